"""Fault tests: the real API, Celery workers, Postgres and Redis, where the tests break things.

Every fault here happens to PRIVATE instances, never to the shared Postgres (5432) or Redis (6379):
  * a Postgres cluster of its own (`pg_createcluster <ver> lrfault<hex> -p <free port>`, trust auth,
    no fsync), started and stopped with `pg_ctlcluster`, dropped (`pg_dropcluster --stop`) at the end;
  * a redis-server subprocess on a free port with append-only persistence in a temp folder (as
    docker-compose runs it), which a test can stop, wipe and start again on the same port.

Fixtures (all for tests in this folder):
  fault_pg       package  PrivatePostgres: .url, .stop(), .start(), .port
  fault_redis    package  PrivateRedis: .url, .stop(sig), .start(), .wipe()
  fault_env      package  dict of the LOWRANK_* variables (also set in os.environ while the tests run)
  fault_api      package  ServiceProcess: uvicorn on the private services
  fault_client   function httpx.Client for fault_api
  spawn_worker   function factory(name=None, env=None, concurrency=1) -> ServiceProcess, stopped at the end
  unique_tag     function a fresh tag

Process helpers (ServiceProcess, start_api, start_worker, free_port, wait_job) come from
tests/service/conftest.py, loaded by path. Missing `pg_createcluster` or `redis-server` FAILS the
tests (never skips). Timings are test-friendly: heartbeat 1 s, stale after 6 s, reaper every 1 s.
"""
from __future__ import annotations

import secrets
import signal
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from faults.faultlib import SHARED_PORTS, PrivatePostgres, PrivateRedis, ServiceProcess, free_port, svc

# ------------------------------------------------------------------------------------------------
# Fixtures.

@pytest.fixture(scope="package")
def fault_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="package")
def fault_pg() -> Iterator[PrivatePostgres]:
    port = free_port()
    assert port not in SHARED_PORTS
    pg = PrivatePostgres(port)
    try:
        pg.create()
        yield pg
    finally:
        pg.drop()


@pytest.fixture(scope="package")
def fault_redis(fault_dir: Path) -> Iterator[PrivateRedis]:
    port = free_port()
    assert port not in SHARED_PORTS
    r = PrivateRedis(fault_dir / "redis", port)
    r.start()
    try:
        yield r
    finally:
        r.stop(signal.SIGKILL)


@pytest.fixture(scope="package")
def fault_env(fault_pg: PrivatePostgres, fault_redis: PrivateRedis, fault_dir: Path) -> Iterator[dict[str, str]]:
    home = fault_dir / "home"
    env = {
        "LOWRANK_HOME": str(home),
        "LOWRANK_DATABASE_URL": fault_pg.url,
        "LOWRANK_BROKER_URL": fault_redis.url,
        "LOWRANK_QUEUE_PREFIX": f"lrf{secrets.token_hex(4)}.",
        "LOWRANK_ARTIFACT_ROOT": str(home / "artifacts"),
        "LOWRANK_AUTH": "off",
        "LOWRANK_HEARTBEAT_INTERVAL_S": "1",
        "LOWRANK_STALE_AFTER_S": "6",
        "LOWRANK_REAP_INTERVAL_S": "1",
        # One torch thread per process: the 2 shared cores are oversubscribed, and spinning OpenMP
        # threads make a tiny epoch take many seconds.
        "OMP_NUM_THREADS": "1",
    }
    from jobs import migrate

    with svc.lowrank_environment(env):
        migrate.upgrade(fault_pg.url)
        yield env


@pytest.fixture(scope="package")
def fault_api(fault_env: dict[str, str], fault_dir: Path) -> Iterator[ServiceProcess]:
    sp = svc.start_api(fault_dir, fault_env)
    yield sp
    sp.stop()


@pytest.fixture
def fault_client(fault_api: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fault_api.url, timeout=30) as c:
        yield c


@pytest.fixture
def spawn_worker(fault_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., object]]:
    """factory(*names, env=None, concurrency=1) -> a Celery worker on the private services (cpu queues),
    or a list of them when given several names (started in parallel). Killed when the test ends."""
    started: list[ServiceProcess] = []

    def start(name: str | None, env: dict[str, str] | None, concurrency: int) -> ServiceProcess:
        sp = svc.start_worker(tmp_path, queues=("cpu",), name=name, concurrency=concurrency,
                              env={**fault_env, **(env or {})})
        started.append(sp)
        return sp

    def spawn(*names: str, env: dict[str, str] | None = None, concurrency: int = 1) -> object:
        if len(names) <= 1:
            return start(names[0] if names else None, env, concurrency)
        with ThreadPoolExecutor(len(names)) as pool:
            futures = [pool.submit(start, n, env, concurrency) for n in names]
            return [f.result() for f in futures]

    yield spawn
    for sp in started:
        # Nothing of theirs needs a clean shutdown (private broker and database): SIGKILL the group.
        sp.kill(signal.SIGKILL)
        sp.stop(timeout=5)


@pytest.fixture
def unique_tag() -> str:
    return f"f-{uuid.uuid4().hex[:12]}"
