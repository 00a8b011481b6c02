"""Files a job wrote (checkpoints, models): recorded by its worker, listed and served by the API.

Paths under the artifact root (LOWRANK_ARTIFACT_ROOT) are stored relative to it, so the root can move
(jobs.rows.rel_path / abs_path; uploads are stored the same way).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import os
import uuid
from pathlib import Path

from sqlalchemy import select

from jobs import models as m
from jobs.db import session_scope
from jobs.errors import NotFound
from jobs.rows import abs_path, as_uuid, dialect_insert, rel_path, utcnow
from jobs.store.jobs import get_job_row


@dataclasses.dataclass(frozen=True)
class ArtifactRecord:
    job_id: str
    name: str
    path: Path  # absolute
    size: int  # bytes
    sha256: str
    created_at: dt.datetime


def add_artifact(job_id: str | uuid.UUID, name: str, path: str | os.PathLike[str], size: int, sha256: str) -> None:
    """Record a file the job wrote (normally under ARTIFACT_ROOT/<job_id>/); idempotent on (job, name)."""
    jid = as_uuid(job_id)
    values = {"job_id": jid, "name": name, "path": rel_path(path), "size": int(size), "sha256": sha256,
              "created_at": utcnow()}
    with session_scope() as session:
        insert = dialect_insert(session)
        stmt = insert(m.Artifact).values(values)
        stmt = stmt.on_conflict_do_update(
            index_elements=["job_id", "name"],
            set_={k: stmt.excluded[k] for k in ("path", "size", "sha256", "created_at")},
        )
        session.execute(stmt)


def _artifact(row: m.Artifact) -> ArtifactRecord:
    return ArtifactRecord(job_id=str(row.job_id), name=row.name, path=abs_path(row.path), size=row.size,
                          sha256=row.sha256, created_at=row.created_at)


def list_artifacts(job_id: str | uuid.UUID) -> list[ArtifactRecord]:
    with session_scope() as session:
        get_job_row(session, job_id)
        rows = session.scalars(select(m.Artifact).where(m.Artifact.job_id == as_uuid(job_id)).order_by(m.Artifact.name))
        return [_artifact(r) for r in rows]


def get_artifact(job_id: str | uuid.UUID, name: str) -> ArtifactRecord:
    """One artifact; NotFound when the job, the record or the file is missing."""
    with session_scope() as session:
        get_job_row(session, job_id)
        row = session.get(m.Artifact, (as_uuid(job_id), name))
        if row is None:
            raise NotFound(f"job {job_id} has no artifact {name!r}")
        record = _artifact(row)
    if not record.path.is_file():
        raise NotFound(f"artifact {name!r} of job {job_id} is recorded but its file is missing")
    return record
