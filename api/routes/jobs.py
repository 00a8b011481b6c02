"""/api/v1/jobs: submit, list, read, cancel, retry; metrics and artifacts of a job."""
from __future__ import annotations

import uuid
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Body, Header, Query, Response, status
from fastapi.responses import FileResponse
from pydantic import StringConstraints

from api.deps import CeleryDep, PrincipalDep, SettingsDep
from api.schemas import ArtifactPublic, ErrorPublic, JobCreate, JobPage, JobPublic, MetricsPublic
from jobs import store
from jobs.dispatch import JobDispatch, dispatch
from jobs.errors import NotFound
from jobs.specs import TAG_PATTERN, TEXT_PATTERN
from jobs.vocabulary import JobKind, JobStatus

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"])

MetricName = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=TEXT_PATTERN)]
ID_PREFIX_HELP = ("only ids starting with these hex digits (4 to 32; dashes ignored): how a short id, as the "
                  "dashboard and CLI show them, is resolved (one match: that one; two: ambiguous)")
_ERRORS = {403: {"model": ErrorPublic}, 404: {"model": ErrorPublic}, 409: {"model": ErrorPublic},
           429: {"model": ErrorPublic, "description": "over a per-owner quota (the message names it)"},
           503: {"model": ErrorPublic}}


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobPublic,
             responses={**_ERRORS, 200: {"model": JobPublic, "description": "Idempotent replay: the existing job"}},
             summary="Submit a job (201; 200 with the existing job for the caller's repeated Idempotency-Key)")
def create_job(
    spec: Annotated[JobCreate, Body()],
    response: Response,
    celery: CeleryDep,
    principal: PrincipalDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)] = None,
) -> store.JobRecord:
    job, created = store.create_job(spec, idempotency_key=idempotency_key, owner=principal.name,
                                    enforce_quota=not principal.admin)
    if created:
        dispatch(celery, [JobDispatch.of(job)])  # a broker failure is recorded, not raised
    else:
        response.status_code = status.HTTP_200_OK
        response.headers["Idempotent-Replayed"] = "true"
    return job


@router.get("", response_model=JobPage)
def list_jobs(
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    kind: JobKind | None = None,
    sweep: uuid.UUID | None = None,
    tag: Annotated[str | None, Query(max_length=64, pattern=TAG_PATTERN)] = None,
    owner: Annotated[str | None, Query(max_length=128, pattern=TEXT_PATTERN)] = None,
    id_prefix: Annotated[str | None, Query(max_length=36, description=ID_PREFIX_HELP)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> store.JobPage:
    """Newest first. Keyset pagination: follow `next_cursor` until it is null."""
    return store.list_jobs(status=status_, kind=kind, sweep_id=sweep, tag=tag, owner=owner, id_prefix=id_prefix,
                           limit=limit, cursor=cursor)


@router.get("/{job_id}", response_model=JobPublic, responses=_ERRORS)
def get_job(job_id: uuid.UUID) -> store.JobRecord:
    return store.get_job(job_id)


@router.post("/{job_id}/cancel", response_model=JobPublic, responses=_ERRORS)
def cancel_job(job_id: uuid.UUID, principal: PrincipalDep) -> store.JobRecord:
    """Queued: cancelled at once. Running: cancel_requested, the worker stops at its next check."""
    return store.request_cancel(job_id, actor=principal.name, admin=principal.admin)


@router.post("/{job_id}/retry", response_model=JobPublic, responses=_ERRORS)
def retry_job(job_id: uuid.UUID, celery: CeleryDep, principal: PrincipalDep) -> store.JobRecord:
    """A failed or cancelled job goes back to the queue on the same id (attempts reset)."""
    job = store.retry_job(job_id, actor=principal.name, admin=principal.admin)
    dispatch(celery, [JobDispatch.of(job)])
    return job


@router.get("/{job_id}/metrics", response_model=MetricsPublic, responses=_ERRORS)
def get_metrics(
    job_id: uuid.UUID,
    name: Annotated[list[MetricName] | None, Query(description="series to return (repeat); default all",
                                                   max_length=100)] = None,
    max_points: Annotated[int, Query(ge=2, le=100_000)] = 1000,
) -> MetricsPublic:
    """Each series downsampled on the server to at most `max_points` (first, last, per-bucket min/max)."""
    series = store.get_metrics(job_id, names=name, max_points=max_points)
    return MetricsPublic.model_validate({"job_id": job_id, "series": series}, from_attributes=True)


@router.get("/{job_id}/artifacts", response_model=list[ArtifactPublic], responses=_ERRORS)
def list_artifacts(job_id: uuid.UUID) -> list[ArtifactPublic]:
    return [ArtifactPublic(name=a.name, size=a.size, sha256=a.sha256, created_at=a.created_at,
                           url=f"/api/v1/jobs/{job_id}/artifacts/{quote(a.name)}")
            for a in store.list_artifacts(job_id)]


@router.get("/{job_id}/artifacts/{name:path}", response_class=FileResponse, responses=_ERRORS)
def download_artifact(job_id: uuid.UUID, name: str, settings: SettingsDep) -> FileResponse:
    artifact = store.get_artifact(job_id, name)
    path = artifact.path.resolve()
    # Serve only files under the artifact root, whatever a row says.
    if not path.is_relative_to(settings.artifacts):
        raise NotFound(f"artifact {name!r} of job {job_id} lies outside the artifact root")
    return FileResponse(path, filename=path.name, headers={"X-Checksum-SHA256": artifact.sha256})
