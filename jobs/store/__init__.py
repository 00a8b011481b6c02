"""The store: every read and write of jobs, metrics, artifacts and uploads, one module per concern.

    jobs.py             create (idempotent per owner, within quotas), get, list, cancel, retry
    worker_contract.py  claim_job, beat / job_control / heartbeat, finish_job, requeue_job,
                        requeue_stale_jobs (workers claim with jobs.claims.claim_next_job)
    metrics.py          record_metrics (the worker), get_metrics (downsampled), metric_names
    artifacts.py        add_artifact (the worker), list_artifacts, get_artifact
    uploads.py          create_upload (checked without loading), get_upload, check_references (specs: uploads,
                        compress sources)

Each public function is one transaction (`session_scope`), returns plain dataclasses (never ORM rows)
and raises the domain errors of jobs/errors.py (never HTTP). What the store shares with sweeps and
search (the clock, ids, paging, the dialect) is jobs/rows.py; sending messages and recording what was
sent is jobs/dispatch.py. Everything public is re-exported here: `from jobs import store; store.get_job(...)`.
"""
from __future__ import annotations

from jobs.db import ping_database
from jobs.dispatch import find_lost_queued_jobs, mark_enqueued, mark_not_enqueued
from jobs.rows import ID_PREFIX_MIN, check_actor, get_row, keyset_page, where_id_prefix
from jobs.store.artifacts import ArtifactRecord, add_artifact, get_artifact, list_artifacts
from jobs.store.jobs import (
    JobPage,
    JobRecord,
    build_job_row,
    cancel_jobs,
    create_job,
    get_job,
    job_values,
    list_jobs,
    request_cancel,
    requeue_values,
    retry_job,
)
from jobs.store.metrics import EPOCH_SERIES, MetricSeries, downsample, get_metrics, metric_names, record_metrics
from jobs.store.uploads import (
    UPLOAD_FORMATS,
    UploadRecord,
    check_references,
    create_upload,
    get_upload,
    get_upload_path,
    needs_resolution,
    resolve_references,
)
from jobs.store.worker_contract import (
    JobControl,
    Requeued,
    beat,
    claim_job,
    finish_job,
    heartbeat,
    job_control,
    requeue_job,
    requeue_stale_jobs,
)

__all__ = [
    "EPOCH_SERIES", "ID_PREFIX_MIN", "UPLOAD_FORMATS", "ArtifactRecord", "JobControl", "JobPage", "JobRecord",
    "MetricSeries", "Requeued", "UploadRecord", "add_artifact", "beat", "build_job_row", "cancel_jobs",
    "check_actor", "check_references", "claim_job", "needs_resolution", "resolve_references", "create_job", "create_upload", "downsample",
    "find_lost_queued_jobs", "finish_job", "get_artifact", "get_job", "get_metrics", "get_row", "get_upload",
    "get_upload_path", "heartbeat", "job_control", "job_values", "keyset_page", "list_artifacts", "list_jobs",
    "mark_enqueued", "mark_not_enqueued", "metric_names", "ping_database", "record_metrics", "request_cancel",
    "requeue_job", "requeue_stale_jobs", "requeue_values", "retry_job", "where_id_prefix",
]
