"""Redis restarts under queued and running jobs: with its append-only file, and without any data."""
from __future__ import annotations

import time

import pytest

from faults.faultlib import SMALL_APPROX, TINY_TRAIN, assert_complete_train_metrics, submit, wait_for, wait_job
from jobs import store
from jobs.settings import get_settings

pytestmark = [pytest.mark.service]

EPOCHS = 2


def _running(job_id: str) -> bool:
    return store.get_job(job_id).status == "running"


@pytest.mark.timeout(300)
def test_redis_restart_loses_no_job(fault_client, fault_redis, spawn_worker, unique_tag):
    worker = spawn_worker()

    # 1. A clean restart (SIGTERM: Redis writes its append-only file), as compose restarts it.
    train = submit(fault_client, {**TINY_TRAIN, "epochs": EPOCHS}, unique_tag)
    wait_for(lambda: _running(train), 90, "the train job to start")
    queued = [submit(fault_client, {**SMALL_APPROX, "seed": i}, unique_tag) for i in range(2)]
    assert all(store.get_job(j).status == "queued" for j in queued)  # waiting behind the train job
    fault_redis.stop()
    t0 = time.monotonic()
    r = fault_client.post("/api/v1/jobs", json={**SMALL_APPROX, "seed": 9, "tags": [unique_tag]})
    submit_while_down_s = time.monotonic() - t0
    assert r.status_code == 201, r.text  # stored; its message is sent by the reaper once Redis is back
    sent_while_down = r.json()["id"]
    assert store.get_job(sent_while_down).enqueued_at is None
    fault_redis.start()
    restarted = time.monotonic()
    jobs = [wait_job(fault_client, j, timeout=120) for j in [train, *queued, sent_while_down]]
    clean_s = time.monotonic() - restarted
    assert [j["status"] for j in jobs] == ["succeeded"] * 4, [j["error"] for j in jobs]
    assert [j["attempts"] for j in jobs] == [1] * 4  # nothing ran twice
    assert_complete_train_metrics(fault_client, train, EPOCHS)

    # 2. Redis comes back with no data at all (no persistence, a wiped volume, a failover to an empty
    # replica): the queued jobs' messages are gone. The reaper sees fewer messages on the queue than
    # jobs waiting on it and sends theirs again.
    train2 = submit(fault_client, {**TINY_TRAIN, "epochs": EPOCHS + 1, "seed": 1}, unique_tag)
    wait_for(lambda: _running(train2), 90, "the second train job to start")
    lost = [submit(fault_client, {**SMALL_APPROX, "seed": 10 + i}, unique_tag) for i in range(2)]
    fault_redis.stop()
    fault_redis.wipe()
    fault_redis.start()
    wiped = time.monotonic()
    jobs = [wait_job(fault_client, j, timeout=120) for j in [train2, *lost]]
    wiped_s = time.monotonic() - wiped
    assert [j["status"] for j in jobs] == ["succeeded"] * 3, [j["error"] for j in jobs]
    assert [j["attempts"] for j in jobs] == [1] * 3
    assert_complete_train_metrics(fault_client, train2, EPOCHS + 1)
    assert all(f"job {j}: queued, but its message looks lost; sent again" in worker.logs() for j in lost)
    assert fault_client.get("/readyz").status_code == 200
    print(f"\nRedis restart (AOF): submit while down answered 201 in {submit_while_down_s:.2f} s; "
          f"4 jobs done {clean_s:.1f} s after the restart. Redis wiped: 2 lost messages re-sent, "
          f"3 jobs done {wiped_s:.1f} s after the restart (stale_after_s={get_settings().stale_after_s:g})")
