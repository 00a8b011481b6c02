"""The fair claim on the embedded default (SQLite + Celery's filesystem broker): with two owners' jobs queued,
a `lowrank worker` alternates between them, and a high-priority job queued behind normal ones starts next.

On SQLite every write transaction is BEGIN IMMEDIATE, so claims are serialized without SELECT ... FOR
UPDATE; the filesystem broker cycles through a worker's queues, so it is the claim, not the message
order, that puts high priority first. (The same on Postgres and Redis: tests/faults/test_fault_fair_use.py.)
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from test_embedded import clean_env

QUICK = {"kind": "approx", "weights": {"source": "gaussian", "m": 64, "d": 32}, "rank": 4, "method": "spectral"}
BUSY = {"kind": "train", "model": "resnet18", "dataset": "synthetic", "init": "dense", "batch_size": 4,
        "synthetic_train_size": 16, "synthetic_val_size": 8, "image_size": 8, "epochs": 3}


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}", pytrace=False)


@pytest.fixture
def embedded(tmp_path, monkeypatch):
    """LOWRANK_HOME=tmp/.lowrank in this process (store calls) and for `lowrank worker`; the worker's log."""
    from jobs import migrate
    from jobs.settings import get_settings, reset_settings

    for key in [k for k in os.environ if k.startswith("LOWRANK_")]:
        monkeypatch.delenv(key)
    home = tmp_path / ".lowrank"
    monkeypatch.setenv("LOWRANK_HOME", str(home))
    reset_settings()
    migrate.upgrade(get_settings().database_url)
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "lowrank", "worker", "--queues", "cpu"], cwd=tmp_path,
                                  env=clean_env(LOWRANK_HOME=str(home), LOWRANK_HEARTBEAT_INTERVAL_S="1",
                                                LOWRANK_STALE_AFTER_S="10", OMP_NUM_THREADS="1"),
                                  stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        yield worker, log_path
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        reset_settings()


def _queue(owner: str, n: int, spec: dict, **extra) -> list[str]:
    from jobs import store
    from jobs.queue import enqueue_job, make_celery

    app = make_celery()
    ids = []
    for i in range(n):
        job, _ = store.create_job({**spec, "seed": i, **extra}, owner=owner)
        enqueue_job(app, job.id, job.queue, job.priority)
        ids.append(job.id)
    return ids


def _done(ids: list[str], log_path) -> list:
    from jobs import store

    jobs = _wait(lambda: (js := [store.get_job(j) for j in ids]) and all(
        j.status in ("succeeded", "failed", "cancelled") for j in js) and js, 240,
        f"{len(ids)} jobs to finish; worker log:\n{log_path.read_text()[-3000:]}")
    assert all(j.status == "succeeded" for j in jobs), [(j.status, j.error) for j in jobs]
    return sorted(jobs, key=lambda j: j.started_at)


@pytest.mark.timeout(400)
def test_embedded_worker_alternates_owners_and_starts_high_priority_first(embedded):
    from jobs import store

    worker, log_path = embedded
    _wait(lambda: b" ready." in log_path.read_bytes(), 120, "the worker to be ready")
    busy = _queue("carol", 1, BUSY)
    _wait(lambda: store.get_job(busy[0]).status == "running", 120, "the busy job to start")
    # Behind the busy job: alice's sweep, then bob's, then carol's normal jobs and one high-priority job.
    alice, bob = _queue("alice", 3, QUICK), _queue("bob", 3, QUICK)
    high = _queue("carol", 1, {**QUICK, "seed": 99}, priority="high")
    assert store.get_job(busy[0]).status == "running", "the busy job ended before the queue was built"
    jobs = _done(busy + alice + bob + high, log_path)
    assert [j.id for j in jobs[:2]] == [busy[0], high[0]], [(j.owner, j.priority) for j in jobs]
    owners = [j.owner for j in jobs[2:]]
    assert owners in (["alice", "bob"] * 3, ["bob", "alice"] * 3), owners
