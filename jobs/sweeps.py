"""Sweeps: a base job spec x a grid of dotted spec paths x seeds, created in one transaction.

    create_sweep(SweepCreate(name="ranks", base={...approx spec...},
                             grid={"rank": [1, 2, 4], "method": ["spectral", "nkp"]}, seeds=[0, 1, 2]))

Grid points are the cartesian product of the grid's value lists, keys in sorted order (so point
index i means the same point whatever order a JSON store gives the keys back in). Every point is
validated as a full job spec (jobs/specs.py) before anything is written; a failing point is a 422
naming it. Jobs are written with one bulk INSERT and sent to the queue with one shared producer.

Results aggregate a metric from the jobs' `result` over seeds (and over grid keys left out of
`group_by`): mean, sample std (0 for n = 1), min, max, n and the job ids per group.

Early stopping (train sweeps): successive halving on a metric recorded at epoch ends. At each
milestone epoch e a point's value is the mean over its jobs of the metric at the end of epoch e;
once `min_points` points have a value at e (default: all points, i.e. synchronous successive
halving), every point with a value is compared with all values at e, and a point strictly worse
than the ceil(keep * n)-th best is stopped: its queued jobs are cancelled and its running jobs get
cancel_requested (their workers stop at the next check). Points reaching e later are judged on
arrival against all values at e so far (asynchronous successive halving, as in ASHA; set
min_points=1 with fewer workers than points). The worker calls `on_epoch_metrics` after it writes
an epoch's metrics and `on_job_finished` after a job ends; decisions are kept on the sweep row
(`early_stopping.decisions`) so each point is judged once per milestone.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json
import logging
import math
import uuid
from collections.abc import Iterable
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import and_, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from jobs import models as m
from jobs.db import session_scope
from jobs.errors import Conflict, InvalidInput, TooLarge
from jobs.settings import get_settings
from jobs.specs import TEXT_PATTERN, parse_spec, spec_to_dict
from jobs.store import (_now, _uuid, check_actor, check_references, get_row, job_values, keyset_page,
                        requeue_values)

log = logging.getLogger(__name__)

GRID_KEY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
METRIC_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.]*$"
DEFAULT_METRIC = {"approx": "error", "learn": "error", "train": "val_top1"}
# Spec fields a grid may not set: `kind` fixes the sweep's kind, `seed` comes from `seeds`.
FORBIDDEN_GRID_KEYS = ("kind", "seed")
EPOCH_END_MARKER = "epoch_time_s"  # recorded once per epoch, at the epoch's last step (core/train)


# ---------------------------------------------------------------------------------------------
# Request models (the API's body; the CLI and SDK send the same JSON).

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
    base: dict[str, Any] = Field(description="a job spec (approx | learn | train); grid values override its fields")
    grid: dict[str, list[Any]] = Field(
        default_factory=dict, max_length=32,
        description='dotted spec path -> values, e.g. {"rank": [1, 2, 4], "weights.d": [128, 256]}')
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, max_length=10_000,
                             description="one job per grid point and seed (sets the spec's seed)")
    early_stopping: EarlyStopping | None = Field(None, description="train sweeps only: successive halving")

    @field_validator("grid")
    @classmethod
    def _grid(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        import re

        for key, values in grid.items():
            if not re.fullmatch(GRID_KEY_PATTERN, key) or len(key) > 200:
                raise ValueError(f"grid key {key!r} is not a dotted spec path (e.g. rank, weights.d)")
            if key.split(".")[0] in FORBIDDEN_GRID_KEYS:
                raise ValueError(f"grid key {key!r}: a sweep cannot vary {key.split('.')[0]!r} "
                                 "(kind is the base's; use `seeds` for seeds)")
            if not values:
                raise ValueError(f"grid key {key!r} has an empty value list")
            seen = set()
            for v in values:
                k = json.dumps(v, sort_keys=True)
                if k in seen:
                    raise ValueError(f"grid key {key!r} lists the value {v!r} twice")
                seen.add(k)
        keys = sorted(grid)
        for a, b in zip(keys, keys[1:]):
            if b.startswith(a + "."):
                raise ValueError(f"grid keys {a!r} and {b!r} overlap (one is inside the other)")
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
    def _base_kind(self) -> "SweepCreate":
        if self.base.get("kind") not in DEFAULT_METRIC:
            raise ValueError(f"base.kind must be one of {sorted(DEFAULT_METRIC)}, got {self.base.get('kind')!r}")
        if self.early_stopping is not None and self.base["kind"] != "train":
            raise ValueError(f"early_stopping is for train sweeps (epochs); this sweep's kind is {self.base['kind']!r}")
        return self


# ---------------------------------------------------------------------------------------------
# Domain objects.

@dataclasses.dataclass(frozen=True)
class SweepRecord:
    id: str
    name: str | None
    kind: str
    status: str  # queued | running | succeeded | failed | cancelled
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    seeds: list[int]
    early_stopping: dict[str, Any] | None
    n_points: int
    total: int
    counts: dict[str, int]
    progress: float  # finished jobs / total
    owner: str | None
    cancel_requested: bool
    created_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class SweepPage:
    items: list[SweepRecord]
    next_cursor: str | None


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The grid's points in index order: the product of the value lists, keys sorted."""
    keys = sorted(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def _set_path(spec: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = spec
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise InvalidInput(f"grid key {key!r}: base.{'.'.join(parts[:i + 1])} is {child!r}, not an object, "
                               f"so it has no field {parts[i + 1]!r}", ("grid", key))
        else:
            child = node[part] = dict(child)  # copy: points must not share nested dicts
        node = child
    node[parts[-1]] = value


def _point_label(point: dict[str, Any]) -> str:
    return json.dumps(point, separators=(", ", ": "))


def _validation_message(exc: pydantic.ValidationError, kind: str) -> tuple[str, tuple[str | int, ...]]:
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


def expand(req: SweepCreate) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Validate every grid point as a full job spec: [(point, canonical spec without seed)], index order.

    Raises TooLarge over LOWRANK_MAX_SWEEP_POINTS, InvalidInput naming the first failing point."""
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
            _set_path(spec, key, value)
        spec["seed"] = req.seeds[0]
        try:
            parsed = parse_spec(spec)
        except pydantic.ValidationError as exc:
            msg, loc = _validation_message(exc, kind)
            grid_key = next((k for k in point if tuple(k.split(".")) == tuple(str(x) for x in loc[:len(k.split("."))])),
                            None)
            where = ("grid", grid_key) if grid_key else ("base", *loc)
            raise InvalidInput(f"grid point #{i} {_point_label(point)} is not a valid {kind} job spec: {msg}",
                               where, point=point, point_index=i) from None
        out.append((point, parsed))
    if req.early_stopping is not None:
        max_epochs = max(p.epochs for _, p in out)  # type: ignore[union-attr]
        bad = [e for e in req.early_stopping.epochs if e >= max_epochs]
        if bad:
            raise InvalidInput(f"early_stopping.epochs {bad} must be below the points' epochs ({max_epochs}): "
                               "a milestone at or after the last epoch stops nothing", ("early_stopping", "epochs"))
        if req.early_stopping.min_points is not None and req.early_stopping.min_points > n_points:
            raise InvalidInput(f"early_stopping.min_points must be <= the number of grid points ({n_points}), "
                               f"got {req.early_stopping.min_points}", ("early_stopping", "min_points"))
    return out


# ---------------------------------------------------------------------------------------------
# Create.

def _request_fingerprint(req: SweepCreate) -> dict[str, Any]:
    return {"name": req.name, "base": req.base, "grid": req.grid, "seeds": req.seeds,
            "early_stopping": req.early_stopping.model_dump(mode="json") if req.early_stopping else None}


def _row_fingerprint(row: m.Sweep) -> dict[str, Any]:
    es = dict(row.early_stopping) if row.early_stopping else None
    if es is not None:
        es.pop("decisions", None)
    return {"name": row.name, "base": row.base, "grid": row.grid, "seeds": row.seeds, "early_stopping": es}


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def create_sweep(req: SweepCreate, *, owner: str | None = None,
                 idempotency_key: str | None = None) -> tuple[SweepRecord, bool, list[tuple[str, str, str]]]:
    """Store the sweep and all its jobs (queued) in one transaction.

    Returns (sweep, created, [(job_id, device, priority)] to enqueue). The same idempotency key with
    the same request (and owner) returns the existing sweep, created=False, nothing to enqueue; with
    a different request it raises Conflict."""
    if idempotency_key is not None:
        existing = _find_idempotent(idempotency_key, req, owner)
        if existing is not None:
            return existing, False, []
    points = expand(req)
    now = _now()
    sweep_id = uuid.uuid4()
    es = req.early_stopping.model_dump(mode="json") if req.early_stopping else None
    if es is not None:
        es["decisions"] = {}
    job_rows: list[dict[str, Any]] = []
    tag_rows: list[dict[str, Any]] = []
    send: list[tuple[str, str, str]] = []
    for index, (point, spec) in enumerate(points):
        canonical = spec_to_dict(spec)
        tags = list(dict.fromkeys(spec.tags))
        point_row = job_values(spec, canonical, owner=owner, now=now, tags=tags, sweep_id=sweep_id,
                               sweep_point=point, sweep_point_index=index, attempts=0, cancel_requested=False)
        for seed in req.seeds:
            job_id = uuid.uuid4()
            job_rows.append({**point_row, "id": job_id, "spec": {**canonical, "seed": seed}, "seed": seed})
            tag_rows.extend({"job_id": job_id, "tag": t} for t in tags)
            send.append((str(job_id), point_row["queue"], spec.priority))
    try:
        with session_scope() as session:
            for _, spec in points:
                check_references(session, spec)  # no I/O unless the spec names an upload
            session.add(m.Sweep(id=sweep_id, name=req.name, kind=req.base["kind"], base=req.base, grid=req.grid,
                                seeds=req.seeds, early_stopping=es, n_points=len(points), n_jobs=len(job_rows),
                                idempotency_key=idempotency_key, owner=owner, cancel_requested=False,
                                created_at=now))
            session.flush()
            for i in range(0, len(job_rows), 2000):
                session.execute(insert(m.Job), job_rows[i:i + 2000])
            for i in range(0, len(tag_rows), 5000):
                session.execute(insert(m.JobTag), tag_rows[i:i + 5000])
    except IntegrityError:
        if idempotency_key is None:
            raise
        existing = _find_idempotent(idempotency_key, req, owner)
        if existing is None:
            raise
        return existing, False, []
    return get_sweep(sweep_id), True, send


def _find_idempotent(key: str, req: SweepCreate, owner: str | None) -> SweepRecord | None:
    with session_scope() as session:
        row = session.scalars(select(m.Sweep).where(m.Sweep.idempotency_key == key)).one_or_none()
        if row is None:
            return None
        if not _same(_row_fingerprint(row), _request_fingerprint(req)) or row.owner != owner:
            raise Conflict(f"Idempotency-Key {key!r} was already used for sweep {row.id} with a different request",
                           sweep_id=str(row.id))
        return _record(session, row)


def send_jobs(celery_app: Any, jobs: list[tuple[str, str, str]]) -> int:
    """Send TASK_RUN_JOB for each (job_id, device, priority) over one producer, pipelined on Redis
    (jobs.queue.enqueue_jobs). A broker failure marks the unsent jobs not enqueued (the workers'
    reaper re-sends them). Returns how many were sent."""
    from jobs.queue import enqueue_jobs
    from jobs.store import mark_not_enqueued

    try:
        return enqueue_jobs(celery_app, jobs)
    except Exception as exc:  # noqa: BLE001 - broker down: the jobs are stored; the reaper re-sends them
        sent = getattr(exc, "sent", 0)
        log.warning("sweep: %d of %d jobs stored but not enqueued (broker unavailable); the reaper will "
                    "re-send them", len(jobs) - sent, len(jobs), exc_info=True)
        mark_not_enqueued([j for j, _, _ in jobs[sent:]])
        return sent


# ---------------------------------------------------------------------------------------------
# Read.

def _status(counts: dict[str, int], total: int, cancel_requested: bool) -> str:
    active = counts["queued"] + counts["running"]
    if active:
        return "queued" if counts["queued"] == total else "running"
    if cancel_requested or (total and counts["cancelled"] == total):
        return "cancelled"
    if counts["failed"]:
        return "failed"
    return "succeeded"


def _counts(session: Session, sweep_ids: list[uuid.UUID]) -> dict[uuid.UUID, dict[str, int]]:
    out = {sid: dict.fromkeys(m.JOB_STATUSES, 0) for sid in sweep_ids}
    if sweep_ids:
        rows = session.execute(select(m.Job.sweep_id, m.Job.status, func.count())
                               .where(m.Job.sweep_id.in_(sweep_ids)).group_by(m.Job.sweep_id, m.Job.status))
        for sid, status, n in rows:
            out[sid][status] = n
    return out


def _record(session: Session, row: m.Sweep, counts: dict[str, int] | None = None) -> SweepRecord:
    if counts is None:
        counts = _counts(session, [row.id])[row.id]
    total = row.n_jobs
    finished = sum(counts[s] for s in m.TERMINAL_STATUSES)
    return SweepRecord(
        id=str(row.id), name=row.name, kind=row.kind, status=_status(counts, total, row.cancel_requested),
        base=row.base, grid=row.grid, seeds=list(row.seeds), early_stopping=row.early_stopping,
        n_points=row.n_points, total=total, counts=counts, progress=(finished / total) if total else 1.0,
        owner=row.owner, cancel_requested=row.cancel_requested, created_at=row.created_at)


def _get_row(session: Session, sweep_id: str | uuid.UUID, *, for_update: bool = False) -> m.Sweep:
    return get_row(session, m.Sweep, sweep_id, "sweep", for_update=for_update)


def get_sweep(sweep_id: str | uuid.UUID) -> SweepRecord:
    with session_scope() as session:
        return _record(session, _get_row(session, sweep_id))


def list_sweeps(*, owner: str | None = None, kind: str | None = None, limit: int = 50,
                cursor: str | None = None) -> SweepPage:
    """Sweeps newest first (keyset pagination on created_at, id), each with its status counts."""
    stmt = select(m.Sweep)
    if owner is not None:
        stmt = stmt.where(m.Sweep.owner == owner)
    if kind is not None:
        stmt = stmt.where(m.Sweep.kind == kind)
    with session_scope() as session:
        rows, next_cursor = keyset_page(session, stmt, m.Sweep, cursor, limit)
        counts = _counts(session, [r.id for r in rows])
        items = [_record(session, r, counts[r.id]) for r in rows]
    return SweepPage(items, next_cursor)


# ---------------------------------------------------------------------------------------------
# Cancel and retry.

def _cancel_jobs(session: Session, where: Any, now: dt.datetime) -> int:
    n = session.execute(update(m.Job).where(where, m.Job.status == "queued")
                        .values(status="cancelled", cancel_requested=True, finished_at=now)
                        .execution_options(synchronize_session=False)).rowcount
    n += session.execute(update(m.Job).where(where, m.Job.status == "running")
                         .values(cancel_requested=True).execution_options(synchronize_session=False)).rowcount
    return n


def cancel_sweep(sweep_id: str | uuid.UUID, *, actor: str | None = None, admin: bool = True) -> SweepRecord:
    """Queued jobs -> cancelled at once; running jobs get cancel_requested (workers stop at the next check)."""
    with session_scope() as session:
        row = _get_row(session, sweep_id, for_update=True)
        check_actor(row, actor, admin, "cancel", "sweep")
        row.cancel_requested = True
        _cancel_jobs(session, m.Job.sweep_id == row.id, _now())
        session.flush()
        return _record(session, row)


def retry_failed(sweep_id: str | uuid.UUID, *, include_cancelled: bool = False, actor: str | None = None,
                 admin: bool = True) -> tuple[SweepRecord, list[tuple[str, str, str]]]:
    """Failed (and with include_cancelled, cancelled) jobs back to queued on the same rows, as
    store.retry_job does. Returns (sweep, [(job_id, device, priority)] to enqueue)."""
    statuses = ("failed", "cancelled") if include_cancelled else ("failed",)
    now = _now()
    with session_scope() as session:
        row = _get_row(session, sweep_id, for_update=True)
        check_actor(row, actor, admin, "retry", "sweep")
        ids = session.execute(
            update(m.Job).where(m.Job.sweep_id == row.id, m.Job.status.in_(statuses))
            .values(**requeue_values(now))
            .returning(m.Job.id, m.Job.queue, m.Job.priority).execution_options(synchronize_session=False)
        ).all()
        if ids and include_cancelled:
            row.cancel_requested = False
        session.flush()
        return _record(session, row), [(str(i), q, p) for i, q, p in ids]


# ---------------------------------------------------------------------------------------------
# Results.

@dataclasses.dataclass(frozen=True)
class ResultsTable:
    sweep_id: str
    kind: str
    metric: str
    group_by: list[str]
    rows: list[dict[str, Any]]


def _number(v: Any) -> float | None:
    """A finite float from a JSON number (or its text form); None for anything else."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _key(v: Any) -> Any:
    """A hashable group key for a grid value (1 and 1.0 and True kept apart)."""
    if isinstance(v, (str, int, float, bool)) or v is None:
        return (type(v).__name__, v)
    return ("json", json.dumps(v, sort_keys=True))


def _stats(values: list[float]) -> dict[str, Any]:
    n = len(values)
    if not n:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n}


def _resolve(session: Session, sweep_id: str | uuid.UUID, metric: str | None,
             group_by: list[str] | None) -> tuple[m.Sweep, str, list[str]]:
    sweep = _get_row(session, sweep_id)
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


def _groups(sweep: m.Sweep, group_by: list[str]) -> tuple[list[dict[str, Any]], list[int]]:
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
        gk = tuple(_key(p[g]) for g in group_by)
        if gk not in index:
            index[gk] = len(group_points)
            group_points.append({g: p[g] for g in group_by})
        point_group.append(index[gk])
    return group_points, point_group


def _missing_metric(session: Session, sweep: m.Sweep, metric: str) -> InvalidInput:
    sample = session.execute(select(m.Job.result).where(m.Job.sweep_id == sweep.id,
                                                        m.Job.status == "succeeded").limit(1)).scalar()
    avail = sorted(k for k, v in (sample or {}).items() if _number(v) is not None)
    return InvalidInput(f"metric {metric!r} is not in this sweep's job results; numeric keys: {avail}",
                        ("query", "metric"))


# Postgres: the whole aggregation and the rows' JSON text in one statement. Per job: the metric as
# float8 when it is a JSON number of a succeeded job (the Python path's rule); per group: avg,
# stddev_samp (0 for n = 1), min, max, count and the job ids in (point index, seed) order (the
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
         CASE WHEN :train AND jobs.status = 'succeeded' AND jsonb_typeof(jobs.result -> 'params_factored') = 'number'
              THEN CAST(jobs.result -> 'params_factored' AS float8) END AS px
  FROM jobs {join}
  WHERE jobs.sweep_id = :sweep_id
  ORDER BY 1, jobs.sweep_point_index, jobs.seed),
