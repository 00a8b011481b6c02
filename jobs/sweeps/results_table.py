"""A grid sweep's results table: a metric from the jobs' `result` aggregated over seeds (and over grid keys
left out of `group_by`): mean, sample std (null for n = 1), min, max, n, the job ids per group and the
parameter count (params when the group's jobs agree, else null; params_min/params_max: never averaged).
Postgres aggregates in one statement (and writes the rows' JSON); SQLite's rows are aggregated in Python,
by the same rules. JSON and CSV.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import uuid
from collections.abc import Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs import models as m
from jobs.db import session_scope
from jobs.errors import InvalidInput
from jobs.paired import grid_value_key
from jobs.rows import is_postgres
from jobs.sweeps.lifecycle import get_sweep_row
from jobs.sweeps.request import DEFAULT_METRIC, grid_points


@dataclasses.dataclass(frozen=True)
class ResultsTable:
    sweep_id: str
    kind: str
    metric: str
    group_by: list[str]
    rows: list[dict[str, Any]]


# A job's parameter count in its result: train and latency `params_factored` (latency: the factored network
# measured), compress `params_compressed` (the whole compressed network); approx and learn `rank (m + d)`, the
# sizes of U (m x r) and V (r x d).
SIZE_KEYS = {"train": ("params_factored",), "compress": ("params_compressed",), "latency": ("params_factored",)}
APPROX_SIZE_KEYS = ("rank", "m", "d")


def number(v: Any) -> float | None:
    """A finite float from a JSON number (or its text form); None for anything else."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _stats(values: list[float]) -> dict[str, Any]:
    n = len(values)
    if not n:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None  # undefined for n = 1
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n}


def _params_fields(values: list[float]) -> dict[str, Any]:
    """params (one size: the group's jobs all have it; else null), params_min, params_max: never averaged,
    since a group that pools grid points of different sizes has no one parameter count."""
    if not values:
        return {"params": None, "params_min": None, "params_max": None}
    lo, hi = _int_if_whole(min(values)), _int_if_whole(max(values))
    return {"params": lo if lo == hi else None, "params_min": lo, "params_max": hi}


def _int_if_whole(x: float) -> float | int:
    return int(x) if x.is_integer() and abs(x) < 2**53 else x


def resolve(session: Session, sweep_id: str | uuid.UUID, metric: str | None,
             group_by: list[str] | None) -> tuple[m.Sweep, str, list[str]]:
    sweep = get_sweep_row(session, sweep_id)
    if sweep.strategy == "search":
        raise InvalidInput(f"sweep {sweep.id} is a search sweep: its results are its trials (GET "
                           f"/api/v1/sweeps/{sweep.id}/results without metric, group_by or baseline; front=true "
                           "for the Pareto front)", ("query",))
    metric = metric or DEFAULT_METRIC[sweep.kind]
    keys = sorted(sweep.grid)
    if group_by is None:
        group_by = keys
    unknown = [g for g in group_by if g not in sweep.grid]
    if unknown:
        raise InvalidInput(f"group_by {unknown} not in this sweep's grid keys {keys}", ("query", "group_by"))
    if len(set(group_by)) != len(group_by):
        raise InvalidInput(f"group_by lists a key twice: {group_by}", ("query", "group_by"))
    return sweep, metric, list(group_by)


def point_groups(sweep: m.Sweep, group_by: list[str]) -> tuple[list[dict[str, Any]], list[int]]:
    """(group points in first-appearance order, group index of each grid point index)."""
    if set(group_by) == set(sweep.grid):  # one group per grid point (a key's values are distinct)
        keys = sorted(sweep.grid)
        pos = [keys.index(g) for g in group_by]
        combos = itertools.product(*(sweep.grid[k] for k in keys))
        group_points = [{g: c[i] for g, i in zip(group_by, pos)} for c in combos]
        return group_points, list(range(len(group_points)))
    index: dict[tuple, int] = {}
    group_points: list[dict[str, Any]] = []
    point_group: list[int] = []
    for p in grid_points(sweep.grid):
        gk = tuple(grid_value_key(p[g]) for g in group_by)
        if gk not in index:
            index[gk] = len(group_points)
            group_points.append({g: p[g] for g in group_by})
        point_group.append(index[gk])
    return group_points, point_group


def missing_metric(session: Session, sweep: m.Sweep, metric: str) -> InvalidInput:
    sample = session.execute(select(m.Job.result).where(m.Job.sweep_id == sweep.id,
                                                        m.Job.status == "succeeded").limit(1)).scalar()
    avail = sorted(k for k, v in (sample or {}).items() if number(v) is not None)
    return InvalidInput(f"metric {metric!r} is not in this sweep's job results; numeric keys: {avail}",
                        ("query", "metric"))


