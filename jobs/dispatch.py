"""Sending jobs' messages, the one way: after the jobs' rows are committed, `dispatch` sends one message per
job (jobs.queue.enqueue_jobs: over one producer, pipelined on Redis); whatever the broker refused is
logged and marked not enqueued, so the workers' reaper (worker/reaper.py) sends it on its next round.
It never raises for the broker: a stored job is never lost to a broker outage.

Used by the API's routes (a submitted or retried job, a sweep's jobs), the search sweeps' ask
(jobs/search.py), and the reaper (re-queued jobs, lost messages, released quota slots).

    dispatch(celery_app, [JobDispatch(job.id, job.queue, job.priority)])
"""
from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from sqlalchemy import or_, select, update

from jobs import models as m
from jobs.db import session_scope
from jobs.queue import enqueue_jobs
from jobs.rows import as_uuid, utcnow

log = logging.getLogger(__name__)


class JobDispatch(NamedTuple):
    """One job's message: the job, the queue family (device) it runs on, and its priority; the Celery queue
    is `<prefix><device>.<priority>` (jobs.queue.queue_name). A NamedTuple: typed fields by name, and it
    still unpacks as (job_id, device, priority)."""

    job_id: str
    device: str
    priority: str

    @classmethod
    def of(cls, job: Any) -> JobDispatch:
        """The message of a job record or row (its id, queue and priority)."""
        return cls(str(job.id), job.queue, job.priority)


def dispatch(celery_app: Any, jobs: Sequence[JobDispatch]) -> list[str]:
    """Send each job's message (call after the jobs' rows are committed). A broker failure is logged and the
    jobs not sent are marked not enqueued (the reaper re-sends them); it is never raised. Returns the ids
    sent, in order."""
    if not jobs:
        return []
    try:
        sent = enqueue_jobs(celery_app, jobs)
    except Exception as exc:
        sent = getattr(exc, "sent", 0)
        unsent = [j.job_id for j in jobs[sent:]]
        log.warning("%d of %d job(s) stored but not enqueued (broker unavailable; first %s); the reaper will "
                    "re-send them", len(unsent), len(jobs), unsent[0], exc_info=True)
        mark_not_enqueued(unsent)
    return [j.job_id for j in jobs[:sent]]


# ---------------------------------------------------------------------------------------------
# What was sent (jobs.enqueued_at): the reaper's evidence of lost messages.

def mark_enqueued(job_ids: Iterable[str | uuid.UUID]) -> None:
    """Record that a Celery message was sent for these jobs now (find_lost_queued_jobs uses it)."""
    _set_enqueued_at(job_ids, utcnow())


def mark_not_enqueued(job_ids: Iterable[str | uuid.UUID]) -> None:
    """Record that sending these jobs' messages failed (broker down): find_lost_queued_jobs returns them
    at once, so the workers' reaper re-sends them on its next round."""
    _set_enqueued_at(job_ids, None)


def _set_enqueued_at(job_ids: Iterable[str | uuid.UUID], when: dt.datetime | None) -> None:
    ids = [as_uuid(j) for j in job_ids]
    if not ids:
        return
    with session_scope() as session:
        for i in range(0, len(ids), 1000):
            session.execute(update(m.Job).where(m.Job.id.in_(ids[i:i + 1000]), m.Job.status == "queued")
                            .values(enqueued_at=when).execution_options(synchronize_session=False))


def find_lost_queued_jobs(older_than_s: float) -> list[JobDispatch]:
    """Queued jobs whose message may be lost: a send that failed (enqueued_at is null, see
    mark_not_enqueued; returned at once), or a message sent more than `older_than_s` ago (the broker
    lost it, or the API died between its commit and the send). The caller re-sends them and calls
    mark_enqueued. Duplicate messages are harmless (claim_job)."""
    cutoff = utcnow() - dt.timedelta(seconds=older_than_s)
    with session_scope() as session:
        rows = session.execute(
            select(m.Job.id, m.Job.queue, m.Job.priority)
            .where(m.Job.status == "queued", or_(m.Job.enqueued_at.is_(None), m.Job.enqueued_at < cutoff))
            .order_by(m.Job.created_at)
        ).all()
    return [JobDispatch(str(i), q, p) for i, q, p in rows]
