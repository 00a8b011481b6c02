"""Search sweeps: a sampler (Optuna: TPE, NSGA-II or random) asks the points, each asked trial runs as
jobs on the queue, each finished trial is told, and the next trials are asked (ask-and-tell).

    create_sweep(SweepCreate(base={...}, strategy="search", seeds=[0],
                             search={"space": {"rank": {"type": "int", "low": 1, "high": 32},
                                               "method": {"type": "categorical", "choices": ["spectral", "nkp"]}},
                                     "objectives": [{"metric": "error", "direction": "minimize"},
                                                    {"metric": "params", "direction": "minimize"}],
                                     "n_trials": 40, "parallelism": 4}))

Where the state lives. Our own tables are the truth: the sweep row (its configuration, `search`) and
one `search_trials` row per asked trial (its number, point, state, objective values, told_at), with
its jobs (one per seed: jobs.sweep_id, sweep_point_index = the trial's number). Optuna's study is
never stored: every ask rebuilds an in-memory study from the trial rows (study.add_trial of each, the
running ones as RUNNING so TPE's constant liar spreads parallel asks) and samples with a sampler seeded
by the sweep's seed and the next trial's number, so the same rows give the same asks on any process.
Why not Optuna's RDB storage: its ~10 tables live outside our migrations, and its commits are not ours,
so an ask could be committed there while the job insert rolled back here (an orphan trial) or the
reverse (a lost one); with our rows, an ask is the INSERT of the trial and its jobs in one transaction.

Serialization. `advance(sweep_id)` is the only writer of trials: it locks the sweep row (SELECT ... FOR
UPDATE; SQLite's BEGIN IMMEDIATE serializes writers anyway), tells every running trial whose jobs have
all ended (UPDATE ... WHERE state = 'running', so a trial is told once), then asks trials until
`parallelism` are running or `n_trials` have been asked, all in one transaction; the caller sends the
new jobs' messages after the commit (a failed send is re-sent by the reaper, as for every job). It runs
when the sweep is created (the API: the first `parallelism` trials), after each of its jobs ends (the
worker, right after recording the outcome), and in every worker's reaper round (`reconcile`) for the
cases nobody else saw: a worker killed between recording a job and telling it, a job the reaper failed
after max_attempts, a queued job a user cancelled, an ask that raised. A killed worker's job is
re-queued by the reaper and finishes once (claim_job is atomic): its trial stays running until then.

Telling (all the trial's jobs ended): every job succeeded -> complete, values = the mean over seeds of
each objective (`params` is the factored parameter count, as in the results table); the pruner stopped
it -> pruned; a job failed -> failed (its error); a job was cancelled -> failed ("cancelled"). A point
that is not a valid job spec is told failed at once (no job). Every told trial counts toward n_trials.
Search sweeps refuse retries (a told trial is final): run a new sweep instead.

Seeds: every trial runs the sweep's `seeds` (default [0]) and its values are their mean: the same seeds
for every trial (common random numbers: approx trials approximate the same matrices), so trials differ
only by their point, and more seeds average the noise of training runs.

Reads (the sweep's status and progress, its trials and Pareto front) are jobs/search_results.py; the
space's own arithmetic (distributions, size, unseen points) is jobs/searchspace.py.

Pruning (train sweeps, `search.pruner`) is jobs/search_pruning.py.
"""
from __future__ import annotations

import itertools
import logging
import math
import uuid
import warnings
from typing import Any

import pydantic
from sqlalchemy import func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from jobs import models as m
from jobs import quotas
from jobs.db import session_scope
from jobs.dispatch import JobDispatch, dispatch
from jobs.errors import InvalidInput, InvalidState, TooLarge
from jobs.rows import as_uuid, utcnow
from jobs.search_pruning import trial_series
from jobs.searchspace import (
    SearchConfig,
    canonical,
    check_objectives,
    distributions,
    optuna_module,
    space_size,
    to_params,
    to_point,
    unseen_point,
)
from jobs.settings import get_settings
from jobs.specs import parse_spec
from jobs.store import resolve_references
from jobs.sweeps.request import check_grid_keys, point_label, set_path, validation_message
from jobs.sweeps.results_table import APPROX_SIZE_KEYS, SIZE_KEYS, number, params_count
from jobs.vocabulary import TERMINAL_STATUSES