# Postgres: the whole aggregation and the rows' JSON text in one statement. Per job: the metric as
# float8 when it is a JSON number of a succeeded job (the Python path's rule), and its parameter count
# (SIZE_KEYS: train params_factored, compress params_compressed; approx and learn: rank (m + d)); per
# group: avg, stddev_samp (null for n < 2), min, max, count, the smallest and largest parameter count
# (params when they agree: never averaged) and the job ids in (point index, seed) order (the
# MATERIALIZED CTE is sorted that way, and string_agg takes its input in that order); the group
# points (one JSON array, built in Python from the stored grid; json keeps each element's text) are
# joined by group number, so every group has a row even without jobs. {group} is the group number of
# a job (1-based). Arrays travel as one text parameter: psycopg dumps a 5,000-item list in Python,
# which costs more than the whole query.
_PG_RESULTS = """
WITH j AS MATERIALIZED (
  SELECT {group} AS grp, jobs.id,
         jobs.status = 'succeeded' AS ok,
         jobs.status = 'succeeded' AND jobs.result ->> :metric IS NOT NULL AS has_key,
         CASE WHEN jobs.status = 'succeeded' AND jsonb_typeof(jobs.result -> :metric) = 'number'
              THEN CAST(jobs.result -> :metric AS float8) END AS x,
         CASE WHEN jobs.status <> 'succeeded' THEN NULL
              WHEN CAST(:size_key AS text) IS NOT NULL
              THEN CASE WHEN jsonb_typeof(jobs.result -> CAST(:size_key AS text)) = 'number'
                        THEN CAST(jobs.result -> CAST(:size_key AS text) AS float8) END
              WHEN jsonb_typeof(jobs.result -> 'rank') = 'number' AND jsonb_typeof(jobs.result -> 'm') = 'number'
                   AND jsonb_typeof(jobs.result -> 'd') = 'number'
              THEN CAST(jobs.result -> 'rank' AS float8)
                   * (CAST(jobs.result -> 'm' AS float8) + CAST(jobs.result -> 'd' AS float8)) END AS px
  FROM jobs {join}
  WHERE jobs.sweep_id = :sweep_id
  ORDER BY 1, jobs.sweep_point_index, jobs.seed),
a AS (
  SELECT grp, avg(x) AS mean, stddev_samp(x) AS std, min(x) AS mn, max(x) AS mx, count(x) AS n,
         min(px) AS pmin, max(px) AS pmax,
         count(*) FILTER (WHERE ok) AS n_ok, count(*) FILTER (WHERE has_key) AS n_key,
         string_agg(CAST(id AS text), '","') AS ids
  FROM j GROUP BY grp)
SELECT coalesce(sum(a.n_ok), 0), coalesce(sum(a.n_key), 0), '[' || string_agg(
  '{{"point":' || CAST(p.pt AS text)
  || ',"mean":' || coalesce(CAST(a.mean AS text), 'null')
  || ',"std":' || coalesce(CAST(a.std AS text), 'null')
  || ',"min":' || coalesce(CAST(a.mn AS text), 'null')
  || ',"max":' || coalesce(CAST(a.mx AS text), 'null')
  || ',"n":' || coalesce(a.n, 0)
  || ',"job_ids":' || CASE WHEN a.ids IS NULL THEN '[]' ELSE '["' || a.ids || '"]' END
  || ',"params":' || CASE WHEN a.pmin = a.pmax THEN CAST(a.pmin AS text) ELSE 'null' END
  || ',"params_min":' || coalesce(CAST(a.pmin AS text), 'null')
  || ',"params_max":' || coalesce(CAST(a.pmax AS text), 'null') || '}}', ',' ORDER BY p.grp) || ']'
FROM json_array_elements(CAST(:points AS json)) WITH ORDINALITY AS p(pt, grp) LEFT JOIN a ON a.grp = p.grp
"""


_PG_GROUP_PER_POINT = _PG_RESULTS.format(group="jobs.sweep_point_index + 1", join="")


_PG_GROUP_MAPPED = _PG_RESULTS.format(
    group="g.grp", join="JOIN unnest(CAST(string_to_array(:point_group, ',') AS int[])) WITH ORDINALITY AS g(grp, pidx) "
                        "ON g.pidx = jobs.sweep_point_index + 1")


