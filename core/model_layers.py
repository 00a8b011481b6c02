"""Which layers a factorization would change, decided without torch (the API validates train specs with it).

`core/model_layers.json` is a table, per registered model, of every plain Conv2d/Linear in
registration order as `[name, kind, m, d, groups]` (the matrix view `m x d = out x in*kh*kw`;
the classifier's `m` is null: it is `num_classes`), the stem conv's `[m, d]` with the small-input
stem, and which layers are the stem and the classifier. It is generated from core.models
(`python -m core.model_layers --write`); tests/core/test_model_layers.py rebuilds it from the real
models and fails on any difference, and checks `plan` against `core.factorize.factorize_model`.

`plan` applies factorize_model's rules to the table: include/exclude narrow the layers (unknown
names are errors), grouped/depthwise convs, the stem and the classifier stay dense unless named in
`include`, and a layer stays full rank when its rank r gives `r (m + d) >= m d`.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TABLE_PATH = Path(__file__).with_name("model_layers.json")


def resolve_rank(m: int, d: int, *, rank: int | None, rank_ratio: float | None) -> int:
    """The rank for an `m x d` layer: `min(rank, m, d)`, or `max(1, round(rank_ratio * min(m, d)))`."""
    full = min(m, d)
    if rank is not None:
        return min(int(rank), full)
    assert rank_ratio is not None
    return max(1, min(full, int(round(rank_ratio * full))))


def shrinks(m: int, d: int, r: int) -> bool:
    """True when rank-r factors `U (m, r)`, `V (r, d)` hold fewer weights than the `m x d` matrix."""
    return r * (m + d) < m * d


@functools.cache
def layer_table() -> dict[str, Any]:
    """The stored table (see the module docstring), read once."""
    return json.loads(TABLE_PATH.read_text())


@dataclass(frozen=True)
class PlannedLayer:
    """One Conv2d/Linear of a model: its matrix view `m x d` (m None: the classifier of a data set whose
    class count is unknown here), and what a factorization does to it: status `factored` (at `rank`),
    `full_rank` (factoring would not shrink it), `skipped` (`reason`) or `unknown` (m unknown)."""

    name: str
    m: int | None
    d: int
    status: str
    rank: int | None = None
    reason: str | None = None


def matches(name: str, pattern: str) -> bool:
    """True when layer `name` is `pattern` or lies under it (pattern "layer1" covers "layer1.0.conv1")."""
    return name == pattern or name.startswith(pattern + ".")


def check_layer_names(field: str, patterns: list[str] | None, names: list[str]) -> None:
    """ValueError naming `field` when a pattern matches no layer name (nor a prefix of one)."""
    unknown = [p for p in patterns or [] if not any(matches(n, p) for n in names)]
    if unknown:
        sample = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise ValueError(f"{field}: no Conv2d/Linear layer named {', '.join(map(repr, unknown))} "
                         f"(nor under it); layers are named like {sample}")


def plan(model: str, *, rank: int | None = None, rank_ratio: float | None = None,
         include: list[str] | None = None, exclude: list[str] | None = None,
         num_classes: int | None = None, small_input: bool = False) -> list[PlannedLayer]:
    """What `factorize_model(build_model(model, num_classes, small_input), rank=..., ...)` does per layer.

    Exactly one of rank / rank_ratio. ValueError (naming include/exclude) for unknown layer names or
    an explicitly included grouped conv, as factorize_model raises."""
    entry = layer_table()[model]
    rows = entry["layers"]
    names = [row[0] for row in rows]
    check_layer_names("include", include, names)
    check_layer_names("exclude", exclude, names)
    out = []
    for name, kind, m, d, groups in rows:
        if name == entry["stem"] and small_input:
            m, d = entry["stem_small_input"]
        if name == entry["classifier"]:
            m = num_classes
        explicitly = include is not None and name in include

        def skipped(reason: str) -> PlannedLayer:
            return PlannedLayer(name, m, d, "skipped", reason=reason)

        if include and not any(matches(name, p) for p in include):
            out.append(skipped("not included"))
        elif any(matches(name, p) for p in exclude or []):
            out.append(skipped("excluded"))
        elif kind == "conv" and groups != 1:
            if explicitly:
                raise ValueError(f"include: {name} is a grouped conv (groups={groups}); "
                                 "grouped and depthwise convs cannot be factored")
            out.append(skipped(f"grouped conv (groups={groups})"))
        elif not include and name == entry["stem"]:
            out.append(skipped("stem conv"))
        elif not include and name == entry["classifier"]:
            out.append(skipped("classifier"))
        elif m is None:
            out.append(PlannedLayer(name, m, d, "unknown"))
        else:
            r = resolve_rank(m, d, rank=rank, rank_ratio=rank_ratio)
            out.append(PlannedLayer(name, m, d, "factored" if shrinks(m, d, r) else "full_rank", rank=r))
    return out


def no_op_rank_message(model: str, *, rank: int | None, rank_ratio: float | None,
                       include: list[str] | None = None, exclude: list[str] | None = None,
                       num_classes: int | None = None, small_input: bool = False) -> str | None:
    """None when the rank (or rank ratio) factorizes at least one layer; else why not, naming the field
    and the values that would factor something. ValueError for bad include/exclude names."""
    layers = plan(model, rank=rank, rank_ratio=rank_ratio, include=include, exclude=exclude,
                  num_classes=num_classes, small_input=small_input)
    if any(p.status in ("factored", "unknown") for p in layers):
        return None
    considered = [p for p in layers if p.status == "full_rank"]
    narrowed = " of the included layers" if include or exclude else ""
    if not considered:
        return (f"include/exclude leave no layer of {model} to factor (only Conv2d/Linear layers that are "
                "not grouped; the stem and classifier only when named in include)")
    def top(p: PlannedLayer) -> int:  # the largest rank that still shrinks the layer: r (m + d) < m d
        return (p.m * p.d - 1) // (p.m + p.d)

    best = max(considered, key=top if rank is not None else lambda p: top(p) / min(p.m, p.d))
    rule = "every layer would keep its full size: r (m + d) >= m d for an m x d layer at rank r"
    if rank is not None:
        return (f"rank {rank} factorizes no layer{narrowed} of {model} ({rule}); the largest rank that "
                f"factorizes a layer here is {top(best)} ({best.name}, {best.m} x {best.d})")
    ratio_top = top(best) / min(best.m, best.d)
    return (f"rank_ratio {rank_ratio} factorizes no layer{narrowed} of {model} ({rule}); use a rank_ratio "
            f"<= {ratio_top:.3f} ({best.name}, {best.m} x {best.d}, factors at rank <= {top(best)})")


def build_table() -> dict[str, Any]:
    """The table from the real models (imports torch): what `--write` stores and the test compares."""
    from torch import nn

    from core.factorize import candidate_layers
    from core.models import build_model
    from core.names import MODELS

    table: dict[str, Any] = {}
    for name in MODELS:
        model = build_model(name, num_classes=10)
        layers = candidate_layers(model)
        convs = [n for n, mod in layers if isinstance(mod, nn.Conv2d)]
        linears = [n for n, mod in layers if isinstance(mod, nn.Linear)]
        rows = []
        for lname, mod in layers:
            w = mod.weight
            kind = "conv" if isinstance(mod, nn.Conv2d) else "linear"
            m = None if lname == linears[-1] else int(w.shape[0])
            rows.append([lname, kind, m, int(w[0].numel()), int(getattr(mod, "groups", 1))])
        small_stem = dict(candidate_layers(build_model(name, num_classes=10, small_input=True)))[convs[0]].weight
        table[name] = {"stem": convs[0], "classifier": linears[-1],
                       "stem_small_input": [int(small_stem.shape[0]), int(small_stem[0].numel())], "layers": rows}
    return table


def dumps_table(table: dict[str, Any]) -> str:
    """JSON with one layer per line (readable diffs)."""
    parts = []
    for model, entry in table.items():
        rows = ",\n".join("    " + json.dumps(row) for row in entry["layers"])
        head = ", ".join(f'"{k}": {json.dumps(entry[k])}' for k in ("stem", "classifier", "stem_small_input"))
        parts.append(f'  "{model}": {{{head}, "layers": [\n{rows}\n  ]}}')
    return "{\n" + ",\n".join(parts) + "\n}\n"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m core.model_layers --write   (regenerates core/model_layers.json)")
    TABLE_PATH.write_text(dumps_table(build_table()))
    print(f"wrote {TABLE_PATH}")
