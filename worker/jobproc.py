"""The job process: one job's spec through core/, its metrics and artifacts, and a report to its supervisor.

Forked for each job from the worker's job-process server (worker/supervisor.py), which imported this
module, and with it torch, core/ and worker/runners.py, once. It never heartbeats and never records the
job's status: its supervisor does both from the worker's process. Over its pipe it sends
("progress", frac) now and then and ("outcome", status, result, error) at the end, after the job's
metrics are stored. SIGUSR1 asks it to stop (cancel, soft time limit): it sets the job's stop flag and
raises JobStopRequested in the running Python code at once, as Celery's soft time limit did (a train
loop between two checks, a model being built); a job inside one C call (LAPACK holding the GIL) cannot
run the handler and is SIGKILLed by its supervisor after the grace. Interrupting anywhere is safe here:
checkpoints are written to a temporary file and renamed, database writes are transactions, metric
rows stay buffered until stored, and the process ends right after. Any other death (SIGTERM from
outside, the OOM killer's SIGKILL) makes its supervisor re-queue the job.
DataLoader workers and torchrun ranks are its children, in its process group.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

from jobs.errors import redact_paths
from jobs.specs import parse_spec
from worker.runners import JobCancelled, JobFailed, run_spec
from worker.supervisor import PROGRESS_MIN_INTERVAL_S, STOP_SIGNAL
from worker.tasks import METRICS_BATCH_SECONDS, RunContext, attach_early_stopping, attach_search_pruning, error_text

log = logging.getLogger(__name__)


class JobStopRequested(BaseException):
    """Raised in the job's main thread by its supervisor's stop signal. A BaseException, so that library
    code catching Exception does not swallow it."""


class JobProcessContext(RunContext):
    """RunContext that reports progress to the supervisor (at most every PROGRESS_MIN_INTERVAL_S) and stops
    on its signal."""

    def __init__(self, payload: dict[str, Any], conn: Any) -> None:
        super().__init__(payload["id"], payload["worker"], Path(payload["artifact_dir"]))
        self.conn = conn
        self._send_lock = threading.Lock()
        self._sent_at = 0.0
        self.interruptible = False  # True while the job's own code runs
        self._sending = 0  # a message half-written to the pipe would break the supervisor's reading of it

    def on_stop_signal(self, *_: object) -> None:
        self.cancel.set()
        if self.interruptible and not self._sending:
            raise JobStopRequested("stop requested by the job's supervisor")

    def set_progress(self, frac: float) -> None:
        super().set_progress(frac)
        now = time.monotonic()
        if now - self._sent_at >= PROGRESS_MIN_INTERVAL_S or self.progress == 1.0:
            self._sent_at = now
            self.send(("progress", self.progress))

    def send(self, message: tuple) -> None:
        self._sending += 1
        try:
            with self._send_lock:
                self.conn.send(message)
        finally:
            self._sending -= 1


class MetricsFlusher(threading.Thread):
    """Writes buffered metric rows once the oldest is METRICS_BATCH_SECONDS old, so an epoch's rows reach
    the dashboard while the next epoch runs (best effort: it needs the GIL; nothing else depends on it)."""

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(name="metrics-flusher", daemon=True)
        self.ctx = ctx
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(METRICS_BATCH_SECONDS):
            self.ctx.metrics.flush_if_due()


def _configure_logging() -> None:
    # The job process starts from the server's unconfigured logging; write like Celery, to the worker's stderr.
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/%(processName)s] %(message)s",
                        force=True)


def run(payload: dict[str, Any], conn: Any) -> None:
    """Run the job `payload` describes (id, spec, worker, sweep_id, cancel_requested, artifact_dir)."""
    _configure_logging()
    ctx = JobProcessContext(payload, conn)
    signal.signal(STOP_SIGNAL, ctx.on_stop_signal)
    if payload.get("cancel_requested"):
        ctx.cancel.set()
    if not attach_early_stopping(payload.get("sweep_id"), ctx):
        attach_search_pruning(payload.get("sweep_id"), ctx)
    flusher = MetricsFlusher(ctx)
    flusher.start()
    status, result, error = "failed", None, None
    try:
        try:
            ctx.interruptible = True
            result = run_spec(parse_spec(payload["spec"]), ctx)
            status = "succeeded"
        finally:
            ctx.interruptible = False
    except (JobCancelled, JobStopRequested):
        status, result = "cancelled", None
    except JobFailed as exc:  # a failure the user can act on (e.g. diverged): its message is the whole error
        error = redact_paths(str(exc))
    except Exception as exc:  # noqa: BLE001 - any job error is recorded, the worker serves on
        error = error_text(exc, ctx.job_id)  # logs the traceback
    finally:
        flusher.stopped.set()
    try:
        # Metrics first: a job is only reported finished once its series is complete.
        ctx.flush_metrics()
    except Exception as exc:  # noqa: BLE001 - any failure to store the metrics fails the job, with its text
        if status == "succeeded":
            status, error = "failed", "could not write the job's metrics: " + error_text(exc, ctx.job_id)
    ctx.send(("outcome", status, result, error))
    conn.close()
