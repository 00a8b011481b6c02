"""The ORM models and the Alembic migrations agree, and the migrations run both ways, on Postgres."""
from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from jobs import migrate
from jobs.db import make_engine
from jobs.models import Base

TABLES = {"jobs", "sweeps", "job_tags", "metrics", "artifacts", "uploads", "api_tokens", "search_trials",
          "owner_turns"}


def _diff(url: str) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            return compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_session_database_is_at_head_and_matches_the_models(database_url: str) -> None:
    assert migrate.current_revision(database_url) == migrate.head_revision()
    assert migrate.is_at_head(database_url)
    assert _diff(database_url) == []


def test_upgrade_downgrade_upgrade(scratch_database) -> None:
    url = scratch_database()
    assert migrate.current_revision(url) is None and not migrate.is_at_head(url)
    migrate.upgrade(url)
    assert migrate.is_at_head(url) and _tables(url) == TABLES
    assert _diff(url) == []
    migrate.downgrade(url, "base")
    assert migrate.current_revision(url) is None and _tables(url) == set()
    migrate.upgrade(url)
    assert migrate.is_at_head(url) and _tables(url) == TABLES and _diff(url) == []


def test_sqlite_embedded_database_migrates_and_matches(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'lowrank.db'}"
    migrate.upgrade(url)
    assert migrate.is_at_head(url) and _tables(url) == TABLES and _diff(url) == []
    migrate.downgrade(url, "base")
    assert _tables(url) == set()
