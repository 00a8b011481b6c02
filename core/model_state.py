"""Every registered model's state_dict keys and shapes, without torch: the API checks an uploaded
state_dict against the architecture a compress job names before the job is queued.

`core/model_state.json` holds, per model (num_classes=10, the standard stem): `keys`, every
`[name, shape]` of `build_model(model).state_dict()` in its order; `classifier`, the keys whose first
dimension is num_classes; `small_input`, the keys whose shape differs with the small-input stem and
their shapes there. It is generated from core.models (`python -m core.model_state --write`);
tests/core/test_model_state.py rebuilds it from the real models and fails on any difference (a
changed model or torchvision must regenerate it, as for core/model_layers.json).

`state_problems` compares a file's `{name: shape}` with an architecture's, in the words
core.source.check_state_dict uses (it calls the same function): the first mismatched key in the
model's order with both shapes, then the missing and the unexpected keys.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

TABLE_PATH = Path(__file__).with_name("model_state.json")
TOLERATED_MISSING = ("num_batches_tracked",)  # a BN counter: irrelevant to eval and to compression
DP_PREFIX = "module."  # DataParallel / DDP


@functools.cache
def state_table() -> dict[str, Any]:
    """The stored table (see the module docstring), read once."""
    return json.loads(TABLE_PATH.read_text())


def expected_shapes(model: str, *, num_classes: int = 10, small_input: bool = False) -> dict[str, tuple[int, ...]]:
    """`{key: shape}` of `build_model(model, num_classes, small_input).state_dict()`, in its order."""
    entry = state_table()[model]
    out = {name: tuple(shape) for name, shape in entry["keys"]}
    for name in entry["classifier"]:
        out[name] = (num_classes, *out[name][1:])
    if small_input:
        out.update({name: tuple(shape) for name, shape in entry["small_input"].items()})
    return out


def strip_dp_prefix(shapes: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """`shapes` without a DataParallel `module.` prefix when every key has it; and whether it was stripped."""
    if shapes and all(k.startswith(DP_PREFIX) for k in shapes):
        return {k[len(DP_PREFIX):]: v for k, v in shapes.items()}, True
    return dict(shapes), False


def infer_num_classes(model: str, shapes: Mapping[str, Sequence[int]]) -> int | None:
    """The class count the file's classifier weight says (None: no such 2-D key)."""
    weight = next((k for k in state_table()[model]["classifier"] if k.endswith("weight")), None)
    shape = shapes.get(weight) if weight else None
    return int(shape[0]) if shape is not None and len(shape) == 2 else None


def infer_small_input(model: str, shapes: Mapping[str, Sequence[int]]) -> bool | None:
    """Whether a ResNet's stem is the small-input 3x3 one (None: not visible in the weights, as for EfficientNet)."""
    entry = state_table()[model]
    if not entry["small_input"]:
        return None
    key, small = next(iter(entry["small_input"].items()))
    given = shapes.get(key)
    return None if given is None else tuple(given) == tuple(small)


def _listing(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def state_problems(expected: Mapping[str, Sequence[int]], given: Mapping[str, Sequence[int]]) -> list[str]:
    """What keeps `given` ({key: shape}) from loading into a model whose state_dict is `expected`: the first
    mismatched key (in the model's order), the missing keys (BN counters may be absent), the unexpected ones.
    Empty when it fits."""
    missing = [k for k in expected if k not in given and not k.endswith(TOLERATED_MISSING)]
    unexpected = [k for k in given if k not in expected]
    mismatched = [k for k in expected if k in given and tuple(given[k]) != tuple(expected[k])]
    problems = []
    if mismatched:
        k = mismatched[0]
        problems.append(f"first mismatched key {k!r}: file has shape {tuple(given[k])}, "
                        f"the model expects {tuple(expected[k])}"
                        + (f" ({len(mismatched)} mismatched in all)" if len(mismatched) > 1 else ""))
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    return problems


def build_table() -> dict[str, Any]:
    """The table from the real models (imports torch): what `--write` stores and the test compares."""
    import torch

    from core.models import build_model
    from core.names import MODELS

    table: dict[str, Any] = {}
    for name in MODELS:
        with torch.random.fork_rng(devices=[]):
            base = {k: list(v.shape) for k, v in build_model(name, num_classes=10).state_dict().items()}
            other = {k: list(v.shape) for k, v in build_model(name, num_classes=7).state_dict().items()}
            small = {k: list(v.shape) for k, v in build_model(name, num_classes=10, small_input=True)
                     .state_dict().items()}
        assert list(base) == list(other) == list(small), name
        table[name] = {"classifier": [k for k in base if base[k] != other[k]],
                       "small_input": {k: small[k] for k in base if base[k] != small[k]},
                       "keys": [[k, s] for k, s in base.items()]}
    return table


def dumps_table(table: dict[str, Any]) -> str:
    """JSON with one key per line (readable diffs)."""
    parts = []
    for model, entry in table.items():
        rows = ",\n".join("    " + json.dumps(row) for row in entry["keys"])
        head = ", ".join(f'"{k}": {json.dumps(entry[k])}' for k in ("classifier", "small_input"))
        parts.append(f'  "{model}": {{{head}, "keys": [\n{rows}\n  ]}}')
    return "{\n" + ",\n".join(parts) + "\n}\n"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m core.model_state --write   (regenerates core/model_state.json)")
    TABLE_PATH.write_text(dumps_table(build_table()))
    print(f"wrote {TABLE_PATH}")
