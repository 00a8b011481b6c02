"""/api/v1/sweeps: create (one transaction, every grid point validated first), list, read, cancel,
retry-failed, and the results table (JSON or CSV). Logic lives in jobs/sweeps.py."""
from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, BackgroundTasks, Body, Header, Query, Response, status
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field

from api.deps import CeleryDep, PrincipalDep
from api.schemas import ErrorPublic
from jobs import sweeps
from jobs.errors import InvalidInput
from jobs.specs import TEXT_PATTERN

router = APIRouter(prefix="/api/v1/sweeps", tags=["sweeps"])
_ERRORS = {403: {"model": ErrorPublic}, 404: {"model": ErrorPublic}, 409: {"model": ErrorPublic},
           413: {"model": ErrorPublic}, 503: {"model": ErrorPublic}}


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


class SweepPagePublic(BaseModel):
    items: list[SweepPublic]
    next_cursor: str | None


class ResultRow(BaseModel):
    point: dict[str, Any] = Field(description="the group_by keys' values")
    mean: float | None
    std: float | None = Field(description="sample standard deviation over the values (0 for n = 1)")
    min: float | None
    max: float | None
    n: int = Field(description="succeeded jobs with a numeric value")
    job_ids: list[uuid.UUID] = Field(description="every job of the group, whatever its status")
    params: float | None = Field(description="train sweeps: mean params_factored; else null")


class ResultsPublic(BaseModel):
    sweep_id: uuid.UUID
    metric: str
    group_by: list[str]
    rows: list[ResultRow]


def _public(rec: sweeps.SweepRecord) -> SweepPublic:
    return SweepPublic.model_validate(rec, from_attributes=True)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=SweepPublic,
             responses={**_ERRORS, 200: {"model": SweepPublic, "description": "Idempotent replay: the existing sweep"}},
             summary="Create a sweep: base spec x grid x seeds, all jobs in one transaction")
def create_sweep(
    body: Annotated[sweeps.SweepCreate, Body()],
    response: Response,
    background: BackgroundTasks,
    celery: CeleryDep,
    principal: PrincipalDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)] = None,
) -> SweepPublic:
    """Every grid point is validated as a full job spec before anything is written (422 names the
    failing point); over LOWRANK_MAX_SWEEP_POINTS jobs is a 413. The answer comes once the jobs are
    committed; their queue messages are sent right after it (a few ms each: seconds for 10,000 jobs).
    Messages an API crash or a broker outage lost are re-sent by the workers' reaper."""
    rec, created, to_send = sweeps.create_sweep(body, owner=principal.name, idempotency_key=idempotency_key)
    if created:
        background.add_task(sweeps.send_jobs, celery, to_send)
    else:
        response.status_code = status.HTTP_200_OK
        response.headers["Idempotent-Replayed"] = "true"
    return _public(rec)


@router.get("", response_model=SweepPagePublic)
def list_sweeps(
    owner: Annotated[str | None, Query(max_length=128, pattern=TEXT_PATTERN)] = None,
    kind: Literal["approx", "learn", "train"] | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> SweepPagePublic:
    """Newest first, with status counts. Keyset pagination: follow `next_cursor` until it is null."""
    page = sweeps.list_sweeps(owner=owner, kind=kind, limit=limit, cursor=cursor)
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
    sweeps.send_jobs(celery, to_send)
    return _public(rec)


@router.get("/{sweep_id}/results", response_model=ResultsPublic, responses={**_ERRORS, 200: {
    "content": {"text/csv": {}}, "description": "JSON, or CSV with format=csv"}})
def get_results(
    sweep_id: uuid.UUID,
    metric: Annotated[str | None, Query(min_length=1, max_length=128, pattern=sweeps.METRIC_PATTERN,
                                        description="a key of the jobs' result; default error (approx, learn) "
                                                    "or val_top1 (train)")] = None,
    group_by: Annotated[str | None, Query(max_length=2000, description="comma-separated grid keys; "
                                                                       "default all (one row per grid point)")] = None,
    format: Literal["json", "csv"] = "json",  # noqa: A002
) -> Any:
    keys = None
    if group_by is not None:
        keys = [k.strip() for k in group_by.split(",") if k.strip()]
        if not keys:
            raise InvalidInput("group_by must name at least one grid key", ("query", "group_by"))
    if format == "csv":
        table = sweeps.results(sweep_id, metric=metric, group_by=keys)
        return PlainTextResponse(sweeps.results_csv(table), media_type="text/csv",
                                 headers={"Content-Disposition": f'attachment; filename="sweep-{sweep_id}.csv"'})
    # The JSON text comes built (on Postgres by the aggregating query itself): validating 10,000 rows
    # again would cost more than the query; ResultsPublic documents the shape.
    return Response(sweeps.results_document(sweep_id, metric=metric, group_by=keys), media_type="application/json")
