"""Thin Celery tasks: take a job id, claim the row, run one core call, record the outcome.

run_job(job_id):
  1. store.claim_job — an atomic UPDATE; None means a duplicate delivery (the job is running
     with a fresh heartbeat, finished, or cancelled while queued): do nothing.
  2. a heartbeat thread (every settings.heartbeat_interval_s) reports progress and reads the
     cancel flag, which the runner checks between steps;
  3. worker/runners.py turns the spec into a core/ call; metrics are written in batches;
  4. store.finish_job: succeeded + result, failed + error text and traceback tail, or cancelled.
The task itself never raises for a job's failure: the message is acked and the worker serves on.
Time limits: the soft limit raises SoftTimeLimitExceeded inside the task (recorded as failed
with a message naming the limit); if the job ignores it until the hard limit, Celery kills the
pool process and `JobRequest.on_timeout` records the failure from the worker's main process.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.worker.request import Request

from jobs import store, sweeps
from jobs.errors import NotFound
from jobs.queue import TASK_REAP, TASK_RUN_JOB, enqueue_job, queue_name
from jobs.settings import get_settings
from jobs.specs import parse_spec

log = logging.getLogger(__name__)

TRACEBACK_TAIL_CHARS = 4000
METRICS_BATCH_ROWS = 200      # flush the metric buffer at this many rows...
METRICS_BATCH_SECONDS = 2.0   # ...or when its oldest row is this old (and at the end)
# How long a job waits for the database to store its metrics (epoch ends, the end) or its outcome
# before it gives up: a Postgres restart or failover takes seconds to a minute or two.
METRICS_DURABLE_TIMEOUT_S = 120.0
DB_RETRY_TIMEOUT_S = 120.0


def worker_name(hostname: str | None, pid: int | None = None) -> str:
    """The owner recorded on a claimed job: Celery node name + pool process id."""
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
        # Sweep early stopping (jobs/sweeps.py): `after_write(rows)` runs after each successful write.
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
                except Exception:  # noqa: BLE001 - a hook never fails the job
                    log.warning("job %s: after-write hook failed", self.job_id, exc_info=True)


class RunContext:
    """The runner's view of its job (see worker.runners.JobContext)."""

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
            except SoftTimeLimitExceeded:
                raise  # the job's time is up, not the database
            except Exception as exc:  # noqa: BLE001 - a database outage: wait for it, bounded
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"could not store the job's metrics for {timeout_s:g} s "
                                       f"(database unavailable): {type(exc).__name__}: {exc}") from exc
                time.sleep(1.0)

    def add_artifact(self, name: str, path: Path) -> None:
        path = Path(path)
        store.add_artifact(self.job_id, name, str(path), path.stat().st_size, sha256_file(path))


class Heartbeat(threading.Thread):
    """Every `interval_s`: store.heartbeat(progress) (True sets the job's cancel flag), then flush
    metrics that have waited METRICS_BATCH_SECONDS."""

    def __init__(self, ctx: RunContext, interval_s: float) -> None:
        super().__init__(name=f"heartbeat-{ctx.job_id[:8]}", daemon=True)
        self.ctx, self.interval_s = ctx, interval_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self.beat()

    def beat(self) -> None:
        try:
            if store.heartbeat(self.ctx.job_id, self.ctx.owner, self.ctx.progress):
                self.ctx.cancel.set()
            self.ctx.metrics.flush_if_due()
        except Exception:
            # A database blip must not kill the job; a long outage makes the job stale, and the
            # reaper re-queues it (a train job resumes from its checkpoint).
            log.warning("job %s: heartbeat failed", self.ctx.job_id, exc_info=True)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


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


def error_text(exc: BaseException) -> str:
    """`Type: message` and the traceback's tail (the frames nearest the error)."""
    head = f"{type(exc).__name__}: {exc}".strip()
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if len(tb) > TRACEBACK_TAIL_CHARS:
        tb = "...\n" + tb[-TRACEBACK_TAIL_CHARS:]
    return f"{head}\n\n{tb}"


