"""Pruning of search sweeps' trials (train sweeps, `search.pruner`; the ask and tell loop is jobs/search.py).

After a job writes an epoch's metrics, the worker calls `on_epoch_metrics`: the trial's value of the
pruner's metric at that epoch (mean over its seeds, once each has reached it) is compared by Optuna's
PercentilePruner with the completed trials' values at the same epoch; a trial below the percentile gets
its jobs cancelled (running ones stop at their next check) and is told pruned by the next advance.
"""
from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs import models as m
from jobs.db import session_scope
from jobs.rows import as_uuid, utcnow
from jobs.searchspace import SearchConfig, optuna_module
from jobs.store import cancel_jobs
from jobs.sweeps.early_stopping import EPOCH_END_MARKER, epoch_values
from jobs.vocabulary import TERMINAL_STATUSES

log = logging.getLogger(__name__)


def trial_series(session: Session, row: m.Sweep, cfg: SearchConfig,
                  by_trial: dict[int, list[Any]]) -> dict[int, dict[int, float]]:
    """trial number -> {epoch: mean over its jobs of the pruner's metric at that epoch's end}, at the
    epochs every job of the trial has reached (a job that ended without reaching one does not hold it
    back)."""
    assert cfg.pruner is not None
    values = epoch_values(session, row.id, cfg.pruner.metric, None)
    out: dict[int, dict[int, float]] = {}
    for number, members in by_trial.items():
        epochs = sorted({e for j in members for e in values.get(j.id, {})})
        series = {}
        for e in epochs:
            vals = [values[j.id][e] for j in members if e in values.get(j.id, {})]
            waiting = any(e not in values.get(j.id, {}) and j.status not in TERMINAL_STATUSES for j in members)
            if vals and not waiting:
                series[e] = math.fsum(vals) / len(vals)
        if series:
            out[number] = series
    return out


def has_pruner(sweep_id: str | uuid.UUID) -> bool:
    with session_scope() as session:
        search = session.scalar(select(m.Sweep.search).where(m.Sweep.id == as_uuid(sweep_id, "sweep")))
    return bool(search and search.get("pruner"))


def on_epoch_metrics(sweep_id: str | uuid.UUID, job_id: str | uuid.UUID,
                     rows: Iterable[tuple[str, int, float]]) -> bool:
    """After a job of a search sweep wrote metrics: when an epoch ended, judge its trial with the pruner.
    A pruned trial's jobs are cancelled (running ones stop at their next check). Returns True when this
    job's trial is pruned (the caller stops the job at once)."""
    if not any(name == EPOCH_END_MARKER for name, _, _ in rows):
        return False
    sid, jid = as_uuid(sweep_id, "sweep"), as_uuid(job_id)
    with session_scope() as session:
        row = session.scalars(select(m.Sweep).where(m.Sweep.id == sid, m.Sweep.strategy == "search")
                              .with_for_update()).one_or_none()
        if row is None or not (row.search or {}).get("pruner") or row.cancel_requested:
            return False
        cfg = SearchConfig.model_validate(row.search)
        number = session.scalar(select(m.Job.sweep_point_index).where(m.Job.id == jid))
        trial = session.get(m.SearchTrial, (sid, number)) if number is not None else None
        if trial is None or trial.state != "running":
            return False
        if trial.pruned_at is not None:
            return True
        trials = list(session.scalars(select(m.SearchTrial).where(m.SearchTrial.sweep_id == sid)))
        complete = {t.number: t for t in trials if t.state == "complete"}
        jobs = session.execute(select(m.Job.id, m.Job.sweep_point_index, m.Job.status).where(
            m.Job.sweep_id == sid, m.Job.sweep_point_index.in_([number, *complete]))).all()
        by_trial: dict[int, list[Any]] = {}
        for j in jobs:
            by_trial.setdefault(j.sweep_point_index, []).append(j)
        series = trial_series(session, row, cfg, by_trial)
        mine = series.get(number)
        if not mine:
            return False
        decision = _prune(cfg, mine, [series.get(n) or {int(k): v for k, v in (t.intermediate or {}).items()}
                                      for n, t in complete.items()])
        if decision is None:
            return False
        trial.pruned_at, trial.reason = max(mine), decision
        cancel_jobs(session, (m.Job.sweep_id == sid) & (m.Job.sweep_point_index == number), utcnow())
        log.info("search %s: trial %d %s", sid, number, decision)
        return True


def _prune(cfg: SearchConfig, mine: dict[int, float], completed: list[dict[int, float]]) -> str | None:
    """Optuna's PercentilePruner on the trial's series against the completed trials' series: the reason
    to prune, or None to go on."""
    optuna = optuna_module()
    from optuna.trial import TrialState, create_trial

    p = cfg.pruner
    assert p is not None
    study = optuna.create_study(direction=p.direction)
    for series in completed:
        if series:
            study.add_trial(create_trial(value=series[max(series)], intermediate_values=series))
    pruner = optuna.pruners.PercentilePruner(p.percentile, n_startup_trials=p.startup_trials,
                                             n_warmup_steps=p.warmup_epochs + 1)  # epoch e <= warmup: never
    if not pruner.prune(study, create_trial(state=TrialState.RUNNING, intermediate_values=mine)):
        return None
    epoch = max(mine)
    others = sorted(s[epoch] for s in completed if epoch in s)
    return (f"pruned at epoch {epoch}: {p.metric} {mine[epoch]:.4g} is worse than the {p.percentile:g}th "
            f"percentile of the {len(others)} completed trials at that epoch ({p.direction})")
