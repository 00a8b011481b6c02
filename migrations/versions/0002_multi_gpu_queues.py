"""multi-GPU queue families: jobs.queue may be gpu2..gpu8 (train jobs with devices > 1)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 00:05:00+00:00
"""
from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen here (not imported from jobs.models) so later model changes never alter this revision.
OLD = ("cpu", "gpu")
NEW = ("cpu", "gpu", "gpu2", "gpu3", "gpu4", "gpu5", "gpu6", "gpu7", "gpu8")


def _check(values: Sequence[str]) -> str:
    return "queue IN (" + ", ".join(f"'{v}'" for v in values) + ")"


def _replace(values: Sequence[str]) -> None:
    # batch mode: SQLite rebuilds the table; Postgres alters in place.
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("ck_jobs_queue"), type_="check")
        batch.create_check_constraint(op.f("ck_jobs_queue"), _check(values))


def upgrade() -> None:
    _replace(NEW)


def downgrade() -> None:
    # Multi-GPU jobs cannot run on a schema without their queues: refuse rather than lose them.
    bind = op.get_bind()
    n = bind.exec_driver_sql("SELECT count(*) FROM jobs WHERE queue NOT IN ('cpu', 'gpu')").scalar()
    if n:
        raise RuntimeError(f"cannot downgrade below 0002: {n} jobs are on multi-GPU queues (gpu2..gpu8)")
    _replace(OLD)
