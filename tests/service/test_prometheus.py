"""GET /metrics on a live API (uvicorn subprocess) over the real Postgres and Redis.

The API under test gets a database of its own and a queue prefix no worker consumes, so the jobs
this test writes are the only ones it sees and every number can be checked exactly. Jobs are
written with the store's own row builder; their messages are real Celery messages sent with
jobs.queue.enqueue_job, so the broker depth is what kombu itself put in Redis.
"""
from __future__ import annotations

import datetime as dt
import os
import secrets
from collections.abc import Callable, Iterator

import httpx
import psycopg
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import make_url

from jobs import migrate, store
from jobs.db import session_scope
from jobs.queue import enqueue_job, make_celery
from jobs.settings import Settings
from jobs.specs import parse_spec

pytestmark = pytest.mark.service

PG_ADMIN_URL = os.environ.get("LOWRANK_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

APPROX = {"kind": "approx", "weights": {"source": "gaussian", "m": 8, "d": 4}, "rank": 2, "method": "nkp"}
LEARN = {"kind": "learn", "teacher": {"source": "gaussian", "m": 8, "d": 4}, "rank": 2}
TRAIN = {"kind": "train", "model": "resnet18", "dataset": "synthetic", "device": "cuda", "rank": 4,
         "epochs": 1, "priority": "high"}


@pytest.fixture
def own_database(service_env: dict[str, str]) -> Iterator[str]:
    """A fresh, migrated database on the test server, dropped afterwards."""
    name = f"lowrank_test_metrics_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(PG_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://", 1)).set(database=name)
    url_s = url.render_as_string(hide_password=False)
    try:
        migrate.upgrade(url_s)
        yield url_s
    finally:
        from jobs.db import dispose_engines

        dispose_engines()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def add_jobs(url: str, now: dt.datetime, rows: list[dict]) -> list[str]:
    """Insert jobs built by the store's row builder, then set the state fields given."""
    ids = []
    with session_scope(url) as session:
        for fields in rows:
            fields = dict(fields)
            row = store.build_job_row(parse_spec(fields.pop("spec")))
            for key, value in fields.items():
                setattr(row, key, now - dt.timedelta(seconds=value) if key.endswith("_at") else value)
            session.add(row)
            ids.append(str(row.id))
    return ids