a AS (
  SELECT grp, avg(x) AS mean, stddev_samp(x) AS std, min(x) AS mn, max(x) AS mx, count(x) AS n, avg(px) AS params,
         count(*) FILTER (WHERE ok) AS n_ok, count(*) FILTER (WHERE has_key) AS n_key,
         string_agg(CAST(id AS text), '","') AS ids
  FROM j GROUP BY grp)
SELECT coalesce(sum(a.n_ok), 0), coalesce(sum(a.n_key), 0), '[' || string_agg(
  '{{"point":' || CAST(p.pt AS text)
  || ',"mean":' || coalesce(CAST(a.mean AS text), 'null')
  || ',"std":' || CASE WHEN a.n = 1 THEN '0.0' ELSE coalesce(CAST(a.std AS text), 'null') END
  || ',"min":' || coalesce(CAST(a.mn AS text), 'null')
  || ',"max":' || coalesce(CAST(a.mx AS text), 'null')
  || ',"n":' || coalesce(a.n, 0)
  || ',"job_ids":' || CASE WHEN a.ids IS NULL THEN '[]' ELSE '["' || a.ids || '"]' END
  || ',"params":' || coalesce(CAST(a.params AS text), 'null') || '}}', ',' ORDER BY p.grp) || ']'
FROM json_array_elements(CAST(:points AS json)) WITH ORDINALITY AS p(pt, grp) LEFT JOIN a ON a.grp = p.grp
"""
_PG_GROUP_PER_POINT = _PG_RESULTS.format(group="jobs.sweep_point_index + 1", join="")
_PG_GROUP_MAPPED = _PG_RESULTS.format(
    group="g.grp", join="JOIN unnest(CAST(string_to_array(:point_group, ',') AS int[])) WITH ORDINALITY AS g(grp, pidx) "
                        "ON g.pidx = jobs.sweep_point_index + 1")


def _dumps(obj: Any) -> str:
    # What FastAPI's JSONResponse writes.
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _results_pg(session: Session, sweep: m.Sweep, metric: str, group_by: list[str]) -> str:
    """The rows of the results table as JSON text, aggregated by Postgres."""
    from sqlalchemy import text

    group_points, point_group = _groups(sweep, group_by)
    params: dict[str, Any] = {"metric": metric, "train": sweep.kind == "train", "sweep_id": sweep.id,
                              "points": _dumps(group_points)}
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
        raise _missing_metric(session, sweep, metric)
    return rows_json or "[]"


def _results_py(session: Session, sweep: m.Sweep, metric: str, group_by: list[str]) -> list[dict[str, Any]]:
    """The rows of the results table, aggregated in Python (SQLite, the embedded default)."""
    cols = [m.Job.id, m.Job.sweep_point_index, m.Job.status, m.Job.result[metric].as_string()]
    if sweep.kind == "train":
        cols.append(m.Job.result["params_factored"].as_string())
    rows = session.execute(select(*cols).where(m.Job.sweep_id == sweep.id)
                           .order_by(m.Job.sweep_point_index, m.Job.seed)).all()
    group_points, point_group = _groups(sweep, group_by)
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
        v = _number(r[3])
        if v is not None:
            grp["values"].append(v)
        if sweep.kind == "train":
            pv = _number(r[4])
            if pv is not None:
                grp["params"].append(pv)
    if any_succeeded and not succeeded_with_key:
        raise _missing_metric(session, sweep, metric)
    out = []
    for grp in groups:
        row = {"point": grp["point"], **_stats(grp["values"]), "job_ids": grp["job_ids"]}
        row["params"] = (math.fsum(grp["params"]) / len(grp["params"])) if grp["params"] else None
        out.append(row)
    return out


def _is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def results(sweep_id: str | uuid.UUID, *, metric: str | None = None,
            group_by: list[str] | None = None) -> ResultsTable:
    """One row per group (default: per grid point) over seeds, from the succeeded jobs' `result[metric]`."""
    with session_scope() as session:
        sweep, metric, group_by = _resolve(session, sweep_id, metric, group_by)
        if _is_postgres(session):
            rows = json.loads(_results_pg(session, sweep, metric, group_by))
        else:
            rows = _results_py(session, sweep, metric, group_by)
        return ResultsTable(str(sweep_id), sweep.kind, metric, group_by, rows)


