"""Database engines and sessions for Postgres (psycopg 3) and SQLite (embedded default).

One engine per URL per process, created lazily. Store functions open one `session_scope()` each,
which commits on success and rolls back on any exception: one public store call = one transaction.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from jobs.settings import get_settings

_lock = threading.Lock()
_engines: dict[str, Engine] = {}
_factories: dict[str, sessionmaker[Session]] = {}


def normalize_url(url: str) -> str:
    """Use psycopg 3 for bare `postgresql://` / `postgres://` URLs (psycopg2 is not installed)."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


def make_engine(url: str) -> Engine:
    """A new engine for `url` with the pragmas / timeouts this service relies on."""
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # 30 s busy timeout: the API and a worker write the same file; WAL lets readers run alongside.
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                               pool_pre_ping=True)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()
            # We issue BEGIN ourselves (below); pysqlite's implicit BEGIN would be DEFERRED.
            dbapi_conn.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn) -> None:
            # Take the write lock up front: a DEFERRED transaction that reads and then writes fails at
            # once with "database is locked" (no busy wait) when another process wrote meanwhile.
            # WAL readers are not blocked by it; transactions here are short.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    # Postgres: fail fast when the server is down (the API answers 503 instead of hanging);
    # pre-ping drops connections a Postgres restart killed.
    return create_engine(
        url,
        pool_pre_ping=True,
        # Autocommit connections (the one-statement job insert) need no ROLLBACK round trip on return.
        skip_autocommit_rollback=True,
        pool_size=10,
        max_overflow=20,
        pool_timeout=10,
        pool_recycle=1800,
        connect_args={"connect_timeout": 5, "options": "-c statement_timeout=60000"},
    )


def get_engine(url: str | None = None) -> Engine:
    """The process-wide engine for `url` (default: settings.database_url)."""
    url = normalize_url(url or get_settings().database_url)
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = make_engine(url)
            _factories[url] = sessionmaker(engine, expire_on_commit=False)
        return engine


def get_sessionmaker(url: str | None = None) -> sessionmaker[Session]:
    url = normalize_url(url or get_settings().database_url)
    get_engine(url)
    return _factories[url]


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """One transaction: commit when the block ends normally, roll back on any exception."""
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def dispose_engines() -> None:
    """Close every pooled connection (tests switching databases; forked worker children)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _factories.clear()


def ping_database() -> None:
    """Raise if the database cannot answer `SELECT 1` (readiness)."""
    with get_engine().connect() as conn:
        conn.exec_driver_sql("SELECT 1")
