"""Postgres stops for a while under a running train job: 503s (fast), self-recovery, no metric lost."""
from __future__ import annotations

import time

import httpx
import pytest

from faults.faultlib import (
    SMALL_APPROX,
    TINY_TRAIN,
    assert_complete_train_metrics,
    series,
    submit,
    svc,
    wait_for,
    wait_job,
)
from jobs import auth, store
from jobs.settings import get_settings

pytestmark = [pytest.mark.service]

EPOCHS = 5
OUTAGE_S = 10.0  # longer than stale_after_s (6 s): every heartbeat looks stale when Postgres returns
HANG_BOUND_S = 15.0  # "no hang": far above the 5 s connect timeout, far below the client's 30 s


def _timed(client: httpx.Client, method: str, path: str, **kw) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    r = client.request(method, path, **kw)
    return r, time.monotonic() - t0


@pytest.mark.timeout(300)
def test_postgres_outage_gives_503_and_recovers_without_losing_metrics(fault_client, fault_pg, fault_env,
                                                                      spawn_worker, unique_tag, tmp_path):
    # Also an API with auth on and no token cache: its token check (a middleware) reads the database too.
    _, token = auth.create_token(f"fault-{unique_tag}")
    secured = svc.start_api(tmp_path, {**fault_env, "LOWRANK_AUTH": "required", "LOWRANK_AUTH_CACHE_S": "0"})
    try:
        _run(fault_client, fault_pg, spawn_worker, unique_tag, secured.url, token)
    finally:
        secured.stop()


def _run(fault_client, fault_pg, spawn_worker, unique_tag, secured_url: str, token: str) -> None:
    secured = httpx.Client(base_url=secured_url, timeout=30, headers={"Authorization": f"Bearer {token}"})
    assert secured.get("/api/v1/jobs").status_code == 200
    worker = spawn_worker()
    job_id = submit(fault_client, {**TINY_TRAIN, "epochs": EPOCHS, "seed": 2}, unique_tag)
    wait_for(lambda: store.get_job(job_id).status == "running", 90, "the train job to start")
    wait_for(lambda: "train_loss_step" in series(fault_client, job_id), 90, "the job's first metrics")

    fault_pg.stop()
    down_at = time.monotonic()
    probes = {
        "GET /readyz": ("GET", "/readyz", {}),
        "POST /api/v1/jobs": ("POST", "/api/v1/jobs", {"json": {**SMALL_APPROX, "tags": [unique_tag]}}),
        "GET /api/v1/jobs/{id}": ("GET", f"/api/v1/jobs/{job_id}", {}),
        "GET /api/v1/jobs": ("GET", "/api/v1/jobs", {}),
        "POST /api/v1/jobs/{id}/cancel": ("POST", f"/api/v1/jobs/{job_id}/cancel", {}),
        "auth GET /api/v1/jobs": ("GET", "auth /api/v1/jobs", {}),
    }
    worst: dict[str, float] = {}
    while time.monotonic() - down_at < OUTAGE_S:
        for what, (method, path, kw) in probes.items():
            client = secured if what.startswith("auth ") else fault_client
            r, took = _timed(client, method, path.removeprefix("auth "), **kw)
            assert r.status_code == 503, (what, r.status_code, r.text)
            assert took < HANG_BOUND_S, (what, took)
            if what == "GET /readyz":
                assert r.json()["checks"]["database"].startswith("unreachable"), r.text
            else:
                assert r.json()["code"] == "unavailable" and r.headers.get("Retry-After"), r.text
            worst[what] = max(worst.get(what, 0.0), took)
        time.sleep(0.5)

    fault_pg.start()
    back_at = time.monotonic()
    wait_for(lambda: fault_client.get("/readyz").status_code == 200, 60, "/readyz to answer 200 again", interval=0.1)
    ready_s = time.monotonic() - back_at
    assert secured.get("/api/v1/jobs").status_code == 200
    r, _ = _timed(fault_client, "POST", "/api/v1/jobs", json={**SMALL_APPROX, "tags": [unique_tag]})
    assert r.status_code == 201, r.text
    writes_s = time.monotonic() - back_at

    job = wait_job(fault_client, job_id, timeout=180)
    done_s = time.monotonic() - back_at
    assert job["status"] == "succeeded", job["error"]
    # The live worker kept its job: no re-queue although its heartbeat was older than stale_after_s.
    assert job["attempts"] == 1 and job["worker"].startswith(worker.name)
    assert_complete_train_metrics(fault_client, job_id, EPOCHS)
    assert "heartbeat failed" in worker.logs()  # the outage did reach the worker
    assert wait_job(fault_client, r.json()["id"], timeout=60)["status"] == "succeeded"
    print(f"\nPostgres down {OUTAGE_S:g} s: worst 503 latency "
          + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in worst.items())
          + f"; after restart: /readyz 200 in {ready_s:.2f} s, POST 201 in {writes_s:.2f} s, "
          f"train job succeeded {done_s:.1f} s later (stale_after_s={get_settings().stale_after_s:g})")
