"""The reads of a search sweep (jobs/search.py writes it): its record's status and progress (they follow
the trials, not the jobs), and its results: every trial or the Pareto front, as JSON and CSV.

    doc = trials_document(sweep_id, front_only=True)   # {"objectives", "front", "counts", "rows"}
    text = trials_csv(doc)
"""
from __future__ import annotations

import dataclasses
import uuid
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from jobs import models as m
from jobs.db import session_scope
from jobs.errors import InvalidInput, NotFound
from jobs.rows import as_uuid
from jobs.searchspace import SearchConfig, canonical
from jobs.vocabulary import TRIAL_STATES

TOLD = ("complete", "pruned", "failed")


def search_record(session: Session, row: m.Sweep, rec: Any) -> Any:
    """sweeps.SweepRecord of a search sweep: status and progress follow the trials; `trials` counts them."""
    counts = dict.fromkeys(TRIAL_STATES, 0)
    for state, n in session.execute(select(m.SearchTrial.state, func.count()).where(
            m.SearchTrial.sweep_id == row.id).group_by(m.SearchTrial.state)):
        counts[state] = n
    asked = sum(counts.values())
    told = sum(counts[s] for s in TOLD)
    jobs = rec.counts
    if jobs["running"] or (jobs["queued"] and told):
        status = "running"
    elif jobs["queued"]:
        status = "queued"
    elif told < row.n_points and not row.cancel_requested:
        status = "running"  # between a tell and the next ask
    elif row.cancel_requested and told < row.n_points:
        status = "cancelled"
    else:
        status = "succeeded" if counts["complete"] else "failed"
    return dataclasses.replace(rec, status=status, progress=told / row.n_points if row.n_points else 1.0,
                               strategy="search", search=row.search,
                               trials={**counts, "asked": asked, "told": told, "n_trials": row.n_points})


def strategy_of(sweep_id: str | uuid.UUID) -> str:
    with session_scope() as session:
        strategy = session.scalar(select(m.Sweep.strategy).where(m.Sweep.id == as_uuid(sweep_id, "sweep")))
    if strategy is None:
        raise NotFound(f"sweep {sweep_id} not found")
    return strategy


def front(values: list[list[float]], directions: list[str]) -> list[int]:
    """Indices of the non-dominated value vectors (maximized objectives negated first)."""
    from jobs.pareto import non_dominated

    signs = [1.0 if d == "minimize" else -1.0 for d in directions]
    return non_dominated([[s * v for s, v in zip(signs, vals)] for vals in values])


def trials_document(sweep_id: str | uuid.UUID, *, front_only: bool = False) -> dict[str, Any]:
    """The results of a search sweep: every trial (or the front only, best first), with its point, state,
    objective values (mean over seeds), whether it is on the Pareto front of the complete trials (with
    one objective: the best trials), its jobs and why it failed or was pruned."""
    sid = as_uuid(sweep_id, "sweep")
    with session_scope() as session:
        row = session.get(m.Sweep, sid)
        if row is None or row.strategy != "search":
            if row is None:
                raise NotFound(f"sweep {sweep_id} not found")
            raise InvalidInput(f"sweep {sid} is a grid sweep", ("path", "sweep_id"))
        cfg = SearchConfig.model_validate(row.search)
        trials = list(session.scalars(select(m.SearchTrial).where(m.SearchTrial.sweep_id == sid)
                                      .order_by(m.SearchTrial.number)))
        jobs = session.execute(select(m.Job.id, m.Job.sweep_point_index).where(m.Job.sweep_id == sid)
                               .order_by(m.Job.sweep_point_index, m.Job.seed)).all()
        n_trials = row.n_points
    job_ids: dict[int, list[str]] = {}
    for job_id, number in jobs:
        job_ids.setdefault(number, []).append(str(job_id))
    metrics = [o.metric for o in cfg.objectives]
    directions = [o.direction for o in cfg.objectives]
    complete = [t for t in trials if t.state == "complete"]
    on_front = {complete[i].number for i in front([t.values for t in complete], directions)}
    rows = [{"number": t.number, "state": t.state, "point": t.point,
             "values": dict(zip(metrics, t.values)) if t.values is not None else None,
             "on_front": t.number in on_front, "n": len(job_ids.get(t.number, [])) if t.state == "complete" else 0,
             "job_ids": job_ids.get(t.number, []), "reason": t.reason, "pruned_at": t.pruned_at,
             "intermediate": t.intermediate, "asked_at": t.created_at.isoformat(),
             "told_at": t.told_at.isoformat() if t.told_at else None}
            for t in trials]
    front_rows = sorted((r for r in rows if r["on_front"]),
                        key=lambda r: tuple((1 if d == "minimize" else -1) * r["values"][k]
                                            for k, d in zip(metrics, directions)))
    counts = dict.fromkeys(TRIAL_STATES, 0)
    for t in trials:
        counts[t.state] += 1
    return {"sweep_id": str(sid), "strategy": "search", "objectives": [o.model_dump() for o in cfg.objectives],
            "space_keys": sorted(cfg.space), "n_trials": n_trials, "counts": counts,
            "front": [r["number"] for r in front_rows], "rows": front_rows if front_only else rows}


def trials_csv(doc: dict[str, Any]) -> str:
    """One line per trial: number, state, the space keys, the objectives, on_front, n, job_ids, reason."""
    from jobs.sweeps.results_table import csv_text, joined

    keys = doc["space_keys"]
    metrics = [o["metric"] for o in doc["objectives"]]
    return csv_text(["number", "state", *keys, *metrics, "on_front", "n", "job_ids", "reason"],
                ([r["number"], r["state"], *(_csv_value(r["point"].get(k)) for k in keys),
                  *((r["values"] or {}).get(k) for k in metrics), r["on_front"], r["n"], joined(r["job_ids"]),
                  r["reason"]] for r in doc["rows"]))


def _csv_value(v: Any) -> Any:
    return canonical(v) if isinstance(v, (list, dict)) else v


__all__ = ["front", "search_record", "strategy_of", "trials_csv", "trials_document"]
