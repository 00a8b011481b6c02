"""Load a trained source network for compression (MATH.md Section 8): weights from a file, checked.

Accepted files (never unpickled: `.pt` is read with `torch.load(weights_only=True)` only):

* a train job's checkpoint `last.pt` (core/train.py: a dict with `format`, `config`, `model`): the
  architecture, `num_classes` and `small_input` come from its config; a factored train run is
  rebuilt with its factored structure (`factorize_model(compute_init=False)`) before loading;
* a compressed model written by `core.artifact.save_compressed` (safetensors with its rebuild spec);
* a plain state_dict in safetensors or `.pt`/`.pth` (also `{"state_dict": ...}` / `{"model": ...}`
  wrappers, and a DataParallel `module.` prefix, which is stripped and said so) plus the architecture
  name; `num_classes` is read off the classifier's weight and, for ResNets, `small_input` off the
  stem's kernel, unless given.

Every key and shape is checked against the architecture before anything is loaded: a mismatch is a
`SourceError` naming the first mismatched key (in the model's order) with both shapes, and the
missing and unexpected keys.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["SourceError", "SourceInfo", "read_weights_file", "check_state_dict", "load_source_model"]

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")


class SourceError(ValueError):
    """A source model that cannot be loaded as asked; the message names the file, field or key."""


@dataclass
class SourceInfo:
    """Where the weights came from and what was built. JSON-able via `to_dict()`."""

    path: str
    kind: str                       # train_checkpoint | compressed | state_dict
    model: str
    num_classes: int
    small_input: bool
    tensors: int
    notes: list[str] = field(default_factory=list)
    train_config: dict[str, Any] | None = None
    compressed_spec: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_tensor_mapping(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def read_weights_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`(state_dict, meta)` from a safetensors or weights-only torch file.

    meta: `{"kind": "train_checkpoint", "config": {...}}`, `{"kind": "compressed", "spec": {...}}`
    or `{"kind": "state_dict"}`; plus `notes` (list of str) on what was unwrapped.
    """
    path = Path(path)
    if not path.exists():
        raise SourceError(f"source: file not found: {path}")
    if not path.is_file():
        raise SourceError(f"source: not a file: {path}")
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise SourceError(f"source: {path}: unsupported format {suffix or '(no suffix)'!r}; "
                          f"use one of {', '.join(WEIGHT_SUFFIXES)}")
    notes: list[str] = []
    if suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                header = fh.metadata() or {}
                state = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as exc:  # truncated or foreign files: one line naming the file
            raise SourceError(f"source: {path}: not a readable safetensors file "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
        from core.artifact import SPEC_KEY, parse_spec

        if SPEC_KEY in header:
            return state, {"kind": "compressed", "spec": parse_spec(header[SPEC_KEY], path), "notes": notes}
        return state, {"kind": "state_dict", "notes": notes}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickled objects, non-allowlisted globals, truncated files
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise SourceError(f"source: {path}: not a readable torch file with weights_only=True "
                          f"({type(exc).__name__}: {first})") from None
    if isinstance(obj, Mapping) and {"format", "config", "model"} <= set(obj) and isinstance(obj["config"], Mapping):
        if not _is_tensor_mapping(obj["model"]):
            raise SourceError(f"source: {path}: a train checkpoint whose 'model' is not a state_dict")
        return dict(obj["model"]), {"kind": "train_checkpoint", "config": dict(obj["config"]), "notes": notes}
    if isinstance(obj, Mapping) and not _is_tensor_mapping(obj):
        inner = [k for k in _WRAPPER_KEYS if k in obj and _is_tensor_mapping(obj[k])]
        if len(inner) == 1:
            notes.append(f"state_dict read from the file's {inner[0]!r} entry")
            obj = obj[inner[0]]
    if not _is_tensor_mapping(obj):
        what = type(obj).__name__
        raise SourceError(f"source: {path}: holds a {what}, expected a state_dict (a mapping of names to "
                          f"tensors), a train checkpoint or {{'state_dict': ...}}")
    return dict(obj), {"kind": "state_dict", "notes": notes}


def _strip_prefix(state: dict[str, torch.Tensor], notes: list[str]) -> dict[str, torch.Tensor]:
    from core.model_state import strip_dp_prefix

    state, stripped = strip_dp_prefix(state)
    if stripped:
        notes.append("stripped the 'module.' prefix (a DataParallel/DDP state_dict)")
    return state


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise SourceError unless `state` has exactly `model`'s keys and shapes, finite values.

    `what` describes the architecture in the message (e.g. "resnet18 (num_classes=10)"). The first
    mismatched key is the first in the model's own state_dict order. BN `num_batches_tracked`
    counters may be absent. The comparison is core.model_state.state_problems, which the API applies to
    an upload's tensor listing before a compress job is queued.
    """
    from core.model_state import state_problems

    problems = state_problems({k: tuple(v.shape) for k, v in model.state_dict().items()},
                              {k: tuple(v.shape) for k, v in state.items()})
    if problems:
        raise SourceError(f"source: the weights do not fit {what}: " + "; ".join(problems))
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise SourceError(f"source: tensor {k!r} has NaN/Inf entries; weights must be finite")


def _infer_num_classes(model_name: str, state: Mapping[str, torch.Tensor]) -> int | None:
    from core.model_state import infer_num_classes

    return infer_num_classes(model_name, {k: tuple(v.shape) for k, v in state.items()})


def _infer_small_input(model_name: str, state: Mapping[str, torch.Tensor]) -> bool | None:
    # small-input ResNets have a 3x3 stem (7x7 otherwise); EfficientNet's differs in stride only (None)
    from core.model_state import infer_small_input

    return infer_small_input(model_name, {k: tuple(v.shape) for k, v in state.items()})


def _resolve_arch(kind: str, meta: dict[str, Any], state: Mapping[str, torch.Tensor], model: str | None,
                  num_classes: int | None, small_input: bool | None) -> tuple[str, int, bool]:
    from core.models import MODELS

    if kind == "train_checkpoint":
        cfg = meta["config"]
        for name, given, saved in (("model", model, cfg.get("model")),
                                   ("small_input", small_input, cfg.get("small_input"))):
            if given is not None and saved is not None and given != saved:
                raise SourceError(f"{name}: the checkpoint was trained with {name}={saved!r}, got {given!r}")
        model = cfg.get("model")
        small_input = bool(cfg.get("small_input", False)) if small_input is None else small_input
    if model is None:
        raise SourceError(f"model: a plain state_dict does not say its architecture; give one of {', '.join(MODELS)}")
    if model not in MODELS:
        raise SourceError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
    inferred = _infer_num_classes(model, state)
    if num_classes is None:
        num_classes = inferred if inferred is not None else 10
    if small_input is None:
        small_input = bool(_infer_small_input(model, state))
    return model, int(num_classes), bool(small_input)


def load_source_model(path: str | os.PathLike, model: str | None = None, *, num_classes: int | None = None,
                      small_input: bool | None = None) -> tuple[nn.Module, SourceInfo]:
    """The trained network stored at `path`, in eval mode on the CPU, and where it came from.

    model / num_classes / small_input: the architecture (core.models); required only as far as the
    file does not say it (see the module docstring). Raises SourceError with one clear line.
    """
    from core.models import build_model

    state, meta = read_weights_file(path)
    kind, notes = meta["kind"], list(meta["notes"])
    if kind == "compressed":
        from core.artifact import build_from_spec

        spec = meta["spec"]
        arch = spec["architecture"]
        for name, given in (("model", model), ("num_classes", num_classes), ("small_input", small_input)):
            if given is not None and given != arch[name]:
                raise SourceError(f"{name}: the compressed model was built with {name}={arch[name]!r}, got {given!r}")
        net = build_from_spec(spec)
        what = f"the compressed {arch['model']} of {path}"
        model, num_classes, small_input = arch["model"], arch["num_classes"], arch["small_input"]
    else:
        state = _strip_prefix(state, notes)
        model, num_classes, small_input = _resolve_arch(kind, meta, state, model, num_classes, small_input)
        with torch.random.fork_rng(devices=[]):  # the throw-away init must not move the caller's RNG
            net = build_model(model, num_classes=num_classes, small_input=small_input)
            cfg = meta.get("config") or {}
            if kind == "train_checkpoint" and (cfg.get("rank") is not None or cfg.get("rank_ratio") is not None):
                from core.factorize import factorize_model

                factorize_model(net, rank=cfg.get("rank"), rank_ratio=cfg.get("rank_ratio"),
                                method=cfg.get("init", "nkp"), include=cfg.get("include"),
                                exclude=cfg.get("exclude"), compute_init=False)
                notes.append(f"factored train run (rank={cfg.get('rank')}, rank_ratio={cfg.get('rank_ratio')}): "
                             "its factored layers are kept as they are")
        what = f"{model} (num_classes={num_classes}, small_input={small_input})"
    check_state_dict(net, state, what)
    net.load_state_dict(state, strict=False)  # keys were checked; only BN counters may be absent
    net.eval()
    info = SourceInfo(path=str(path), kind=kind, model=model, num_classes=num_classes, small_input=small_input,
                      tensors=len(state), notes=notes, train_config=meta.get("config"),
                      compressed_spec=meta.get("spec"))
    return net, info
