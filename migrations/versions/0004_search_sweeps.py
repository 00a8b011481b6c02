"""search sweeps: sweeps.strategy (grid | search) and sweeps.search (its configuration); search_trials

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 00:04:00+00:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen here (not imported from jobs.models) so later model changes never alter this revision.
JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    # batch mode: SQLite rebuilds the table for the CHECK constraint; Postgres alters in place.
    with op.batch_alter_table("sweeps") as batch:
        batch.add_column(sa.Column("strategy", sa.String(length=16), server_default="grid", nullable=False))
        batch.add_column(sa.Column("search", JSON, nullable=True))
        batch.create_check_constraint(op.f("ck_sweeps_strategy"), "strategy IN ('grid', 'search')")
    op.create_table(
        "search_trials",
        sa.Column("sweep_id", sa.Uuid(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("point", JSON, nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("values", JSON, nullable=True),
        sa.Column("intermediate", JSON, nullable=True),
        sa.Column("pruned_at", sa.Integer(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("told_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("state IN ('running', 'complete', 'pruned', 'failed')", name=op.f("ck_search_trials_state")),
        sa.ForeignKeyConstraint(["sweep_id"], ["sweeps.id"], name=op.f("fk_search_trials_sweep_id_sweeps"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("sweep_id", "number", name=op.f("pk_search_trials")),
    )
    op.create_index(op.f("ix_search_trials_state_sweep_id"), "search_trials", ["state", "sweep_id"], unique=False)


def downgrade() -> None:
    # A search sweep cannot be represented without its strategy and trials: refuse rather than lose them.
    bind = op.get_bind()
    n = bind.exec_driver_sql("SELECT count(*) FROM sweeps WHERE strategy <> 'grid'").scalar()
    if n:
        raise RuntimeError(f"cannot downgrade below 0004: {n} search sweeps exist (delete them first)")
    op.drop_index(op.f("ix_search_trials_state_sweep_id"), table_name="search_trials")
    op.drop_table("search_trials")
    with op.batch_alter_table("sweeps") as batch:
        batch.drop_constraint(op.f("ck_sweeps_strategy"), type_="check")
        batch.drop_column("search")
        batch.drop_column("strategy")
