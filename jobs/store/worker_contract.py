"""The worker's side of the store: claim a job, heartbeat it (and learn of a cancel), record its outcome,
give back a run that ended without one, and re-queue the jobs of workers that are gone (the reaper).

Workers claim with jobs.claims.claim_next_job (fair, with a lease); claim_job here targets one job
(tools and tests). Metrics and artifacts a job writes: jobs/store/metrics.py, jobs/store/artifacts.py.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from typing import Any, Literal

from sqlalchemy import and_, func, or_, select, update

from jobs import models as m
from jobs.db import session_scope
from jobs.rows import as_uuid, utcnow
from jobs.store.jobs import JobRecord, get_job_row
from jobs.vocabulary import TERMINAL_STATUSES, JobStatus


def claim_job(job_id: str | uuid.UUID, worker_name: str, *, stale_after_s: float) -> JobRecord | None:
    """Atomically take a job to run: succeeds only if it is queued, or running with a heartbeat older
    than `stale_after_s` (its worker died). Sets running, started_at (first time), heartbeat_at,
    worker, attempts += 1. Returns None when the job is not claimable: a duplicate delivery, a job
    another worker runs, a finished or cancelled job, or no such job. Workers claim with
    jobs.claims.claim_next_job (fair, and with a lease); this targets one job (tools and tests)."""
    jid = as_uuid(job_id)
    now = utcnow()
    cutoff = now - dt.timedelta(seconds=stale_after_s)
    with session_scope() as session:
        claimed = session.execute(
            update(m.Job)
            .where(m.Job.id == jid, or_(
                m.Job.status == "queued",
                and_(m.Job.status == "running", or_(m.Job.heartbeat_at.is_(None), m.Job.heartbeat_at < cutoff)),
            ))
            .values(status="running", started_at=func.coalesce(m.Job.started_at, now), heartbeat_at=now,
                    worker=worker_name, attempts=m.Job.attempts + 1, leased=None)
            .execution_options(synchronize_session=False)
        ).rowcount
        if claimed != 1:
            return None
        return JobRecord.from_row(get_job_row(session, jid))


JobControl = Literal["run", "cancel", "lost"]


def running_under(jid: uuid.UUID, worker_name: str, attempt: int | None) -> Any:
    """The job is running under this worker (and, with `attempt`, under this very claim: a fencing token
    that tells two claims of one worker apart)."""
    cond = and_(m.Job.id == jid, m.Job.worker == worker_name, m.Job.status == "running")
    return cond if attempt is None else and_(cond, m.Job.attempts == attempt)


def beat(job_id: str | uuid.UUID, worker_name: str, progress: float | None = None, *,
         attempt: int | None = None) -> JobControl:
    """Refresh the job's heartbeat (and progress, 0..1) and say what its supervisor should do: "run" on,
    "cancel" (cancel_requested is set: stop the job and record it cancelled), or "lost" (the job no longer
    runs under this claim: re-queued after a stale heartbeat, or finished; stop without recording)."""
    jid = as_uuid(job_id)
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if progress is not None:
        values["progress"] = min(1.0, max(0.0, float(progress)))
    with session_scope() as session:
        owned = session.execute(update(m.Job).where(running_under(jid, worker_name, attempt)).values(**values)
                                .execution_options(synchronize_session=False)).rowcount
        if owned != 1:
            return "lost"
        return "cancel" if session.scalar(select(m.Job.cancel_requested).where(m.Job.id == jid)) else "run"


def job_control(job_id: str | uuid.UUID, worker_name: str, *, attempt: int | None = None) -> JobControl:
    """What `beat` answers, read only (a supervisor polls it between heartbeats so a cancel acts fast)."""
    jid = as_uuid(job_id)
    with session_scope() as session:
        row = session.execute(select(m.Job.cancel_requested)
                              .where(running_under(jid, worker_name, attempt))).one_or_none()
    if row is None:
        return "lost"
    return "cancel" if row[0] else "run"


def heartbeat(job_id: str | uuid.UUID, worker_name: str, progress: float | None = None) -> bool:
    """`beat` as a yes/no: True when the worker should stop (cancel requested, or the job is lost)."""
    return beat(job_id, worker_name, progress) != "run"


def finish_job(job_id: str | uuid.UUID, worker_name: str, status: JobStatus, *,
               result: dict[str, Any] | None = None, error: str | None = None, attempt: int | None = None) -> bool:
    """Record the outcome (succeeded | failed | cancelled) if the job is still running under this worker
    (and claim `attempt`). Returns False (and changes nothing) when another worker took it over or it was
    already finished."""
    if status not in TERMINAL_STATUSES:
        raise ValueError(f"status must be one of {TERMINAL_STATUSES}, got {status!r}")
    values: dict[str, Any] = {"status": status, "finished_at": utcnow(), "result": result, "error": error}
    if status == "succeeded":
        values["progress"] = 1.0
    with session_scope() as session:
        return session.execute(
            update(m.Job).where(running_under(as_uuid(job_id), worker_name, attempt))
            .values(**values).execution_options(synchronize_session=False)
        ).rowcount == 1


def _give_back(row: m.Job, now: dt.datetime, max_attempts: int, why: str) -> bool:
    """A running job whose run ended without an outcome (`why`): back to queued (True), or cancelled when a
    cancel was requested, or failed with `why` after max_attempts runs (False)."""
    if row.cancel_requested:
        row.status, row.finished_at = "cancelled", now
        return False
    if row.attempts >= max_attempts:
        row.status, row.finished_at = "failed", now
        row.error = f"{why}; the job has had {row.attempts} runs (max_attempts={max_attempts})"
        return False
    row.status, row.worker, row.enqueued_at, row.leased = "queued", None, now, None
    row.error = f"run {row.attempts} ended: {why}; re-queued"
    return True


def requeue_job(job_id: str | uuid.UUID, worker_name: str, why: str, *, max_attempts: int,
                attempt: int | None = None) -> str | None:
    """The supervisor's record of a run that ended without an outcome (its process died, the worker shut
    down): the job goes back to queued (the caller sends its message), or to cancelled/failed as
    `_give_back` says. Returns the new status, or None when the job no longer runs under this claim."""
    with session_scope() as session:
        row = session.scalars(select(m.Job).where(running_under(as_uuid(job_id), worker_name, attempt))
                              .with_for_update()).one_or_none()
        if row is None:
            return None
        _give_back(row, utcnow(), max_attempts, why)
        return row.status


@dataclasses.dataclass(frozen=True)
class Requeued:
    job_id: str
    device: str
    priority: str
    why: str  # what the reaper saw (for its log)


def requeue_stale_jobs(stale_after_s: float, max_attempts: int, *,
                       orphaned_after_s: float | None = None) -> list[Requeued]:
    """Running jobs whose worker is gone: back to queued (or `failed` once they have had `max_attempts`
    runs, or `cancelled` if a cancel was requested). Gone means either
      * stale: no heartbeat for `stale_after_s` (any death, including a lost host or network), or
      * orphaned (with `orphaned_after_s`): the claim took a lease (jobs/lease.py) that is now free, and
        the heartbeat is older than `orphaned_after_s` - the supervisor's process died, seen by the OS.
    Returns the re-queued ones; the caller enqueues them (then may call mark_enqueued)."""
    from jobs import lease

    now = utcnow()
    stale_cutoff = now - dt.timedelta(seconds=stale_after_s)
    cutoff = stale_cutoff if orphaned_after_s is None else now - dt.timedelta(seconds=min(orphaned_after_s,
                                                                                          stale_after_s))
    requeued: list[Requeued] = []
    with session_scope() as session:
        stmt = select(m.Job).where(
            m.Job.status == "running", or_(m.Job.heartbeat_at.is_(None), m.Job.heartbeat_at < cutoff)
        ).with_for_update(skip_locked=True)
        rows = list(session.scalars(stmt))
        trust = orphaned_after_s is not None and rows and lease.trustworthy(session, stale_after_s)
        for row in rows:
            silent = (now - row.heartbeat_at).total_seconds() if row.heartbeat_at else float("inf")
            if row.heartbeat_at is None or row.heartbeat_at < stale_cutoff:
                why = f"worker {row.worker!r} stopped heartbeating ({silent:.0f} s silent)"
            elif trust and row.leased and lease.is_free(session, row.id):
                why = f"worker {row.worker!r} is gone (its process released the job's lease; {silent:.1f} s silent)"
            else:
                continue
            if _give_back(row, now, max_attempts, why):
                requeued.append(Requeued(str(row.id), row.queue, row.priority, why))
    return requeued
