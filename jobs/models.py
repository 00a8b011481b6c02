"""SQLAlchemy 2 ORM rows. Only the jobs/ package's data modules touch them (jobs/store/, jobs/sweeps/, jobs/search*.py,
jobs/claims.py, ...); the API, the worker and the CLI see dataclasses.

Every schema change is an Alembic migration (migrations/versions/); a test checks that
autogenerate against the migrated Postgres finds no difference from these models.
Enumerations are VARCHAR + CHECK constraints (not native Postgres enums) so adding a value is a
plain migration on both Postgres and SQLite.
"""
from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from jobs.rows import utcnow

# The enumerations of the CHECK constraints below are jobs/vocabulary.py's; these two are re-exported for
# callers that read them here (m.TERMINAL_STATUSES; tests/core/test_train_contract.py).
from jobs.vocabulary import (  # noqa: F401 - re-exports, see above
    JOB_KINDS,
    JOB_STATUSES,
    MAX_JOB_DEVICES,
    PRIORITIES,
    QUEUES,
    SWEEP_STRATEGIES,
    TERMINAL_STATUSES,
    TRIAL_STATES,
)

# Idempotency keys are scoped by owner: one unique index per owner over the rows that have a key, and
# one for the rows without an owner (auth off: everyone is the one anonymous owner; NULLs would
# otherwise never collide). Partial, so rows without a key cost these indexes nothing.
_HAS_KEY = "idempotency_key IS NOT NULL"
_ANONYMOUS_KEY = "owner IS NULL AND idempotency_key IS NOT NULL"


def _idempotency_indexes(table: str) -> tuple[Index, Index]:
    return (Index(f"ix_{table}_owner_idempotency_key", "owner", "idempotency_key", unique=True,
                  postgresql_where=text(_HAS_KEY), sqlite_where=text(_HAS_KEY)),
            Index(f"ix_{table}_anonymous_idempotency_key", "idempotency_key", unique=True,
                  postgresql_where=text(_ANONYMOUS_KEY), sqlite_where=text(_ANONYMOUS_KEY)))


def owned_by(model: Any, owner: str | None) -> Any:
    """WHERE clause: rows of `model` (Job, Sweep) owned by `owner`; None is the anonymous owner (auth off)."""
    return model.owner.is_(None) if owner is None else model.owner == owner


# JSONB on Postgres (indexable, compact), JSON text elsewhere.
PortableJSON = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive text; we re-attach UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        value = value.astimezone(dt.UTC)
        # SQLite compares stored text: keep one format (naive UTC) so range queries stay correct.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _check_in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    # Deterministic constraint names so migrations can drop/alter them on every backend.
    metadata = MetaData(naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    })


class Sweep(Base):
    """A grid of job specs created together: `base` spec x `grid` (dotted path -> values) x `seeds`."""

    __tablename__ = "sweeps"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str | None] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))
    base: Mapped[dict[str, Any]] = mapped_column(PortableJSON)
    grid: Mapped[dict[str, Any]] = mapped_column(PortableJSON)
    seeds: Mapped[list[int]] = mapped_column(PortableJSON)
    # Optional early-stopping rule (successive halving) for train sweeps; null = none.
    early_stopping: Mapped[dict[str, Any] | None] = mapped_column(PortableJSON)
    n_points: Mapped[int] = mapped_column(Integer, default=0)  # grid points (without seeds)
    n_jobs: Mapped[int] = mapped_column(Integer, default=0)  # n_points * len(seeds)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))  # unique per owner
    owner: Mapped[str | None] = mapped_column(String(128))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Search sweeps (migration 0004): strategy "search" asks its points from a sampler (jobs/search.py);
    # `search` is its configuration (space, objectives, budget, ...), null for grid sweeps.
    strategy: Mapped[str] = mapped_column(String(16), default="grid", server_default="grid")
    search: Mapped[dict[str, Any] | None] = mapped_column(PortableJSON)

    __table_args__ = (
        CheckConstraint(_check_in("kind", JOB_KINDS), name="kind"),
        CheckConstraint(_check_in("strategy", SWEEP_STRATEGIES), name="strategy"),
        Index(None, "created_at", "id"),
        Index(None, "owner"),
        *_idempotency_indexes("sweeps"),
    )