def scrape(base_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = httpx.get(f"{base_url}/metrics", timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_report_exact_job_states(own_database: str, spawn_api: Callable, service_env: dict[str, str]) -> None:
    prefix = f"{service_env['LOWRANK_QUEUE_PREFIX']}metrics{secrets.token_hex(3)}."
    now = dt.datetime.now(dt.UTC)
    # Seconds before `now` for every *_at field.
    add_jobs(own_database, now, [
        # approx: 3 succeeded (0.5 s, 3 s, 100 s), 1 failed (20 s), 1 cancelled before it started.
        {"spec": APPROX, "status": "succeeded", "started_at": 1000.0, "finished_at": 999.5},
        {"spec": APPROX, "status": "succeeded", "started_at": 1000.0, "finished_at": 997.0},
        {"spec": APPROX, "status": "succeeded", "started_at": 1000.0, "finished_at": 900.0},
        {"spec": APPROX, "status": "failed", "started_at": 1000.0, "finished_at": 980.0},
        {"spec": APPROX, "status": "cancelled", "finished_at": 500.0},
        # train: one succeeded after 2 h; three running on two GPU workers.
        {"spec": TRAIN, "status": "succeeded", "started_at": 9000.0, "finished_at": 1800.0},
        {"spec": TRAIN, "status": "running", "worker": "worker@n1-gpu0", "started_at": 600.0, "heartbeat_at": 30.0},
        {"spec": TRAIN, "status": "running", "worker": "worker@n1-gpu0", "started_at": 300.0, "heartbeat_at": 5.0},
        {"spec": TRAIN, "status": "running", "worker": "worker@n1-gpu1", "started_at": 300.0, "heartbeat_at": 50.0},
    ])
    queued = add_jobs(own_database, now, [
        {"spec": TRAIN, "status": "queued", "created_at": 100.0},
        {"spec": TRAIN, "status": "queued", "created_at": 10.0},
        {"spec": LEARN, "status": "queued", "created_at": 40.0},
    ])
    settings = Settings(database_url=own_database, broker_url=service_env["LOWRANK_BROKER_URL"], queue_prefix=prefix,
                        home=service_env["LOWRANK_HOME"])
    celery = make_celery(settings)
    try:
        enqueue_job(celery, queued[0], "gpu", "high")
        enqueue_job(celery, queued[1], "gpu", "high")
        enqueue_job(celery, queued[2], "cpu", "normal")
        api = spawn_api(env={"LOWRANK_DATABASE_URL": own_database, "LOWRANK_QUEUE_PREFIX": prefix,
                             "LOWRANK_API_THREADS": "3"})
        m = scrape(api.url)
        lag = (dt.datetime.now(dt.UTC) - now).total_seconds()
    finally:
        celery.close()
        r = redis.Redis.from_url(service_env["LOWRANK_BROKER_URL"])
        keys = list(r.scan_iter(match=f"{prefix}*")) + list(r.scan_iter(match=f"_kombu.binding.{prefix}*"))
        if keys:
            r.delete(*keys)

    assert value(m, "lowrank_database_up") == 1
    # Every status x kind is exported; these are the exact counts.
    expected = {("succeeded", "approx"): 3, ("failed", "approx"): 1, ("cancelled", "approx"): 1,
                ("succeeded", "train"): 1, ("running", "train"): 3, ("queued", "train"): 2, ("queued", "learn"): 1}
    for status in ("queued", "running", "succeeded", "failed", "cancelled"):
        for kind in ("approx", "learn", "train"):
            assert value(m, "lowrank_jobs", status=status, kind=kind) == expected.get((status, kind), 0), (status, kind)

    # Queue depth: the broker's (real messages in Redis) and the database's, kept apart.
    for device in ("cpu", "gpu"):
        for prio in ("high", "normal", "low"):
            q = f"{prefix}{device}.{prio}"
            want = {"gpu.high": 2, "cpu.normal": 1}.get(f"{device}.{prio}", 0)
            assert value(m, "lowrank_broker_queue_depth", queue=q) == want, q
            assert value(m, "lowrank_queued_jobs_db", queue=q) == want, q
    assert value(m, "lowrank_broker_up") == 1
    oldest_gpu = value(m, "lowrank_queued_job_oldest_age_seconds", queue=f"{prefix}gpu.high")
    assert 100.0 <= oldest_gpu <= 100.0 + lag
    assert value(m, "lowrank_queued_job_oldest_age_seconds", queue=f"{prefix}cpu.low") == 0

    # Durations: first start -> finish of finished jobs only (the never-started cancel is left out).
    h = {"kind": "approx", "status": "succeeded"}
    assert value(m, "lowrank_job_duration_seconds_count", **h) == 3
    assert value(m, "lowrank_job_duration_seconds_sum", **h) == pytest.approx(103.5, abs=1e-3)
    assert value(m, "lowrank_job_duration_seconds_bucket", le="1.0", **h) == 1
    assert value(m, "lowrank_job_duration_seconds_bucket", le="5.0", **h) == 2
    assert value(m, "lowrank_job_duration_seconds_bucket", le="60.0", **h) == 2
    assert value(m, "lowrank_job_duration_seconds_bucket", le="120.0", **h) == 3
    assert value(m, "lowrank_job_duration_seconds_bucket", le="+Inf", **h) == 3
    f = {"kind": "approx", "status": "failed"}
    assert value(m, "lowrank_job_duration_seconds_count", **f) == 1
    assert value(m, "lowrank_job_duration_seconds_bucket", le="15.0", **f) == 0
    assert value(m, "lowrank_job_duration_seconds_bucket", le="30.0", **f) == 1
    t = {"kind": "train", "status": "succeeded"}
    assert value(m, "lowrank_job_duration_seconds_sum", **t) == pytest.approx(7200.0, abs=1e-3)
    assert value(m, "lowrank_job_duration_seconds_bucket", le="3600.0", **t) == 0
    assert value(m, "lowrank_job_duration_seconds_bucket", le="7200.0", **t) == 1
    assert ("lowrank_job_duration_seconds_count", (("kind", "approx"), ("status", "cancelled"))) not in m

    # Workers: running jobs and the age of the latest heartbeat among them.
    assert value(m, "lowrank_worker_running_jobs", worker="worker@n1-gpu0") == 2
    assert value(m, "lowrank_worker_running_jobs", worker="worker@n1-gpu1") == 1
    assert 5.0 <= value(m, "lowrank_worker_heartbeat_age_seconds", worker="worker@n1-gpu0") <= 5.0 + lag
    assert 50.0 <= value(m, "lowrank_worker_heartbeat_age_seconds", worker="worker@n1-gpu1") <= 50.0 + lag
    workers = {dict(labels)["worker"] for (name, labels) in m if name == "lowrank_worker_running_jobs"}
    assert workers == {"worker@n1-gpu0", "worker@n1-gpu1"}

    # The API process's own metrics come along, with its handler threads: the configured limit,
    # and the one this scrape itself runs in (the route is sync).
    assert value(m, "process_resident_memory_bytes") > 0
    assert value(m, "lowrank_api_threads", state="limit") == 3
    assert 1 <= value(m, "lowrank_api_threads", state="busy") <= 3


def test_metrics_follow_state_changes(client: httpx.Client, wait_job: Callable, unique_tag: str,
                                      worker_process) -> None:
    """On the shared session API: a job run by the real worker moves from queued to succeeded in the
    next scrape (deltas, since other tests share this database)."""
    def jobs_of(samples: dict, status: str) -> float:
        return value(samples, "lowrank_jobs", status=status, kind="approx")

    before = scrape(str(client.base_url))
    r = client.post("/api/v1/jobs", json={**APPROX, "tags": [unique_tag]})
    assert r.status_code == 201, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", job
    after = scrape(str(client.base_url))
    # This job added one succeeded approx job; other tests' jobs can only add, never remove.
    assert jobs_of(after, "succeeded") >= jobs_of(before, "succeeded") + 1
    h = {"kind": "approx", "status": "succeeded"}
    assert value(after, "lowrank_job_duration_seconds_count", **h) >= 1
    total_before = sum(v for (n, _), v in before.items() if n == "lowrank_jobs")
    total_after = sum(v for (n, _), v in after.items() if n == "lowrank_jobs")
    assert total_after >= total_before + 1
