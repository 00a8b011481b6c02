"""Early stopping of train and compress (fine-tune epochs) sweeps: successive halving on a metric recorded at epoch ends.

At each milestone epoch e a point's value is the mean over its jobs of the metric at the end of epoch e;
once `min_points` points have a value at e (default: all points, i.e. synchronous successive halving),
every point with a value is compared with all values at e, and a point strictly worse than the
ceil(keep * n)-th best is stopped: its queued jobs are cancelled and its running jobs get
cancel_requested (their workers stop at the next check). Points reaching e later are judged on arrival
against all values at e so far (asynchronous successive halving, as in ASHA; set min_points=1 with fewer
workers than points). The worker calls `on_epoch_metrics` after it writes an epoch's metrics and
`on_job_finished` after a job ends; decisions are kept on the sweep row (`early_stopping.decisions`) so
each point is judged once per milestone.
"""
from __future__ import annotations

import json
import logging
import math
import uuid
from collections.abc import Iterable
from typing import Any

from sqlalchemy import and_, select
from sqlalchemy.orm import Session, aliased

from jobs import models as m
from jobs.db import session_scope
from jobs.rows import as_uuid, utcnow
from jobs.store import cancel_jobs
from jobs.vocabulary import TERMINAL_STATUSES

log = logging.getLogger(__name__)


EPOCH_END_MARKER = "epoch_time_s"  # recorded once per epoch, at the epoch's last step (core/train)


def decide_rung(values: dict[int, float], decided: dict[str, str], mode: str, keep: float,
                min_points: int) -> dict[int, str]:
    """Pure decision of one milestone. `values`: point index -> value at this milestone (points not
    stopped earlier); `decided`: str(point) -> "kept"|"stopped" from earlier calls. Returns the new
    decisions: nothing until min_points points have values; then each undecided point is stopped if
    strictly worse than the ceil(keep*n)-th best of all n values."""
    if len(values) < min_points:
        return {}
    ordered = sorted(values.values(), reverse=(mode == "max"))
    n_keep = max(1, math.ceil(keep * len(ordered)))
    cutoff = ordered[n_keep - 1]
    out = {}
    for p, v in values.items():
        if str(p) in decided:
            continue
        worse = v < cutoff if mode == "max" else v > cutoff
        out[p] = "stopped" if worse else "kept"
    return out


def epoch_values(session: Session, sweep_id: uuid.UUID, metric: str,
                  epochs: list[int] | None) -> dict[uuid.UUID, dict[int, float]]:
    """job -> {epoch: metric value at that epoch's end} for the sweep's jobs (at `epochs`; None: all)."""
    marker, ep, val = aliased(m.Metric), aliased(m.Metric), aliased(m.Metric)
    stmt = (select(marker.job_id, ep.value, val.value)
            .join(ep, and_(ep.job_id == marker.job_id, ep.step == marker.step, ep.name == "epoch"))
            .join(val, and_(val.job_id == marker.job_id, val.step == marker.step, val.name == metric))
            .where(marker.name == EPOCH_END_MARKER,
                   marker.job_id.in_(select(m.Job.id).where(m.Job.sweep_id == sweep_id))))
    if epochs is not None:
        stmt = stmt.where(ep.value.in_([float(e) for e in epochs]))
    rows = session.execute(stmt).all()
    out: dict[uuid.UUID, dict[int, float]] = {}
    for job_id, epoch, value in rows:
        if value is not None and math.isfinite(value):
            out.setdefault(job_id, {})[int(epoch)] = float(value)
    return out


def apply_early_stopping(sweep_id: str | uuid.UUID) -> list[str]:
    """Judge the sweep's milestones with the metrics recorded so far; stop the worse points.
    Idempotent; serialized per sweep by a row lock. Returns the ids of jobs cancelled or asked to stop."""
    sid = as_uuid(sweep_id, "sweep")
    with session_scope() as session:
        row = session.scalars(select(m.Sweep).where(m.Sweep.id == sid).with_for_update()).one_or_none()
        if row is None or not row.early_stopping or row.cancel_requested:
            return []
        rule = json.loads(json.dumps(row.early_stopping))
        decisions: dict[str, dict[str, Any]] = rule.setdefault("decisions", {})
        jobs = session.execute(select(m.Job.id, m.Job.sweep_point_index, m.Job.status)
                               .where(m.Job.sweep_id == sid)).all()
        by_point: dict[int, list[tuple[uuid.UUID, str]]] = {}
        for job_id, idx, status in jobs:
            by_point.setdefault(idx, []).append((job_id, status))
        values = epoch_values(session, sid, rule["metric"], rule["epochs"])
        min_points = rule.get("min_points") or row.n_points
        stopped_before: set[int] = set()
        newly_stopped: set[int] = set()
        changed = False
        for epoch in rule["epochs"]:
            rung = decisions.setdefault(str(epoch), {"decided": {}, "values": {}})
            point_values: dict[int, float] = {}
            for idx, members in by_point.items():
                if idx in stopped_before:
                    continue
                vals, complete = [], True
                for job_id, status in members:
                    v = values.get(job_id, {}).get(epoch)
                    if v is not None:
                        vals.append(v)
                    elif status not in TERMINAL_STATUSES:
                        complete = False  # this seed has not reached the milestone yet
                if complete and vals:
                    point_values[idx] = math.fsum(vals) / len(vals)
            new = decide_rung(point_values, rung["decided"], rule["mode"], rule["keep"], min_points)
            for idx, verdict in new.items():
                rung["decided"][str(idx)] = verdict
                rung["values"][str(idx)] = point_values[idx]
                changed = True
                if verdict == "stopped":
                    newly_stopped.add(idx)
            stopped_before |= {int(p) for p, v in rung["decided"].items() if v == "stopped"}
            if len(point_values) < min_points:
                break  # later milestones wait for this one
        if changed:
            row.early_stopping = rule
        if not newly_stopped:
            return []
        targets = [j for idx in newly_stopped for j, status in by_point[idx] if status not in TERMINAL_STATUSES]
        if targets:
            cancel_jobs(session, m.Job.id.in_(targets), utcnow())
        log.info("sweep %s: early stopping stopped points %s (%d jobs)", sid, sorted(newly_stopped), len(targets))
        return [str(t) for t in targets]


def has_early_stopping(sweep_id: str | uuid.UUID) -> bool:
    # Compared in Python: a JSON column stores Python None as JSON null, which SQL's IS NOT NULL counts as a value.
    with session_scope() as session:
        return bool(session.scalar(select(m.Sweep.early_stopping).where(m.Sweep.id == as_uuid(sweep_id, "sweep"))))


def on_epoch_metrics(sweep_id: str, rows: Iterable[tuple[str, int, float]]) -> list[str]:
    """Worker hook after a metrics batch is written: judge milestones when an epoch ended."""
    if not any(name == EPOCH_END_MARKER for name, _, _ in rows):
        return []
    return apply_early_stopping(sweep_id)


def on_job_finished(sweep_id: str) -> list[str]:
    """Worker hook after a job of the sweep ended (a failed seed may complete a point's value)."""
    return apply_early_stopping(sweep_id)