def run_job(task: Task, job_id: str) -> str:
    """Body of TASK_RUN_JOB. Returns the recorded status, or "skipped" for a duplicate delivery."""
    from worker.runners import JobCancelled, run_spec

    settings = get_settings()
    owner = worker_name(task.request.hostname)
    try:
        job = with_db_retries(lambda: store.claim_job(job_id, owner, stale_after_s=settings.stale_after_s),
                              f"job {job_id}: claim")
    except NotFound:
        job = None
    if job is None:
        log.info("job %s: not claimable (finished, cancelled, or running elsewhere): skipped", job_id)
        return "skipped"
    log.info("job %s (%s): claimed by %s, attempt %d", job_id, job.kind, owner, job.attempts)
    ctx = RunContext(str(job.id), owner, settings.artifacts / str(job.id))
    if job.cancel_requested:
        ctx.cancel.set()
    early_stopping = _attach_early_stopping(job, ctx)
    beat = Heartbeat(ctx, settings.heartbeat_interval_s)
    beat.start()
    status, result, error = "failed", None, None
    try:
        try:
            result = run_spec(parse_spec(job.spec), ctx)
            status = "succeeded"
        except JobCancelled:
            status = "cancelled"
        except SoftTimeLimitExceeded:
            error = (f"time limit exceeded: the job ran longer than {settings.job_soft_time_limit_s:g} s "
                     f"(LOWRANK_JOB_SOFT_TIME_LIMIT_S) and was stopped")
        except Exception as exc:  # noqa: BLE001 - any job error is recorded, the worker serves on
            error = error_text(exc)
        try:
            # Metrics first: a job is only reported finished once its series is complete.
            ctx.flush_metrics()
        except Exception as exc:  # noqa: BLE001
            if status == "succeeded":
                status, error = "failed", "could not write the job's metrics: " + error_text(exc)
    finally:
        beat.stop()
    ok = with_db_retries(lambda: store.finish_job(str(job.id), owner, status, result=result, error=error),
                         f"job {job_id}: record outcome")
    if not ok:
        log.warning("job %s: no longer owned by %s (re-queued after a stale heartbeat?); "
                    "outcome %s not recorded", job_id, owner, status)
        return "lost"
    log.info("job %s: %s", job_id, status)
    if early_stopping:
        try:
            sweeps.on_job_finished(str(job.sweep_id))
        except Exception:  # noqa: BLE001
            log.warning("job %s: early-stopping check failed", job_id, exc_info=True)
    return status


def _attach_early_stopping(job: store.JobRecord, ctx: RunContext) -> bool:
    """For a job of a sweep with early stopping: judge the sweep's milestones after each metrics write
    (an epoch's rows are written at its end: RunContext.flush_metrics); a verdict against this job
    stops it at once."""
    try:
        if not job.sweep_id or not sweeps.has_early_stopping(job.sweep_id):
            return False
    except Exception:  # noqa: BLE001
        log.warning("job %s: could not read its sweep's early-stopping rule", job.id, exc_info=True)
        return False

    def after_write(rows: list[tuple[str, int, float]]) -> None:
        if ctx.job_id in sweeps.on_epoch_metrics(str(job.sweep_id), rows):
            log.info("job %s: stopped by its sweep's early stopping", ctx.job_id)
            ctx.cancel.set()

    ctx.metrics.after_write = after_write
    return True


class JobRequest(Request):
    """Records a hard time limit kill in the database (the killed pool process cannot)."""

    def on_timeout(self, soft: bool, timeout: float) -> None:
        if not soft and self.args:
            job_id = str(self.args[0])
            owner = worker_name(self.hostname, self.worker_pid)
            try:
                store.finish_job(job_id, owner, "failed",
                                 error=f"time limit exceeded: the job did not stop within {timeout:g} s "
                                       f"(LOWRANK_JOB_TIME_LIMIT_S); its worker process was killed")
            except Exception:  # noqa: BLE001 - the reaper will re-queue or fail it later
                log.exception("job %s: could not record the hard time limit", job_id)
        super().on_timeout(soft, timeout)


class JobTask(Task):
    Request = JobRequest
    # Long jobs: acks_late + reject on worker loss come from the app config (jobs.queue.make_celery).


def lost_after_s(settings) -> float:
    """Age after which a queued job's message counts as lost and is sent again.

    Long: a job may legitimately wait hours behind others, and each re-send adds a (harmless,
    claim-guarded) duplicate message to its queue. Jobs never enqueued (the API died between its
    commit and the send) are caught by the same rule.
    """
    return max(3600.0, 10 * settings.stale_after_s)