class Job(Base):
    """One unit of work: a validated spec (jobs/specs.py) and its lifecycle."""

    __tablename__ = "jobs"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    kind: Mapped[str] = mapped_column(String(16))
    spec: Mapped[dict[str, Any]] = mapped_column(PortableJSON)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    priority: Mapped[str] = mapped_column(String(8), default="normal")
    queue: Mapped[str] = mapped_column(String(8), default="cpu")
    name: Mapped[str | None] = mapped_column(String(200))
    tags: Mapped[list[str]] = mapped_column(PortableJSON, default=list)
    owner: Mapped[str | None] = mapped_column(String(128))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))  # unique per owner

    # Sweep membership: the grid point (dotted path -> value), its index in the grid, and the seed.
    sweep_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"))
    sweep_point: Mapped[dict[str, Any] | None] = mapped_column(PortableJSON)
    sweep_point_index: Mapped[int | None] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger, default=0)

    attempts: Mapped[int] = mapped_column(Integer, default=0)  # runs started (claims)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker: Mapped[str | None] = mapped_column(String(255))
    # True while the claiming supervisor holds the job's lease (jobs/lease.py): a free lease then means
    # the supervisor died. Null for claims without one (store.claim_job), which only the heartbeat rule reaps.
    leased: Mapped[bool | None] = mapped_column(Boolean)
    progress: Mapped[float | None] = mapped_column(Double)  # 0..1
    result: Mapped[dict[str, Any] | None] = mapped_column(PortableJSON)
    error: Mapped[str | None] = mapped_column(Text)

    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    enqueued_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)  # last Celery message sent
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    job_tags: Mapped[list[JobTag]] = relationship(cascade="all, delete-orphan", passive_deletes=True)

    __table_args__ = (
        CheckConstraint(_check_in("kind", JOB_KINDS), name="kind"),
        CheckConstraint(_check_in("status", JOB_STATUSES), name="status"),
        CheckConstraint(_check_in("priority", PRIORITIES), name="priority"),
        CheckConstraint(_check_in("queue", QUEUES), name="queue"),
        # Keyset pagination (newest first) and the list filters.
        Index(None, "created_at", "id"),
        Index(None, "status", "created_at", "id"),
        Index(None, "kind", "created_at", "id"),
        Index(None, "sweep_id", "created_at", "id"),
        Index(None, "owner", "created_at", "id"),
        # The reaper's scan for stale running jobs.
        Index(None, "status", "heartbeat_at"),
        # The fair claim (jobs.claims): queued jobs per device, priority and owner, oldest first (a sweep's
        # jobs share created_at: then in grid order).
        Index("ix_jobs_claim", "queue", "priority", "owner", "created_at", "sweep_point_index", "seed", "id",
              postgresql_where=text("status = 'queued'"), sqlite_where=text("status = 'queued'")),
        UniqueConstraint("sweep_id", "sweep_point_index", "seed"),
        *_idempotency_indexes("jobs"),
        # Per-owner quotas count an owner's queued jobs (and the high-priority ones among them).
        Index("ix_jobs_queued_owner_priority", "owner", "priority", postgresql_where=text("status = 'queued'"),
              sqlite_where=text("status = 'queued'")),
    )


class OwnerTurn(Base):
    """When an owner last had a job claimed: among owners with equally many running jobs, the fair claim
    serves the one served longest ago (store.claim_next_job). One row per owner ever served."""

    __tablename__ = "owner_turns"

    owner: Mapped[str] = mapped_column(String(128), primary_key=True)  # "" = jobs without an owner (auth off)
    last_claimed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class JobTag(Base):
    """One row per (job, tag): the portable, indexed form of `jobs.tags` for the tag filter."""

    __tablename__ = "job_tags"

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(64), primary_key=True)

    __table_args__ = (Index(None, "tag", "job_id"),)


class Metric(Base):
    """One value of a named series at a step; (job, name, step) is the key, so writes are idempotent."""

    __tablename__ = "metrics"

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    value: Mapped[float | None] = mapped_column(Double)  # NULL = NaN (SQLite cannot store NaN)
    recorded_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Artifact(Base):
    """A file a job wrote under ARTIFACT_ROOT/<job_id>/ (path stored relative to the root when under it)."""

    __tablename__ = "artifacts"

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Upload(Base):
    """A weights file a client uploaded, stored as ARTIFACT_ROOT/uploads/<id><ext>."""

    __tablename__ = "uploads"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    filename: Mapped[str] = mapped_column(String(255))  # the client's name, for display only
    format: Mapped[str] = mapped_column(String(16))  # npy | npz | safetensors | pt
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    # {array name: {"shape": [...], "dtype": "float32"}}; null for .pt (validated by the worker).
    arrays: Mapped[dict[str, Any] | None] = mapped_column(PortableJSON)
    owner: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        CheckConstraint(_check_in("format", ("npy", "npz", "safetensors", "pt")), name="format"),
        Index(None, "created_at", "id"),
    )


class ApiToken(Base):
    """An API token; only its SHA-256 is stored. Revoked tokens keep their row (audit)."""

    __tablename__ = "api_tokens"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(128), index=True)  # not unique: a name may be re-issued
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class SearchTrial(Base):
    """One trial of a search sweep (jobs/search.py): the point its sampler asked and, once its jobs (one
    per seed, jobs.sweep_point_index = number) have all ended, what was told: the state and the objective
    values (mean over seeds). The sampler's study is rebuilt from these rows, so they are its only state."""

    __tablename__ = "search_trials"

    sweep_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"), primary_key=True)
    number: Mapped[int] = mapped_column(Integer, primary_key=True)  # 0, 1, ... in order of asking
    point: Mapped[dict[str, Any]] = mapped_column(PortableJSON)  # dotted spec path -> value
    state: Mapped[str] = mapped_column(String(16), default="running")
    values: Mapped[list[float] | None] = mapped_column(PortableJSON)  # one per objective; complete trials only
    # Pruner metric per epoch (str(epoch) -> mean over seeds), kept when the trial is told.
    intermediate: Mapped[dict[str, float] | None] = mapped_column(PortableJSON)
    pruned_at: Mapped[int | None] = mapped_column(Integer)  # the epoch at which the pruner stopped it
    reason: Mapped[str | None] = mapped_column(Text)  # why it failed or was pruned
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)  # asked
    told_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        CheckConstraint(_check_in("state", TRIAL_STATES), name="state"),
        Index(None, "state", "sweep_id"),  # the reaper's scan for running trials
    )
