"""/api/v1/sweeps: create (one transaction, every grid point validated first), list, read, cancel,
retry-failed, and the results table (JSON or CSV). Logic lives in jobs/sweeps/ (search sweeps: jobs/search.py)."""
from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, BackgroundTasks, Body, Header, Query, Response, status
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field

from api.deps import CeleryDep, PrincipalDep
from api.routes.jobs import ID_PREFIX_HELP
from api.schemas import ErrorPublic
from jobs import search_results, sweeps
from jobs.dispatch import dispatch
from jobs.errors import InvalidInput
from jobs.specs import TEXT_PATTERN
from jobs.vocabulary import JobKind, SweepStrategy, TrialState

router = APIRouter(prefix="/api/v1/sweeps", tags=["sweeps"])
_ERRORS = {403: {"model": ErrorPublic}, 404: {"model": ErrorPublic}, 409: {"model": ErrorPublic},
           413: {"model": ErrorPublic}, 429: {"model": ErrorPublic, "description": "over a per-owner quota"},
           503: {"model": ErrorPublic}}


class SweepCounts(BaseModel):
    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int


class SweepPublic(BaseModel):
    id: uuid.UUID
    name: str | None
    kind: str
    status: str = Field(description="queued | running | succeeded | failed | cancelled")
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    seeds: list[int]
    early_stopping: dict[str, Any] | None = Field(description="the rule and, under `decisions`, per milestone "
                                                              "the points kept/stopped and their values")
    n_points: int = Field(description="grid points")
    total: int = Field(description="jobs: grid points x seeds")
    counts: SweepCounts
    progress: float = Field(description="finished jobs / total, 0..1")
    owner: str | None
    cancel_requested: bool
    created_at: dt.datetime
    strategy: SweepStrategy = Field("grid", description="grid: every grid point; search: points "
                                                                    "asked by a sampler")
    search: dict[str, Any] | None = Field(None, description="search sweeps: space, objectives, n_trials, "
                                                            "parallelism, sampler, seed, pruner")
    trials: dict[str, int] | None = Field(None, description="search sweeps: trials per state (running, complete, "
                                                            "pruned, failed), asked, told, n_trials")


class SweepPagePublic(BaseModel):
    items: list[SweepPublic]
    next_cursor: str | None


class ResultRow(BaseModel):
    point: dict[str, Any] = Field(description="the group_by keys' values")
    mean: float | None
    std: float | None = Field(description="sample standard deviation over the values (n - 1); null for n < 2")
    min: float | None
    max: float | None
    n: int = Field(description="succeeded jobs with a numeric value")
    job_ids: list[uuid.UUID] = Field(description="every job of the group, whatever its status")
    params: float | None = Field(description="parameters of the factored layer/model (train: params_factored; "
                                             "approx, learn: rank (m + d)) when the group's jobs agree; null when "
                                             "the group pools points of different sizes (see params_min/max)")
    params_min: float | None = Field(description="smallest parameter count in the group")
    params_max: float | None = Field(description="largest parameter count in the group")


class ResultsPublic(BaseModel):
    sweep_id: uuid.UUID
    metric: str
    group_by: list[str]
    rows: list[ResultRow]


class TrialRow(BaseModel):
    number: int = Field(description="0, 1, ... in the order the sampler asked them")
    state: TrialState
    point: dict[str, Any] = Field(description="the space keys' values")
    values: dict[str, float] | None = Field(description="objective -> mean over the seeds' jobs; complete trials")
    on_front: bool = Field(description="on the Pareto front of the complete trials (one objective: the best)")
    n: int = Field(description="seeds averaged (complete trials)")
    job_ids: list[uuid.UUID] = Field(description="the trial's jobs, one per seed")
    reason: str | None = Field(description="why it failed or was pruned")
    pruned_at: int | None = Field(description="the epoch at which the pruner stopped it")
    intermediate: dict[str, float] | None = Field(description="the pruner's metric per epoch (mean over seeds)")
    asked_at: dt.datetime
    told_at: dt.datetime | None = Field(description="when its outcome was told to the sampler (once)")


class TrialsPublic(BaseModel):
    sweep_id: uuid.UUID
    strategy: Literal["search"]
    objectives: list[dict[str, str]] = Field(description='[{"metric", "direction": minimize | maximize}]')
    space_keys: list[str]
    n_trials: int
    counts: dict[str, int] = Field(description="trials per state")
    front: list[int] = Field(description="numbers of the trials on the front, best first by the first objective")
    rows: list[TrialRow] = Field(description="every trial by number, or (front=true) the front, best first")


