"""A sweep request (the API's body; the CLI and SDK send the same JSON) and its grid, each point validated as
a full job spec before anything is written.

Grid points are the cartesian product of the grid's value lists, keys in sorted order (so point index i
means the same point whatever order a JSON store gives the keys back in). An unknown grid key is a 422
that names the closest field; a failing point is a 422 naming it.
"""
from __future__ import annotations

import itertools
import json
import math
import typing
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from jobs.errors import InvalidInput, TooLarge, did_you_mean
from jobs.searchspace import FORBIDDEN_KEYS, KEY_PATTERN, SearchConfig, check_spec_keys
from jobs.settings import get_settings
from jobs.specs import TEXT_PATTERN, AnySpec, parse_spec
from jobs.vocabulary import SweepStrategy

GRID_KEY_PATTERN = KEY_PATTERN


METRIC_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.]*$"


DEFAULT_METRIC = {"approx": "error", "learn": "error", "train": "val_top1", "compress": "val_top1",
                  "latency": "speedup"}
EPOCH_KINDS = {"train": "epochs", "compress": "finetune_epochs"}  # kinds with epochs (early stopping): their field


FORBIDDEN_GRID_KEYS = FORBIDDEN_KEYS


class EarlyStopping(BaseModel):
    """Successive halving: at each of `epochs`, stop the points worse than the best `keep` fraction."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field("val_top1", min_length=1, max_length=128, pattern=METRIC_PATTERN,
                        description="a metric recorded at epoch ends (val_top1, val_loss, train_loss, ...)")
    mode: Literal["max", "min"] = Field("max", description="max: higher is better; min: lower is better")
    epochs: list[int] = Field(min_length=1, max_length=64, description="milestone epochs (1-based), increasing")
    keep: float = Field(0.5, gt=0, lt=1, description="fraction of points kept at each milestone")
    min_points: int | None = Field(None, ge=1, description="points with a value before a milestone is judged "
                                                           "(default all: synchronous halving; 1: asynchronous)")

    @field_validator("epochs")
    @classmethod
    def _increasing(cls, epochs: list[int]) -> list[int]:
        if any(e < 1 for e in epochs):
            raise ValueError("milestone epochs are 1-based: each must be >= 1")
        if any(b <= a for a, b in zip(epochs, epochs[1:])):
            raise ValueError(f"milestone epochs must be strictly increasing, got {epochs}")
        return epochs


class SweepCreate(BaseModel):
    """A sweep: `base` job spec, `grid` of dotted spec paths -> value lists, `seeds`."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1, max_length=200, pattern=TEXT_PATTERN)
    base: dict[str, Any] = Field(description="a job spec (approx | learn | train | compress | latency); grid values override "
                                             "its fields")
    grid: dict[str, list[Any]] = Field(
        default_factory=dict, max_length=32,
        description='dotted spec path -> values, e.g. {"rank": [1, 2, 4], "weights.d": [128, 256]}')
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, max_length=10_000,
                             description="one job per grid point and seed (sets the spec's seed)")
    early_stopping: EarlyStopping | None = Field(None, description="train and compress (fine-tune epochs) sweeps "
                                                                   "only: successive halving")
    # Search sweeps (jobs/search.py): a sampler asks the points instead of a grid.
    strategy: SweepStrategy = Field("grid", description="grid: every grid point; search: points "
                                                                    "asked by a sampler (needs `search`)")
    search: SearchConfig | None = Field(None, description="strategy search: space, objectives, n_trials, "
                                                          "parallelism, sampler, pruner")

    @field_validator("grid")
    @classmethod
    def _grid(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            check_spec_keys([key], "grid key", "a sweep")
            if not values:
                raise ValueError(f"grid key {key!r} has an empty value list")
            seen = set()
            for v in values:
                k = json.dumps(v, sort_keys=True)
                if k in seen:
                    raise ValueError(f"grid key {key!r} lists the value {v!r} twice")
                seen.add(k)
        check_spec_keys(grid, "grid key", "a sweep")
        return grid

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: list[int]) -> list[int]:
        for s in seeds:
            if not 0 <= s <= 2**63 - 1:
                raise ValueError(f"seeds must be between 0 and 2**63-1, got {s}")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {seeds}")
        return seeds

    @model_validator(mode="after")
    def _base_kind(self) -> SweepCreate:
        if self.base.get("kind") not in DEFAULT_METRIC:
            raise ValueError(f"base.kind must be one of {sorted(DEFAULT_METRIC)}, got {self.base.get('kind')!r}")
        if self.early_stopping is not None and self.base["kind"] not in EPOCH_KINDS:
            raise ValueError(f"early_stopping is for train sweeps and compress sweeps (epochs, fine-tune epochs); this "
                             f"sweep's kind is {self.base['kind']!r}")
        if self.strategy == "search":
            if self.search is None:
                raise ValueError("strategy 'search' needs `search` (space, objectives, n_trials)")
            if self.grid:
                raise ValueError("a search sweep has no grid: its points come from search.space")
            if self.early_stopping is not None:
                raise ValueError("a search sweep stops trials with search.pruner, not early_stopping")
        elif self.search is not None:
            raise ValueError("`search` needs strategy 'search' (this sweep's strategy is 'grid')")
        return self


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The grid's points in index order: the product of the value lists, keys sorted."""
    keys = sorted(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def set_path(spec: dict[str, Any], key: str, value: Any, where: tuple[str, ...] = ("grid",)) -> None:
    """spec[key] = value through the dotted path (nested objects copied); `where` is the request field
    the key belongs to (("grid",), or ("search", "space") for a search), named in the error."""
    parts = key.split(".")
    node = spec
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise InvalidInput(f"{where[-1]} key {key!r}: base.{'.'.join(parts[:i + 1])} is {child!r}, not an "
                               f"object, so it has no field {parts[i + 1]!r}", (*where, key))
        else:
            child = node[part] = dict(child)  # copy: points must not share nested dicts
        node = child
    node[parts[-1]] = value


def point_label(point: dict[str, Any]) -> str:
    return json.dumps(point, separators=(", ", ": "))


def validation_message(exc: pydantic.ValidationError, kind: str) -> tuple[str, tuple[str | int, ...]]:
    """First error as 'field.path: message' and its loc (the union's kind tag dropped)."""
    errors = exc.errors()
    parts = []
    first_loc: tuple[str | int, ...] = ()
    for e in errors[:3]:
        loc = tuple(e["loc"])
        if loc and loc[0] == kind:
            loc = loc[1:]
        if not first_loc:
            first_loc = loc
        parts.append(f"{'.'.join(str(x) for x in loc) or '(spec)'}: {e['msg']}")
    more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more, first_loc


def _spec_model(kind: str) -> type[BaseModel] | None:
    for cls in typing.get_args(AnySpec):
        field = cls.model_fields.get("kind")
        if field is not None and field.default == kind:
            return cls
    return None


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a field's annotation allows (through Annotated, unions and Optional)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m_ for arg in typing.get_args(annotation) for m_ in _models_in(arg)]


def check_grid_keys(kind: str, grid: dict[str, Any], where: tuple[str, ...] = ("grid",)) -> None:
    """Every grid key names a field of a `kind` spec (dotted through nested objects): an unknown key is
    a 422 that leads with it and suggests the closest field, before any point is validated (whose first
    error could be an unrelated one, e.g. a missing rank when the key meant to set it is misspelled)."""
    root = _spec_model(kind)
    for key in grid:
        models = [root] if root is not None else []
        for depth, part in enumerate(key.split(".")):
            if not models or any(mdl.model_config.get("extra") != "forbid" for mdl in models):
                break  # a free-form object (or not a model): nothing to check below it
            fields = {name: f for mdl in models for name, f in mdl.model_fields.items()}
            if part not in fields:
                parent = f"a {kind} spec" if depth == 0 else f"{'.'.join(key.split('.')[:depth])}"
                raise InvalidInput(f"{where[-1]} key {key!r}: {part!r} is not a field of {parent}"
                                   f"{did_you_mean(part, fields)} (fields: {', '.join(sorted(fields))})", (*where, key))
            models = _models_in(fields[part].annotation)


def expand(req: SweepCreate) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Validate every grid point as a full job spec: [(point, canonical spec without seed)], index order.

    Raises TooLarge over LOWRANK_MAX_SWEEP_POINTS, InvalidInput naming an unknown grid key or the first
    failing point."""
    check_grid_keys(req.base["kind"], req.grid)
    limit = get_settings().max_sweep_points
    n_points = math.prod(len(v) for v in req.grid.values())
    total = n_points * len(req.seeds)
    if total > limit:
        raise TooLarge(f"this sweep has {n_points} grid points x {len(req.seeds)} seeds = {total} jobs, over the "
                       f"limit of {limit} (LOWRANK_MAX_SWEEP_POINTS)", jobs=total, limit=limit)
    kind = req.base["kind"]
    out = []
    for i, point in enumerate(grid_points(req.grid)):
        spec = dict(req.base)
        for key, value in point.items():
            set_path(spec, key, value)
        spec["seed"] = req.seeds[0]
        try:
            parsed = parse_spec(spec)
        except pydantic.ValidationError as exc:
            msg, loc = validation_message(exc, kind)
            grid_key = next((k for k in point if tuple(k.split(".")) == tuple(str(x) for x in loc[:len(k.split("."))])),
                            None)
            where = ("grid", grid_key) if grid_key else ("base", *loc)
            raise InvalidInput(f"grid point #{i} {point_label(point)} is not a valid {kind} job spec: {msg}",
                               where, point=point, point_index=i) from None
        out.append((point, parsed))
    if req.early_stopping is not None:
        field = EPOCH_KINDS[kind]
        max_epochs = max(getattr(p, field) for _, p in out)
        bad = [e for e in req.early_stopping.epochs if e >= max_epochs]
        if bad:
            raise InvalidInput(f"early_stopping.epochs {bad} must be below the points' {field} ({max_epochs}): "
                               "a milestone at or after the last epoch stops nothing", ("early_stopping", "epochs"))
        if req.early_stopping.min_points is not None and req.early_stopping.min_points > n_points:
            raise InvalidInput(f"early_stopping.min_points must be <= the number of grid points ({n_points}), "
                               f"got {req.early_stopping.min_points}", ("early_stopping", "min_points"))
    return out
