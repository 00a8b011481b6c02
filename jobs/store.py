"""The store: every read and write of jobs, metrics, artifacts and uploads.

Each public function is one transaction (`session_scope`), returns plain dataclasses (never ORM
rows) and raises the domain errors of jobs/errors.py (never HTTP). Times are UTC, from this
process's clock (hosts are expected to run NTP; staleness windows are minutes).

Worker contract (see the team brief): claim_job, heartbeat, record_metrics, add_artifact,
finish_job, requeue_stale_jobs, get_upload_path. API: create_job, get_job, list_jobs,
request_cancel, retry_job, get_metrics, list_artifacts, get_artifact, create_upload, get_upload.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from jobs import models as m
from jobs.db import get_engine, session_scope
from jobs.errors import Conflict, Forbidden, InvalidInput, InvalidState, NotFound, TooLarge
from jobs.settings import get_settings
from jobs.specs import AnySpec, UploadWeights, parse_spec, queue_for, spec_to_dict

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
UPLOAD_FORMATS = {".npy": "npy", ".npz": "npz", ".safetensors": "safetensors", ".pt": "pt", ".pth": "pt"}


# ---------------------------------------------------------------------------------------------
# Domain objects.

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

    @property
    def device(self) -> str:
        return self.queue

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


@dataclasses.dataclass(frozen=True)
class ArtifactRecord:
    job_id: str
    name: str
    path: Path  # absolute
    size: int  # bytes
    sha256: str
    created_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class UploadRecord:
    id: str
    filename: str
    format: str
    path: Path
    size: int
    sha256: str
    arrays: dict[str, Any] | None  # {name: {"shape": [..], "dtype": ".."}}; None for .pt
    owner: str | None
    created_at: dt.datetime

    @classmethod
    def from_row(cls, row: m.Upload) -> UploadRecord:
        return cls(id=str(row.id), filename=row.filename, format=row.format, path=_abs_path(row.path),
                   size=row.size, sha256=row.sha256, arrays=row.arrays, owner=row.owner,
                   created_at=row.created_at)


@dataclasses.dataclass(frozen=True)
class MetricSeries:
    name: str
    steps: list[int]
    values: list[float | None]  # None = NaN or infinite (JSON has neither)
    total: int  # points stored
    downsampled: bool


# ---------------------------------------------------------------------------------------------
# Helpers.

def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _uuid(value: str | uuid.UUID, what: str = "job") -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise NotFound(f"{what} {value!r} not found (not a UUID)") from None


def _rel_path(path: str | os.PathLike[str]) -> str:
    """Paths under the artifact root are stored relative to it, so the root can move."""
    p = Path(path).resolve()
    root = get_settings().artifacts
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)


def _abs_path(stored: str) -> Path:
    p = Path(stored)
    return p if p.is_absolute() else get_settings().artifacts / p


def get_row(session: Session, model: Any, row_id: str | uuid.UUID, what: str, *, for_update: bool = False) -> Any:
    """The `model` row with this id (a job or a sweep: `what` names it in errors); NotFound otherwise."""
    stmt = select(model).where(model.id == _uuid(row_id, what))
    if for_update:
        stmt = stmt.with_for_update()
    row = session.scalars(stmt).one_or_none()
    if row is None:
        raise NotFound(f"{what} {row_id} not found")
    return row


def _get_job_row(session: Session, job_id: str | uuid.UUID, *, for_update: bool = False) -> m.Job:
    return get_row(session, m.Job, job_id, "job", for_update=for_update)


def check_actor(row: Any, actor: str | None, admin: bool, action: str, what: str = "job") -> None:
    """Only the owner of a job or sweep, or an admin, may act on it (Forbidden)."""
    if not admin and row.owner != actor:
        raise Forbidden(f"{what} {row.id} belongs to {row.owner or 'nobody'}; only its owner or an admin may "
                        f"{action} it")


def _insert(session: Session):  # noqa: ANN202 - dialect-specific INSERT with ON CONFLICT
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


# ---------------------------------------------------------------------------------------------
# Creating jobs.

def job_values(spec: AnySpec, canonical: dict[str, Any], *, owner: str | None, idempotency_key: str | None = None,
               now: dt.datetime | None = None, tags: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """The column values of a new queued job for a validated spec (`canonical` = spec_to_dict(spec));
    `extra` adds columns (a sweep's job: sweep_id, sweep_point, ...). enqueued_at is set optimistically:
    the caller sends the message right after the commit and records a failure to send with
    mark_not_enqueued (saves a second commit per submission)."""
    now = now or _now()
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


def check_references(session: Session, spec: AnySpec) -> None:
    """Checks a spec against stored data (uploads it names, rank vs the uploaded matrix); InvalidInput."""
    for field in ("weights", "teacher"):
        source = getattr(spec, field, None)
        if not isinstance(source, UploadWeights):
            continue
        loc = (spec.kind, field)
        upload = session.get(m.Upload, source.upload_id)
        if upload is None:
            raise InvalidInput(f"{field}.upload_id: no upload with id {source.upload_id}", loc + ("upload_id",))
        if upload.arrays is None:  # .pt: the worker loads it (weights_only) and checks it
            continue
        if upload.format == "npy" and source.key is not None:
            raise InvalidInput(f"{field}.key: a .npy upload holds one array; leave key out", loc + ("key",))
        two_d = {k: v for k, v in upload.arrays.items() if len(v["shape"]) == 2}
        if source.key is None:
            if len(two_d) != 1:
                raise InvalidInput(f"{field}.key: upload {source.upload_id} holds the 2-D arrays "
                                   f"{sorted(two_d)}; name one with key", loc + ("key",))
            key = next(iter(two_d))
        else:
            key = source.key
            if key not in upload.arrays:
                raise InvalidInput(f"{field}.key: {key!r} is not in upload {source.upload_id}; "
                                   f"it holds {sorted(upload.arrays)}", loc + ("key",))
            if key not in two_d:
                raise InvalidInput(f"{field}.key: array {key!r} has shape {upload.arrays[key]['shape']}, "
                                   "a weight matrix must be 2-D", loc + ("key",))
        rows, cols = two_d[key]["shape"]
        rank = getattr(spec, "rank", None)
        if rank is not None and rank > min(rows, cols):
            raise InvalidInput(f"rank must be <= min(m, d) = {min(rows, cols)} for the uploaded "
                               f"{rows} x {cols} matrix, got {rank}", (spec.kind, "rank"))


def create_job(spec: AnySpec | dict[str, Any], *, idempotency_key: str | None = None,
               owner: str | None = None) -> tuple[JobRecord, bool]:
    """Store a new queued job. Returns (job, created).

    With an idempotency key: the same key with the same spec (and owner) returns the existing job and
    created=False; the same key with a different spec raises Conflict. The caller enqueues the job
    (jobs.queue.enqueue_job) after this returns; enqueued_at is already set, so only a failed send
    needs recording (mark_not_enqueued).
    """
    if isinstance(spec, dict):
        spec = parse_spec(spec)
    canonical = spec_to_dict(spec)
    if idempotency_key is not None:
        existing = _find_idempotent(idempotency_key, canonical, owner)
        if existing is not None:
            return existing, False
    try:
        needs_lookup = any(isinstance(getattr(spec, f, None), UploadWeights) for f in ("weights", "teacher"))
        engine = get_engine()
        if engine.dialect.name == "postgresql" and not needs_lookup:
            # The hot path of POST /jobs: one statement (job row + its tag rows) in autocommit, so a
            # submission costs one round trip to Postgres instead of BEGIN / INSERT / INSERT / COMMIT.
            values = job_values(spec, canonical, owner=owner, idempotency_key=idempotency_key)
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(_PG_INSERT_JOB, {**values, "tag_list": list(dict.fromkeys(spec.tags))})
            return _record_from_values(values), True
        with session_scope() as session:
            check_references(session, spec)
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


def _pg_insert_job_statement():  # noqa: ANN202 - a Core INSERT ... with a data-modifying CTE
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
    with session_scope() as session:
        row = session.scalars(select(m.Job).where(m.Job.idempotency_key == key)).one_or_none()
        if row is None:
            return None
        if row.spec != canonical or row.owner != owner:
            raise Conflict(f"Idempotency-Key {key!r} was already used for job {row.id} with a different spec",
                           job_id=str(row.id))
        return JobRecord.from_row(row)


def mark_enqueued(job_ids: Iterable[str | uuid.UUID]) -> None:
    """Record that a Celery message was sent for these jobs now (find_lost_queued_jobs uses it)."""
    _set_enqueued_at(job_ids, _now())


def mark_not_enqueued(job_ids: Iterable[str | uuid.UUID]) -> None:
    """Record that sending these jobs' messages failed (broker down): find_lost_queued_jobs returns them
    at once, so the workers' reaper re-sends them on its next round."""
    _set_enqueued_at(job_ids, None)


def _set_enqueued_at(job_ids: Iterable[str | uuid.UUID], when: dt.datetime | None) -> None:
    ids = [_uuid(j) for j in job_ids]
    if not ids:
        return
    with session_scope() as session:
        for i in range(0, len(ids), 1000):
            session.execute(update(m.Job).where(m.Job.id.in_(ids[i:i + 1000]), m.Job.status == "queued")
                            .values(enqueued_at=when).execution_options(synchronize_session=False))


def find_lost_queued_jobs(older_than_s: float) -> list[tuple[str, str, str]]:
    """Queued jobs whose message may be lost: a send that failed (enqueued_at is null, see
    mark_not_enqueued; returned at once), or a message sent more than `older_than_s` ago (the broker
    lost it, or the API died between its commit and the send). Returns (job_id, device, priority);
    the caller re-sends them and calls mark_enqueued. Duplicate messages are harmless (claim_job)."""
    cutoff = _now() - dt.timedelta(seconds=older_than_s)
    with session_scope() as session:
        rows = session.execute(
            select(m.Job.id, m.Job.queue, m.Job.priority)
            .where(m.Job.status == "queued", or_(m.Job.enqueued_at.is_(None), m.Job.enqueued_at < cutoff))
            .order_by(m.Job.created_at)
        ).all()
    return [(str(i), q, p) for i, q, p in rows]


# ---------------------------------------------------------------------------------------------
# Reading jobs.

def get_job(job_id: str | uuid.UUID) -> JobRecord:
    with session_scope() as session:
        return JobRecord.from_row(_get_job_row(session, job_id))


def _encode_cursor(created_at: dt.datetime, job_id: uuid.UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(job_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[dt.datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        when = dt.datetime.fromisoformat(created)
        if when.tzinfo is None:
            raise ValueError("naive")
        return when, uuid.UUID(job_id)
    except (ValueError, TypeError, binascii.Error, json.JSONDecodeError):
        raise InvalidInput("cursor is not a cursor this server returned (use next_cursor as given)",
                           ("query", "cursor")) from None


def keyset_page(session: Session, stmt: Any, model: Any, cursor: str | None, limit: int) -> tuple[list, str | None]:
    """One page of `stmt`'s rows newest first on (created_at, id) of `model`, after `cursor`: at most
    `limit` rows (1..1000) and the cursor of the next page (None on the last). One row more than
    `limit` is read to know whether a next page exists."""
    if not 1 <= limit <= 1000:
        raise InvalidInput(f"limit must be between 1 and 1000, got {limit}", ("query", "limit"))
    if cursor:
        when, last_id = _decode_cursor(cursor)
        stmt = stmt.where(or_(model.created_at < when, and_(model.created_at == when, model.id < last_id)))
    rows = list(session.scalars(stmt.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (_encode_cursor(rows[-1].created_at, rows[-1].id) if more else None)


def list_jobs(*, status: str | None = None, kind: str | None = None, sweep_id: str | uuid.UUID | None = None,
              tag: str | None = None, owner: str | None = None, limit: int = 50,
              cursor: str | None = None) -> JobPage:
    """Jobs newest first, filtered; keyset pagination on (created_at, id) with an opaque cursor."""
    stmt = select(m.Job)
    if status is not None:
        stmt = stmt.where(m.Job.status == status)
    if kind is not None:
        stmt = stmt.where(m.Job.kind == kind)
    if sweep_id is not None:
        stmt = stmt.where(m.Job.sweep_id == _uuid(sweep_id, "sweep"))
    if owner is not None:
        stmt = stmt.where(m.Job.owner == owner)
    if tag is not None:
        stmt = stmt.where(m.Job.id.in_(select(m.JobTag.job_id).where(m.JobTag.tag == tag)))
    with session_scope() as session:
        rows, next_cursor = keyset_page(session, stmt, m.Job, cursor, limit)
    return JobPage([JobRecord.from_row(r) for r in rows], next_cursor)


# ---------------------------------------------------------------------------------------------
# Cancel and retry (user actions).

def request_cancel(job_id: str | uuid.UUID, *, actor: str | None = None, admin: bool = True) -> JobRecord:
    """Cancel a job: a queued job becomes `cancelled` at once (it will never run); a running job gets
    cancel_requested=True and its worker stops at the next check. Cancelling a cancelled job is a
    no-op; cancelling a succeeded or failed job raises InvalidState. With admin=False only the job's
    owner (`actor`) may cancel it (Forbidden otherwise)."""
    jid = _uuid(job_id)
    now = _now()
    with session_scope() as session:
        check_actor(_get_job_row(session, jid, for_update=True), actor, admin, "cancel")
        done = session.execute(
            update(m.Job).where(m.Job.id == jid, m.Job.status == "queued")
            .values(status="cancelled", cancel_requested=True, finished_at=now)
        ).rowcount
        if not done:
            session.execute(
                update(m.Job).where(m.Job.id == jid, m.Job.status == "running").values(cancel_requested=True)
            )
        row = _get_job_row(session, jid)
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
    With admin=False only the job's owner (`actor`) may retry it (Forbidden otherwise)."""
    jid = _uuid(job_id)
    with session_scope() as session:
        row = _get_job_row(session, jid, for_update=True)
        check_actor(row, actor, admin, "retry")
        if row.status not in ("failed", "cancelled"):
            raise InvalidState(f"job {jid} is {row.status}; only failed or cancelled jobs can be retried",
                               status=row.status)
        for key, value in requeue_values(_now()).items():
            setattr(row, key, value)
        session.flush()
        return JobRecord.from_row(row)


# ---------------------------------------------------------------------------------------------
# Worker contract.

def claim_job(job_id: str | uuid.UUID, worker_name: str, *, stale_after_s: float) -> JobRecord | None:
    """Atomically take a job to run: succeeds only if it is queued, or running with a heartbeat older
    than `stale_after_s` (its worker died). Sets running, started_at (first time), heartbeat_at,
    worker, attempts += 1. Returns None when the job is not claimable: a duplicate delivery, a job
    another worker runs, a finished or cancelled job, or no such job. Then the task does nothing."""
    jid = _uuid(job_id)
    now = _now()
    cutoff = now - dt.timedelta(seconds=stale_after_s)
    with session_scope() as session:
        claimed = session.execute(
            update(m.Job)
            .where(m.Job.id == jid, or_(
                m.Job.status == "queued",
                and_(m.Job.status == "running", or_(m.Job.heartbeat_at.is_(None), m.Job.heartbeat_at < cutoff)),
            ))
            .values(status="running", started_at=func.coalesce(m.Job.started_at, now), heartbeat_at=now,
                    worker=worker_name, attempts=m.Job.attempts + 1)
            .execution_options(synchronize_session=False)
        ).rowcount
        if claimed != 1:
            return None
        return JobRecord.from_row(_get_job_row(session, jid))


def heartbeat(job_id: str | uuid.UUID, worker_name: str, progress: float | None = None) -> bool:
    """Refresh the job's heartbeat (and progress, 0..1). Returns True when the worker should stop:
    cancel_requested is set, or the job is no longer running under this worker (re-claimed after a
    stale heartbeat, or finished) - a worker that sees True stops without recording a result."""
    jid = _uuid(job_id)
    values: dict[str, Any] = {"heartbeat_at": _now()}
    if progress is not None:
        values["progress"] = min(1.0, max(0.0, float(progress)))
    with session_scope() as session:
        owned = session.execute(
            update(m.Job).where(m.Job.id == jid, m.Job.worker == worker_name, m.Job.status == "running")
            .values(**values).execution_options(synchronize_session=False)
        ).rowcount
        if owned != 1:
            return True
        flag = session.scalar(select(m.Job.cancel_requested).where(m.Job.id == jid))
        return bool(flag)


def record_metrics(job_id: str | uuid.UUID, rows: Sequence[tuple[str, int, float]]) -> None:
    """Bulk insert (name, step, value) rows; idempotent on (job, name, step): a re-written step (after a
    resume) replaces the earlier value. NaN values are stored as NULL."""
    jid = _uuid(job_id)
    if not rows:
        return
    now = _now()
    # Last value per key wins within one batch too (ON CONFLICT cannot touch a row twice per statement).
    dedup: dict[tuple[str, int], float | None] = {}
    for name, step, value in rows:
        v = float(value)
        dedup[(str(name), int(step))] = None if math.isnan(v) else v
    values = [{"job_id": jid, "name": n, "step": s, "value": v, "recorded_at": now} for (n, s), v in dedup.items()]
    with session_scope() as session:
        insert = _insert(session)
        for i in range(0, len(values), 1000):  # SQLite allows ~32k bound parameters per statement
            stmt = insert(m.Metric).values(values[i:i + 1000])
            stmt = stmt.on_conflict_do_update(
                index_elements=["job_id", "name", "step"],
                set_={"value": stmt.excluded.value, "recorded_at": stmt.excluded.recorded_at},
            )
            session.execute(stmt)


def add_artifact(job_id: str | uuid.UUID, name: str, path: str | os.PathLike[str], size: int, sha256: str) -> None:
    """Record a file the job wrote (normally under ARTIFACT_ROOT/<job_id>/); idempotent on (job, name)."""
    jid = _uuid(job_id)
    values = {"job_id": jid, "name": name, "path": _rel_path(path), "size": int(size), "sha256": sha256,
              "created_at": _now()}
    with session_scope() as session:
        insert = _insert(session)
        stmt = insert(m.Artifact).values(values)
        stmt = stmt.on_conflict_do_update(
            index_elements=["job_id", "name"],
            set_={k: stmt.excluded[k] for k in ("path", "size", "sha256", "created_at")},
        )
        session.execute(stmt)


def finish_job(job_id: str | uuid.UUID, worker_name: str, status: JobStatus, *,
               result: dict[str, Any] | None = None, error: str | None = None) -> bool:
    """Record the outcome (succeeded | failed | cancelled) if the job is still running under this worker.
    Returns False (and changes nothing) when another worker took it over or it was already finished."""
    if status not in m.TERMINAL_STATUSES:
        raise ValueError(f"status must be one of {m.TERMINAL_STATUSES}, got {status!r}")
    values: dict[str, Any] = {"status": status, "finished_at": _now(), "result": result, "error": error}
    if status == "succeeded":
        values["progress"] = 1.0
    with session_scope() as session:
        return session.execute(
            update(m.Job).where(m.Job.id == _uuid(job_id), m.Job.worker == worker_name, m.Job.status == "running")
            .values(**values).execution_options(synchronize_session=False)
        ).rowcount == 1


def requeue_stale_jobs(stale_after_s: float, max_attempts: int) -> list[tuple[str, str, str]]:
    """Running jobs whose heartbeat is older than `stale_after_s` (their worker died): back to queued,
    or `failed` once they have had `max_attempts` runs, or `cancelled` if a cancel was requested.
    Returns (job_id, device, priority) of the re-queued ones; the caller enqueues them (then may call
    mark_enqueued)."""
    now = _now()
    cutoff = now - dt.timedelta(seconds=stale_after_s)
    requeued: list[tuple[str, str, str]] = []
    with session_scope() as session:
        stmt = select(m.Job).where(
            m.Job.status == "running", or_(m.Job.heartbeat_at.is_(None), m.Job.heartbeat_at < cutoff)
        ).with_for_update(skip_locked=True)
        for row in session.scalars(stmt):
            silent = (now - row.heartbeat_at).total_seconds() if row.heartbeat_at else float("inf")
            if row.cancel_requested:
                row.status, row.finished_at = "cancelled", now
            elif row.attempts >= max_attempts:
                row.status, row.finished_at = "failed", now
                row.error = (f"worker {row.worker!r} stopped heartbeating ({silent:.0f} s silent) and the job "
                             f"has had {row.attempts} runs (max_attempts={max_attempts})")
            else:
                row.status, row.worker, row.enqueued_at = "queued", None, now
                requeued.append((str(row.id), row.queue, row.priority))
    return requeued


def get_upload_path(upload_id: str | uuid.UUID) -> Path:
    """Absolute path of an uploaded weights file (NotFound if the upload does not exist)."""
    return get_upload(upload_id).path


# ---------------------------------------------------------------------------------------------
# Metrics and artifacts (reads).

def metric_names(job_id: str | uuid.UUID) -> list[str]:
    with session_scope() as session:
        _get_job_row(session, job_id)
        return list(session.scalars(select(m.Metric.name).where(m.Metric.job_id == _uuid(job_id))
                                    .distinct().order_by(m.Metric.name)))


def downsample(steps: np.ndarray, values: np.ndarray, max_points: int) -> np.ndarray:
    """Indices of at most `max_points` points that keep a series' shape: the first and last point, and in
    each of (max_points-2)//2 equal-width buckets of the points between, the minimum and the maximum
    (in step order). NaN (None) values are kept as candidates only if a bucket holds nothing else."""
    n = len(steps)
    if n <= max_points:
        return np.arange(n)
    buckets = max(0, (max_points - 2) // 2)
    keep = [0, n - 1]
    if buckets:
        edges = np.linspace(1, n - 1, buckets + 1).astype(np.int64)
        finite = np.where(np.isnan(values), np.nan, values)
        for lo, hi in zip(edges[:-1], edges[1:]):
            if hi <= lo:
                continue
            chunk = finite[lo:hi]
            if np.all(np.isnan(chunk)):
                keep.append(int(lo))
                continue
            keep.append(int(lo + np.nanargmin(chunk)))
            keep.append(int(lo + np.nanargmax(chunk)))
    return np.unique(np.asarray(keep, dtype=np.int64))


def get_metrics(job_id: str | uuid.UUID, names: Sequence[str] | None = None,
                max_points: int = 1000) -> list[MetricSeries]:
    """The job's metric series (all names, or `names`), each downsampled to at most `max_points` points
    by `downsample` (first, last, per-bucket min and max). Steps ascending."""
    if not 2 <= max_points <= 100_000:
        raise InvalidInput(f"max_points must be between 2 and 100000, got {max_points}", ("query", "max_points"))
    jid = _uuid(job_id)
    with session_scope() as session:
        _get_job_row(session, jid)
        stmt = select(m.Metric.name, m.Metric.step, m.Metric.value).where(m.Metric.job_id == jid)
        if names:
            stmt = stmt.where(m.Metric.name.in_(list(names)))
        rows = session.execute(stmt.order_by(m.Metric.name, m.Metric.step)).all()
    by_name: dict[str, list[tuple[int, float | None]]] = {}
    for name, step, value in rows:
        by_name.setdefault(name, []).append((step, value))
    out = []
    for name in sorted(by_name):
        pts = by_name[name]
        steps = np.fromiter((s for s, _ in pts), dtype=np.int64, count=len(pts))
        values = np.fromiter((np.nan if v is None else v for _, v in pts), dtype=np.float64, count=len(pts))
        idx = downsample(steps, values, max_points)
        out.append(MetricSeries(
            name=name, steps=steps[idx].tolist(),
            values=[v if math.isfinite(v) else None for v in values[idx].tolist()],
            total=len(pts), downsampled=len(idx) < len(pts)))
    return out


def _artifact(row: m.Artifact) -> ArtifactRecord:
    return ArtifactRecord(job_id=str(row.job_id), name=row.name, path=_abs_path(row.path), size=row.size,
                          sha256=row.sha256, created_at=row.created_at)


def list_artifacts(job_id: str | uuid.UUID) -> list[ArtifactRecord]:
    with session_scope() as session:
        _get_job_row(session, job_id)
        rows = session.scalars(select(m.Artifact).where(m.Artifact.job_id == _uuid(job_id)).order_by(m.Artifact.name))
        return [_artifact(r) for r in rows]


def get_artifact(job_id: str | uuid.UUID, name: str) -> ArtifactRecord:
    """One artifact; NotFound when the job, the record or the file is missing."""
    with session_scope() as session:
        _get_job_row(session, job_id)
        row = session.get(m.Artifact, (_uuid(job_id), name))
        if row is None:
            raise NotFound(f"job {job_id} has no artifact {name!r}")
        record = _artifact(row)
    if not record.path.is_file():
        raise NotFound(f"artifact {name!r} of job {job_id} is recorded but its file {record.path} is missing")
    return record


# ---------------------------------------------------------------------------------------------
# Uploads.

def _describe_arrays(path: Path, fmt: str) -> dict[str, Any] | None:
    """Parse an uploaded file without executing code; {array: {"shape", "dtype"}}. Raises ValueError."""
    def check(name: str, arr: np.ndarray) -> dict[str, Any]:
        if arr.dtype.kind not in "fiu":
            raise ValueError(f"array {name!r} has dtype {arr.dtype}; weights must be numeric")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ValueError(f"array {name!r} holds NaN or infinite values")
        return {"shape": list(arr.shape), "dtype": str(arr.dtype)}

    if fmt == "npy":
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        return {"array": check("array", arr)}
    if fmt == "npz":
        with np.load(path, allow_pickle=False) as npz:
            return {k: check(k, npz[k]) for k in npz.files}
    if fmt == "safetensors":
        from safetensors import safe_open

        out = {}
        with safe_open(str(path), framework="numpy") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                dtype = sl.get_dtype()
                if dtype in ("BF16", "F8_E4M3", "F8_E5M2"):  # numpy cannot hold these; shape is enough
                    out[k] = {"shape": list(sl.get_shape()), "dtype": dtype.lower()}
                else:
                    out[k] = check(k, f.get_tensor(k))
        return out
    # .pt: its pickle is replayed with only torch's weights_only globals, each inert (no torch here,
    # no code of the file runs); the worker loads it with torch.load(weights_only=True) and checks shapes.
    from jobs.ptcheck import check_torch_file

    check_torch_file(path)
    return None


def create_upload(filename: str, fileobj: BinaryIO, *, owner: str | None = None) -> UploadRecord:
    """Store an uploaded weights file as ARTIFACT_ROOT/uploads/<id><ext> (never under a client-given path)
    after parsing it safely: .npy/.npz with numpy (allow_pickle=False), .safetensors with its numpy API.
    .pt is stored as is and validated by the worker (torch.load(weights_only=True)) because the API
    process never imports torch. Raises TooLarge over LOWRANK_MAX_UPLOAD_BYTES, InvalidInput otherwise."""
    settings = get_settings()
    # Display name only (the file is stored by id): last path component, printable, bounded.
    base = "".join(ch for ch in os.path.basename(filename or "") if ch.isprintable()).strip()[:255] or "upload"
    ext = "".join(Path(base).suffixes[-1:]).lower()
    fmt = UPLOAD_FORMATS.get(ext)
    if fmt is None:
        raise InvalidInput(f"file: {base!r} has an unsupported extension; allowed: .npy, .npz, .safetensors, .pt",
                           ("file",))
    folder = settings.artifacts / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    upload_id = uuid.uuid4()
    digest = hashlib.sha256()
    size = 0
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=".incoming-", suffix=ext)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := fileobj.read(1 << 20):
                size += len(chunk)
                if size > settings.max_upload_bytes:
                    raise TooLarge(f"file is larger than {settings.max_upload_bytes} bytes (LOWRANK_MAX_UPLOAD_BYTES)")
                digest.update(chunk)
                out.write(chunk)
        if size == 0:
            raise InvalidInput("file: the uploaded file is empty", ("file",))
        try:
            arrays = _describe_arrays(tmp, fmt)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the client's bad file
            raise InvalidInput(f"file: {base!r} is not a valid .{fmt} weights file: {exc}", ("file",)) from None
        if arrays is not None:
            if not arrays:
                raise InvalidInput(f"file: {base!r} holds no arrays", ("file",))
            if not any(len(a["shape"]) == 2 for a in arrays.values()):
                raise InvalidInput(f"file: {base!r} holds no 2-D array (shapes: "
                                   f"{ {k: a['shape'] for k, a in arrays.items()} })", ("file",))
        final = folder / f"{upload_id}{ext}"
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        with session_scope() as session:
            row = m.Upload(id=upload_id, filename=base[:255], format=fmt, path=_rel_path(final), size=size,
                           sha256=digest.hexdigest(), arrays=arrays, owner=owner, created_at=_now())
            session.add(row)
            session.flush()
            return UploadRecord.from_row(row)
    except BaseException:
        final.unlink(missing_ok=True)
        raise


def get_upload(upload_id: str | uuid.UUID) -> UploadRecord:
    with session_scope() as session:
        row = session.get(m.Upload, _uuid(upload_id, "upload"))
        if row is None:
            raise NotFound(f"upload {upload_id} not found")
        return UploadRecord.from_row(row)


def ping_database() -> None:
    """Raise if the database cannot answer `SELECT 1` (readiness)."""
    with get_engine().connect() as conn:
        conn.exec_driver_sql("SELECT 1")


__all__ = [
    "ArtifactRecord", "JobPage", "JobRecord", "MetricSeries", "UploadRecord", "add_artifact", "build_job_row",
    "check_references", "claim_job", "create_job", "create_upload", "downsample", "find_lost_queued_jobs",
    "finish_job", "get_artifact", "get_job", "get_metrics", "get_upload", "get_upload_path", "heartbeat",
    "list_artifacts", "list_jobs", "mark_enqueued", "mark_not_enqueued", "metric_names", "ping_database", "record_metrics",
    "request_cancel", "requeue_stale_jobs", "retry_job",
]
