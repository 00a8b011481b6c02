"""latency jobs: jobs.kind and sweeps.kind may be 'latency' (measured forward latency, dense against factored)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 00:00:00+00:00
"""
from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen here (not imported from jobs.models) so later model changes never alter this revision.
OLD = ("approx", "learn", "train", "compress")
NEW = ("approx", "learn", "train", "compress", "latency")


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
    # Latency jobs cannot be stored without their kind: refuse rather than lose them.
    bind = op.get_bind()
    n = bind.exec_driver_sql("SELECT (SELECT count(*) FROM jobs WHERE kind = 'latency') "
                             "+ (SELECT count(*) FROM sweeps WHERE kind = 'latency')").scalar()
    if n:
        raise RuntimeError(f"cannot downgrade below 0007: {n} latency jobs or sweeps are stored")
    _replace(OLD)
