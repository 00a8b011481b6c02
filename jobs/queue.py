"""The queue contract between the API (sends) and the worker (receives): task names, queue names, Celery app.

The API sends tasks by name and never imports worker code; the payload is the job id only, and it is
sent after the database commit (the job row is the truth; a message is only a wake-up call).
Queues are `<prefix><device>.<priority>`, e.g. `lowrank.gpu.high`; a worker lists its queues
high -> normal -> low and, on Redis, consumes them in that order (queue_order_strategy="priority").
A message is a slot for its device: the worker that receives it runs the next job of that device
chosen fairly in the database (jobs/claims.py: priority first, then owners in turn), not necessarily
the job it names.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from celery import Celery

from jobs.settings import Settings, get_settings
from jobs.vocabulary import PRIORITIES, QUEUES, Priority

if TYPE_CHECKING:
    from jobs.dispatch import JobDispatch

TASK_RUN_JOB = "lowrank.run_job"  # one arg: job id (str UUID)
TASK_REAP = "lowrank.reap_stale_jobs"

DEVICES: tuple[str, ...] = QUEUES  # cpu, gpu, gpu2..gpu8 (jobs.vocabulary.QUEUES)
# A broker hiccup: a publish is retried briefly, then reported (the reaper re-sends what was not sent).
SEND_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2, "interval_max": 0.5}


def queue_name(device: str, priority: Priority,
               settings: Settings | None = None) -> str:
    """`<queue_prefix><device>.<priority>`, e.g. "lowrank.cpu.normal", "lowrank.gpu4.high"."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {PRIORITIES}, got {priority!r}")
    prefix = (settings or get_settings()).queue_prefix
    return f"{prefix}{device}.{priority}"


def broker_transport_options(settings: Settings) -> dict:
    if settings.is_embedded_broker:
        folder = settings.broker_folder / "queue"
        control = settings.broker_folder / "control"
        for f in (folder, control):
            f.mkdir(parents=True, exist_ok=True)
        # Producer and consumers share one folder; processed messages are deleted, not archived.
        return {"data_folder_in": str(folder), "data_folder_out": str(folder),
                "control_folder": str(control), "store_processed": False}
    return {
        # Redis re-delivers a message not acked within this time: longer than the longest job, so a
        # running job is never handed to a second worker (our own reaper re-queues dead workers' jobs).
        "visibility_timeout": int(settings.visibility_timeout_s),
        # Consume a worker's -Q list in order (high before normal before low), not round robin.
        "queue_order_strategy": "priority",
    }


def make_celery(settings: Settings | None = None) -> Celery:
    """A Celery app on the configured broker, without any task imports (the worker registers tasks)."""
    settings = settings or get_settings()
    app = Celery("lowrank", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        broker_transport_options=broker_transport_options(settings),
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        # No result backend: job state lives in the database.
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        # Long GPU jobs: ack after the task ran, give the message back if the worker dies, and let
        # each task thread hold only the one message it is running (a busy worker hoards no slots).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # No Celery time limits: the job's supervisor enforces LOWRANK_JOB_*TIME_LIMIT_S (worker/supervisor.py).
        task_default_queue=queue_name("cpu", "normal", settings),
        task_create_missing_queues=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        timezone="UTC",
        enable_utc=True,
    )
    # Remembered on the app so enqueue_job names the queues of the settings this app was built from.
    app.conf.lowrank_queue_prefix = settings.queue_prefix
    return app


def _queue(celery_app: Celery, device: str, priority: str) -> str:
    prefix = celery_app.conf.get("lowrank_queue_prefix")
    if prefix is None:
        return queue_name(device, priority)  # type: ignore[arg-type]
    queue_name(device, priority)  # type: ignore[arg-type]  # validates device / priority
    return f"{prefix}{device}.{priority}"


def enqueue_job(celery_app: Celery, job_id: str, device: str,
                priority: Priority) -> None:
    """Send TASK_RUN_JOB(job_id) to its queue. Call only after the job row is committed."""
    celery_app.send_task(
        TASK_RUN_JOB,
        args=[str(job_id)],
        queue=_queue(celery_app, device, priority),
        # A broken broker must not hang an API request: give up after a few quick retries.
        retry=True,
        retry_policy=SEND_RETRY_POLICY,
    )


class BulkEnqueueError(Exception):
    """enqueue_jobs failed part-way: the first `sent` jobs are on the broker, the rest are not."""

    def __init__(self, sent: int, cause: BaseException) -> None:
        super().__init__(f"broker failure after {sent} messages: {cause!r}")
        self.sent = sent


def enqueue_jobs(celery_app: Celery, jobs: Sequence[JobDispatch], *, batch_size: int = 1000) -> int:
    """Send TASK_RUN_JOB for many jobs (jobs.dispatch.JobDispatch) over one producer; returns how many were sent.

    Each message is built by Celery's own send_task (the same format the worker consumes). On Redis
    they are pipelined, `batch_size` per round trip (kombu's Producer.batch); one message alone, or on
    transports without batch publishing (the embedded filesystem broker), each is sent at once with
    enqueue_job's retry policy. Raises BulkEnqueueError(sent) if the broker fails part-way. Call only
    after the jobs' rows are committed (jobs.dispatch.dispatch does, and records a failure)."""
    sent = 0
    try:
        with celery_app.producer_or_acquire() as producer:
            if not producer.supports_batch_publish or len(jobs) == 1:
                for j in jobs:
                    celery_app.send_task(TASK_RUN_JOB, args=[str(j.job_id)],
                                         queue=_queue(celery_app, j.device, j.priority),
                                         producer=producer, retry=True, retry_policy=SEND_RETRY_POLICY)
                    sent += 1
                return sent
            for start in range(0, len(jobs), batch_size):
                chunk = jobs[start:start + batch_size]
                # One pipeline per chunk: flushed when the block exits, discarded if it raises.
                with producer.batch(max_size=len(chunk) + 16):
                    for j in chunk:
                        celery_app.send_task(TASK_RUN_JOB, args=[str(j.job_id)],
                                             queue=_queue(celery_app, j.device, j.priority), producer=producer)
                sent += len(chunk)
    except Exception as exc:
        raise BulkEnqueueError(sent, exc) from exc
    return sent
