"""Shared fixtures of every service test: real Postgres, real Redis, a live API and a live Celery worker.

Per test session (autouse, so every test here runs against it):
  * a fresh Postgres database `lowrank_test_<hex>`, migrated to head, dropped at the end;
  * a unique Celery queue prefix `lrt<hex>.` on Redis (keys removed at the end);
  * a fresh LOWRANK_HOME / LOWRANK_ARTIFACT_ROOT under pytest's tmp dir;
  * these LOWRANK_* variables set in os.environ (so in-process store calls and every subprocess
    use them) and jobs.settings reset.

Fixtures (names are the contract other helpers use):
  service_env     session  dict[str, str]: the LOWRANK_* variables of this session
  database_url    session  str: the session database (postgresql+psycopg://...)
  api_server      session  ServiceProcess: uvicorn `api.main:app` on a free port, /readyz answered 200
  worker_process  session  ServiceProcess: `celery -A worker.celery_app:app worker` on the cpu queues
  client          function httpx.Client with base_url = api_server.url (paths: "/api/v1/jobs")
  idle_api_server session  ServiceProcess: an API whose queue prefix no worker consumes (jobs stay queued)
  idle_client     function httpx.Client for idle_api_server
  spawn_api       function factory(env=None, timeout=60, ready_path="/readyz") -> ServiceProcess; stopped at
                  the test's end (ready_path="/healthz" for a server whose DB/broker is meant to be down)
  spawn_worker    function factory(queues=("cpu",), name=None, concurrency=1, env=None, pool=None)
                  -> ServiceProcess; stopped when the test ends (kill it yourself to test faults)
  scratch_database function factory() -> URL of a new empty Postgres database, dropped at the test's end
  wait_job        function (client, job_id, statuses=terminal, timeout=60) -> job dict
  unique_tag      function str: a tag no other test uses (filter your jobs with ?tag=)
  environment     function lowrank_environment: `with environment({...}):` runs in-process store calls
                  with other LOWRANK_* values (e.g. another database), settings re-read and restored after
  finish_job      function (job_id, result=None, error=None) -> None: the job run as a worker would record
                  it (store.claim_job, then store.finish_job: succeeded with `result`, or failed with `error`)
  insert_job      function (spec, job_id) -> job_id: a queued job with a chosen id (e.g. one whose short id
                  is all digits), written with the store's row builder; no message is sent

Postgres (127.0.0.1:5432, user postgres) and Redis (127.0.0.1:6379) must be reachable: a test
here FAILS with the reason when they are not (never skips). Override with LOWRANK_TEST_PG_ADMIN_URL
and LOWRANK_TEST_REDIS_URL. Test-friendly timings: heartbeat 1 s, stale after 10 s, reaper every 2 s.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
PG_ADMIN_URL = os.environ.get("LOWRANK_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("LOWRANK_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
TERMINAL = ("succeeded", "failed", "cancelled")


def _unreachable(what: str, exc: BaseException) -> None:
    required = os.environ.get("LOWRANK_TEST_REQUIRE_SERVICES") == "1"
    hint = ("(.ci/run requires them)" if required else
            "(start them, or run .ci/run, which starts installed ones)")
    pytest.fail(f"service tests need {what}, which cannot be reached {hint}: {exc}", pytrace=False)


def _pg_admin_connect():
    import psycopg

    return psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)


def create_database(name: str) -> str:
    """CREATE DATABASE `name` on the test server; returns its SQLAlchemy URL."""
    with _pg_admin_connect() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    from sqlalchemy.engine import make_url

    url = make_url(PG_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://", 1)).set(database=name)
    return url.render_as_string(hide_password=False)


def drop_database(name: str) -> None:
    with _pg_admin_connect() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def _services_reachable() -> None:
    try:
        with _pg_admin_connect() as conn:
            conn.execute("SELECT 1")
    except Exception as exc:  # noqa: BLE001 - any failure to connect: fail naming the service
        _unreachable(f"PostgreSQL at {PG_ADMIN_URL}", exc)
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except Exception as exc:  # noqa: BLE001 - any failure to connect: fail naming the service
        _unreachable(f"Redis at {REDIS_URL}", exc)


@contextlib.contextmanager
def lowrank_environment(env: dict[str, str]) -> Iterator[None]:
    """`env` (LOWRANK_* and the like) in os.environ with jobs.settings re-read; on exit the previous
    values come back and settings are reset again (which also closes pooled database connections,
    so the database can be dropped next)."""
    from jobs.settings import reset_settings

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    reset_settings()
    try:
        yield
    finally:
        reset_settings()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session", autouse=True)
def service_env(_services_reachable: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    token = secrets.token_hex(4)
    db_name = f"lowrank_test_{token}"
    home = tmp_path_factory.mktemp("lowrank_home")
    url = create_database(db_name)
    env = {
        "LOWRANK_HOME": str(home),
        "LOWRANK_DATABASE_URL": url,
        "LOWRANK_BROKER_URL": REDIS_URL,
        "LOWRANK_QUEUE_PREFIX": f"lrt{token}.",
        "LOWRANK_ARTIFACT_ROOT": str(home / "artifacts"),
        "LOWRANK_AUTH": "off",
        "LOWRANK_HEARTBEAT_INTERVAL_S": "1",
        "LOWRANK_STALE_AFTER_S": "10",
        "LOWRANK_REAP_INTERVAL_S": "2",
    }
    from jobs import migrate

    try:
        with lowrank_environment(env):
            migrate.upgrade(url)
            yield env
    finally:
        drop_database(db_name)
        _clean_redis(env["LOWRANK_QUEUE_PREFIX"])


def _clean_redis(prefix: str) -> None:
    import redis

    r = redis.Redis.from_url(REDIS_URL)
    for pattern in (f"{prefix}*", f"_kombu.binding.{prefix}*"):
        keys = list(r.scan_iter(match=pattern, count=1000))
        if keys:
            r.delete(*keys)


@pytest.fixture
def scratch_database(_services_reachable: None) -> Iterator[Callable[[], str]]:
    """factory() -> URL of a new, empty Postgres database (not migrated), dropped when the test ends."""
    names: list[str] = []

    def make() -> str:
        name = f"lowrank_test_scratch_{secrets.token_hex(4)}"
        names.append(name)
        return create_database(name)

    yield make
    from jobs.db import dispose_engines

    dispose_engines()
    for name in names:
        drop_database(name)


@pytest.fixture(scope="session")
def database_url(service_env: dict[str, str]) -> str:
    return service_env["LOWRANK_DATABASE_URL"]


# ------------------------------------------------------------------------------------------------
# Processes.

@dataclasses.dataclass
class ServiceProcess:
    """A subprocess this test session started; `url` is set for API servers."""

    name: str
    proc: subprocess.Popen
    log_path: Path
    url: str | None = None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to the whole process group (a Celery worker has children: its job-process server)."""
        if self.alive():
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (Celery: warm shutdown), then SIGKILL after `timeout` s."""
        if self.alive():
            self.kill(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.proc.wait(10)
        # Children left behind by a SIGKILLed parent die with their group.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _popen(argv: list[str], env: dict[str, str] | None, log_path: Path) -> subprocess.Popen:
    full_env = {**os.environ, **(env or {})}
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns it
    try:
        # Own process group: stop()/kill() reach a worker's children too.
        return subprocess.Popen(argv, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, process_group=0)
    finally:
        log.close()


def start_api(log_dir: Path, env: dict[str, str] | None = None, timeout: float = 60.0,
              ready_path: str = "/readyz") -> ServiceProcess:
    """uvicorn api.main:app on a free loopback port; returns once GET `ready_path` answers 200
    (pass "/healthz" for a server whose database or broker is meant to be down)."""
    port = free_port()
    name = f"api-{port}"
    log_path = log_dir / f"{name}.log"
    proc = _popen([sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port),
                   "--log-level", "warning", "--no-access-log"], env, log_path)
    sp = ServiceProcess(name, proc, log_path, url=f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not sp.alive():
            pytest.fail(f"API server exited with code {proc.returncode} before it was ready:\n{sp.logs()[-4000:]}",
                        pytrace=False)
        try:
            r = httpx.get(f"{sp.url}{ready_path}", timeout=2)
            if r.status_code == 200:
                return sp
            last = f"{r.status_code} {r.text[:500]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.2)
    sp.stop()
    pytest.fail(f"API server not ready after {timeout:.0f} s (last {ready_path}: {last}):\n{sp.logs()[-4000:]}",
                pytrace=False)


def start_worker(log_dir: Path, *, queues: tuple[str, ...] = ("cpu",), name: str | None = None,
                 concurrency: int = 1, pool: str | None = None, env: dict[str, str] | None = None,
                 timeout: float = 90.0) -> ServiceProcess:
    """A real Celery worker (the command `lowrank worker` runs) consuming `queues` (device names), high
    priority first; returns once it logs "ready". pool=None: the app's own (job supervisors)."""
    from jobs.queue import PRIORITIES

    # One torch/OpenMP thread per worker process unless asked otherwise: on a small shared machine
    # spinning OpenMP threads under load made a tiny training job ~5x slower (what `lowrank worker`'s
    # launcher does too: it splits the cores between its workers).
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
    prefix = {**os.environ, **env}.get("LOWRANK_QUEUE_PREFIX", "lowrank.")
    qnames = [f"{prefix}{dev}.{prio}" for prio in PRIORITIES for dev in queues]  # = jobs.queue.queue_name
    node = name or f"test-{secrets.token_hex(3)}@{socket.gethostname()}"
    log_path = log_dir / f"worker-{node.split('@')[0]}.log"
    proc = _popen([sys.executable, "-m", "celery", "-A", "worker.celery_app:app", "worker", "-n", node,
                   "-Q", ",".join(qnames), *(["-P", pool] if pool else []), "-c", str(concurrency), "-l", "INFO",
                   "--without-mingle", "--without-gossip"], env, log_path)
    sp = ServiceProcess(node, proc, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sp.alive():
            pytest.fail(f"Celery worker exited with code {proc.returncode} before it was ready:\n"
                        f"{sp.logs()[-4000:]}", pytrace=False)
        if " ready." in sp.logs():
            return sp
        time.sleep(0.2)
    sp.stop()
    pytest.fail(f"Celery worker not ready after {timeout:.0f} s:\n{sp.logs()[-4000:]}", pytrace=False)


@pytest.fixture(scope="session")
def _log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("service_logs")


@pytest.fixture(scope="session")
def api_server(service_env: dict[str, str], _log_dir: Path) -> Iterator[ServiceProcess]:
    sp = start_api(_log_dir)
    yield sp
    sp.stop()


@pytest.fixture(scope="session")
def idle_api_server(service_env: dict[str, str], _log_dir: Path) -> Iterator[ServiceProcess]:
    """An API on the session database whose queue prefix no worker consumes: jobs it takes stay queued."""
    sp = start_api(_log_dir, {"LOWRANK_QUEUE_PREFIX": f"{service_env['LOWRANK_QUEUE_PREFIX']}idle."})
    yield sp
    sp.stop()


@pytest.fixture(scope="session")
def worker_process(service_env: dict[str, str], _log_dir: Path) -> Iterator[ServiceProcess]:
    sp = start_worker(_log_dir, queues=("cpu",))
    yield sp
    sp.stop(timeout=30)


@pytest.fixture
def spawn_api(service_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    started: list[ServiceProcess] = []

    def spawn(env: dict[str, str] | None = None, timeout: float = 60.0, ready_path: str = "/readyz") -> ServiceProcess:
        sp = start_api(tmp_path, env, timeout, ready_path)
        started.append(sp)
        return sp

    yield spawn
    for sp in started:
        sp.stop()


@pytest.fixture
def spawn_worker(service_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    started: list[ServiceProcess] = []

    def spawn(**kwargs) -> ServiceProcess:
        sp = start_worker(tmp_path, **kwargs)
        started.append(sp)
        return sp

    yield spawn
    for sp in started:
        sp.stop(timeout=30)


@pytest.fixture
def client(api_server: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_server.url, timeout=30) as c:
        yield c


@pytest.fixture
def idle_client(idle_api_server: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=idle_api_server.url, timeout=30) as c:
        yield c


@pytest.fixture
def environment() -> Callable[[dict[str, str]], contextlib.AbstractContextManager[None]]:
    return lowrank_environment


def _finish_job(job_id: str, result: dict | None = None, error: str | None = None) -> None:
    from jobs import store

    worker = "test-writer"
    assert store.claim_job(job_id, worker, stale_after_s=60) is not None, f"job {job_id} was not claimable"
    if error is not None:
        assert store.finish_job(job_id, worker, "failed", error=error)
    else:
        assert store.finish_job(job_id, worker, "succeeded", result=result or {})


@pytest.fixture
def finish_job() -> Callable[..., None]:
    return _finish_job


def _insert_job(spec: dict, job_id: str) -> str:
    from jobs import store
    from jobs.db import session_scope
    from jobs.specs import parse_spec

    row = store.build_job_row(parse_spec(spec))
    row.id = uuid.UUID(job_id)
    for tag in row.job_tags:
        tag.job_id = row.id
    with session_scope() as session:
        session.add(row)
    return str(row.id)


@pytest.fixture
def insert_job() -> Callable[..., str]:
    return _insert_job


@pytest.fixture
def unique_tag() -> Iterator[str]:
    """A fresh tag; when the test ends, its jobs still queued or running are cancelled, so the
    session's one worker is free for the next test (a test's leftovers must not decide whether a
    later test's job runs in time)."""
    tag = f"t-{uuid.uuid4().hex[:12]}"
    yield tag
    cancel_leftovers(tag)


@pytest.fixture(autouse=True)
def _cancel_jobs_left_queued(service_env: dict[str, str]) -> Iterator[None]:
    """When a test ends, every job it created that is still queued or running is cancelled, tagged or not:
    the session's worker claims the oldest queued job of the whole database, so a test's leftovers (a valid
    spec submitted only to check its 201, a sweep not waited for) would run ahead of a later test's job
    and decide whether that one finishes in time (seen: the dashboard's live-index test timed out behind
    nine compress jobs an earlier module left queued). Jobs of session and module fixtures are created
    before this starts and are left alone."""
    from jobs.rows import utcnow

    start = utcnow()
    yield
    _cancel_where(lambda m: m.Job.created_at >= start)


def _cancel_where(condition: Callable[[Any], Any]) -> int:
    from jobs import models as m
    from jobs.db import session_scope
    from jobs.rows import utcnow
    from jobs.store.jobs import cancel_jobs

    with session_scope() as s:
        return cancel_jobs(s, condition(m), utcnow())


def cancel_leftovers(tag: str) -> int:
    """Cancel every queued or running job carrying `tag` (queued at once; running at its next check)."""
    from sqlalchemy import select

    return _cancel_where(lambda m: m.Job.id.in_(select(m.JobTag.job_id).where(m.JobTag.tag == tag)))


def _wait_job(client: httpx.Client, job_id: str, statuses: tuple[str, ...] = TERMINAL,
              timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        r = client.get(f"/api/v1/jobs/{job_id}")
        r.raise_for_status()
        job = r.json()
        if job["status"] in statuses:
            return job
        time.sleep(0.2)
    pytest.fail(f"job {job_id} not in {statuses} after {timeout:.0f} s; last: {job}", pytrace=False)


@pytest.fixture
def wait_job() -> Callable[..., dict]:
    return _wait_job
