"""Scratch service state for the service benchmarks: a Postgres database migrated to head and a
unique Redis queue prefix, both removed at the end, using the service tests' own helpers
(tests/service/conftest.py: create_database, start_api, start_worker, ...), so a benchmark runs
the stack exactly as the tests do.
"""
from __future__ import annotations

import contextlib
import importlib.util
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
_NAME = "_lowrank_service_conftest"


def conftest():
    if _NAME in sys.modules:
        return sys.modules[_NAME]
    spec = importlib.util.spec_from_file_location(_NAME, REPO / "tests" / "service" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = mod
    spec.loader.exec_module(mod)
    return mod


def call(fn, *args, **kwargs):
    """The conftest helpers report failures with pytest.fail (a BaseException): make it an error here."""
    import pytest

    try:
        return fn(*args, **kwargs)
    except pytest.fail.Exception as exc:
        raise RuntimeError(str(exc)) from None


def check_reachable(cf) -> None:
    """A clear error naming the URL when Postgres or Redis is not there (before anything is created)."""
    import redis

    try:
        with cf._pg_admin_connect() as conn:
            conn.execute("SELECT 1")
    except Exception as exc:  # noqa: BLE001 - any failure: say which service the benchmarks need
        raise RuntimeError(f"the service benchmarks need PostgreSQL at {cf.PG_ADMIN_URL}: {exc}") from None
    try:
        redis.Redis.from_url(cf.REDIS_URL, socket_connect_timeout=3).ping()
    except Exception as exc:  # noqa: BLE001 - any failure: say which service the benchmarks need
        raise RuntimeError(f"the service benchmarks need Redis at {cf.REDIS_URL}: {exc}") from None


@contextlib.contextmanager
def service(home: Path, label: str, *, in_process: bool = True) -> Iterator[dict[str, Any]]:
    """Yield {"env", "url", "db", "prefix", "cf"}: a scratch database `lowrank_<label>_<hex>` at the
    Alembic head and a queue prefix, with `env` the LOWRANK_* settings that point at them (auth off,
    artifacts under `home`). in_process=True also sets them in os.environ (jobs.settings reset) for
    the benchmark's own store calls, and restores the environment afterwards. Everything is removed
    at the end, whatever happened."""
    from jobs import migrate

    cf = conftest()
    check_reachable(cf)
    token = secrets.token_hex(4)
    db_name = f"lowrank_{label}_{token}"
    prefix = f"lr{label[:1]}{token}."
    url = cf.create_database(db_name)
    env = {"LOWRANK_HOME": str(home), "LOWRANK_DATABASE_URL": url, "LOWRANK_BROKER_URL": cf.REDIS_URL,
           "LOWRANK_QUEUE_PREFIX": prefix, "LOWRANK_ARTIFACT_ROOT": str(home / "artifacts"),
           "LOWRANK_AUTH": "off"}
    try:
        with cf.lowrank_environment(env) if in_process else contextlib.nullcontext():
            migrate.upgrade(url)
            yield {"env": env, "url": url, "db": db_name, "prefix": prefix, "cf": cf}
    finally:
        cf.drop_database(db_name)
        cf._clean_redis(prefix)
