"""The worker's Celery app: jobs.queue.make_celery() + our tasks + an in-worker reaper.

Start a worker with `lowrank worker` (worker/launcher.py), which runs
`celery -A worker.celery_app:app worker ...` once per GPU (or once).

Reaper, without Celery beat: when a worker node is ready, its main process starts a daemon
thread that every settings.reap_interval_s calls store.requeue_stale_jobs (running jobs whose
heartbeat is older than settings.stale_after_s go back to `queued`, or to `failed` past
settings.max_attempts) and re-enqueues them. Why not beat: beat is one more process that must run
exactly once per deployment; every worker running the reaper needs no coordination, because
re-queueing is one atomic UPDATE in the store and a duplicate message for a job is a no-op
(claiming is atomic). Why in the main process and not as a queued task: a queued reap task would
wait behind a day-long GPU job on a busy worker. The same work is also registered as the task
TASK_REAP for operators (`celery -A worker.celery_app:app call lowrank.reap_stale_jobs`).
"""
from __future__ import annotations

import logging
import threading
import time

from celery.signals import worker_process_init, worker_ready, worker_shutdown

from jobs.queue import make_celery
from jobs.settings import get_settings
from worker import runners  # noqa: F401  - imports torch/core before the pool forks (fast first job)
from worker import tasks

log = logging.getLogger(__name__)

app = make_celery()
TASKS = tasks.register(app)


class Reaper(threading.Thread):
    """Daemon thread: reap stale jobs every `interval_s` until stopped.

    After a round that could not reach the database, heartbeats could not be written either: every
    running job would look stale the moment the database is back, and live workers would lose their
    jobs. So the heartbeat rule waits `stale_after_s` after the database comes back (workers beat
    again meanwhile); lost messages are still re-sent at once.
    """

    def __init__(self, interval_s: float, stale_after_s: float | None = None) -> None:
        super().__init__(name="lowrank-reaper", daemon=True)
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
        from jobs import store

        try:
            store.ping_database()
        except Exception:  # noqa: BLE001 - database down: nothing to do until it is back
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
            tasks.reap_stale_jobs(app, requeue_stale=requeue)
        except Exception:  # noqa: BLE001 - database or broker down: try again next round
            log.warning("reaper: round failed; retrying in %g s", self.interval_s, exc_info=True)


_reaper: Reaper | None = None


@worker_ready.connect
def _start_reaper(**_: object) -> None:
    global _reaper
    if _reaper is None:
        _reaper = Reaper(get_settings().reap_interval_s)
        _reaper.start()
        log.info("reaper: every %g s, stale after %g s, max %d attempts", _reaper.interval_s,
                 get_settings().stale_after_s, get_settings().max_attempts)


@worker_shutdown.connect
def _stop_reaper(**_: object) -> None:
    if _reaper is not None:
        _reaper.stopped.set()


@worker_process_init.connect
def _forget_parent_connections(**_: object) -> None:
    """A forked pool process must not reuse the parent's pooled DB sockets (SQLAlchemy's fork recipe)."""
    from jobs import db

    # No db._lock here: another parent thread (the reaper) may have held it at fork time.
    for engine in list(db._engines.values()):  # noqa: SLF001 - no public dispose(close=False) in jobs.db
        engine.dispose(close=False)
