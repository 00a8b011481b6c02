"""Wire schemas: `JobCreate` (the job spec union of jobs/specs.py) in, `*Public` out."""
from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from jobs.specs import JobSpec

JobCreate = JobSpec  # the single source of truth for what a job accepts


class _Public(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class JobPublic(_Public):
    id: uuid.UUID
    kind: str
    status: str = Field(description="queued | running | succeeded | failed | cancelled")
    priority: str
    queue: str = Field(description="cpu | gpu: the device family of the queue it runs on")
    name: str | None
    tags: list[str]
    owner: str | None
    spec: dict[str, Any] = Field(description="the validated spec, every default filled in")
    sweep_id: uuid.UUID | None
    sweep_point: dict[str, Any] | None
    sweep_point_index: int | None
    seed: int
    attempts: int = Field(description="runs started (a stale run re-queued counts again)")
    cancel_requested: bool
    worker: str | None
    progress: float | None = Field(description="0..1")
    result: dict[str, Any] | None
    error: str | None
    created_at: dt.datetime
    enqueued_at: dt.datetime | None
    started_at: dt.datetime | None
    heartbeat_at: dt.datetime | None
    finished_at: dt.datetime | None


class JobPage(BaseModel):
    items: list[JobPublic]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next (older) page; null on the last")


class MetricSeriesPublic(_Public):
    name: str
    steps: list[int]
    values: list[float | None] = Field(description="null = NaN or infinite")
    total: int = Field(description="points stored for this series")
    downsampled: bool
    epochs: list[float | None] | None = Field(
        None, description="the job's epoch (1-based) at each step (null where none was recorded); null for jobs "
                          "without an `epoch` series. Epoch-level series (val_*, train_loss) are recorded once per "
                          "epoch, at its last step")


class MetricsPublic(BaseModel):
    job_id: uuid.UUID
    series: list[MetricSeriesPublic]


class ArtifactPublic(BaseModel):
    name: str
    size: int = Field(description="bytes")
    sha256: str
    created_at: dt.datetime
    url: str = Field(description="download path on this server")


class UploadPublic(_Public):
    id: uuid.UUID
    filename: str
    format: str = Field(description="npy | npz | safetensors | pt")
    size: int = Field(description="bytes")
    sha256: str
    arrays: dict[str, Any] | None = Field(description="{name: {shape, dtype}} of its tensors (a .pt: its state_dict's); "
                                                      "null for a .pt of one tensor or without named tensors")
    created_at: dt.datetime


class ErrorPublic(BaseModel):
    detail: str
    code: str
    info: dict[str, Any] | None = None


class HealthPublic(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)