def results_document(sweep_id: str | uuid.UUID, *, metric: str | None = None,
                     group_by: list[str] | None = None) -> str:
    """The JSON results document ({"sweep_id","metric","group_by","rows"}) as text. On Postgres the
    rows' JSON comes straight from the database (no per-row work in Python)."""
    with session_scope() as session:
        sweep, metric, group_by = _resolve(session, sweep_id, metric, group_by)
        head = _dumps({"sweep_id": str(sweep_id), "metric": metric, "group_by": group_by})
        if _is_postgres(session):
            rows_json = _results_pg(session, sweep, metric, group_by)
        else:
            rows_json = _dumps(_results_py(session, sweep, metric, group_by))
    return head[:-1] + ',"rows":' + rows_json + "}"


def results_csv(table: ResultsTable) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*table.group_by, "mean", "std", "min", "max", "n", "params", "job_ids"])
    for r in table.rows:
        w.writerow([*(r["point"][g] for g in table.group_by),
                    *("" if r[k] is None else repr(r[k]) if isinstance(r[k], float) else r[k]
                      for k in ("mean", "std", "min", "max", "n", "params")),
                    " ".join(r["job_ids"])])
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Early stopping (successive halving); called by the worker.

def decide_rung(values: dict[int, float], decided: dict[str, str], mode: str, keep: float,
                min_points: int) -> dict[int, str]:
    """Pure decision of one milestone. `values`: point index -> value at this milestone (points not
    stopped earlier); `decided`: str(point) -> "kept"|"stopped" from earlier calls. Returns the new
    decisions: nothing until min_points points have values; then each undecided point is stopped if
    strictly worse than the ceil(keep*n)-th best of all n values."""
    if len(values) < min_points:
        return {}
    ordered = sorted(values.values(), reverse=(mode == "max"))
    n_keep = max(1, math.ceil(keep * len(ordered)))
    cutoff = ordered[n_keep - 1]
    out = {}
    for p, v in values.items():
        if str(p) in decided:
            continue
        worse = v < cutoff if mode == "max" else v > cutoff
        out[p] = "stopped" if worse else "kept"
    return out


