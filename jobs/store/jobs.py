"""Jobs: create (idempotent per owner, within quotas), read and list, cancel and retry.

Each public function is one transaction (`session_scope`), returns plain dataclasses (never ORM rows) and
raises the domain errors of jobs/errors.py (never HTTP). The caller sends a created or retried job's
message after the commit (jobs.dispatch.dispatch).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from jobs import models as m
from jobs import quotas
from jobs.db import get_engine, session_scope
from jobs.errors import Conflict, InvalidState
from jobs.rows import as_uuid, check_actor, get_row, is_postgres, keyset_page, utcnow, where_id_prefix
from jobs.specs import AnySpec, parse_spec, queue_for, spec_to_dict
from jobs.store.uploads import check_references, needs_references, needs_resolution, resolve_references


@dataclasses.dataclass(frozen=True)
class JobRecord:
    id: str
    kind: str
    spec: dict[str, Any]
    status: str
    queue: str  # "cpu" | "gpu": the device family of the queue it runs on
    priority: str  # "high" | "normal" | "low"
    name: str | None
    tags: list[str]
    owner: str | None
    idempotency_key: str | None
    sweep_id: str | None
    sweep_point: dict[str, Any] | None
    sweep_point_index: int | None
    seed: int
    attempts: int
    cancel_requested: bool
    worker: str | None
    progress: float | None
    result: dict[str, Any] | None
    error: str | None
    created_at: dt.datetime
    enqueued_at: dt.datetime | None
    started_at: dt.datetime | None
    heartbeat_at: dt.datetime | None
    finished_at: dt.datetime | None

    @classmethod
    def from_row(cls, row: m.Job) -> JobRecord:
        return cls(
            id=str(row.id), kind=row.kind, spec=row.spec, status=row.status, queue=row.queue,
            priority=row.priority, name=row.name, tags=list(row.tags or []), owner=row.owner,
            idempotency_key=row.idempotency_key, sweep_id=str(row.sweep_id) if row.sweep_id else None,
            sweep_point=row.sweep_point, sweep_point_index=row.sweep_point_index, seed=row.seed,
            attempts=row.attempts, cancel_requested=row.cancel_requested, worker=row.worker,
            progress=row.progress, result=row.result, error=row.error, created_at=row.created_at,
            enqueued_at=row.enqueued_at, started_at=row.started_at, heartbeat_at=row.heartbeat_at,
            finished_at=row.finished_at,
        )


@dataclasses.dataclass(frozen=True)
class JobPage:
    items: list[JobRecord]
    next_cursor: str | None  # pass back as `cursor` for the next (older) page; None = last page


def get_job_row(session: Session, job_id: str | uuid.UUID, *, for_update: bool = False) -> m.Job:
    return get_row(session, m.Job, job_id, "job", for_update=for_update)


def job_values(spec: AnySpec, canonical: dict[str, Any], *, owner: str | None, idempotency_key: str | None = None,
               now: dt.datetime | None = None, tags: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """The column values of a new queued job for a validated spec (`canonical` = spec_to_dict(spec));
    `extra` adds columns (a sweep's job: sweep_id, sweep_point, ...). enqueued_at is set optimistically:
    the caller sends the message right after the commit and records a failure to send with
    mark_not_enqueued (saves a second commit per submission)."""
    now = now or utcnow()
    return {"id": uuid.uuid4(), "kind": spec.kind, "spec": canonical, "status": "queued", "priority": spec.priority,
            "queue": queue_for(spec), "name": spec.name, "tags": list(spec.tags) if tags is None else tags,
            "owner": owner, "idempotency_key": idempotency_key, "seed": spec.seed, "created_at": now,
            "enqueued_at": now, **extra}


def build_job_row(spec: AnySpec, *, owner: str | None = None, idempotency_key: str | None = None,
                  canonical: dict[str, Any] | None = None) -> m.Job:
    """An unsaved Job row (with its tag rows) for a validated spec."""
    values = job_values(spec, spec_to_dict(spec) if canonical is None else canonical, owner=owner,
                        idempotency_key=idempotency_key)
    return m.Job(**values, attempts=0, cancel_requested=False,
                 job_tags=[m.JobTag(job_id=values["id"], tag=t) for t in dict.fromkeys(spec.tags)])


def create_job(spec: AnySpec | dict[str, Any], *, idempotency_key: str | None = None,
               owner: str | None = None, enforce_quota: bool = False) -> tuple[JobRecord, bool]:
    """Store a new queued job. Returns (job, created).

    An idempotency key is scoped by owner (None, auth off, is one owner): the owner's same key with the
    same spec returns the existing job and created=False; with a different spec it raises Conflict.
    Another owner's key never matters. `enforce_quota` (a caller who is not an admin) checks the
    owner's quotas first (jobs/quotas.py; QuotaExceeded). The caller enqueues the job
    (jobs.dispatch.dispatch) after this returns; enqueued_at is already set, so only a failed send
    needs recording (mark_not_enqueued).
    """
    if isinstance(spec, dict):
        spec = parse_spec(spec)
    if needs_resolution(spec):  # e.g. a latency job's source: the stored spec (and idempotency) is the resolved one
        with session_scope() as session:
            spec = resolve_references(session, spec, owner=owner, admin=not enforce_quota)
    canonical = spec_to_dict(spec)
    if idempotency_key is not None:
        existing = _find_idempotent(idempotency_key, canonical, owner)
        if existing is not None:
            return existing, False
    try:
        needs_lookup = needs_references(spec)
        engine = get_engine()
        if is_postgres(engine) and not needs_lookup:
            # The hot path of POST /jobs: one statement (job row + its tag rows) in autocommit, so a
            # submission costs one round trip to Postgres instead of BEGIN / INSERT / INSERT / COMMIT.
            values = job_values(spec, canonical, owner=owner, idempotency_key=idempotency_key)
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                if enforce_quota:
                    quotas.check_queued(conn, owner, jobs=1, high=int(spec.priority == "high"))
                conn.execute(_PG_INSERT_JOB, {**values, "tag_list": list(dict.fromkeys(spec.tags))})
            return _record_from_values(values), True
        with session_scope() as session:
            if enforce_quota:
                quotas.check_queued(session, owner, jobs=1, high=int(spec.priority == "high"))
            check_references(session, spec, owner=owner, admin=not enforce_quota)
            row = build_job_row(spec, owner=owner, idempotency_key=idempotency_key, canonical=canonical)
            session.add(row)
            session.flush()
            return JobRecord.from_row(row), True
    except IntegrityError:
        # A concurrent request with the same key won the insert race.
        if idempotency_key is None:
            raise
        existing = _find_idempotent(idempotency_key, canonical, owner)
        if existing is None:
            raise
        return existing, False


def _record_from_values(v: dict[str, Any]) -> JobRecord:
    return JobRecord(
        id=str(v["id"]), kind=v["kind"], spec=v["spec"], status="queued", queue=v["queue"], priority=v["priority"],
        name=v["name"], tags=v["tags"], owner=v["owner"], idempotency_key=v["idempotency_key"], sweep_id=None,
        sweep_point=None, sweep_point_index=None, seed=v["seed"], attempts=0, cancel_requested=False, worker=None,
        progress=None, result=None, error=None, created_at=v["created_at"], enqueued_at=v["enqueued_at"],
        started_at=None, heartbeat_at=None, finished_at=None)


def _pg_insert_job_statement():
    """INSERT the job and, in the same statement, one job_tags row per distinct tag (Postgres)."""
    from sqlalchemy import ARRAY, String, bindparam, func, insert, literal_column

    cols = ["id", "kind", "spec", "status", "priority", "queue", "name", "tags", "owner", "idempotency_key",
            "seed", "created_at", "enqueued_at"]
    job = (insert(m.Job)
           .values({c: bindparam(c, type_=m.Job.__table__.c[c].type) for c in cols}
                   | {"attempts": 0, "cancel_requested": False})
           .returning(m.Job.id)
           .cte("new_job"))
    tags = func.unnest(bindparam("tag_list", type_=ARRAY(String(64)))).table_valued("tag").render_derived(name="t")
    return insert(m.JobTag).from_select(["job_id", "tag"], select(job.c.id, tags.c.tag).select_from(job).join(
        tags, literal_column("true")))


_PG_INSERT_JOB = _pg_insert_job_statement()


def _find_idempotent(key: str, canonical: dict[str, Any], owner: str | None) -> JobRecord | None:
    """The owner's job created with this key (None: none yet); Conflict when its spec differs."""
    with session_scope() as session:
        row = session.scalars(select(m.Job).where(m.Job.idempotency_key == key, m.owned_by(m.Job, owner))
                              ).one_or_none()
        if row is None:
            return None
        if row.spec != canonical:
            raise Conflict(f"Idempotency-Key {key!r} was already used for your job {row.id} with a different spec",
                           job_id=str(row.id))
        return JobRecord.from_row(row)


def get_job(job_id: str | uuid.UUID) -> JobRecord:
    with session_scope() as session:
        return JobRecord.from_row(get_job_row(session, job_id))


def list_jobs(*, status: str | None = None, kind: str | None = None, sweep_id: str | uuid.UUID | None = None,
              tag: str | None = None, owner: str | None = None, id_prefix: str | None = None, limit: int = 50,
              cursor: str | None = None) -> JobPage:
    """Jobs newest first, filtered; keyset pagination on (created_at, id) with an opaque cursor.
    `id_prefix`: jobs whose id starts with these hex digits (how a short id is resolved)."""
    stmt = select(m.Job)
    if id_prefix is not None:
        stmt = where_id_prefix(stmt, m.Job, id_prefix)
    if status is not None:
        stmt = stmt.where(m.Job.status == status)
    if kind is not None:
        stmt = stmt.where(m.Job.kind == kind)
    if sweep_id is not None:
        stmt = stmt.where(m.Job.sweep_id == as_uuid(sweep_id, "sweep"))
    if owner is not None:
        stmt = stmt.where(m.Job.owner == owner)
    if tag is not None:
        stmt = stmt.where(m.Job.id.in_(select(m.JobTag.job_id).where(m.JobTag.tag == tag)))
    with session_scope() as session:
        rows, next_cursor = keyset_page(session, stmt, m.Job, cursor, limit)
    return JobPage([JobRecord.from_row(r) for r in rows], next_cursor)


def cancel_jobs(session: Session, where: Any, now: dt.datetime) -> int:
    """Cancel the jobs `where` selects (one job, a sweep's, a point's): queued ones become `cancelled` at once
    (they will never run); running ones get cancel_requested and their workers stop them at the next check.
    Finished jobs are left as they are. Returns how many jobs were cancelled or asked to stop."""
    n = session.execute(update(m.Job).where(where, m.Job.status == "queued")
                        .values(status="cancelled", cancel_requested=True, finished_at=now)
                        .execution_options(synchronize_session=False)).rowcount
    n += session.execute(update(m.Job).where(where, m.Job.status == "running")
                         .values(cancel_requested=True).execution_options(synchronize_session=False)).rowcount
    return n


def request_cancel(job_id: str | uuid.UUID, *, actor: str | None = None, admin: bool = True) -> JobRecord:
    """Cancel a job: a queued job becomes `cancelled` at once (it will never run); a running job gets
    cancel_requested=True and its worker stops at the next check. Cancelling a cancelled job is a
    no-op; cancelling a succeeded or failed job raises InvalidState. With admin=False only the job's
    owner (`actor`) may cancel it (Forbidden otherwise)."""
    jid = as_uuid(job_id)
    now = utcnow()
    with session_scope() as session:
        row = get_job_row(session, jid, for_update=True)
        check_actor(row, actor, admin, "cancel")
        cancel_jobs(session, m.Job.id == jid, now)
        session.refresh(row)
        if row.status in ("succeeded", "failed"):
            raise InvalidState(f"job {jid} already {row.status}; only queued or running jobs can be cancelled",
                               status=row.status)
        return JobRecord.from_row(row)


def requeue_values(now: dt.datetime) -> dict[str, Any]:
    """What a retry resets on a failed or cancelled job row (store.retry_job, sweeps.retry_failed).
    enqueued_at is set because the caller sends the job next (mark_not_enqueued if that fails)."""
    return {"status": "queued", "attempts": 0, "cancel_requested": False, "error": None, "result": None,
            "progress": None, "worker": None, "started_at": None, "heartbeat_at": None, "finished_at": None,
            "enqueued_at": now}


def retry_job(job_id: str | uuid.UUID, *, actor: str | None = None, admin: bool = True) -> JobRecord:
    """Put a failed or cancelled job back in the queue, on the same row (its id, sweep point and metric
    history stay; a train job resumes from its last checkpoint when one exists). Resets status,
    attempts, error, result, progress, worker and times. The caller enqueues it after this returns.
    With admin=False only the job's owner (`actor`) may retry it (Forbidden otherwise), within the
    owner's queued-job quotas (QuotaExceeded)."""
    jid = as_uuid(job_id)
    with session_scope() as session:
        row = get_job_row(session, jid, for_update=True)
        check_actor(row, actor, admin, "retry")
        if row.sweep_id is not None and session.get(m.Sweep, row.sweep_id).strategy == "search":
            from jobs.search import no_retry  # a told trial is final (jobs/search.py)

            raise no_retry(row.sweep_id)
        if row.status not in ("failed", "cancelled"):
            raise InvalidState(f"job {jid} is {row.status}; only failed or cancelled jobs can be retried",
                               status=row.status)
        if not admin:
            quotas.check_queued(session, row.owner, jobs=1, high=int(row.priority == "high"))
        for key, value in requeue_values(utcnow()).items():
            setattr(row, key, value)
        session.flush()
        return JobRecord.from_row(row)