log = logging.getLogger(__name__)

PROBE_COMBINATIONS = 256  # other dimensions' probe values tried per probed value at submit
PROBE_BUDGET = 2000  # spec validations at submit in all (a 32-dimension space cannot make it take minutes)
# Asks per trial to get a point not asked before: the same point with the same seeds would run the
# same jobs again, and TPE repeats the best point of a small discrete space (its choice is an argmax).
# Past these, a random point not asked before is run instead (searchspace.unseen_point; the space is
# never exhausted: n_trials is at most its size).
FRESH_POINT_TRIES = 3


# ---------------------------------------------------------------------------------------------
# Optuna (searchspace.optuna_module: imported on first use, so the API pays for it only when a search sweep is created).

def _sampler(cfg: SearchConfig, seed: int):
    optuna = optuna_module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning of multivariate / constant_liar
        if cfg.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if cfg.sampler == "nsga2":
            population = max(2, min(50, max(cfg.parallelism, cfg.n_trials // 5)))
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=population)
        # multivariate: one model of the joint space (rank and method interact); constant_liar: running
        # trials count as bad ones, so parallel asks spread out instead of repeating one point.
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.n_startup(), multivariate=True,
                                          constant_liar=True)


def _study(cfg: SearchConfig, space: dict[str, Any], trials: list[m.SearchTrial], next_number: int):
    """The sampler's study rebuilt in memory from the trial rows, its sampler seeded by (seed, next trial)."""
    optuna = optuna_module()
    from optuna.trial import TrialState, create_trial

    seed = (cfg.seed * 1_000_003 + next_number) % 2**32
    study = optuna.create_study(directions=[o.direction for o in cfg.objectives], sampler=_sampler(cfg, seed))
    dists = distributions(space)
    for t in trials:
        params = to_params(space, t.point)
        inter = {int(k): float(v) for k, v in (t.intermediate or {}).items()}
        if t.state == "complete":
            ft = create_trial(state=TrialState.COMPLETE, params=params, distributions=dists, values=t.values,
                              intermediate_values=inter)
        elif t.state == "pruned":
            ft = create_trial(state=TrialState.PRUNED, params=params, distributions=dists, intermediate_values=inter)
        elif t.state == "failed":
            ft = create_trial(state=TrialState.FAIL, params=params, distributions=dists)
        else:
            ft = create_trial(state=TrialState.RUNNING, params=params, distributions=dists)
        study.add_trial(ft)
    return study


# ---------------------------------------------------------------------------------------------
# Create.

def _trial_spec(base: dict[str, Any], point: dict[str, Any], seed: int) -> dict[str, Any]:
    spec = dict(base)
    for key, value in point.items():
        set_path(spec, key, value, ("search", "space"))
    spec["seed"] = seed
    return spec


def _spec_error(kind: str, base: dict[str, Any], point: dict[str, Any], seed: int) -> tuple[Any, str | None, tuple]:
    """(parsed spec, None, ()) or (None, 'field: message', the error's loc) for base + point."""
    try:
        return parse_spec(_trial_spec(base, point, seed)), None, ()
    except pydantic.ValidationError as exc:
        msg, loc = validation_message(exc, kind)
        return None, msg, loc


def check_space(req: Any) -> None:
    """Submit-time checks of a search sweep (InvalidInput / TooLarge): space keys are spec fields,
    objectives are metrics of the kind, a pruner only for train sweeps, the budget within
    LOWRANK_MAX_SWEEP_POINTS, and every probed value of every dimension (categorical: each choice; int
    and float: low and high) makes a valid job spec with some combination of the other dimensions'
    probed values. A combination that is invalid only with particular other values is found when
    asked, and told failed with the reason."""
    cfg: SearchConfig = req.search
    kind = req.base["kind"]
    check_grid_keys(kind, cfg.space, ("search", "space"))
    check_objectives(kind, cfg.objectives)
    if cfg.pruner is not None and kind != "train":
        raise InvalidInput(f"search.pruner needs metrics per epoch: train sweeps only (this sweep's kind is {kind!r})",
                           ("search", "pruner"))
    limit = get_settings().max_sweep_points
    total = cfg.n_trials * len(req.seeds)
    if total > limit:
        raise TooLarge(f"this search has {cfg.n_trials} trials x {len(req.seeds)} seeds = up to {total} jobs, over "
                       f"the limit of {limit} (LOWRANK_MAX_SWEEP_POINTS)", jobs=total, limit=limit)
    size = space_size(cfg)
    if size is not None and cfg.n_trials > size:
        raise InvalidInput(f"search.n_trials ({cfg.n_trials}) is more than the {size} points of this space: "
                           f"every point can be tried with n_trials = {size} (or a grid sweep)", ("search", "n_trials"))
    keys = sorted(cfg.space)
    probes = {k: cfg.space[k].probes() for k in keys}
    budget = PROBE_BUDGET
    for key in keys:
        others = [k for k in keys if k != key]
        for value in probes[key]:
            first_error = None
            for combo in itertools.islice(itertools.product(*(probes[k] for k in others)), PROBE_COMBINATIONS):
                budget -= 1
                if budget < 0:
                    return  # the rest is checked when asked (an invalid point is told failed)
                point = {key: value, **dict(zip(others, combo))}
                _, msg, loc = _spec_error(kind, req.base, point, req.seeds[0])
                if msg is None:
                    break
                first_error = first_error or (point, msg, loc)
            else:
                point, msg, loc = first_error
                hit = next((k for k in point if tuple(k.split(".")) == tuple(str(x) for x in loc[:len(k.split("."))])),
                           key)
                raise InvalidInput(f"search.space.{key} = {value!r} makes no valid {kind} job spec: "
                                   f"{point_label(point)}: {msg}", ("search", "space", hit), point=point)


def create_search_sweep(req: Any, *, owner: str | None = None, idempotency_key: str | None = None,
                        enforce_quota: bool = False) -> tuple[Any, bool, list[JobDispatch]]:
    """Store the search sweep and ask its first `parallelism` trials (their jobs queued) in one
    transaction. Returns (sweep, created, the jobs to dispatch) like sweeps.create_sweep.
    `enforce_quota`: the whole budget (n_trials x seeds) counts as the sweep's size, and its first
    trials' jobs against the owner's queued jobs (jobs/quotas.py), as for a grid sweep."""
    from jobs.sweeps.create import find_idempotent, replay_or_raise  # sweeps.create_sweep calls here
    from jobs.sweeps.lifecycle import get_sweep

    if idempotency_key is not None:
        existing = find_idempotent(idempotency_key, req, owner)
        if existing is not None:
            return existing, False, []
    check_space(req)
    cfg: SearchConfig = req.search
    if enforce_quota:
        quotas.check_sweep_size(cfg.n_trials * len(req.seeds))
    sweep_id = uuid.uuid4()
    try:
        with session_scope() as session:
            if enforce_quota:
                first = min(cfg.parallelism, cfg.n_trials) * len(req.seeds)
                quotas.check_queued(session, owner, jobs=first, high=first if req.base.get("priority") == "high" else 0)
            row = m.Sweep(id=sweep_id, name=req.name, kind=req.base["kind"], base=req.base, grid={}, seeds=req.seeds,
                          early_stopping=None, n_points=cfg.n_trials, n_jobs=cfg.n_trials * len(req.seeds),
                          idempotency_key=idempotency_key, owner=owner, cancel_requested=False, created_at=utcnow(),
                          strategy="search", search=cfg.model_dump(mode="json"))
            session.add(row)
            session.flush()
            send = _advance_locked(session, row)
    except IntegrityError:
        return replay_or_raise(idempotency_key, req, owner), False, []
    return get_sweep(sweep_id), True, send


# ---------------------------------------------------------------------------------------------
# Ask and tell.

def advance(sweep_id: str | uuid.UUID) -> list[JobDispatch]:
    """Tell the search's finished trials and ask new ones (see the module doc), serialized per sweep by
    a row lock. Idempotent: with nothing finished and every slot taken it changes nothing. Returns the
    new jobs to dispatch after the commit."""
    sid = as_uuid(sweep_id, "sweep")
    with session_scope() as session:
        row = session.scalars(select(m.Sweep).where(m.Sweep.id == sid, m.Sweep.strategy == "search")
                              .with_for_update()).one_or_none()
        if row is None:
            return []
        return _advance_locked(session, row)


def _advance_locked(session: Session, row: m.Sweep) -> list[JobDispatch]:
    cfg = SearchConfig.model_validate(row.search)
    trials = list(session.scalars(select(m.SearchTrial).where(m.SearchTrial.sweep_id == row.id)
                                  .order_by(m.SearchTrial.number)))
    running = [t for t in trials if t.state == "running"]
    if running:
        _tell_finished(session, row, cfg, running)
    if row.cancel_requested:
        return []
    active = sum(t.state == "running" for t in trials)
    if active >= cfg.parallelism or len(trials) >= cfg.n_trials:
        return []
    return _ask(session, row, cfg, trials, active)


def _objective_value(kind: str, result: dict[str, Any] | None, metric: str) -> float | None:
    result = result or {}
    if metric == "params":
        return params_count(kind, [number(result.get(k)) for k in SIZE_KEYS.get(kind, APPROX_SIZE_KEYS)])
    return number(result.get(metric))


def _outcome(kind: str, cfg: SearchConfig, trial: m.SearchTrial,
             members: list[Any]) -> tuple[str, list[float] | None, str | None]:
    """(state, values, reason) of a trial whose jobs (id, seed, status, result, error) have all ended."""
    if all(j.status == "succeeded" for j in members):
        values = []
        for o in cfg.objectives:
            per_seed = [_objective_value(kind, j.result, o.metric) for j in members]
            missing = next((j for j, v in zip(members, per_seed) if v is None), None)
            if missing is not None:
                return "failed", None, (f"job {str(missing.id)[:8]}'s result has no finite number {o.metric!r}")
            values.append(math.fsum(per_seed) / len(per_seed))
        return "complete", values, None
    if trial.pruned_at is not None:
        return "pruned", None, trial.reason
    failed = next((j for j in members if j.status == "failed"), None)
    if failed is not None:
        first = (failed.error or "").strip().splitlines()[0][:500] if failed.error else "no error text"
        return "failed", None, f"job {str(failed.id)[:8]} (seed {failed.seed}) failed: {first}"
    cancelled = next(j for j in members if j.status == "cancelled")
    return "failed", None, f"job {str(cancelled.id)[:8]} (seed {cancelled.seed}) was cancelled"


def _tell_finished(session: Session, row: m.Sweep, cfg: SearchConfig, running: list[m.SearchTrial]) -> None:
    """Tell every running trial whose jobs have all ended (once: the UPDATE requires state 'running')."""
    jobs = session.execute(
        select(m.Job.id, m.Job.sweep_point_index, m.Job.seed, m.Job.status, m.Job.result, m.Job.error)
        .where(m.Job.sweep_id == row.id, m.Job.sweep_point_index.in_([t.number for t in running]))
        .order_by(m.Job.sweep_point_index, m.Job.seed)).all()
    by_trial: dict[int, list[Any]] = {}
    for j in jobs:
        by_trial.setdefault(j.sweep_point_index, []).append(j)
    done = [t for t in running if by_trial.get(t.number) and
            all(j.status in TERMINAL_STATUSES for j in by_trial[t.number])]
    if not done:
        return
    series = trial_series(session, row, cfg, by_trial) if cfg.pruner is not None else {}
    now = utcnow()
    for t in done:
        state, values, reason = _outcome(row.kind, cfg, t, by_trial[t.number])
        inter = {str(e): v for e, v in series.get(t.number, {}).items()} or None
        told = session.execute(
            update(m.SearchTrial)
            .where(m.SearchTrial.sweep_id == row.id, m.SearchTrial.number == t.number, m.SearchTrial.state == "running")
            .values(state=state, values=values, reason=reason, intermediate=inter, told_at=now)
            .execution_options(synchronize_session=False)).rowcount
        if told:  # the loaded row now holds what was written (without marking it for another UPDATE)
            for key, value in (("state", state), ("values", values), ("reason", reason), ("intermediate", inter),
                               ("told_at", now)):
                set_committed_value(t, key, value)
            log.info("search %s: trial %d told %s %s", row.id, t.number, state, values if values else reason or "")


def _ask(session: Session, row: m.Sweep, cfg: SearchConfig, trials: list[m.SearchTrial],
         active: int) -> list[JobDispatch]:
    """Ask trials until `parallelism` run or `n_trials` were asked; insert each with its jobs."""
    from optuna.trial import TrialState

    from jobs.sweeps.create import point_jobs

    space = row.search["space"]
    dists = distributions(space)
    number = len(trials)
    study = _study(cfg, space, trials, number)
    now = utcnow()
    send: list[JobDispatch] = []
    job_rows: list[dict[str, Any]] = []
    tag_rows: list[dict[str, Any]] = []
    seen = {canonical(t.point) for t in trials}
    while active < cfg.parallelism and number < cfg.n_trials:
        for _ in range(FRESH_POINT_TRIES):
            asked = study.ask(dists)
            point = to_point(space, asked.params)
            if canonical(point) not in seen:
                break
            study.tell(asked, state=TrialState.FAIL)  # in this rebuilt study only: never stored
        else:
            point = unseen_point(cfg, space, seen, number)
            if point is not None:
                study.enqueue_trial(to_params(space, point))
                asked = study.ask(dists)  # the enqueued point, running in the study for the next asks
            else:  # a continuous space that kept giving known points: run the repeat
                asked = study.ask(dists)
                point = to_point(space, asked.params)
        seen.add(canonical(point))
        spec, msg, _ = _spec_error(row.kind, row.base, point, row.seeds[0])
        if spec is not None:
            try:
                spec = resolve_references(session, spec, owner=row.owner, admin=row.owner is None)
            except InvalidInput as exc:
                spec, msg = None, exc.message
        if spec is None:
            # Not a job spec: told failed at once (the sampler avoids it no more than any failure).
            study.tell(asked, state=TrialState.FAIL)
            session.add(m.SearchTrial(sweep_id=row.id, number=number, point=point, state="failed",
                                      reason=f"not a valid {row.kind} job spec: {msg}", created_at=now, told_at=now))
            log.info("search %s: trial %d %s is not a valid spec: %s", row.id, number, point, msg)
        else:
            session.add(m.SearchTrial(sweep_id=row.id, number=number, point=point, state="running", created_at=now))
            point_jobs(spec, point, number, row.seeds, sweep_id=row.id, owner=row.owner, now=now,
                       out=(job_rows, tag_rows, send))
            active += 1
        number += 1
    session.flush()
    if job_rows:
        session.execute(insert(m.Job), job_rows)
    if tag_rows:
        session.execute(insert(m.JobTag), tag_rows)
    return send


def after_job(celery_app: Any, sweep_id: str | uuid.UUID | None) -> int:
    """The worker's hook after a job of a sweep ended: advance the search and send the new jobs.
    Never raises (the reaper's `reconcile` repeats whatever failed here). Returns how many were sent."""
    if not sweep_id:
        return 0
    try:
        send = advance(sweep_id)
    except Exception:
        log.warning("search %s: advancing after a job failed; the reaper retries", sweep_id, exc_info=True)
        return 0
    return len(dispatch(celery_app, send))


def open_searches() -> list[uuid.UUID]:
    """Search sweeps that may have something to tell or ask: a running trial, or (not cancelled) fewer
    trials asked than n_trials."""
    asked = (select(func.count()).select_from(m.SearchTrial).where(m.SearchTrial.sweep_id == m.Sweep.id)
             .scalar_subquery())
    with session_scope() as session:
        return list(session.scalars(select(m.Sweep.id).where(
            m.Sweep.strategy == "search",
            or_(m.Sweep.id.in_(select(m.SearchTrial.sweep_id).where(m.SearchTrial.state == "running")),
                (m.Sweep.cancel_requested.is_(False)) & (asked < m.Sweep.n_points)))))


def reconcile(celery_app: Any) -> list[str]:
    """The reaper's round for searches: advance every open search (tell what finished unseen, ask what
    is missing) and send the new jobs. Returns the ids sent."""
    sent: list[str] = []
    for sid in open_searches():
        try:
            send = advance(sid)
        except Exception:
            log.warning("search %s: advancing failed; retrying next round", sid, exc_info=True)
            continue
        sent += dispatch(celery_app, send)
    return sent


def no_retry(sweep_id: Any) -> InvalidState:
    return InvalidState(f"sweep {sweep_id} is a search sweep: each trial was told to the sampler once and is "
                        "final, so its jobs are not retried (the sampler asks new trials instead); create a new "
                        "search sweep to run again", strategy="search")


__all__ = ["advance", "after_job", "check_space", "create_search_sweep", "no_retry", "open_searches", "reconcile"]
