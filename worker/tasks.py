"""Celery tasks: a message is a slot; the task claims the next job fairly and supervises its process.

run_job(job_id), on receiving a message from a device's queue (the job id only names the message):
  1. jobs.claims.claim_next_job - the next job of that device by priority, then owner fairness, within
     the owner's running quota; nothing claimable (the named job is running, finished or cancelled and
     nothing else waits): the message is dropped and the task does nothing;
  2. worker.supervisor.supervise - the job runs in a process of its own (worker/jobproc.py) while this
     thread heartbeats, holds the job's lease, polls the cancel flag and enforces the time limits;
  3. the outcome: store.finish_job (succeeded + result, failed + `Type: message` without server paths (the traceback goes
     to the worker log), cancelled), or, when the
     job's process died without one, store.requeue_job and a new message (at most max_attempts runs).
The task itself never raises for a job's failure: the message is acked and the worker serves on.
The job process shares MetricsBuffer, RunContext and error_text from this module.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import Celery, Task

from jobs import claims, search, search_pruning, store, sweeps
from jobs.dispatch import JobDispatch, dispatch
from jobs.errors import NotFound, redact_paths
from jobs.queue import TASK_REAP, TASK_RUN_JOB
from jobs.settings import get_settings
from jobs.vocabulary import QUEUES
from worker.reaper import reap_stale_jobs
from worker.supervisor import Limits, Outcome, supervise

log = logging.getLogger(__name__)

ERROR_TEXT_CHARS = 2000  # a job's error as stored and shown
METRICS_BATCH_ROWS = 200      # flush the metric buffer at this many rows...
METRICS_BATCH_SECONDS = 2.0   # ...or when its oldest row is this old (and at the end)
# How long a job waits for the database to store its metrics (epoch ends, the end) or its outcome
# before it gives up: a Postgres restart or failover takes seconds to a minute or two.
METRICS_DURABLE_TIMEOUT_S = 120.0
DB_RETRY_TIMEOUT_S = 120.0


def worker_name(hostname: str | None, pid: int | None = None) -> str:
    """The owner recorded on a claimed job: Celery node name + the worker's (supervisor's) process id."""
    return f"{hostname or 'worker@unknown'}:{pid or os.getpid()}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class MetricsBuffer:
    """Rows (name, step, value) written with store.record_metrics in batches.

    A failed write (database briefly down) keeps the rows and retries at the next flush; writes
    are idempotent on (job, name, step), so a retried batch never doubles a point.
    """

    def __init__(self, job_id: str, max_rows: int = METRICS_BATCH_ROWS, max_age_s: float = METRICS_BATCH_SECONDS):
        self.job_id, self.max_rows, self.max_age_s = job_id, max_rows, max_age_s
        self.rows: list[tuple[str, int, float]] = []
        self.first_at: float | None = None
        self.written = 0
        self.failures = 0  # consecutive failed writes
        self._lock = threading.Lock()
        # Sweep early stopping (jobs/sweeps/early_stopping.py): `after_write(rows)` runs after each successful write.
        # An epoch's rows are written at its end anyway (RunContext.flush_metrics, before the checkpoint).
        self.after_write = None

    def add(self, rows: list[tuple[str, int, float]]) -> None:
        with self._lock:
            if not self.rows:
                self.first_at = time.monotonic()
            self.rows.extend(rows)
        self.flush_if_due()

    def flush_if_due(self) -> None:
        """Flush when max_rows are buffered or the oldest row is max_age_s old (the heartbeat calls
        this too, so an epoch's metrics reach the dashboard while the next epoch runs)."""
        with self._lock:
            due = bool(self.rows) and (len(self.rows) >= self.max_rows
                                       or time.monotonic() - (self.first_at or 0) >= self.max_age_s)
        if due:
            self.flush(raise_errors=False)

    def flush(self, *, raise_errors: bool = True) -> None:
        """Write the buffered rows once; on failure keep them (RunContext.flush_metrics retries)."""
        with self._lock:
            if not self.rows:
                return
            try:
                store.record_metrics(self.job_id, list(self.rows))
            except Exception as exc:
                # The first failure of a run of failures carries the traceback; the rest (a database
                # outage retried every second) one line each, so the log stays readable.
                self.failures += 1
                log.warning("job %s: writing %d metric rows failed (%d in a row): %s: %s",
                            self.job_id, len(self.rows), self.failures,
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "",
                            exc_info=self.failures == 1)
                if raise_errors:
                    raise
                return
            if self.failures:
                log.info("job %s: metric rows written again after %d failed attempts", self.job_id,
                         self.failures)
                self.failures = 0
            self.written += len(self.rows)
            written, self.rows = self.rows, []
            self.first_at = None
            if self.after_write is not None:
                try:
                    self.after_write(written)
                except Exception:
                    log.warning("job %s: after-write hook failed", self.job_id, exc_info=True)


class RunContext:
    """The runner's view of its job (see worker.runners.JobContext), inside the job process."""

    def __init__(self, job_id: str, owner: str, artifact_dir: Path) -> None:
        self.job_id, self.owner, self.artifact_dir = job_id, owner, artifact_dir
        self.cancel = threading.Event()
        self.progress: float | None = None
        self.metrics = MetricsBuffer(job_id)

    def should_stop(self) -> bool:
        return self.cancel.is_set()

    def check_cancel(self) -> None:
        from worker.runners import JobCancelled

        if self.cancel.is_set():
            raise JobCancelled("cancel requested")

    def set_progress(self, frac: float) -> None:
        self.progress = min(1.0, max(0.0, float(frac)))

    def add_metrics(self, rows: list[tuple[str, int, float]]) -> None:
        self.metrics.add(rows)

    def flush_metrics(self, timeout_s: float = METRICS_DURABLE_TIMEOUT_S) -> None:
        """Store every buffered row now, retrying (every second) while the database is down.

        Called before a train job's checkpoint is written (a resume starts after it, so rows not
        stored by then would never be written again) and before the outcome is recorded. Raises
        RuntimeError after `timeout_s` without a successful write.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.metrics.flush(raise_errors=True)
                return
            except Exception as exc:
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"could not store the job's metrics for {timeout_s:g} s "
                                       f"(database unavailable): {type(exc).__name__}: {exc}") from exc
                time.sleep(1.0)

    def add_artifact(self, name: str, path: Path) -> None:
        path = Path(path)
        store.add_artifact(self.job_id, name, str(path), path.stat().st_size, sha256_file(path))


def with_db_retries(fn, what: str, *, timeout_s: float = DB_RETRY_TIMEOUT_S, first_delay_s: float = 0.5,
                    max_delay_s: float = 5.0):
    """fn() with retries on database connection errors (a Postgres restart or failover, a locked SQLite
    file) for up to `timeout_s` (then the error propagates); waits double from `first_delay_s` to
    `max_delay_s`, so a database that is back is used within seconds. Domain errors are not retried."""
    from sqlalchemy.exc import DBAPIError

    deadline = time.monotonic() + timeout_s
    delay = first_delay_s
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except DBAPIError as exc:
            if time.monotonic() + delay > deadline or not (exc.connection_invalidated or _transient(exc)):
                raise
            log.warning("%s: database error (attempt %d), retrying in %.1f s: %s", what, attempt, delay,
                        str(exc).splitlines()[0])
            time.sleep(delay)
            delay = min(max_delay_s, delay * 2)


def _transient(exc: Exception) -> bool:
    from sqlalchemy.exc import InterfaceError, OperationalError

    return isinstance(exc, (OperationalError, InterfaceError))


def error_text(exc: BaseException, job_id: str | None = None) -> str:
    """What a user sees of a job's failure: `Type: message`, the server's folders replaced by labels
    (jobs.errors.redact_paths: artifact root, data roots, site-packages, ...), at most ERROR_TEXT_CHARS.
    The full traceback goes to the worker's log, with the job id."""
    log.error("job %s failed: %s", job_id or "?", type(exc).__name__, exc_info=(type(exc), exc, exc.__traceback__))
    text = redact_paths(f"{type(exc).__name__}: {exc}".strip())
    return text if len(text) <= ERROR_TEXT_CHARS else text[:ERROR_TEXT_CHARS] + " ..."


def slot_device(task: Task, hint_job_id: str) -> str | None:
    """The device a message is a slot for: its queue's (`<prefix><device>.<priority>`), else the named job's."""
    routing_key = str((task.request.delivery_info or {}).get("routing_key") or "")
    prefix = get_settings().queue_prefix
    if routing_key.startswith(prefix):
        device = routing_key[len(prefix):].split(".", 1)[0]
        if device in QUEUES:
            return device
    try:
        return store.get_job(hint_job_id).queue
    except NotFound:
        return None


def supervisor_limits(settings) -> Limits:
    return Limits(heartbeat_interval_s=settings.heartbeat_interval_s,
                  soft_time_limit_s=settings.job_soft_time_limit_s, time_limit_s=settings.job_time_limit_s,
                  stop_grace_s=settings.stop_grace_s)


def run_job(task: Task, job_id: str) -> str:
    """Body of TASK_RUN_JOB for a message naming `job_id`. Returns the recorded status, or "skipped" when
    the message found nothing claimable."""
    settings = get_settings()
    owner = worker_name(task.request.hostname)
    device = slot_device(task, job_id)
    if device is None:
        log.info("job %s: no such job, and its message names no queue: skipped", job_id)
        return "skipped"
    claim = with_db_retries(lambda: claims.claim_next_job(device, owner,
                                                          max_running_per_owner=settings.max_running_jobs_per_owner),
                            f"job {job_id}: claim")
    job = claim.job
    if job is None:
        if claim.blocked_owners:
            log.info("job %s's message: no job of %s can be claimed now; the queued ones wait for their owners' "
                     "running quota (%s at their running quota of %d, LOWRANK_MAX_RUNNING_JOBS_PER_OWNER): skipped",
                     job_id, device, ", ".join(map(str, claim.blocked_owners)), settings.max_running_jobs_per_owner)
        else:
            log.info("job %s: not claimable (finished, cancelled, or running elsewhere) and no other job of %s "
                     "is queued: skipped", job_id, device)
        return "skipped"
    via = "" if job.id == str(job_id) else f" (on the message of job {job_id})"
    log.info("job %s (%s): claimed by %s, attempt %d%s", job.id, job.kind, owner, job.attempts, via)
    payload = {"id": job.id, "spec": job.spec, "worker": owner, "sweep_id": job.sweep_id,
               "cancel_requested": job.cancel_requested, "artifact_dir": str(settings.artifacts / job.id)}
    outcome = supervise(job, owner, payload, supervisor_limits(settings))
    return record_outcome(task.app, job, owner, outcome)


def record_outcome(app: Celery, job: store.JobRecord, owner: str, outcome: Outcome) -> str:
    """Store what `supervise` decided; send a message for a re-queued job and fresh slots for its owner."""
    settings = get_settings()
    if outcome.status == "lost":
        log.warning("job %s: no longer owned by %s (re-queued after a stale heartbeat?); its process was "
                    "stopped and nothing is recorded", job.id, owner)
        return "lost"
    if outcome.status == "requeue":
        status = with_db_retries(lambda: store.requeue_job(job.id, owner, outcome.error,
                                                           max_attempts=settings.max_attempts, attempt=job.attempts),
                                 f"job {job.id}: record the lost run")
        if status is None:
            log.warning("job %s: %s; no longer owned by %s, nothing recorded", job.id, outcome.error, owner)
            return "lost"
        log.warning("job %s: %s; %s", job.id, outcome.error,
                    "re-queued" if status == "queued" else f"recorded {status}")
        if status == "queued":
            dispatch(app, [JobDispatch.of(job)])
    else:
        ok = with_db_retries(lambda: store.finish_job(job.id, owner, outcome.status, result=outcome.result,
                                                      error=outcome.error, attempt=job.attempts),
                             f"job {job.id}: record outcome")
        if not ok:
            log.warning("job %s: no longer owned by %s (re-queued after a stale heartbeat?); "
                        "outcome %s not recorded", job.id, owner, outcome.status)
            return "lost"
        status = outcome.status
        log.info("job %s: %s", job.id, status)
    try:
        # Its owner runs one job fewer: where the quota held its queued jobs back, they need messages again.
        dispatch(app, claims.released_slots(job.owner, settings.max_running_jobs_per_owner))
        if job.sweep_id and sweeps.has_early_stopping(job.sweep_id):
            sweeps.on_job_finished(str(job.sweep_id))
    except Exception:
        log.warning("job %s: after-job bookkeeping failed", job.id, exc_info=True)
    # Search sweeps (jobs/search.py): tell this trial's outcome, ask the next trials, send their jobs.
    if job.sweep_id:
        search.after_job(app, job.sweep_id)
    return status


def _attach_epoch_judge(ctx: RunContext, applies: Callable[[], bool],
                        stops: Callable[[list[tuple[str, int, float]]], bool], rule: str, verdict: str) -> bool:
    """Set ctx's after-write hook: after each metrics write (an epoch's rows are written at its end:
    RunContext.flush_metrics), `stops(rows)` decides whether this job stops at once. Not set (False) when
    the rule does not apply, or cannot be read (logged, naming `rule`)."""
    try:
        if not applies():
            return False
    except Exception:
        log.warning("job %s: could not read its %s", ctx.job_id, rule, exc_info=True)
        return False

    def after_write(rows: list[tuple[str, int, float]]) -> None:
        if stops(rows):
            log.info("job %s: %s", ctx.job_id, verdict)
            ctx.cancel.set()

    ctx.metrics.after_write = after_write
    return True


def attach_early_stopping(sweep_id: str | None, ctx: RunContext) -> bool:
    """For a job of a sweep with early stopping: judge the sweep's milestones after each metrics write;
    a verdict against this job stops it at once."""
    return _attach_epoch_judge(
        ctx, lambda: bool(sweep_id) and sweeps.has_early_stopping(sweep_id),
        lambda rows: ctx.job_id in sweeps.on_epoch_metrics(str(sweep_id), rows),
        "sweep's early-stopping rule", "stopped by its sweep's early stopping")


def attach_search_pruning(sweep_id: str | None, ctx: RunContext) -> bool:
    """For a job of a search sweep with a pruner (jobs/search_pruning.py): judge its trial after each epoch's
    metrics are written; a pruned trial stops this job at once. (A sweep is a grid with early stopping
    or a search with a pruner, never both, so at most one of the two hooks is set.)"""
    return _attach_epoch_judge(
        ctx, lambda: bool(sweep_id) and search_pruning.has_pruner(sweep_id),
        lambda rows: search_pruning.on_epoch_metrics(str(sweep_id), ctx.job_id, rows),
        "search's pruner", "its trial was pruned by the search")


def register(app: Celery) -> dict[str, Any]:
    """Register the tasks on `app` under the names the API sends (jobs.queue)."""

    @app.task(name=TASK_RUN_JOB, bind=True)
    def run_job_task(self: Task, job_id: str) -> str:
        return run_job(self, job_id)

    @app.task(name=TASK_REAP, bind=True)
    def reap_task(self: Task) -> list[str]:
        return reap_stale_jobs(self.app)  # the reaper's round (worker/reaper.py), on demand

    return {TASK_RUN_JOB: run_job_task, TASK_REAP: reap_task}
