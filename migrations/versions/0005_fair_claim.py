"""fair claim and job leases: owner_turns (when each owner was last served), a partial index over
queued jobs, and jobs.leased (the claiming supervisor holds the job's lease, jobs/lease.py)

A Celery message is a slot for its device: the worker that receives one claims the next job fairly
(highest priority, then the owner with the fewest running jobs, then the owner served longest ago,
then the oldest job; jobs.store.claim_next_job). The index makes each step an index probe.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 00:00:00+00:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

QUEUED = sa.text("status = 'queued'")


def upgrade() -> None:
    op.add_column("jobs", sa.Column("leased", sa.Boolean(), nullable=True))
    op.create_table(
        "owner_turns",
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("last_claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("owner", name=op.f("pk_owner_turns")),
    )
    op.create_index("ix_jobs_claim", "jobs", ["queue", "priority", "owner", "created_at", "sweep_point_index", "seed",
                                              "id"],
                    postgresql_where=QUEUED, sqlite_where=QUEUED)


def downgrade() -> None:
    op.drop_index("ix_jobs_claim", table_name="jobs", postgresql_where=QUEUED, sqlite_where=QUEUED)
    op.drop_table("owner_turns")
    with op.batch_alter_table("jobs") as batch:  # SQLite rebuilds the table
        batch.drop_column("leased")