def reap_stale_jobs(app: Celery, *, requeue_stale: bool = True) -> list[str]:
    """Re-queue running jobs whose heartbeat is older than settings.stale_after_s; re-enqueue them.

    Jobs over settings.max_attempts are failed by the store instead. Queued jobs whose message looks
    lost are sent again: at once when the broker holds fewer messages on a job's queue than there are
    jobs waiting on it for longer than settings.stale_after_s (a broker restarted without its data, a
    send that failed), else after lost_after_s. `requeue_stale=False` skips the heartbeat rule (the
    Reaper passes it right after a database outage, when every heartbeat looks stale). Returns the
    ids sent.
    """
    settings = get_settings()
    sent: list[str] = []
    if requeue_stale:
        requeued = store.requeue_stale_jobs(settings.stale_after_s, settings.max_attempts)
        for job_id, device, priority in requeued:
            log.warning("job %s: heartbeat older than %g s; re-queued on %s/%s",
                        job_id, settings.stale_after_s, device, priority)
        sent += _send(app, requeued)
    lost = find_lost_messages(app, settings)
    for job_id, _, _ in lost:
        log.warning("job %s: queued, but its message looks lost; sent again", job_id)
    resent = _send(app, lost)
    if resent:
        store.mark_enqueued(resent)
    return sent + resent


def _send(app: Celery, jobs: list[tuple[str, str, str]]) -> list[str]:
    """Enqueue each job; those the broker refused are marked not enqueued (re-sent next round)."""
    sent, failed = [], []
    for job_id, device, priority in jobs:
        try:
            enqueue_job(app, str(job_id), device, priority)  # type: ignore[arg-type]
            sent.append(str(job_id))
        except Exception:  # noqa: BLE001 - broker down: the next round sends it
            failed.append(str(job_id))
    if failed:
        log.warning("broker unavailable: %d job(s) not sent; they are re-sent next round", len(failed))
        store.mark_not_enqueued(failed)
    return sent


def broker_queue_size(app: Celery, queue: str) -> int:
    """Messages waiting on `queue` in the broker (not counting those a worker holds unacked)."""
    from kombu.exceptions import ChannelError

    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2, timeout=3)
        try:
            return int(conn.default_channel.queue_declare(queue=queue, passive=True).message_count)
        except ChannelError:  # no such queue: the broker holds no message for it
            return 0


def find_lost_messages(app: Celery, settings) -> list[tuple[str, str, str]]:  # noqa: ANN001
    """Queued jobs to send again: the store's (send failed, or older than lost_after_s), plus every job
    waiting longer than stale_after_s on a queue that holds fewer messages than such jobs.

    Counting is cheap and catches a broker that lost its data (Redis restarted without persistence,
    flushed, failed over) within one round instead of lost_after_s. Re-sending a job whose message
    still exists only adds a duplicate, which claim_job turns into a no-op.
    """
    lost = {j[0]: j for j in store.find_lost_queued_jobs(lost_after_s(settings))}
    waiting = store.find_lost_queued_jobs(settings.stale_after_s)
    by_queue: dict[tuple[str, str], list[tuple[str, str, str]]] = {}
    for job in waiting:
        if job[0] not in lost:
            by_queue.setdefault((job[1], job[2]), []).append(job)
    for (device, priority), jobs in by_queue.items():
        name = queue_name(device, priority, settings)  # type: ignore[arg-type]
        try:
            size = broker_queue_size(app, name)
        except Exception:  # noqa: BLE001 - broker down: nothing can be sent now anyway
            log.warning("reaper: cannot count the messages on %s", name, exc_info=True)
            continue
        if size < len(jobs):
            log.warning("reaper: %s holds %d message(s) for %d job(s) queued longer than %g s; "
                        "sending theirs again", name, size, len(jobs), settings.stale_after_s)
            lost.update((j[0], j) for j in jobs)
    return list(lost.values())


def register(app: Celery) -> dict[str, Any]:
    """Register the tasks on `app` under the names the API sends (jobs.queue)."""

    @app.task(name=TASK_RUN_JOB, bind=True, base=JobTask)
    def run_job_task(self: Task, job_id: str) -> str:
        return run_job(self, job_id)

    @app.task(name=TASK_REAP, bind=True)
    def reap_task(self: Task) -> list[str]:
        return reap_stale_jobs(self.app)

    return {TASK_RUN_JOB: run_job_task, TASK_REAP: reap_task}