class ComparisonRow(BaseModel):
    point: dict[str, Any] = Field(description="the compared grid point (every grid key)")
    baseline_point: dict[str, Any] = Field(description="its partner: the same point with the baseline value")
    n: int = Field(description="seeds paired (both points have a value)")
    n_unpaired: int = Field(description="seeds with a value at only one of the two points (left out)")
    n_nonpositive: int = Field(description="ratio: pairs left out because a value is <= 0")
    seeds: list[int]
    job_ids: list[uuid.UUID] = Field(description="the point's jobs, in pair (seed) order")
    baseline_job_ids: list[uuid.UUID] = Field(description="the baseline point's jobs, in pair order")
    point_mean: float | None = Field(description="mean of the point's paired values")
    baseline_mean: float | None = Field(description="mean of the baseline's paired values")
    mean: float | None = Field(description="mean of the paired statistic (difference, or ln ratio)")
    std: float | None = Field(description="its sample std (n - 1); null for n < 2")
    ci_low: float | None = Field(description="confidence interval of the mean (Student t, n - 1 dof); null for n < 2")
    ci_high: float | None
    ratio: float | None = Field(description="ratio comparisons: exp(mean), the geometric-mean ratio point / baseline")
    ratio_ci_low: float | None = Field(description="exp(ci_low)")
    ratio_ci_high: float | None = Field(description="exp(ci_high)")
    significant: bool | None = Field(description="the interval excludes no change (0; a ratio of 1); null for n < 2")
    note: str | None = Field(description="why std or the interval is missing (n = 0, n = 1)")


class ComparisonPublic(BaseModel):
    sweep_id: uuid.UUID
    kind: str
    metric: str
    baseline: dict[str, Any] = Field(description='{"key": grid key, "value": the baseline value}')
    comparison: Literal["difference", "ratio"] = Field(
        description="difference: point - baseline; ratio: point / baseline (approx/learn errors by default)")
    statistic: Literal["difference", "log_ratio"] = Field(description="what mean, std and ci_* are of")
    confidence: float = Field(description="of the interval: 0.95")
    grid_keys: list[str]
    rows: list[ComparisonRow] = Field(description="one per grid point other than the baseline's, in grid order")


def _public(rec: sweeps.SweepRecord) -> SweepPublic:
    return SweepPublic.model_validate(rec, from_attributes=True)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=SweepPublic,
             responses={**_ERRORS, 200: {"model": SweepPublic, "description": "Idempotent replay: the existing sweep"}},
             summary="Create a sweep: base spec x grid x seeds (all jobs in one transaction), or a search")
def create_sweep(
    body: Annotated[sweeps.SweepCreate, Body()],
    response: Response,
    background: BackgroundTasks,
    celery: CeleryDep,
    principal: PrincipalDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)] = None,
) -> SweepPublic:
    """Every grid point is validated as a full job spec before anything is written (422 names the
    failing point); over LOWRANK_MAX_SWEEP_POINTS jobs is a 413; over the caller's quotas a 429 (a user's
    sweep size, queued jobs, high-priority jobs; admins exempt). The answer comes once the jobs are
    committed; their queue messages are sent right after it (a few ms each: seconds for 10,000 jobs).
    Messages an API crash or a broker outage lost are re-sent by the workers' reaper.

    `"strategy": "search"` with a `search` object (space, objectives, n_trials, parallelism, sampler,
    pruner) makes a search sweep: its first `parallelism` trials are asked now, the rest by the workers
    as trials finish (jobs/search.py); every value of every dimension is checked at submit (422 naming
    `search.space.KEY`)."""
    rec, created, to_send = sweeps.create_sweep(body, owner=principal.name, idempotency_key=idempotency_key,
                                                enforce_quota=not principal.admin)
    if created:
        background.add_task(dispatch, celery, to_send)
    else:
        response.status_code = status.HTTP_200_OK
        response.headers["Idempotent-Replayed"] = "true"
    return _public(rec)


