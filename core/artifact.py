"""The compressed model's artifact: one safetensors file that rebuilds the network exactly.

The file holds the model's state_dict (every parameter and buffer, factored halves included) and,
in the safetensors header under `SPEC_KEY`, a JSON spec:

    {"format": 1,
     "architecture": {"model": "resnet18", "num_classes": 10, "small_input": false},
     "factored": [{"layer": "layer1.0.conv1", "kind": "conv", "rank": 12}, ...],
     "bn_folded_into_weights": false,
     "extra": {...}}            # method, options, block contexts (the BN folding used), source, ...

`build_from_spec` builds the architecture with core.models and swaps each listed layer for a
FactoredConv2d/FactoredLinear of that rank; core.source.load_source_model then checks every key
and shape and loads the weights, so `load_compressed(path)` gives back the same function (test:
outputs equal). BatchNorms stay modules (their folding into `D, c` is only used by the
compression objective), so a loaded model can be fine-tuned or compressed again.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.layers import FactoredConv2d, FactoredLinear, factored_modules
from core.source import SourceError
from core.surgery import get_module, replace_module

__all__ = ["SPEC_KEY", "FORMAT", "model_spec", "save_compressed", "parse_spec", "build_from_spec", "load_compressed"]

SPEC_KEY = "lowrank_compressed"
FORMAT = 1


def model_spec(model: nn.Module, architecture: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The rebuild spec of `model` (its factored layers read off the model itself)."""
    factored = [{"layer": name, "kind": "conv" if isinstance(mod, FactoredConv2d) else "linear", "rank": mod.rank}
                for name, mod in factored_modules(model)]
    arch = {"model": architecture["model"], "num_classes": int(architecture["num_classes"]),
            "small_input": bool(architecture["small_input"])}
    return {"format": FORMAT, "architecture": arch, "factored": factored, "bn_folded_into_weights": False,
            "extra": extra or {}}


def save_compressed(path: str | os.PathLike, model: nn.Module, architecture: dict[str, Any],
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `model` and its spec to the safetensors file `path` atomically; returns the spec.

    architecture: `{"model", "num_classes", "small_input"}` as core.models.build_model takes them.
    extra: JSON-able facts kept with the weights (method, report summary, ...).
    """
    from safetensors.torch import save_file

    spec = model_spec(model, architecture, extra)
    text = json.dumps(spec)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={SPEC_KEY: text})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return spec


def parse_spec(text: str, path: str | os.PathLike = "<spec>") -> dict[str, Any]:
    """The spec from its JSON text, checked; SourceError naming the file and the bad field."""
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SourceError(f"source: {path}: the compressed-model spec is not valid JSON ({exc.msg})") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise SourceError(f"source: {path}: unsupported compressed-model spec format "
                          f"{spec.get('format') if isinstance(spec, dict) else None!r} (this version reads {FORMAT})")
    arch = spec.get("architecture")
    if not isinstance(arch, dict) or not isinstance(arch.get("model"), str) \
            or not isinstance(arch.get("num_classes"), int) or not isinstance(arch.get("small_input"), bool):
        raise SourceError(f"source: {path}: spec field architecture must hold model (str), num_classes (int), small_input (bool)")
    entries = spec.get("factored")
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("layer"), str) and e.get("kind") in ("conv", "linear")
            and isinstance(e.get("rank"), int) and e["rank"] >= 1 for e in entries):
        raise SourceError(f"source: {path}: spec field factored must be a list of "
                          "{layer: str, kind: conv|linear, rank: int >= 1}")
    return spec


def build_from_spec(spec: dict[str, Any]) -> nn.Module:
    """The architecture of `spec` with its factored layers in place (weights: a throw-away init)."""
    from core.models import MODELS, build_model

    arch = spec["architecture"]
    if arch["model"] not in MODELS:
        raise SourceError(f"source: spec architecture.model must be one of {', '.join(MODELS)}, got {arch['model']!r}")
    with torch.random.fork_rng(devices=[]):
        net = build_model(arch["model"], num_classes=arch["num_classes"], small_input=arch["small_input"])
        for entry in spec["factored"]:
            try:
                layer = get_module(net, entry["layer"])
            except KeyError as exc:
                raise SourceError(f"source: spec factored layer {entry['layer']!r}: {exc.args[0]}") from None
            want = nn.Conv2d if entry["kind"] == "conv" else nn.Linear
            if type(layer) is not want:
                raise SourceError(f"source: spec factored layer {entry['layer']!r} is a {type(layer).__name__} "
                                  f"in {arch['model']}, not a {want.__name__}")
            m, d = layer.weight.shape[0], layer.weight[0].numel()
            r = entry["rank"]
            if r > min(m, d):
                raise SourceError(f"source: spec factored layer {entry['layer']!r}: rank {r} exceeds min({m}, {d})")
            U, V = torch.zeros(m, r), torch.zeros(r, d)
            new = FactoredConv2d.from_conv(layer, U, V) if want is nn.Conv2d else FactoredLinear.from_linear(layer, U, V)
            replace_module(net, entry["layer"], new)
    return net


def load_compressed(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """`(model in eval mode on the CPU, spec)` from a file written by save_compressed."""
    from core.source import load_source_model

    if not _has_spec(path):
        raise SourceError(f"source: {path} is not a compressed model (no safetensors file with a {SPEC_KEY!r} "
                          "spec in its header)")
    model, info = load_source_model(path)
    return model, info.compressed_spec


def _has_spec(path: str | os.PathLike) -> bool:
    from safetensors import safe_open

    if Path(path).suffix.lower() != ".safetensors" or not Path(path).is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as fh:
            return SPEC_KEY in (fh.metadata() or {})
    except Exception:  # unreadable: not ours (load_source_model would say why)
        return False
