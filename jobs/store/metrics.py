"""A job's metric series: written in batches by its worker (idempotent per step), read downsampled."""
from __future__ import annotations

import dataclasses
import math
import uuid
from collections.abc import Sequence

import numpy as np
from sqlalchemy import select

from jobs import models as m
from jobs.db import session_scope
from jobs.errors import InvalidInput
from jobs.rows import as_uuid, dialect_insert, utcnow
from jobs.store.jobs import get_job_row


@dataclasses.dataclass(frozen=True)
class MetricSeries:
    name: str
    steps: list[int]
    values: list[float | None]  # None = NaN or infinite (JSON has neither)
    total: int  # points stored
    downsampled: bool
    epochs: list[float | None] | None = None  # the job's `epoch` series at each of `steps` (None: no epoch there)


def record_metrics(job_id: str | uuid.UUID, rows: Sequence[tuple[str, int, float]]) -> None:
    """Bulk insert (name, step, value) rows; idempotent on (job, name, step): a re-written step (after a
    resume) replaces the earlier value. NaN values are stored as NULL."""
    jid = as_uuid(job_id)
    if not rows:
        return
    now = utcnow()
    # Last value per key wins within one batch too (ON CONFLICT cannot touch a row twice per statement).
    dedup: dict[tuple[str, int], float | None] = {}
    for name, step, value in rows:
        v = float(value)
        dedup[(str(name), int(step))] = None if math.isnan(v) else v
    values = [{"job_id": jid, "name": n, "step": s, "value": v, "recorded_at": now} for (n, s), v in dedup.items()]
    with session_scope() as session:
        insert = dialect_insert(session)
        for i in range(0, len(values), 1000):  # SQLite allows ~32k bound parameters per statement
            stmt = insert(m.Metric).values(values[i:i + 1000])
            stmt = stmt.on_conflict_do_update(
                index_elements=["job_id", "name", "step"],
                set_={"value": stmt.excluded.value, "recorded_at": stmt.excluded.recorded_at},
            )
            session.execute(stmt)


def metric_names(job_id: str | uuid.UUID) -> list[str]:
    with session_scope() as session:
        get_job_row(session, job_id)
        return list(session.scalars(select(m.Metric.name).where(m.Metric.job_id == as_uuid(job_id))
                                    .distinct().order_by(m.Metric.name)))


def downsample(steps: np.ndarray, values: np.ndarray, max_points: int) -> np.ndarray:
    """Indices of at most `max_points` points that keep a series' shape: the first and last point, and in
    each of (max_points-2)//2 equal-width buckets of the points between, the minimum and the maximum
    (in step order). NaN (None) values are kept as candidates only if a bucket holds nothing else."""
    n = len(steps)
    if n <= max_points:
        return np.arange(n)
    buckets = max(0, (max_points - 2) // 2)
    keep = [0, n - 1]
    if buckets:
        edges = np.linspace(1, n - 1, buckets + 1).astype(np.int64)
        finite = np.where(np.isnan(values), np.nan, values)
        for lo, hi in zip(edges[:-1], edges[1:]):
            if hi <= lo:
                continue
            chunk = finite[lo:hi]
            if np.all(np.isnan(chunk)):
                keep.append(int(lo))
                continue
            keep.append(int(lo + np.nanargmin(chunk)))
            keep.append(int(lo + np.nanargmax(chunk)))
    return np.unique(np.asarray(keep, dtype=np.int64))


EPOCH_SERIES = "epoch"


def get_metrics(job_id: str | uuid.UUID, names: Sequence[str] | None = None,
                max_points: int = 1000) -> list[MetricSeries]:
    """The job's metric series (all names, or `names`), each downsampled to at most `max_points` points
    by `downsample` (first, last, per-bucket min and max). Steps ascending. When the job records an
    `epoch` series (train jobs: the 1-based epoch at every step that records metrics), each series
    carries the epoch at each of its steps, so epoch-level curves can be drawn against epochs."""
    if not 2 <= max_points <= 100_000:
        raise InvalidInput(f"max_points must be between 2 and 100000, got {max_points}", ("query", "max_points"))
    jid = as_uuid(job_id)
    with session_scope() as session:
        get_job_row(session, jid)
        stmt = select(m.Metric.name, m.Metric.step, m.Metric.value).where(m.Metric.job_id == jid)
        if names:
            stmt = stmt.where(m.Metric.name.in_(list(names)))
        rows = session.execute(stmt.order_by(m.Metric.name, m.Metric.step)).all()
        epoch_rows = session.execute(select(m.Metric.step, m.Metric.value).where(
            m.Metric.job_id == jid, m.Metric.name == EPOCH_SERIES)).all() if names and EPOCH_SERIES not in names else None
    by_name: dict[str, list[tuple[int, float | None]]] = {}
    for name, step, value in rows:
        by_name.setdefault(name, []).append((step, value))
    epoch_at = dict(epoch_rows if epoch_rows is not None else by_name.get(EPOCH_SERIES, []))
    out = []
    for name in sorted(by_name):
        pts = by_name[name]
        steps = np.fromiter((s for s, _ in pts), dtype=np.int64, count=len(pts))
        values = np.fromiter((np.nan if v is None else v for _, v in pts), dtype=np.float64, count=len(pts))
        idx = downsample(steps, values, max_points)
        out.append(MetricSeries(
            name=name, steps=steps[idx].tolist(),
            values=[v if math.isfinite(v) else None for v in values[idx].tolist()],
            total=len(pts), downsampled=len(idx) < len(pts),
            epochs=[epoch_at.get(st) for st in steps[idx].tolist()] if epoch_at else None))
    return out