def dumps(obj: Any) -> str:
    # What FastAPI's JSONResponse writes.
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def rows_pg(session: Session, sweep: m.Sweep, metric: str, group_by: list[str]) -> str:
    """The rows of the results table as JSON text, aggregated by Postgres."""
    from sqlalchemy import text

    group_points, point_group = point_groups(sweep, group_by)
    size_key = SIZE_KEYS[sweep.kind][0] if sweep.kind in SIZE_KEYS else None
    params: dict[str, Any] = {"metric": metric, "size_key": size_key, "sweep_id": sweep.id,
                              "points": dumps(group_points)}
    if len(group_points) == len(point_group):  # one group per grid point, in point order
        sql = _PG_GROUP_PER_POINT
    else:
        sql = _PG_GROUP_MAPPED
        params["point_group"] = ",".join(str(g + 1) for g in point_group)
    # float8 -> text with the shortest exact digits (the server default; pinned in case it was changed);
    # memory enough to aggregate 10,000 jobs without spilling to disk.
    session.execute(text("SET LOCAL extra_float_digits = 1"))
    session.execute(text("SET LOCAL work_mem = '64MB'"))
    n_ok, n_key, rows_json = session.execute(text(sql), params).one()
    if n_ok and not n_key:
        raise missing_metric(session, sweep, metric)
    return rows_json or "[]"


def rows_py(session: Session, sweep: m.Sweep, metric: str, group_by: list[str]) -> list[dict[str, Any]]:
    """The rows of the results table, aggregated in Python (SQLite, the embedded default)."""
    size_keys = SIZE_KEYS.get(sweep.kind, APPROX_SIZE_KEYS)
    cols = [m.Job.id, m.Job.sweep_point_index, m.Job.status, m.Job.result[metric].as_string(),
            *(m.Job.result[k].as_string() for k in size_keys)]
    rows = session.execute(select(*cols).where(m.Job.sweep_id == sweep.id)
                           .order_by(m.Job.sweep_point_index, m.Job.seed)).all()
    group_points, point_group = point_groups(sweep, group_by)
    groups = [{"point": p, "values": [], "params": [], "job_ids": []} for p in group_points]
    any_succeeded = succeeded_with_key = False
    for r in rows:
        grp = groups[point_group[r[1]]]
        grp["job_ids"].append(str(r[0]))
        if r[2] != "succeeded":
            continue
        any_succeeded = True
        if r[3] is not None:
            succeeded_with_key = True
        v = number(r[3])
        if v is not None:
            grp["values"].append(v)
        pv = params_count(sweep.kind, [number(x) for x in r[4:]])
        if pv is not None:
            grp["params"].append(pv)
    if any_succeeded and not succeeded_with_key:
        raise missing_metric(session, sweep, metric)
    out = []
    for grp in groups:
        out.append({"point": grp["point"], **_stats(grp["values"]), "job_ids": grp["job_ids"],
                    **_params_fields(grp["params"])})
    return out


def params_count(kind: str, sizes: list[float | None]) -> float | None:
    """A job's parameter count from its result's SIZE_KEYS values (approx/learn: rank (m + d))."""
    if kind in SIZE_KEYS:
        return sizes[0]
    rank, m_, d = sizes
    return None if rank is None or m_ is None or d is None else rank * (m_ + d)


def results(sweep_id: str | uuid.UUID, *, metric: str | None = None,
            group_by: list[str] | None = None) -> ResultsTable:
    """One row per group (default: per grid point) over seeds, from the succeeded jobs' `result[metric]`."""
    with session_scope() as session:
        sweep, metric, group_by = resolve(session, sweep_id, metric, group_by)
        if is_postgres(session):
            rows = json.loads(rows_pg(session, sweep, metric, group_by))
        else:
            rows = rows_py(session, sweep, metric, group_by)
        return ResultsTable(str(sweep_id), sweep.kind, metric, group_by, rows)


def results_document(sweep_id: str | uuid.UUID, *, metric: str | None = None,
                     group_by: list[str] | None = None) -> str:
    """The JSON results document ({"sweep_id","metric","group_by","rows"}) as text. On Postgres the
    rows' JSON comes straight from the database (no per-row work in Python)."""
    with session_scope() as session:
        sweep, metric, group_by = resolve(session, sweep_id, metric, group_by)
        head = dumps({"sweep_id": str(sweep_id), "metric": metric, "group_by": group_by})
        if is_postgres(session):
            rows_json = rows_pg(session, sweep, metric, group_by)
        else:
            rows_json = dumps(rows_py(session, sweep, metric, group_by))
    return head[:-1] + ',"rows":' + rows_json + "}"


_RESULT_COLUMNS = ("mean", "std", "min", "max", "n", "params", "params_min", "params_max")


def _cell(v: Any) -> Any:
    """A CSV cell: empty for null, floats with every digit (repr), true/false."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return v


def joined(ids: list[Any]) -> str:
    return " ".join(str(x) for x in ids)


def csv_text(header: list[str], rows: Iterable[list[Any]]) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow([_cell(v) for v in row])
    return buf.getvalue()


def results_csv(table: ResultsTable) -> str:
    return csv_text([*table.group_by, *_RESULT_COLUMNS, "job_ids"],
                ([*(r["point"][g] for g in table.group_by), *(r[k] for k in _RESULT_COLUMNS), joined(r["job_ids"])]
                 for r in table.rows))
