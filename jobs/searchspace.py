"""A search sweep's configuration (the `search` object of POST /api/v1/sweeps with strategy "search"):
the space, the objectives, the trial budget and parallelism, the sampler and the pruner. Pure pydantic
(no Optuna import until `distributions` is called), so the request schema costs the API nothing.

    {"space": {"rank": {"type": "int", "low": 1, "high": 32},
               "method": {"type": "categorical", "choices": ["spectral", "nkp"]},
               "lr": {"type": "float", "low": 1e-3, "high": 0.3, "log": true}},
     "objectives": [{"metric": "error", "direction": "minimize"}, {"metric": "params", "direction": "minimize"}],
     "n_trials": 40, "parallelism": 4}

Space keys are dotted spec paths, like a grid's keys (`weights.m`); each trial's point is set on the
base spec, which is then validated as a full job spec. Objectives are numeric keys of the jobs' result
(OBJECTIVE_METRICS), or `params`: the factored parameter count the results table shows (train:
params_factored; approx, learn: rank (m + d)).
"""
from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

METRIC_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.]*$"
KEY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
# Spec fields a sweep (grid or search) may not vary: `kind` fixes the sweep's kind, `seed` comes from `seeds`.
FORBIDDEN_KEYS = ("kind", "seed")
# What an objective may name, per job kind: numeric keys of the result the worker stores
# (worker/runners.py, core/train.py's summary), and `params` (derived, as in the results table).
OBJECTIVE_METRICS: dict[str, tuple[str, ...]] = {
    "approx": ("error", "mc_error", "time_s", "iterations", "rank", "params"),
    "learn": ("error", "nkp_error", "samples", "time_s", "rank", "params"),
    "train": ("val_top1", "best_val_top1", "val_top5", "val_loss", "train_loss", "train_top1", "params",
              "params_factored", "params_dense", "macs_factored", "wall_time_s"),
    "compress": ("val_top1", "top1_compressed", "top1_compressed_before_bn", "top1_dense", "params",
                 "params_compressed", "param_ratio", "macs_compressed", "budget_used", "mean_block_error",
                 "mean_linear_error", "mean_surrogate_error", "run_time_s"),
    # latency: at the spec's first batch size (per batch: speedup_b<N>, latency_ms_b<N>, ... in the result)
    "latency": ("speedup", "latency_ms", "dense_latency_ms", "slower_layers", "params", "params_factored"),
}
# What a pruner may watch: metrics a train job records at every epoch's end.
EPOCH_METRICS = ("val_top1", "val_top5", "val_loss", "train_loss", "train_top1", "lr")
SAMPLERS = ("tpe", "nsga2", "random")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class IntDimension(_Model):
    """Integers low..high (inclusive) in steps of `step`; log: sampled uniformly in log space."""

    type: Literal["int"]
    low: int = Field(ge=-(2**53), le=2**53)
    high: int = Field(ge=-(2**53), le=2**53)
    step: int = Field(1, ge=1, le=2**53)
    log: bool = False

    @model_validator(mode="after")
    def _check(self) -> IntDimension:
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) must be >= low ({self.low})")
        if self.log and self.low < 1:
            raise ValueError(f"log scale needs low >= 1, got {self.low}")
        if self.log and self.step != 1:
            raise ValueError("log scale takes no step (step must be 1)")
        if (self.high - self.low) % self.step:
            raise ValueError(f"high - low ({self.high - self.low}) must be a multiple of step ({self.step})")
        return self

    def probes(self) -> list[Any]:
        return [self.low, self.high]


class FloatDimension(_Model):
    """Reals in [low, high]; log: sampled uniformly in log space; step: a grid of low + k step."""

    type: Literal["float"]
    low: float = Field(ge=-1e300, le=1e300)
    high: float = Field(ge=-1e300, le=1e300)
    log: bool = False
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> FloatDimension:
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) must be >= low ({self.low})")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0, got {self.low}")
        if self.log and self.step is not None:
            raise ValueError("log scale takes no step")
        if self.step is not None:
            k = (self.high - self.low) / self.step
            if not math.isfinite(k) or k > 1e6 or abs(k - round(k)) > 1e-8 * max(1.0, abs(k)):
                raise ValueError(f"high - low ({self.high - self.low:g}) must be a whole multiple of step "
                                 f"({self.step:g}), at most 1e6 steps")
        return self

    def probes(self) -> list[Any]:
        return [self.low, self.high]


class CategoricalDimension(_Model):
    """One of `choices` (any JSON values: strings, numbers, lists, objects)."""

    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1, max_length=1000)

    @field_validator("choices")
    @classmethod
    def _distinct(cls, choices: list[Any]) -> list[Any]:
        seen: set[str] = set()
        for c in choices:
            if not _finite_json(c):
                raise ValueError(f"choice {c!r} holds NaN or an infinity (JSON has neither)")
            k = canonical(c)
            if k in seen:
                raise ValueError(f"choices list {c!r} twice")
            seen.add(k)
        return choices

    def probes(self) -> list[Any]:
        return list(self.choices)


