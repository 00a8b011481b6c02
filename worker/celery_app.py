"""The worker's Celery app: jobs.queue.make_celery() + our tasks + an in-worker reaper (worker/reaper.py).

Start a worker with `lowrank worker` (worker/launcher.py), which runs
`celery -A worker.celery_app:app worker ...` once per GPU (or once).

Pool: worker.supervisor.SupervisorPool, Celery's thread pool (concurrency = jobs at once). Its threads
supervise job processes forked from a job-process server that this worker starts when it is ready
(worker/supervisor.py); the worker's own process never imports torch. Celery's prefork pool is not
used: a kill -9 of one of its forked children can leave the pool blocked on a semaphore for good
(celery#2011, billiard#104), and its time limits and heartbeats live in the job's own process.

Reaper (worker/reaper.py), without Celery beat: when a worker node is ready, its main process starts
the reaper's daemon thread; it stops with the worker.
"""
from __future__ import annotations

import logging

from celery.signals import worker_init, worker_ready, worker_shutdown

from jobs.queue import make_celery
from jobs.settings import get_settings
from worker import supervisor, tasks
from worker.reaper import Reaper

log = logging.getLogger(__name__)

app = make_celery()
# `celery worker` without -P (or with the default -P prefork) takes this pool; `lowrank worker` passes no -P.
app.conf.worker_pool = "worker.supervisor:SupervisorPool"
TASKS = tasks.register(app)


_reaper: Reaper | None = None
_job_start_s: float | None = None  # measured when the job-process server became ready


@worker_init.connect
def _start_job_process_server(**_: object) -> None:
    """Before the worker consumes: the job-process server imports torch and core/ once (seconds), so no
    job waits for it."""
    global _job_start_s
    try:
        _job_start_s = supervisor.start_job_process_server()
    except Exception:
        log.exception("could not start the job-process server")


@worker_ready.connect
def _start_reaper(**_: object) -> None:
    global _reaper
    if _job_start_s is not None:
        log.info("job-process server ready: a job process starts in %.0f ms", _job_start_s * 1000)
    if _reaper is None:
        _reaper = Reaper(app, get_settings().reap_interval_s)
        _reaper.start()
        log.info("reaper: every %g s, stale after %g s, max %d attempts", _reaper.interval_s,
                 get_settings().stale_after_s, get_settings().max_attempts)


@worker_shutdown.connect
def _stop_reaper(**_: object) -> None:
    if _reaper is not None:
        _reaper.stopped.set()
