"""A sweep's record (status and counts follow its jobs; a search's follow its trials), listing, cancel and
retry of its failed jobs."""
from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from jobs import models as m
from jobs import quotas
from jobs.db import session_scope
from jobs.dispatch import JobDispatch
from jobs.rows import check_actor, get_row, keyset_page, utcnow, where_id_prefix
from jobs.store import cancel_jobs, requeue_values
from jobs.vocabulary import JOB_STATUSES, TERMINAL_STATUSES


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
    strategy: str = "grid"
    search: dict[str, Any] | None = None  # search sweeps: the configuration
    trials: dict[str, int] | None = None  # search sweeps: trials per state, asked, n_trials


@dataclasses.dataclass(frozen=True)
class SweepPage:
    items: list[SweepRecord]
    next_cursor: str | None


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
    out = {sid: dict.fromkeys(JOB_STATUSES, 0) for sid in sweep_ids}
    if sweep_ids:
        rows = session.execute(select(m.Job.sweep_id, m.Job.status, func.count())
                               .where(m.Job.sweep_id.in_(sweep_ids)).group_by(m.Job.sweep_id, m.Job.status))
        for sid, status, n in rows:
            out[sid][status] = n
    return out


def sweep_record(session: Session, row: m.Sweep, counts: dict[str, int] | None = None) -> SweepRecord:
    if counts is None:
        counts = _counts(session, [row.id])[row.id]
    total = row.n_jobs
    finished = sum(counts[s] for s in TERMINAL_STATUSES)
    rec = SweepRecord(
        id=str(row.id), name=row.name, kind=row.kind, status=_status(counts, total, row.cancel_requested),
        base=row.base, grid=row.grid, seeds=list(row.seeds), early_stopping=row.early_stopping,
        n_points=row.n_points, total=total, counts=counts, progress=(finished / total) if total else 1.0,
        owner=row.owner, cancel_requested=row.cancel_requested, created_at=row.created_at)
    if row.strategy == "search":  # status and progress follow the trials (jobs/search.py)
        from jobs import search_results

        rec = search_results.search_record(session, row, rec)
    return rec


def get_sweep_row(session: Session, sweep_id: str | uuid.UUID, *, for_update: bool = False) -> m.Sweep:
    return get_row(session, m.Sweep, sweep_id, "sweep", for_update=for_update)


def get_sweep(sweep_id: str | uuid.UUID) -> SweepRecord:
    with session_scope() as session:
        return sweep_record(session, get_sweep_row(session, sweep_id))


def list_sweeps(*, owner: str | None = None, kind: str | None = None, id_prefix: str | None = None,
                limit: int = 50, cursor: str | None = None) -> SweepPage:
    """Sweeps newest first (keyset pagination on created_at, id), each with its status counts.
    `id_prefix`: sweeps whose id starts with these hex digits (how a short id is resolved)."""
    stmt = select(m.Sweep)
    if id_prefix is not None:
        stmt = where_id_prefix(stmt, m.Sweep, id_prefix)
    if owner is not None:
        stmt = stmt.where(m.Sweep.owner == owner)
    if kind is not None:
        stmt = stmt.where(m.Sweep.kind == kind)
    with session_scope() as session:
        rows, next_cursor = keyset_page(session, stmt, m.Sweep, cursor, limit)
        counts = _counts(session, [r.id for r in rows])
        items = [sweep_record(session, r, counts[r.id]) for r in rows]
    return SweepPage(items, next_cursor)


def cancel_sweep(sweep_id: str | uuid.UUID, *, actor: str | None = None, admin: bool = True) -> SweepRecord:
    """Queued jobs -> cancelled at once; running jobs get cancel_requested (workers stop at the next check)."""
    with session_scope() as session:
        row = get_sweep_row(session, sweep_id, for_update=True)
        check_actor(row, actor, admin, "cancel", "sweep")
        row.cancel_requested = True
        cancel_jobs(session, m.Job.sweep_id == row.id, utcnow())
        session.flush()
        return sweep_record(session, row)


def retry_failed(sweep_id: str | uuid.UUID, *, include_cancelled: bool = False, actor: str | None = None,
                 admin: bool = True) -> tuple[SweepRecord, list[JobDispatch]]:
    """Failed (and with include_cancelled, cancelled) jobs back to queued on the same rows, as
    store.retry_job does (within the owner's quotas unless admin). Returns (sweep, the jobs to dispatch)."""
    statuses = ("failed", "cancelled") if include_cancelled else ("failed",)
    now = utcnow()
    with session_scope() as session:
        row = get_sweep_row(session, sweep_id, for_update=True)
        check_actor(row, actor, admin, "retry", "sweep")
        if row.strategy == "search":
            from jobs.search import no_retry

            raise no_retry(row.id)
        if not admin:
            again, high = session.execute(
                select(func.count(), func.count().filter(m.Job.priority == "high"))
                .where(m.Job.sweep_id == row.id, m.Job.status.in_(statuses))).one()
            quotas.check_queued(session, row.owner, jobs=again, high=high)
        ids = session.execute(
            update(m.Job).where(m.Job.sweep_id == row.id, m.Job.status.in_(statuses))
            .values(**requeue_values(now))
            .returning(m.Job.id, m.Job.queue, m.Job.priority).execution_options(synchronize_session=False)
        ).all()
        if ids and include_cancelled:
            row.cancel_requested = False
        session.flush()
        return sweep_record(session, row), [JobDispatch(str(i), q, p) for i, q, p in ids]
