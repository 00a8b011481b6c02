"""Aggregate views of the jobs table and the broker's queues for monitoring (the API's `/metrics`).

`service_stats()` is one read transaction, so a scrape sees one consistent snapshot. Everything is
aggregated in SQL (GROUP BY, bucket counts as SUM(CASE ...)), so a scrape costs a few index/table
scans whatever the number of jobs. Returns plain dataclasses, like the store.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sqlalchemy import Float, and_, case, cast, func, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from jobs import models as m
from jobs.db import session_scope
from jobs.rows import is_postgres
from jobs.vocabulary import JOB_KINDS, JOB_STATUSES, PRIORITIES, QUEUES, TERMINAL_STATUSES

if TYPE_CHECKING:
    import redis

# Upper bounds (seconds) of the job-duration histogram: approximations take seconds, training runs
# minutes to days.
DURATION_BUCKETS_S: tuple[float, ...] = (
    1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600, 16 * 3600, 24 * 3600, 48 * 3600,
)


@dataclasses.dataclass(frozen=True)
class DurationHistogram:
    """Wall time from first start to finish of the finished jobs of one (kind, status)."""

    kind: str
    status: str  # succeeded | failed | cancelled
    count: int
    sum_s: float  # seconds, summed over the jobs
    cumulative: tuple[int, ...]  # jobs with duration <= each bucket bound (same order as `buckets`)


@dataclasses.dataclass(frozen=True)
class WorkerHeartbeat:
    """A worker (Celery node name) that has running jobs, and its most recent heartbeat."""

    worker: str
    running_jobs: int
    last_heartbeat_at: dt.datetime | None  # UTC; None if none of its jobs heartbeated yet


@dataclasses.dataclass(frozen=True)
class QueueBacklog:
    """Jobs with status `queued` in the database for one (device, priority) queue."""

    device: str  # cpu | gpu
    priority: str  # high | normal | low
    jobs: int
    oldest_created_at: dt.datetime | None  # UTC creation time of the oldest one; None if jobs == 0


@dataclasses.dataclass(frozen=True)
class ServiceStats:
    jobs_by_status_kind: dict[tuple[str, str], int]  # (status, kind) -> jobs; every pair present, 0 if none
    backlog: list[QueueBacklog]  # every (device, priority) pair, in models.QUEUES x PRIORITIES order
    durations: list[DurationHistogram]  # (kind, status) pairs that have at least one finished job
    buckets: tuple[float, ...]  # histogram bucket upper bounds, seconds, increasing
    workers: list[WorkerHeartbeat]  # sorted by worker name


def _duration_s(session: Session) -> ColumnElement[float]:
    """finished_at - started_at in seconds, as a SQL expression for this session's dialect."""
    job = m.Job
    if not is_postgres(session):
        # SQLite stores naive UTC text (models.UTCDateTime); julianday is in days.
        return (func.julianday(job.finished_at) - func.julianday(job.started_at)) * 86400.0
    return cast(func.extract("epoch", job.finished_at - job.started_at), Float)


def service_stats(buckets: Sequence[float] = DURATION_BUCKETS_S, *, url: str | None = None) -> ServiceStats:
    """Counts by status and kind, queued backlog per queue, duration histograms of finished jobs, and
    the workers with running jobs. `url`: database URL (default: settings.database_url)."""
    bounds = tuple(float(b) for b in buckets)
    if any(b2 <= b1 for b1, b2 in zip(bounds, bounds[1:])):
        raise ValueError(f"buckets must be strictly increasing, got {list(buckets)}")
    job = m.Job
    with session_scope(url) as session:
        counts = {(s, k): 0 for s in JOB_STATUSES for k in JOB_KINDS}
        for status, kind, n in session.execute(
            select(job.status, job.kind, func.count()).group_by(job.status, job.kind)
        ):
            counts[(status, kind)] = int(n)

        queued: dict[tuple[str, str], tuple[int, dt.datetime | None]] = {}
        for device, priority, n, oldest in session.execute(
            select(job.queue, job.priority, func.count(), func.min(job.created_at))
            .where(job.status == "queued").group_by(job.queue, job.priority)
        ):
            queued[(device, priority)] = (int(n), _utc(oldest))
        backlog = [QueueBacklog(d, p, *queued.get((d, p), (0, None))) for d in QUEUES for p in PRIORITIES]

        dur = _duration_s(session)
        finished = and_(job.status.in_(TERMINAL_STATUSES), job.started_at.is_not(None),
                        job.finished_at.is_not(None))
        columns = [job.kind, job.status, func.count(), func.sum(dur)]
        columns += [func.sum(case((dur <= b, 1), else_=0)) for b in bounds]
        durations = [
            DurationHistogram(kind=row[0], status=row[1], count=int(row[2]), sum_s=max(0.0, float(row[3] or 0.0)),
                              cumulative=tuple(int(c or 0) for c in row[4:]))
            for row in session.execute(
                select(*columns).where(finished).group_by(job.kind, job.status).order_by(job.kind, job.status)
            )
        ]

        workers = [
            WorkerHeartbeat(worker=w, running_jobs=int(n), last_heartbeat_at=_utc(last))
            for w, n, last in session.execute(
                select(job.worker, func.count(), func.max(job.heartbeat_at))
                .where(job.status == "running", job.worker.is_not(None))
                .group_by(job.worker).order_by(job.worker)
            )
        ]
    return ServiceStats(jobs_by_status_kind=counts, backlog=backlog, durations=durations, buckets=bounds,
                        workers=workers)


def _utc(value: dt.datetime | str | None) -> dt.datetime | None:
    """Aggregates (MIN/MAX) bypass the column type: SQLite returns text, Postgres an aware datetime."""
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


# ---------------------------------------------------------------------------------------------
# The broker's side: messages waiting in Redis.

REDIS_SCHEMES = ("redis", "rediss")


def is_redis_broker(broker_url: str) -> bool:
    return broker_url.split(":", 1)[0].lower() in REDIS_SCHEMES


def redis_queue_depths(client: redis.Redis, queues: Sequence[str]) -> dict[str, int]:
    """Messages waiting in each Celery queue on a Redis broker (LLEN; unacked messages not included).

    Kombu's Redis transport keeps a queue as one list per priority step: `<queue>` for priority 0
    and `<queue>\\x06\\x16<step>` for the others; a queue's depth is the sum, as kombu computes it.
    Raises redis.RedisError when Redis cannot answer.
    """
    from kombu.transport.redis import PRIORITY_STEPS, Channel

    keys = {q: [q if step == 0 else f"{q}{Channel.sep}{step}" for step in PRIORITY_STEPS] for q in queues}
    with client.pipeline(transaction=False) as pipe:
        for q in queues:
            for key in keys[q]:
                pipe.llen(key)
        sizes = pipe.execute()
    n = len(PRIORITY_STEPS)
    return {q: int(sum(sizes[i * n:(i + 1) * n])) for i, q in enumerate(queues)}
