"""compress jobs: jobs.kind and sweeps.kind may be 'compress' (a trained network compressed with calibration data)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 00:00:00+00:00
"""
from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen here (not imported from jobs.models) so later model changes never alter this revision.
OLD = ("approx", "learn", "train")
NEW = ("approx", "learn", "train", "compress")


def _check(values: Sequence[str]) -> str:
    return "kind IN (" + ", ".join(f"'{v}'" for v in values) + ")"


def _replace(values: Sequence[str]) -> None:
    # batch mode: SQLite rebuilds the table; Postgres alters in place.
    for table in ("jobs", "sweeps"):
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(op.f(f"ck_{table}_kind"), type_="check")
            batch.create_check_constraint(op.f(f"ck_{table}_kind"), _check(values))


def upgrade() -> None:
    _replace(NEW)


def downgrade() -> None:
    # Compress jobs cannot be stored without their kind: refuse rather than lose them.
    bind = op.get_bind()
    n = bind.exec_driver_sql("SELECT (SELECT count(*) FROM jobs WHERE kind = 'compress') "
                             "+ (SELECT count(*) FROM sweeps WHERE kind = 'compress')").scalar()
    if n:
        raise RuntimeError(f"cannot downgrade below 0006: {n} compress jobs or sweeps are stored")
    _replace(OLD)
