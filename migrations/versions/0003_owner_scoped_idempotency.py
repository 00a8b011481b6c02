"""owner-scoped idempotency keys; an index for per-owner quotas

Idempotency keys were unique across all users, so one user's key blocked another's request. Now
they are unique per owner (jobs and sweeps): a partial unique index on (owner, idempotency_key),
and one on idempotency_key for rows without an owner (auth off: one anonymous owner). Plus a partial
index on the queued jobs' (owner, priority), which the submission quotas count.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 00:00:00+00:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

HAS_KEY = "idempotency_key IS NOT NULL"
ANONYMOUS_KEY = "owner IS NULL AND idempotency_key IS NOT NULL"
QUEUED = "status = 'queued'"
TABLES = ("jobs", "sweeps")


def _where(clause: str) -> dict[str, sa.TextClause]:
    return {"postgresql_where": sa.text(clause), "sqlite_where": sa.text(clause)}


def upgrade() -> None:
    for table in TABLES:
        # batch mode: SQLite rebuilds the table; Postgres alters in place.
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(op.f(f"uq_{table}_idempotency_key"), type_="unique")
        op.create_index(op.f(f"ix_{table}_owner_idempotency_key"), table, ["owner", "idempotency_key"], unique=True,
                        **_where(HAS_KEY))
        op.create_index(op.f(f"ix_{table}_anonymous_idempotency_key"), table, ["idempotency_key"], unique=True,
                        **_where(ANONYMOUS_KEY))
    op.create_index(op.f("ix_jobs_queued_owner_priority"), "jobs", ["owner", "priority"], **_where(QUEUED))


def downgrade() -> None:
    # Two owners may now hold the same key; a global unique constraint cannot hold them: refuse, not lose.
    bind = op.get_bind()
    for table in TABLES:
        n = bind.exec_driver_sql(f"SELECT count(*) FROM (SELECT idempotency_key FROM {table} WHERE {HAS_KEY} "
                                 "GROUP BY idempotency_key HAVING count(*) > 1) AS shared").scalar()
        if n:
            raise RuntimeError(f"cannot downgrade below 0003: {n} idempotency keys of {table} are used by more "
                               "than one owner")
    op.drop_index(op.f("ix_jobs_queued_owner_priority"), table_name="jobs")
    for table in TABLES:
        op.drop_index(op.f(f"ix_{table}_anonymous_idempotency_key"), table_name=table)
        op.drop_index(op.f(f"ix_{table}_owner_idempotency_key"), table_name=table)
        with op.batch_alter_table(table) as batch:
            batch.create_unique_constraint(op.f(f"uq_{table}_idempotency_key"), ["idempotency_key"])