def _epoch_values(session: Session, sweep_id: uuid.UUID, metric: str,
                  epochs: list[int]) -> dict[uuid.UUID, dict[int, float]]:
    """job -> {epoch: metric value at that epoch's end} for the sweep's jobs."""
    marker, ep, val = aliased(m.Metric), aliased(m.Metric), aliased(m.Metric)
    rows = session.execute(
        select(marker.job_id, ep.value, val.value)
        .join(ep, and_(ep.job_id == marker.job_id, ep.step == marker.step, ep.name == "epoch"))
        .join(val, and_(val.job_id == marker.job_id, val.step == marker.step, val.name == metric))
        .where(marker.name == EPOCH_END_MARKER,
               marker.job_id.in_(select(m.Job.id).where(m.Job.sweep_id == sweep_id)),
               ep.value.in_([float(e) for e in epochs]))
    ).all()
    out: dict[uuid.UUID, dict[int, float]] = {}
    for job_id, epoch, value in rows:
        if value is not None and math.isfinite(value):
            out.setdefault(job_id, {})[int(epoch)] = float(value)
    return out


def apply_early_stopping(sweep_id: str | uuid.UUID) -> list[str]:
    """Judge the sweep's milestones with the metrics recorded so far; stop the worse points.
    Idempotent; serialized per sweep by a row lock. Returns the ids of jobs cancelled or asked to stop."""
    sid = _uuid(sweep_id, "sweep")
    with session_scope() as session:
        row = session.scalars(select(m.Sweep).where(m.Sweep.id == sid).with_for_update()).one_or_none()
        if row is None or not row.early_stopping or row.cancel_requested:
            return []
        rule = json.loads(json.dumps(row.early_stopping))
        decisions: dict[str, dict[str, Any]] = rule.setdefault("decisions", {})
        jobs = session.execute(select(m.Job.id, m.Job.sweep_point_index, m.Job.status)
                               .where(m.Job.sweep_id == sid)).all()
        by_point: dict[int, list[tuple[uuid.UUID, str]]] = {}
        for job_id, idx, status in jobs:
            by_point.setdefault(idx, []).append((job_id, status))
        values = _epoch_values(session, sid, rule["metric"], rule["epochs"])
        min_points = rule.get("min_points") or row.n_points
        stopped_before: set[int] = set()
        newly_stopped: set[int] = set()
        changed = False
        for epoch in rule["epochs"]:
            rung = decisions.setdefault(str(epoch), {"decided": {}, "values": {}})
            point_values: dict[int, float] = {}
            for idx, members in by_point.items():
                if idx in stopped_before:
                    continue
                vals, complete = [], True
                for job_id, status in members:
                    v = values.get(job_id, {}).get(epoch)
                    if v is not None:
                        vals.append(v)
                    elif status not in m.TERMINAL_STATUSES:
                        complete = False  # this seed has not reached the milestone yet
                if complete and vals:
                    point_values[idx] = math.fsum(vals) / len(vals)
            new = decide_rung(point_values, rung["decided"], rule["mode"], rule["keep"], min_points)
            for idx, verdict in new.items():
                rung["decided"][str(idx)] = verdict
                rung["values"][str(idx)] = point_values[idx]
                changed = True
                if verdict == "stopped":
                    newly_stopped.add(idx)
            stopped_before |= {int(p) for p, v in rung["decided"].items() if v == "stopped"}
            if len(point_values) < min_points:
                break  # later milestones wait for this one
        if changed:
            row.early_stopping = rule
        if not newly_stopped:
            return []
        targets = [j for idx in newly_stopped for j, status in by_point[idx] if status not in m.TERMINAL_STATUSES]
        if targets:
            _cancel_jobs(session, m.Job.id.in_(targets), _now())
        log.info("sweep %s: early stopping stopped points %s (%d jobs)", sid, sorted(newly_stopped), len(targets))
        return [str(t) for t in targets]


def has_early_stopping(sweep_id: str | uuid.UUID) -> bool:
    with session_scope() as session:
        return bool(session.scalar(select(m.Sweep.early_stopping.is_not(None))
                                   .where(m.Sweep.id == _uuid(sweep_id, "sweep"))))


def on_epoch_metrics(sweep_id: str, rows: Iterable[tuple[str, int, float]]) -> list[str]:
    """Worker hook after a metrics batch is written: judge milestones when an epoch ended."""
    if not any(name == EPOCH_END_MARKER for name, _, _ in rows):
        return []
    return apply_early_stopping(sweep_id)


def on_job_finished(sweep_id: str) -> list[str]:
    """Worker hook after a job of the sweep ended (a failed seed may complete a point's value)."""
    return apply_early_stopping(sweep_id)


__all__ = [
    "EarlyStopping", "ResultsTable", "SweepCreate", "SweepPage", "SweepRecord", "apply_early_stopping",
    "cancel_sweep", "create_sweep", "decide_rung", "expand", "get_sweep", "grid_points", "has_early_stopping",
    "list_sweeps", "on_epoch_metrics", "on_job_finished", "results", "results_csv", "results_document",
    "retry_failed", "send_jobs",
]
