"""Creating a grid sweep: the sweep row and all its jobs (queued) in one transaction, idempotent per owner.

Jobs are written with one bulk INSERT; the caller sends their messages after the commit
(jobs.dispatch.dispatch). A search sweep (strategy "search") is created by jobs/search.py.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import uuid
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from jobs import models as m
from jobs import quotas
from jobs.db import session_scope
from jobs.dispatch import JobDispatch
from jobs.errors import Conflict
from jobs.rows import utcnow
from jobs.specs import AnySpec, spec_to_dict
from jobs.store import check_references, job_values, needs_resolution, resolve_references
from jobs.sweeps.lifecycle import SweepRecord, get_sweep, sweep_record
from jobs.sweeps.request import SweepCreate, expand


def _request_fingerprint(req: SweepCreate) -> dict[str, Any]:
    return {"name": req.name, "base": req.base, "grid": req.grid, "seeds": req.seeds,
            "early_stopping": req.early_stopping.model_dump(mode="json") if req.early_stopping else None,
            "strategy": req.strategy, "search": req.search.model_dump(mode="json") if req.search else None}


def _row_fingerprint(row: m.Sweep) -> dict[str, Any]:
    es = dict(row.early_stopping) if row.early_stopping else None
    if es is not None:
        es.pop("decisions", None)
    return {"name": row.name, "base": row.base, "grid": row.grid, "seeds": row.seeds, "early_stopping": es,
            "strategy": row.strategy, "search": row.search}


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def create_sweep(req: SweepCreate, *, owner: str | None = None, idempotency_key: str | None = None,
                 enforce_quota: bool = False) -> tuple[SweepRecord, bool, list[JobDispatch]]:
    """Store the sweep and all its jobs (queued) in one transaction.

    Returns (sweep, created, the jobs to dispatch). The owner's same idempotency
    key (scoped by owner, as for jobs) with the same request returns the existing sweep,
    created=False, nothing to enqueue; with a different request it raises Conflict.
    `enforce_quota` (a caller who is not an admin): the sweep's size and the owner's queued jobs
    within the quotas (jobs/quotas.py; QuotaExceeded)."""
    if req.strategy == "search":  # points asked by a sampler: jobs/search.py
        from jobs import search

        return search.create_search_sweep(req, owner=owner, idempotency_key=idempotency_key,
                                          enforce_quota=enforce_quota)
    if idempotency_key is not None:
        existing = find_idempotent(idempotency_key, req, owner)
        if existing is not None:
            return existing, False, []
    if enforce_quota:  # before validating thousands of points
        quotas.check_sweep_size(math.prod(len(v) for v in req.grid.values()) * len(req.seeds))
    points = expand(req)
    if any(needs_resolution(spec) for _, spec in points):  # e.g. latency sources: the jobs store resolved specs
        with session_scope() as session:
            points = [(p, resolve_references(session, spec, owner=owner, admin=not enforce_quota)) for p, spec in points]
    now = utcnow()
    sweep_id = uuid.uuid4()
    es = req.early_stopping.model_dump(mode="json") if req.early_stopping else None
    if es is not None:
        es["decisions"] = {}
    job_rows: list[dict[str, Any]] = []
    tag_rows: list[dict[str, Any]] = []
    send: list[JobDispatch] = []
    for index, (point, spec) in enumerate(points):
        point_jobs(spec, point, index, req.seeds, sweep_id=sweep_id, owner=owner, now=now,
                   out=(job_rows, tag_rows, send))
    try:
        with session_scope() as session:
            if enforce_quota:
                quotas.check_queued(session, owner, jobs=len(job_rows),
                                    high=len(req.seeds) * sum(spec.priority == "high" for _, spec in points))
            for _, spec in points:
                check_references(session, spec, owner=owner, admin=not enforce_quota)  # I/O only for uploads, sources
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
        return replay_or_raise(idempotency_key, req, owner), False, []
    return get_sweep(sweep_id), True, send


def point_jobs(spec: AnySpec, point: dict[str, Any], index: int, seeds: list[int], *, sweep_id: uuid.UUID,
               owner: str | None, now: dt.datetime,
               out: tuple[list[dict[str, Any]], list[dict[str, Any]], list[JobDispatch]]) -> None:
    """The job rows (one per seed), tag rows and messages to send of one sweep point (a grid point, or a
    search's trial: index = its number), appended to `out` = (job_rows, tag_rows, send)."""
    job_rows, tag_rows, send = out
    canonical = spec_to_dict(spec)
    tags = list(dict.fromkeys(spec.tags))
    point_row = job_values(spec, canonical, owner=owner, now=now, tags=tags, sweep_id=sweep_id, sweep_point=point,
                           sweep_point_index=index, attempts=0, cancel_requested=False)
    for seed in seeds:
        job_id = uuid.uuid4()
        job_rows.append({**point_row, "id": job_id, "spec": {**canonical, "seed": seed}, "seed": seed})
        tag_rows.extend({"job_id": job_id, "tag": t} for t in tags)
        send.append(JobDispatch(str(job_id), point_row["queue"], spec.priority))


def replay_or_raise(key: str | None, req: SweepCreate, owner: str | None) -> SweepRecord:
    """After an IntegrityError on insert: the sweep a concurrent request with the same idempotency key
    created (its replay), or the error again when there is none."""
    existing = find_idempotent(key, req, owner) if key is not None else None
    if existing is None:
        raise
    return existing


def find_idempotent(key: str, req: SweepCreate, owner: str | None) -> SweepRecord | None:
    """The owner's sweep created with this key (None: none yet); Conflict when its request differs."""
    with session_scope() as session:
        row = session.scalars(select(m.Sweep).where(m.Sweep.idempotency_key == key, m.owned_by(m.Sweep, owner))
                              ).one_or_none()
        if row is None:
            return None
        if not _same(_row_fingerprint(row), _request_fingerprint(req)):
            raise Conflict(f"Idempotency-Key {key!r} was already used for your sweep {row.id} with a different "
                           "request", sweep_id=str(row.id))
        return sweep_record(session, row)
