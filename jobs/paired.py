"""Paired comparisons of a sweep's grid points against a baseline point, and the Student t they use.

"Does init A beat init B at this rank?": for every grid point p whose value of the baseline key is not
the baseline value, its partner is the grid point with the baseline value and p's other grid values.
Jobs of the two points are paired by seed (seeds with a value at only one of the two are left out and
counted in `n_unpaired`). Per pair the statistic is

    difference:  d = x_p - x_baseline                  (accuracies, losses, anything)
    ratio:       d = ln(x_p / x_baseline)             (errors of approx/learn jobs; both must be > 0)

and a row reports the mean, the sample std (n - 1) and the 95% confidence interval of d's mean from
Student's t with n - 1 degrees of freedom, mean +- t_{0.975, n-1} std / sqrt(n). For a ratio the
interval is computed on the log ratios and reported on both scales: `mean`, `ci_low`, `ci_high` are
of ln(ratio); `ratio`, `ratio_ci_low`, `ratio_ci_high` are their exponentials (the geometric-mean
ratio and its interval). n = 1 has a mean but no std and no interval; n = 0 has nothing.

Pure Python (math only): the API process imports it, and has neither torch nor scipy. The t
quantile and the paired interval are core.paired's (one implementation for the service and bench/).
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Literal

# The Student t statistics live in core (torch-free) so benchmarks and the service share them.
from core.paired import CONFIDENCE, PairedInterval, paired_t_interval

Comparison = Literal["difference", "ratio"]


def default_comparison(kind: str, metric: str) -> Comparison:
    """ratio for the function errors of approx and learn jobs (lower is better, and they span orders
    of magnitude across ranks), difference for everything else (accuracies, losses, times)."""
    if kind in ("approx", "learn") and (metric == "error" or metric.endswith("_error")):
        return "ratio"
    return "difference"


@dataclasses.dataclass(frozen=True)
class JobValue:
    """One job of a sweep: its grid point index, seed, id, and its metric value (None: no finite number)."""

    point_index: int
    seed: int
    job_id: str
    value: float | None


def _fmean(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def grid_value_key(v: Any) -> Any:
    """A hashable key of a grid value (1, 1.0 and True kept apart; lists and objects by their JSON)."""
    if isinstance(v, (str, int, float, bool)) or v is None:
        return (type(v).__name__, v)
    return ("json", json.dumps(v, sort_keys=True))


def compare_to_baseline(points: list[dict[str, Any]], key: str, baseline_value: Any, jobs: list[JobValue],
                        comparison: Comparison, confidence: float = CONFIDENCE) -> list[dict[str, Any]]:
    """One row per grid point whose `key` is not `baseline_value`, in point order (see the module doc).

    `points`: the grid points in index order. A row: point, baseline_point, n, n_unpaired, n_nonpositive (ratio: pairs
    left out because a value is <= 0), seeds, job_ids, baseline_job_ids (pair order), point_mean and
    baseline_mean (of the paired values), mean, std, ci_low, ci_high (of the statistic), ratio,
    ratio_ci_low, ratio_ci_high (ratio comparisons), significant (the interval excludes no change),
    note (why std or the interval is missing)."""
    by_point: dict[int, dict[int, JobValue]] = {}
    for j in jobs:
        if j.value is not None:
            by_point.setdefault(j.point_index, {})[j.seed] = j
    base = grid_value_key(baseline_value)
    others = [k for k in points[0] if k != key] if points else []
    baseline_index: dict[tuple, int] = {}
    for i, p in enumerate(points):
        if grid_value_key(p[key]) == base:
            baseline_index[tuple(grid_value_key(p[k]) for k in others)] = i
    rows = []
    for i, p in enumerate(points):
        if grid_value_key(p[key]) == base:
            continue
        b = baseline_index[tuple(grid_value_key(p[k]) for k in others)]
        mine, theirs = by_point.get(i, {}), by_point.get(b, {})
        paired_seeds = sorted(set(mine) & set(theirs))
        n_unpaired = len(set(mine) ^ set(theirs))
        pairs = [(mine[s], theirs[s]) for s in paired_seeds]
        n_nonpositive = 0
        if comparison == "ratio":
            usable = [(x, y) for x, y in pairs if x.value > 0 and y.value > 0]  # type: ignore[operator]
            n_nonpositive = len(pairs) - len(usable)
            pairs = usable
            diffs = [math.log(x.value / y.value) for x, y in pairs]  # type: ignore[operator]
        else:
            diffs = [x.value - y.value for x, y in pairs]  # type: ignore[operator]
        ci = paired_t_interval(diffs, confidence)
        row: dict[str, Any] = {
            "point": p, "baseline_point": points[b], "n": ci.n, "n_unpaired": n_unpaired,
            "n_nonpositive": n_nonpositive, "seeds": [x.seed for x, _ in pairs],
            "job_ids": [x.job_id for x, _ in pairs], "baseline_job_ids": [y.job_id for _, y in pairs],
            "point_mean": _fmean([x.value for x, _ in pairs]),  # type: ignore[misc]
            "baseline_mean": _fmean([y.value for _, y in pairs]),  # type: ignore[misc]
            "mean": ci.mean, "std": ci.std, "ci_low": ci.ci_low, "ci_high": ci.ci_high,
        }
        if comparison == "ratio":
            row.update(ratio=_exp(ci.mean), ratio_ci_low=_exp(ci.ci_low), ratio_ci_high=_exp(ci.ci_high))
        else:
            row.update(ratio=None, ratio_ci_low=None, ratio_ci_high=None)
        row["significant"] = None if ci.ci_low is None else bool(ci.ci_low > 0 or ci.ci_high < 0)  # type: ignore[operator]
        row["note"] = ("no paired seeds" if ci.n == 0 else
                       "n = 1: one pair, no std or confidence interval" if ci.n == 1 else None)
        rows.append(row)
    return rows


def _exp(x: float | None) -> float | None:
    if x is None:
        return None
    try:
        return math.exp(x)
    except OverflowError:
        return None


__all__ = ["CONFIDENCE", "Comparison", "JobValue", "PairedInterval", "compare_to_baseline", "default_comparison",
           "grid_value_key", "paired_t_interval"]
