"""The /metrics collector on the embedded setup (SQLite + filesystem broker) and with a broker or a
database that is down: explicit `*_up 0` gauges, never a silent substitute.

In-process (the collector the route uses, on a SQLite file migrated by Alembic); the Postgres +
Redis path through a live API is tests/service/test_prometheus.py.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from api.routes.prometheus import ServiceCollector
from jobs import migrate, store
from jobs.db import dispose_engines, session_scope
from jobs.settings import Settings
from jobs.specs import parse_spec
from jobs.stats import DURATION_BUCKETS_S, service_stats

APPROX = {"kind": "approx", "weights": {"source": "gaussian", "m": 8, "d": 4}, "rank": 2, "method": "nkp"}


@pytest.fixture
def sqlite_settings(tmp_path: Path):
    settings = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'lowrank.db'}",
                        broker_url="filesystem://", queue_prefix="emb.")
    migrate.upgrade(settings.database_url)
    now = dt.datetime.now(dt.UTC)
    with session_scope(settings.database_url) as session:
        for status, start, finish, extra in [
            ("succeeded", 100.0, 98.0, {}),  # 2 s
            ("succeeded", 100.0, 40.0, {}),  # 60 s: on a bucket bound
            ("failed", 100.0, 99.5, {}),  # 0.5 s
            ("queued", None, None, {"priority": "low"}),
            ("running", 10.0, None, {"worker": "w@cpu", "heartbeat_at": now - dt.timedelta(seconds=3)}),
        ]:
            row = store.build_job_row(parse_spec(APPROX))
            row.status = status
            row.started_at = now - dt.timedelta(seconds=start) if start is not None else None
            row.finished_at = now - dt.timedelta(seconds=finish) if finish is not None else None
            for k, v in extra.items():
                setattr(row, k, v)
            session.add(row)
    yield settings
    dispose_engines()


def scrape(settings: Settings) -> dict:
    registry = CollectorRegistry()
    registry.register(ServiceCollector(settings))
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def names(samples: dict) -> set[str]:
    return {n for n, _ in samples}


def test_embedded_backends(sqlite_settings: Settings) -> None:
    m = scrape(sqlite_settings)
    assert m[("lowrank_database_up", ())] == 1
    assert m[("lowrank_jobs", (("kind", "approx"), ("status", "succeeded")))] == 2
    assert m[("lowrank_jobs", (("kind", "approx"), ("status", "running")))] == 1
    assert m[("lowrank_jobs", (("kind", "train"), ("status", "queued")))] == 0
    # No Redis: no broker metric at all; the database's queued count is there, under its own name.
    assert not {n for n in names(m) if n.startswith("lowrank_broker")}
    assert m[("lowrank_queued_jobs_db", (("queue", "emb.cpu.low"),))] == 1
    assert m[("lowrank_queued_jobs_db", (("queue", "emb.cpu.normal"),))] == 0
    h = (("kind", "approx"), ("status", "succeeded"))
    assert m[("lowrank_job_duration_seconds_count", h)] == 2
    # SQLite's julianday() arithmetic is good to ~0.1 ms over these spans.
    assert m[("lowrank_job_duration_seconds_sum", h)] == pytest.approx(62.0, abs=1e-3)
    assert m[("lowrank_job_duration_seconds_bucket", (("kind", "approx"), ("le", "1.0"), ("status", "succeeded")))] == 0
    assert m[("lowrank_job_duration_seconds_bucket", (("kind", "approx"), ("le", "5.0"), ("status", "succeeded")))] == 1
    assert m[("lowrank_job_duration_seconds_bucket", (("kind", "approx"), ("le", "1.0"), ("status", "failed")))] == 1
    assert m[("lowrank_worker_running_jobs", (("worker", "w@cpu"),))] == 1
    assert 3.0 <= m[("lowrank_worker_heartbeat_age_seconds", (("worker", "w@cpu"),))] < 60.0


def test_duration_on_a_bucket_bound_is_inside_it(sqlite_settings: Settings) -> None:
    stats = service_stats(url=sqlite_settings.database_url)
    (succeeded,) = [d for d in stats.durations if d.status == "succeeded"]
    i60 = DURATION_BUCKETS_S.index(60)
    # 60 s is exact only to julianday precision, so le="60.0" may go either way; the neighbours
    # may not, and the cumulative counts must be monotone and end at the total.
    assert succeeded.cumulative[i60 - 1] == 1
    assert succeeded.cumulative[i60 + 1] == 2
    assert list(succeeded.cumulative) == sorted(succeeded.cumulative)
    assert succeeded.cumulative[-1] == succeeded.count == 2


def test_broker_down_is_reported_not_hidden(sqlite_settings: Settings) -> None:
    down = sqlite_settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    m = scrape(down)
    assert m[("lowrank_broker_up", ())] == 0
    assert "lowrank_broker_queue_depth" not in names(m)
    assert m[("lowrank_database_up", ())] == 1
    assert m[("lowrank_queued_jobs_db", (("queue", "emb.cpu.low"),))] == 1


def test_database_down_is_reported(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, database_url="postgresql+psycopg://nobody@127.0.0.1:1/none",
                        broker_url="filesystem://")
    m = scrape(settings)
    assert m == {("lowrank_database_up", ()): 0}
    dispose_engines()


def test_buckets_must_increase(sqlite_settings: Settings) -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        service_stats((1, 5, 5), url=sqlite_settings.database_url)
