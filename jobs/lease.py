"""Job leases: a sign, visible to every peer, that a running job's supervisor process is alive.

The supervisor (worker/supervisor.py) takes its job's lease right after claiming it and holds it until
the outcome is recorded. The operating system gives the lease up the moment that process dies (kill -9,
the OOM killer, a crash), so the reaper re-queues the job within a reaper round instead of waiting
stale_after_s for its heartbeat to go stale (store.requeue_stale_jobs).

* Postgres: a session-level advisory lock on a connection of the lease's own. The server ends the session,
  and frees its locks, as soon as the dead process's socket is closed by its kernel.
* SQLite (the embedded default, one host): an flock on <home>/leases/<job id>.lock.

Where a death cannot be seen this way (the host lost power, the network between worker and Postgres is
cut, the process is frozen), the server keeps the session until TCP gives up on it, and the
stale-heartbeat rule applies. A Postgres restart drops every session: leases only count once the server
has been up longer than stale_after_s (`trustworthy`), by when live supervisors have taken theirs again.
"""
from __future__ import annotations

import fcntl
import logging
import os
import uuid
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from jobs.db import normalize_url
from jobs.rows import is_postgres
from jobs.settings import get_settings

log = logging.getLogger(__name__)
_engines: dict[str, Engine] = {}


def lease_key(job_id: str | uuid.UUID) -> int:
    """The advisory-lock key of a job: its UUID's first 8 bytes as a signed 64-bit integer."""
    return int.from_bytes(uuid.UUID(str(job_id)).bytes[:8], "big", signed=True)


def _lease_path(job_id: str | uuid.UUID) -> Path:
    return get_settings().home / "leases" / f"{uuid.UUID(str(job_id))}.lock"


def _lease_engine() -> Engine:
    """Connections that are closed, never pooled, when a lease is released (closing one frees its lock)."""
    url = normalize_url(get_settings().database_url)
    engine = _engines.get(url)
    if engine is None:
        engine = _engines[url] = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 5})
    return engine


class JobLease:
    """Held by one supervisor for one job. `acquire` once, `keep` at every heartbeat (re-takes a lease
    whose connection was lost), `release` after the outcome is recorded."""

    def __init__(self, job_id: str) -> None:
        self.job_id = str(job_id)
        self._conn: Connection | None = None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._conn is not None or self._fd is not None

    def acquire(self) -> bool:
        """Take the lease; False when another process holds it (or the database cannot be reached)."""
        if get_settings().is_sqlite:
            return self._acquire_file()
        try:
            conn = _lease_engine().connect().execution_options(isolation_level="AUTOCOMMIT")
        except Exception:
            log.warning("job %s: cannot take its lease (database unreachable)", self.job_id, exc_info=True)
            return False
        try:
            got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": lease_key(self.job_id)}).scalar())
        except Exception:  # noqa: BLE001 - any database error: no lease now, `keep` tries again
            conn.close()
            return False
        if not got:
            conn.close()
            return False
        self._conn = conn
        return True

    def _acquire_file(self) -> bool:
        path = _lease_path(self.job_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def keep(self) -> None:
        """Check the lease's connection; take the lease again if it was lost (a Postgres restart)."""
        if self._fd is not None:
            return
        if self._conn is not None:
            try:
                self._conn.execute(text("SELECT 1"))
                return
            except Exception:  # noqa: BLE001 - the session is gone, and the lock with it
                self._drop_connection()
        if self.acquire():
            log.info("job %s: lease taken again", self.job_id)

    def release(self) -> None:
        if self._fd is not None:
            _lease_path(self.job_id).unlink(missing_ok=True)
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
        if self._conn is not None:
            self._drop_connection()

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        try:
            conn.close()  # NullPool: the session ends, and its advisory lock with it
        except Exception:  # noqa: BLE001 - a dead connection has released the lock already
            pass


def trustworthy(session: Session, min_uptime_s: float) -> bool:
    """Whether a free lease means a dead supervisor: always on SQLite (flock is the kernel's); on Postgres
    only once the server has been up `min_uptime_s` (a restart frees every lease at once)."""
    if not is_postgres(session):
        return True
    up = session.execute(text("SELECT extract(epoch FROM now() - pg_postmaster_start_time())")).scalar()
    return float(up) >= min_uptime_s


def is_free(session: Session, job_id: str | uuid.UUID) -> bool:
    """True when no process holds the job's lease. On Postgres the check takes the lock until `session`
    ends (so no supervisor can take it meanwhile)."""
    if is_postgres(session):
        return bool(session.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": lease_key(job_id)}).scalar())
    try:
        fd = os.open(_lease_path(job_id), os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    _lease_path(job_id).unlink(missing_ok=True)
    return True