Dimension = Annotated[IntDimension | FloatDimension | CategoricalDimension, Field(discriminator="type")]


class Objective(_Model):
    metric: str = Field(min_length=1, max_length=128, pattern=METRIC_PATTERN,
                        description="a numeric key of the jobs' result (error, val_top1, ...) or params")
    direction: Literal["minimize", "maximize"]


class Pruner(_Model):
    """Stop a train trial whose `metric` at an epoch's end is worse than the `percentile` (50: the median)
    of the completed trials' values at the same epoch (Optuna's PercentilePruner)."""

    metric: str = Field("val_top1", description=f"a metric recorded at epoch ends: {', '.join(EPOCH_METRICS)}")
    direction: Literal["minimize", "maximize"] = "maximize"
    percentile: float = Field(50.0, ge=0, le=100, description="50: prune below the median")
    startup_trials: int = Field(3, ge=0, le=10_000, description="completed trials before anything is pruned")
    warmup_epochs: int = Field(0, ge=0, le=10_000, description="epochs a trial always runs before it may be pruned")

    @field_validator("metric")
    @classmethod
    def _metric(cls, metric: str) -> str:
        if metric not in EPOCH_METRICS:
            raise ValueError(f"pruner.metric must be a metric recorded at epoch ends ({', '.join(EPOCH_METRICS)}), "
                             f"got {metric!r}")
        return metric


