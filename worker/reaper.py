"""The reaper: every worker node's main process runs one, without Celery beat.

When a worker node is ready, its main process (worker/celery_app.py) starts a `Reaper` daemon thread that
every settings.reap_interval_s calls `reap_stale_jobs`: running jobs whose supervisor is gone (a free job
lease, or a heartbeat older than settings.stale_after_s: store.requeue_stale_jobs) go back to `queued`
(or to `failed` past settings.max_attempts) and their messages are sent; messages a broker lost are sent
again (`find_lost_messages`); search sweeps' trials that ended unseen are told (jobs.search.reconcile).
Why not beat: beat is one more process that must run exactly once per deployment; every worker running
the reaper needs no coordination, because re-queueing is one atomic UPDATE in the store and a message
more than needed is a no-op (jobs.claims). Why in the main process and not as a queued task: a queued
reap task would wait behind a day-long GPU job on a busy worker. The same work is also registered as the
task TASK_REAP for operators (`celery -A worker.celery_app:app call lowrank.reap_stale_jobs`).
"""
from __future__ import annotations

import logging
import threading
import time

from celery import Celery

from jobs import claims, search, store
from jobs.db import ping_database
from jobs.dispatch import JobDispatch, dispatch, mark_enqueued
from jobs.queue import queue_name
from jobs.settings import get_settings
from jobs.vocabulary import PRIORITIES

log = logging.getLogger(__name__)


def orphaned_after_s(settings) -> float:
    """Heartbeat age from which a free lease proves the job's supervisor dead: 1.5 beats (a live supervisor
    beats every interval and takes a lost lease again at its next beat)."""
    return 1.5 * settings.heartbeat_interval_s


def reap_stale_jobs(app: Celery, *, requeue_stale: bool = True) -> list[str]:
    """Re-queue running jobs whose worker is gone (a free lease, or a heartbeat older than stale_after_s:
    store.requeue_stale_jobs) and send their messages; send messages the broker lost (find_lost_messages).

    `requeue_stale=False` skips the first part (the Reaper passes it right after a database outage, when
    every heartbeat looks stale). Returns the ids of the jobs whose messages were sent.
    """
    settings = get_settings()
    sent: list[str] = []
    if requeue_stale:
        requeued = store.requeue_stale_jobs(settings.stale_after_s, settings.max_attempts,
                                            orphaned_after_s=orphaned_after_s(settings))
        for r in requeued:
            log.warning("job %s: %s; re-queued on %s/%s", r.job_id, r.why, r.device, r.priority)
        sent += dispatch(app, [JobDispatch(r.job_id, r.device, r.priority) for r in requeued])
    lost = find_lost_messages(app, settings)
    for job in lost:
        log.warning("job %s: queued, but its message looks lost; sent again", job.job_id)
    resent = dispatch(app, lost)
    if resent:
        mark_enqueued(resent)
    # Search sweeps: tell trials whose jobs ended unseen (a worker killed before telling, a job failed
    # here past max_attempts, a cancel), and ask what is missing (jobs/search.py).
    try:
        resent += search.reconcile(app)
    except Exception:
        log.warning("reaper: search round failed", exc_info=True)
    return sent + resent


def broker_queue_size(app: Celery, queue: str) -> int:
    """Messages waiting on `queue` in the broker (not counting those a worker holds unacked)."""
    from kombu.exceptions import ChannelError

    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2, timeout=3)
        try:
            return int(conn.default_channel.queue_declare(queue=queue, passive=True).message_count)
        except ChannelError:  # no such queue: the broker holds no message for it
            return 0


def find_lost_messages(app: Celery, settings) -> list[JobDispatch]:
    """Slots to send again: jobs whose send failed (jobs.dispatch.mark_not_enqueued), and, per device, as many as
    the broker's messages (all priorities) fall short of the claimable jobs queued longer than
    stale_after_s (a broker restarted without its data, flushed, failed over to an empty replica).

    Messages are slots for a device (jobs.claims), so counts per device are what must match; a slot more
    than needed finds nothing to claim and is dropped. Each message sent names the oldest waiting job.
    """
    lost = {j.job_id: j for j in claims.unsent_queued_jobs()}
    for device, claimable in claims.claimable_backlog(settings.stale_after_s,
                                                      settings.max_running_jobs_per_owner).items():
        try:
            size = sum(broker_queue_size(app, queue_name(device, p, settings)) for p in PRIORITIES)  # type: ignore[arg-type]
        except Exception:
            log.warning("reaper: cannot count the messages of %s", device, exc_info=True)
            continue
        if size < claimable:
            log.warning("reaper: the %s queues hold %d message(s) for %d claimable job(s) queued longer than "
                        "%g s; sending %d", device, size, claimable, settings.stale_after_s, claimable - size)
            for job in claims.oldest_queued(device, claimable - size, settings.stale_after_s):
                lost.setdefault(job.job_id, job)
    return list(lost.values())


class Reaper(threading.Thread):
    """Daemon thread: reap stale jobs every `interval_s` until stopped.

    After a round that could not reach the database, heartbeats could not be written either: every
    running job would look stale the moment the database is back, and live workers would lose their
    jobs. So the heartbeat rule waits `stale_after_s` after the database comes back (workers beat
    again meanwhile); lost messages are still re-sent at once.
    """

    def __init__(self, app: Celery, interval_s: float, stale_after_s: float | None = None) -> None:
        super().__init__(name="lowrank-reaper", daemon=True)
        self.app = app
        self.interval_s = interval_s
        self.stale_after_s = get_settings().stale_after_s if stale_after_s is None else stale_after_s
        self.stopped = threading.Event()
        self.runs = 0
        self.db_back_at: float | None = None  # monotonic time the database answered again after an outage

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            self.round()
            self.runs += 1

    def round(self) -> None:
        try:
            ping_database()
        except Exception:
            if self.db_back_at != float("inf"):
                log.warning("reaper: database unreachable; stale-heartbeat checks paused", exc_info=True)
            self.db_back_at = float("inf")
            return
        now = time.monotonic()
        if self.db_back_at == float("inf"):
            self.db_back_at = now
            log.info("reaper: database back; stale-heartbeat checks resume in %g s", self.stale_after_s)
        requeue = self.db_back_at is None or now - self.db_back_at >= self.stale_after_s
        try:
            reap_stale_jobs(self.app, requeue_stale=requeue)
        except Exception:
            log.warning("reaper: round failed; retrying in %g s", self.interval_s, exc_info=True)