@router.get("", response_model=SweepPagePublic)
def list_sweeps(
    owner: Annotated[str | None, Query(max_length=128, pattern=TEXT_PATTERN)] = None,
    kind: JobKind | None = None,
    id_prefix: Annotated[str | None, Query(max_length=36, description=ID_PREFIX_HELP)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> SweepPagePublic:
    """Newest first, with status counts. Keyset pagination: follow `next_cursor` until it is null."""
    page = sweeps.list_sweeps(owner=owner, kind=kind, id_prefix=id_prefix, limit=limit, cursor=cursor)
    return SweepPagePublic(items=[_public(r) for r in page.items], next_cursor=page.next_cursor)


@router.get("/{sweep_id}", response_model=SweepPublic, responses=_ERRORS)
def get_sweep(sweep_id: uuid.UUID) -> SweepPublic:
    return _public(sweeps.get_sweep(sweep_id))


@router.post("/{sweep_id}/cancel", response_model=SweepPublic, responses=_ERRORS)
def cancel_sweep(sweep_id: uuid.UUID, principal: PrincipalDep) -> SweepPublic:
    """Queued jobs are cancelled at once; running jobs stop at their next check."""
    return _public(sweeps.cancel_sweep(sweep_id, actor=principal.name, admin=principal.admin))


@router.post("/{sweep_id}/retry-failed", response_model=SweepPublic, responses=_ERRORS)
def retry_failed(sweep_id: uuid.UUID, celery: CeleryDep, principal: PrincipalDep,
                 include_cancelled: bool = False) -> SweepPublic:
    """Failed jobs (and cancelled ones with include_cancelled=true) go back to the queue on the same ids."""
    rec, to_send = sweeps.retry_failed(sweep_id, include_cancelled=include_cancelled, actor=principal.name,
                                       admin=principal.admin)
    dispatch(celery, to_send)
    return _public(rec)


@router.get("/{sweep_id}/results", response_model=ResultsPublic | ComparisonPublic | TrialsPublic,
            responses={**_ERRORS, 200: {"content": {"text/csv": {}}, "description": (
                "JSON (ResultsPublic; ComparisonPublic with baseline; TrialsPublic for a search sweep), "
                "or CSV with format=csv")}})
def get_results(
    sweep_id: uuid.UUID,
    metric: Annotated[str | None, Query(min_length=1, max_length=128, pattern=sweeps.METRIC_PATTERN,
                                        description="a key of the jobs' result; default error (approx, learn) "
                                                    "or val_top1 (train)")] = None,
    group_by: Annotated[str | None, Query(max_length=2000, description="comma-separated grid keys; "
                                                                       "default all (one row per grid point)")] = None,
    baseline: Annotated[str | None, Query(min_length=1, max_length=1000, description=(
        "KEY:VALUE (or KEY=VALUE), a grid key and one of its values, e.g. init:spectral: every other grid point "
        "compared with the point that has this value and the same other grid values, paired by seed, with "
        "mean, std, n and a 95% confidence interval (Student t); the answer is a ComparisonPublic"))] = None,
    comparison: Annotated[Literal["difference", "ratio"] | None, Query(description=(
        "with baseline: difference (point - baseline) or ratio (point / baseline, the interval computed on the "
        "log ratios); default ratio for the errors of approx and learn sweeps, difference otherwise"))] = None,
    front: Annotated[bool, Query(description=(
        "search sweeps: only the trials on the Pareto front of the objectives (one objective: the best), best "
        "first"))] = False,
    format: Literal["json", "csv"] = "json",
) -> Any:
    if search_results.strategy_of(sweep_id) == "search":
        return _search_results(sweep_id, front, format, metric=metric, group_by=group_by, baseline=baseline,
                               comparison=comparison)
    if front:
        raise InvalidInput("front applies to search sweeps (strategy search); this is a grid sweep",
                           ("query", "front"))
    keys = None
    if group_by is not None:
        keys = [k.strip() for k in group_by.split(",") if k.strip()]
        if not keys:
            raise InvalidInput("group_by must name at least one grid key", ("query", "group_by"))
    if baseline is not None:
        table = sweeps.compare_results(sweep_id, baseline, metric=metric, comparison=comparison, group_by=keys)
        if format == "csv":
            return PlainTextResponse(sweeps.comparison_csv(table), media_type="text/csv", headers={
                "Content-Disposition": f'attachment; filename="sweep-{sweep_id}-vs-baseline.csv"'})
        return Response(sweeps.comparison_document(table), media_type="application/json")
    if comparison is not None:
        raise InvalidInput("comparison applies to a baseline comparison: give baseline=KEY:VALUE too",
                           ("query", "comparison"))
    if format == "csv":
        table = sweeps.results(sweep_id, metric=metric, group_by=keys)
        return PlainTextResponse(sweeps.results_csv(table), media_type="text/csv",
                                 headers={"Content-Disposition": f'attachment; filename="sweep-{sweep_id}.csv"'})
    # The JSON text comes built (on Postgres by the aggregating query itself): validating 10,000 rows
    # again would cost more than the query; ResultsPublic documents the shape.
    return Response(sweeps.results_document(sweep_id, metric=metric, group_by=keys), media_type="application/json")


def _search_results(sweep_id: uuid.UUID, front: bool, format: str, **grid_only: Any) -> Response:
    """A search sweep's trials (TrialsPublic), or its front; the grid's parameters do not apply."""
    given = sorted(k for k, v in grid_only.items() if v is not None)
    if given:
        raise InvalidInput(f"{', '.join(given)} apply to grid sweeps; a search sweep's results are its trials "
                           "(front=true: the Pareto front)", ("query", given[0]))
    doc = search_results.trials_document(sweep_id, front_only=front)
    if format == "csv":
        name = f"sweep-{sweep_id}-{'front' if front else 'trials'}.csv"
        return PlainTextResponse(search_results.trials_csv(doc), media_type="text/csv",
                                 headers={"Content-Disposition": f'attachment; filename="{name}"'})
    return Response(sweeps.dumps(doc), media_type="application/json")