class SearchConfig(_Model):
    """What a search sweep explores and optimizes (see the module doc)."""

    space: dict[str, Dimension] = Field(min_length=1, max_length=32,
                                        description="dotted spec path -> int | float | categorical dimension")
    objectives: list[Objective] = Field(min_length=1, max_length=4)
    n_trials: int = Field(ge=1, le=10_000, description="trials in all (told: complete, pruned or failed)")
    parallelism: int | None = Field(None, ge=1, le=1000, description="trials queued or running at once "
                                                                     "(default: 4, or n_trials when fewer)")
    sampler: Literal["tpe", "nsga2", "random"] = Field(
        "tpe", description="tpe (default; one or several objectives), nsga2 (several objectives, large budgets), "
                           "random")
    startup_trials: int | None = Field(None, ge=1, le=100_000, description=(
        "tpe: trials sampled at random before the model is used (default: n_trials // 5, between "
        "parallelism and 10)"))
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds the sampler (the jobs' seeds are `seeds`)")
    pruner: Pruner | None = Field(None, description="train sweeps: stop trials early (intermediate values per epoch)")

    @field_validator("space")
    @classmethod
    def _space(cls, space: dict[str, Any]) -> dict[str, Any]:
        check_spec_keys(space, "space key", "a search")
        return space

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, objectives: list[Objective]) -> list[Objective]:
        names = [o.metric for o in objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"objectives name a metric twice: {names}")
        return objectives

    @model_validator(mode="after")
    def _budget(self) -> SearchConfig:
        if self.parallelism is None:
            self.parallelism = min(4, self.n_trials)
        if self.parallelism > self.n_trials:
            raise ValueError(f"parallelism ({self.parallelism}) must be <= n_trials ({self.n_trials})")
        if self.sampler == "nsga2" and len(self.objectives) < 2:
            raise ValueError("sampler nsga2 is for several objectives; use tpe for one")
        return self

    def n_startup(self) -> int:
        if self.startup_trials is not None:
            return self.startup_trials
        return max(self.parallelism, min(10, self.n_trials // 5), 1)


def optuna_module():
    """Optuna, imported on first use (the API pays for it only when a search sweep is created), quiet: no
    "Trial N finished" line per trial of a study rebuilt from the trial rows."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def check_spec_keys(keys: Any, noun: str, who: str) -> None:
    """Keys a sweep varies (a grid's, a search space's): dotted spec paths, never kind or seed, none
    inside another. ValueError naming the key as `noun` ("grid key") and the sweep as `who` ("a sweep")."""
    for key in keys:
        if not re.fullmatch(KEY_PATTERN, key) or len(key) > 200:
            raise ValueError(f"{noun} {key!r} is not a dotted spec path (e.g. rank, weights.d)")
        if key.split(".")[0] in FORBIDDEN_KEYS:
            raise ValueError(f"{noun} {key!r}: {who} cannot vary {key.split('.')[0]!r} "
                             "(kind is the base's; use `seeds` for seeds)")
    ordered = sorted(keys)
    for a, b in zip(ordered, ordered[1:]):
        if b.startswith(a + "."):
            raise ValueError(f"{noun}s {a!r} and {b!r} overlap (one is inside the other)")


def _finite_json(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite_json(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite_json(v) for v in value)
    return True


def canonical(value: Any) -> str:
    """A JSON value's canonical text: equal values, equal text (1 and 1.0 differ from true)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def check_objectives(kind: str, objectives: list[Objective]) -> None:
    """Every objective names a metric a `kind` job reports (InvalidInput naming the allowed ones)."""
    from jobs.errors import InvalidInput, did_you_mean

    allowed = OBJECTIVE_METRICS.get(kind, ())
    for i, o in enumerate(objectives):
        if o.metric not in allowed:
            raise InvalidInput(f"search.objectives[{i}].metric: {o.metric!r} is not reported by {kind} jobs"
                               f"{did_you_mean(o.metric, allowed)} (allowed: {', '.join(allowed)})",
                               ("search", "objectives", i, "metric"))


def distributions(space: dict[str, Any]) -> dict[str, Any]:
    """Optuna distributions of a space (dict of dimension models or their JSON). A categorical dimension
    is sampled as the index of its choice, so choices may be any JSON values (Optuna's categorical
    parameters must be scalars)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for key, dim in space.items():
        d = dim.model_dump() if isinstance(dim, BaseModel) else dim
        if d["type"] == "int":
            out[key] = IntDistribution(d["low"], d["high"], log=d.get("log", False), step=d.get("step", 1))
        elif d["type"] == "float":
            out[key] = FloatDistribution(d["low"], d["high"], log=d.get("log", False), step=d.get("step"))
        else:
            out[key] = CategoricalDistribution(list(range(len(d["choices"]))))
    return out


def to_point(space: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Optuna's params -> the trial's point (categorical indices -> their choices), keys in sorted order."""
    out = {}
    for key in sorted(space):
        d = space[key]
        v = params[key]
        if d["type"] == "categorical":
            out[key] = d["choices"][int(v)]
        elif d["type"] == "int":
            out[key] = int(v)
        else:
            out[key] = float(v)
    return out


def to_params(space: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """The trial's point -> Optuna's params (choices -> their indices)."""
    out = {}
    for key, d in space.items():
        v = point[key]
        if d["type"] == "categorical":
            out[key] = [canonical(c) for c in d["choices"]].index(canonical(v))
        else:
            out[key] = v
    return out


# ---------------------------------------------------------------------------------------------
# The points of a space (jobs/search.py replaces a sampler's repeated point with an unseen one).

ENUMERATE_UP_TO = 20_000  # points of a discrete space listed to pick an unseen one; above, rejection sampling


def space_size(cfg: SearchConfig) -> int | None:
    """Points in the space when every dimension is discrete (int, categorical, float with a step); None
    when it is continuous."""
    size = 1
    for dim in cfg.space.values():
        d = dim.model_dump()
        if d["type"] == "categorical":
            size *= len(d["choices"])
        elif d["type"] == "int" and not d["log"]:
            size *= (d["high"] - d["low"]) // d["step"] + 1
        elif d["type"] == "int":
            size *= d["high"] - d["low"] + 1
        elif d.get("step"):
            size *= round((d["high"] - d["low"]) / d["step"]) + 1
        else:
            return None
    return size


def unseen_point(cfg: SearchConfig, space: dict[str, Any], seen: set[str], number: int) -> dict[str, Any] | None:
    """A point not in `seen`, uniformly at random (seeded by the sweep's seed and the trial's number):
    picked from the list of unseen points of a discrete space, else by rejection sampling."""
    import itertools
    import random

    rng = random.Random(cfg.seed * 1_000_003 + number)
    size = space_size(cfg)
    keys = sorted(space)
    if size is not None and size <= ENUMERATE_UP_TO:
        axes = [_values(space[k]) for k in keys]
        unseen = [p for p in (dict(zip(keys, c)) for c in itertools.product(*axes)) if canonical(p) not in seen]
        return rng.choice(unseen) if unseen else None
    for _ in range(1000):
        point = {k: _random_value(space[k], rng) for k in keys}
        if canonical(point) not in seen:
            return point
    return None


def _values(d: dict[str, Any]) -> list[Any]:
    """Every value of a discrete dimension."""
    if d["type"] == "categorical":
        return list(d["choices"])
    if d["type"] == "int":
        return list(range(d["low"], d["high"] + 1, d.get("step", 1)))
    n = round((d["high"] - d["low"]) / d["step"])
    return [float(d["low"] + k * d["step"]) for k in range(n + 1)]


def _random_value(d: dict[str, Any], rng: Any) -> Any:
    if d["type"] == "categorical":
        return rng.choice(d["choices"])
    if d["type"] == "int":
        if d.get("log"):
            return min(d["high"], max(d["low"], round(math.exp(rng.uniform(math.log(d["low"]),
                                                                         math.log(d["high"]))))))
        return rng.randrange(d["low"], d["high"] + 1, d.get("step", 1))
    if d.get("step"):
        return float(d["low"] + rng.randint(0, round((d["high"] - d["low"]) / d["step"])) * d["step"])
    if d.get("log"):
        return math.exp(rng.uniform(math.log(d["low"]), math.log(d["high"])))
    return rng.uniform(d["low"], d["high"])


__all__ = ["CategoricalDimension", "Dimension", "EPOCH_METRICS", "FloatDimension", "IntDimension",
           "OBJECTIVE_METRICS", "Objective", "Pruner", "SAMPLERS", "SearchConfig", "canonical", "check_objectives",
           "distributions", "space_size", "to_params", "to_point", "unseen_point"]
