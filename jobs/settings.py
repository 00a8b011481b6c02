"""One settings class read by the API, the worker, the CLI and the migrations (env prefix LOWRANK_).

Defaults are the embedded ones: a SQLite file and Celery's filesystem transport under
`./.lowrank/`, so `lowrank up` needs nothing installed. Production sets
`LOWRANK_DATABASE_URL=postgresql+psycopg://...` and `LOWRANK_BROKER_URL=redis://...`.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

import pydantic
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The embedded broker: Celery's filesystem transport, folders under `home/broker/`.
EMBEDDED_BROKER_URL = "filesystem://"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOWRANK_", extra="ignore", validate_default=True)

    # Where the embedded defaults live (SQLite file, broker folders, artifacts); made absolute at load
    # so the API, the worker and subprocesses started from another cwd agree.
    home: Path = Path(".lowrank")
    # SQLAlchemy URL; empty -> sqlite:///<home>/lowrank.db. Postgres: postgresql+psycopg://user@host/db
    database_url: str = ""
    # Celery broker URL; "filesystem://" (default) -> folders under <home>/broker. Production: redis://...
    broker_url: str = EMBEDDED_BROKER_URL
    # Root of every file a job or an upload writes: <artifact_root>/<job_id>/..., <artifact_root>/uploads/
    artifact_root: Path | None = None
    # Prefix of every Celery queue name; tests set a unique one so parallel runs never share queues.
    queue_prefix: str = "lowrank."

    # Authentication of API requests: "off" (loopback-only embedded use) or "required" (Bearer tokens).
    auth: Literal["off", "required"] = "off"
    # How long an API process trusts a token lookup (valid or unknown) before asking the database again:
    # one lookup per window for a busy client; a revoked token works at most this long (0: no cache).
    auth_cache_s: float = Field(5.0, ge=0)

    # Threads per API process that run request handlers (the route handlers are sync: database and
    # Redis calls). Few threads keep the GIL from thrashing: on 2 cores, 4 gives ~1,000 submissions/s
    # with p99 < 100 ms where anyio's default of 40 gave ~600/s with p99 ~400 ms (bench/load.py).
    # Raise it when many slow requests (large uploads, big CSV results) must not wait on each other.
    api_threads: int = Field(4, ge=1, le=1024)
    # API processes `lowrank api` starts when --workers is not given (uvicorn workers; one per core).
    api_processes: int = Field(1, ge=1, le=256)

    # Limits, each enforced with a clear 413/422 naming it.
    max_body_bytes: int = Field(1 << 20, ge=1024)  # JSON request bodies
    max_upload_bytes: int = Field(512 << 20, ge=1024)  # uploaded weight files, as sent
    # What an upload's arrays expand to in memory, all together (shape x dtype, read from headers): a
    # 4 MB deflated .npz can hold 4 GiB of zeros. 1 GiB holds the largest allowed matrix in float64.
    max_upload_expanded_bytes: int = Field(1 << 30, ge=1024)
    max_sweep_points: int = Field(10_000, ge=1)  # jobs one sweep may create
    max_matrix_elements: int = Field(1 << 26, ge=1)  # m*d of a weight matrix (64 Mi elements = 256 MiB fp32)
    max_rank: int = Field(4096, ge=1)
    max_epochs: int = Field(1000, ge=1)
    max_mc_samples: int = Field(1_000_000, ge=0)
    # Per-owner quotas, checked at submission (429 naming the setting; 0 = no limit); admins (and
    # everyone with auth off) are exempt. Queued jobs count a sweep's jobs and retried jobs; one sweep
    # may create at most max_sweep_jobs_per_owner jobs; queued `priority: high` jobs, which workers take
    # before all others, at most max_high_priority_jobs_per_owner. (Running jobs: worker side.)
    max_queued_jobs_per_owner: int = Field(2000, ge=0)
    max_sweep_jobs_per_owner: int = Field(1000, ge=0)
    max_high_priority_jobs_per_owner: int = Field(10, ge=0)
    # Folders an `imagefolder` train job may read (comma-free JSON list in env: '["/data"]').
    data_roots: list[Path] = Field(default_factory=list)

    # Worker liveness: a job's supervisor (worker/supervisor.py, not the job's own process) heartbeats
    # every heartbeat_interval_s; after stale_after_s of silence the reaper re-queues the job, at most
    # max_attempts runs in all. A supervisor whose process died is seen sooner: its job lease is free
    # (jobs/lease.py) and its heartbeat older than 1.5 intervals.
    heartbeat_interval_s: float = Field(10.0, gt=0)
    stale_after_s: float = Field(120.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    reap_interval_s: float = Field(10.0, gt=0)
    # Per-job time limits (seconds), enforced by the job's supervisor: at the soft limit the job is asked
    # to stop (recorded `failed`, naming the limit); at the hard limit its process group is killed.
    job_soft_time_limit_s: float = Field(48 * 3600, gt=0)
    job_time_limit_s: float = Field(48 * 3600 + 300, gt=0)
    # How long a job asked to stop (cancel) may take before its process group is killed: a training
    # loop stops at its next step; a LAPACK call that holds the GIL is killed after this grace.
    stop_grace_s: float = Field(5.0, ge=0)
    # Fair use at claim time: jobs one owner may have running at once (0 = no limit). Admins (an owner
    # with a live admin token) and jobs without an owner (auth off) are exempt.
    max_running_jobs_per_owner: int = Field(32, ge=0)
    # Redis re-delivers an unacked message after this long; must exceed the longest job (hard limit).
    visibility_timeout_s: float = Field(7 * 24 * 3600, gt=0)

    @model_validator(mode="after")
    def _resolve(self) -> Settings:
        self.home = self.home.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'lowrank.db'}"
        if self.artifact_root is None:
            self.artifact_root = self.home / "artifacts"
        self.artifact_root = self.artifact_root.expanduser().resolve()
        self.data_roots = [p.expanduser().resolve() for p in self.data_roots]
        if self.job_soft_time_limit_s >= self.job_time_limit_s:
            raise ValueError("job_soft_time_limit_s must be below job_time_limit_s")
        if self.visibility_timeout_s <= self.job_time_limit_s:
            raise ValueError("visibility_timeout_s must exceed job_time_limit_s (longest job)")
        if self.stale_after_s <= self.heartbeat_interval_s:
            raise ValueError("stale_after_s must exceed heartbeat_interval_s")
        return self

    @property
    def artifacts(self) -> Path:
        """`artifact_root` as a non-optional Path (always set after validation)."""
        assert self.artifact_root is not None
        return self.artifact_root

    @property
    def is_embedded_broker(self) -> bool:
        return self.broker_url == EMBEDDED_BROKER_URL

    @property
    def broker_folder(self) -> Path:
        """Folder of the embedded filesystem transport (messages in `queue/`, acked ones dropped)."""
        return self.home / "broker"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def describe_settings_error(exc: pydantic.ValidationError) -> str:
    """One line naming each bad LOWRANK_* variable, its value and what is allowed."""
    parts = []
    for err in exc.errors():
        name = "LOWRANK_" + "_".join(str(p) for p in err["loc"]).upper() if err["loc"] else "LOWRANK_* settings"
        given = f"={err['input']!r}" if err["loc"] and isinstance(err.get("input"), (str, int, float)) else ""
        parts.append(f"{name}{given}: {err['msg']}")
    return "invalid settings: " + "; ".join(parts)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment (LOWRANK_*)."""
    return Settings()


def reset_settings() -> None:
    """Forget cached settings and database engines (tests change LOWRANK_* env vars, then call this)."""
    get_settings.cache_clear()
    from jobs import db  # local import: db imports settings

    db.dispose_engines()
