"""Paired comparisons with a baseline point (`compare_results`, "init:spectral"): every other grid point
against its baseline partner (the same other grid values), paired by seed, with a Student t interval
(jobs/paired.py has the statistics)."""
from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

from sqlalchemy import select

from jobs import models as m
from jobs.db import session_scope
from jobs.errors import InvalidInput, did_you_mean
from jobs.paired import CONFIDENCE, JobValue, compare_to_baseline, default_comparison
from jobs.sweeps.request import grid_points
from jobs.sweeps.results_table import csv_text, dumps, joined, missing_metric, number, resolve


@dataclasses.dataclass(frozen=True)
class ComparisonTable:
    """Every grid point against its baseline partner (the same other grid values, baseline_key =
    baseline_value), paired by seed: see jobs/paired.py for the rows."""

    sweep_id: str
    kind: str
    metric: str
    baseline: dict[str, Any]  # {"key": grid key, "value": its baseline value}
    comparison: str  # difference | ratio
    statistic: str  # what mean/std/ci_* are of: difference | log_ratio
    confidence: float
    grid_keys: list[str]
    rows: list[dict[str, Any]]


_NO_JSON = object()


def _find_value(text: str, values: list[Any]) -> Any:
    """The grid value `text` names: a string value as written, else the JSON value it parses to
    (4 names 4, 0.10 names 0.1; true is not 1). _NO_JSON when none."""
    for v in values:
        if isinstance(v, str) and v == text:
            return v
    try:
        parsed = json.loads(text)
    except ValueError:
        return _NO_JSON
    for v in values:
        if not isinstance(v, str) and isinstance(v, bool) == isinstance(parsed, bool) and v == parsed:
            return v
    return _NO_JSON


def parse_baseline(text: str, grid: dict[str, list[Any]]) -> tuple[str, Any]:
    """'key:value' or 'key=value' (a grid key and one of its values) -> (key, the grid's value)."""
    keys = sorted(grid)
    example = next((f"{k}:{json.dumps(grid[k][0]) if not isinstance(grid[k][0], str) else grid[k][0]}"
                    for k in keys if len(grid[k]) > 1), "KEY:VALUE")
    cut = min((i for i in (text.find(":"), text.find("=")) if i >= 0), default=-1)
    if cut <= 0:
        raise InvalidInput(f"baseline must be KEY:VALUE, a grid key and one of its values (e.g. {example}), "
                           f"got {text!r}", ("query", "baseline"))
    key, value_text = text[:cut].strip(), text[cut + 1:].strip()
    if key not in grid:
        raise InvalidInput(f"baseline key {key!r} is not a grid key of this sweep{did_you_mean(key, keys)} "
                           f"(grid keys: {', '.join(keys) or 'none'})", ("query", "baseline"))
    values = grid[key]
    if len(values) < 2:
        raise InvalidInput(f"grid key {key!r} has one value ({values[0]!r}): no other point to compare with it; "
                           f"use a key with several values", ("query", "baseline"))
    value = _find_value(value_text, values)
    if value is _NO_JSON:
        raise InvalidInput(f"baseline value {value_text!r} is not one of grid key {key!r}'s values "
                           f"{json.dumps(values)}", ("query", "baseline"))
    return key, value


def compare_results(sweep_id: str | uuid.UUID, baseline: str, *, metric: str | None = None,
                    comparison: str | None = None, group_by: list[str] | None = None) -> ComparisonTable:
    """The paired comparison of every grid point with the baseline point (same SQL on Postgres and
    SQLite: each job's value is read as text and parsed here by the results' own rule, so both give
    the same numbers). `comparison` defaults to jobs.paired.default_comparison(kind, metric)."""
    with session_scope() as session:
        sweep, metric, group_by = resolve(session, sweep_id, metric, group_by)
        if set(group_by) != set(sweep.grid):
            raise InvalidInput(f"baseline compares single grid points (paired by seed): group_by must be left out "
                               f"or list every grid key ({', '.join(sorted(sweep.grid))}), got {group_by}",
                               ("query", "group_by"))
        key, value = parse_baseline(baseline, sweep.grid)
        rows = session.execute(select(m.Job.id, m.Job.sweep_point_index, m.Job.seed, m.Job.status,
                                      m.Job.result[metric].as_string()).where(m.Job.sweep_id == sweep.id)
                               .order_by(m.Job.sweep_point_index, m.Job.seed)).all()
        succeeded = [r for r in rows if r[3] == "succeeded"]
        if succeeded and all(r[4] is None for r in succeeded):
            raise missing_metric(session, sweep, metric)
        kind, grid = sweep.kind, sweep.grid
    comparison = comparison or default_comparison(kind, metric)
    values = [JobValue(idx, seed, str(job_id), number(v) if status == "succeeded" else None)
              for job_id, idx, seed, status, v in rows]
    out = compare_to_baseline(grid_points(grid), key, value, values, comparison)  # type: ignore[arg-type]
    return ComparisonTable(str(sweep_id), kind, metric, {"key": key, "value": value}, comparison,
                           "log_ratio" if comparison == "ratio" else "difference", CONFIDENCE, sorted(grid), out)


def comparison_document(table: ComparisonTable) -> str:
    return dumps(dataclasses.asdict(table))


_COMPARISON_COLUMNS = ("n", "n_unpaired", "n_nonpositive", "mean", "std", "ci_low", "ci_high", "ratio",
                       "ratio_ci_low", "ratio_ci_high", "significant", "point_mean", "baseline_mean", "seeds",
                       "job_ids", "baseline_job_ids", "note")


def comparison_csv(table: ComparisonTable) -> str:
    """One line per compared point: its grid values, the baseline value, then _COMPARISON_COLUMNS."""
    key = table.baseline["key"]
    return csv_text([*table.grid_keys, f"baseline {key}", "comparison", *_COMPARISON_COLUMNS],
                ([*(r["point"][g] for g in table.grid_keys), table.baseline["value"], table.comparison,
                  *(joined(r[c]) if isinstance(r[c], list) else r[c] for c in _COMPARISON_COLUMNS)]
                 for r in table.rows))
