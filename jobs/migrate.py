"""Programmatic Alembic: upgrade a database and ask whether it is at the head revision.

`lowrank db upgrade` / `lowrank up` call `upgrade(url)`; the API refuses to start unless
`is_at_head(url)`. Works from any cwd: the migrations folder is found from the installed package.
"""
from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

import migrations
from jobs.db import get_engine, normalize_url
from jobs.settings import get_settings

MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent


def alembic_config(url: str | None = None) -> Config:
    """An Alembic Config for migrations/ bound to `url` (default: settings.database_url)."""
    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["database_url"] = normalize_url(url or get_settings().database_url)
    cfg.attributes["configure_logging"] = False  # keep the caller's logging setup
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Migrate the database at `url` up to `revision` (creates the SQLite file if needed)."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | None = None, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def head_revision() -> str:
    heads = ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"migrations have {len(heads)} heads ({heads}); merge them")
    return heads[0]


def current_revision(url: str | None = None) -> str | None:
    """The database's revision, or None for a database never migrated (pooled connection: /readyz asks)."""
    with get_engine(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def is_at_head(url: str | None = None) -> bool:
    return current_revision(url) == head_revision()


def require_head(url: str | None = None) -> None:
    """Raise RuntimeError with the fix when the database is not at the head revision."""
    url = url or get_settings().database_url
    current, head = current_revision(url), head_revision()
    if current != head:
        raise RuntimeError(
            f"database {_redact(url)} is at revision {current or '(none: empty database)'}, "
            f"not at head {head}; run `lowrank db upgrade` first")


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(normalize_url(url)).render_as_string(hide_password=True)
