"""Per-owner quotas at submission (issue 18, fair use): 429 naming the limit, admins exempt.

A live API with LOWRANK_AUTH=required and small quotas (queued jobs 6, sweep size 4, queued high-priority
jobs 1) on a queue prefix no worker consumes, so every job stays queued and counts. Each test uses users
with fresh names (a quota counts the owner's jobs across the whole session database).
"""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from jobs import auth

pytestmark = pytest.mark.service

REPO = Path(__file__).resolve().parents[2]
SPEC = {"kind": "approx", "weights": {"source": "gaussian", "m": 16, "d": 8}, "rank": 2, "method": "nkp"}
QUOTAS = {"LOWRANK_MAX_QUEUED_JOBS_PER_OWNER": "6", "LOWRANK_MAX_SWEEP_JOBS_PER_OWNER": "4", "LOWRANK_MAX_HIGH_PRIORITY_JOBS_PER_OWNER": "1"}


@pytest.fixture(scope="module")
def start_auth_api(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[Callable[[dict[str, str]], str]]:
    from test_auth import _start_uvicorn, _stop  # same folder (rootdir-relative import)

    procs = []

    def start(extra: dict[str, str]) -> str:
        env = {"LOWRANK_AUTH": "required", "LOWRANK_QUEUE_PREFIX": f"{service_env['LOWRANK_QUEUE_PREFIX']}quota.",
               **extra}
        proc, url = _start_uvicorn("127.0.0.1", "127.0.0.1", env, tmp_path_factory.mktemp("quota") / "api.log")
        procs.append(proc)
        return url

    yield start
    for proc in procs:
        _stop(proc)


@pytest.fixture(scope="module")
def api(start_auth_api) -> str:
    return start_auth_api(QUOTAS)


def user(url: str, admin: bool = False) -> httpx.Client:
    name = f"{'root' if admin else 'user'}-{secrets.token_hex(3)}"
    _, token = auth.create_token(name, admin=admin)
    c = httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {token}"})
    c.token = token  # type: ignore[attr-defined]
    return c


def over_quota(r: httpx.Response, setting: str, limit: int, retry_after: bool = True) -> str:
    assert r.status_code == 429, r.text
    body = r.json()
    assert body["code"] == "quota_exceeded" and setting in body["detail"], body
    assert body["info"]["setting"] == setting and body["info"]["limit"] == limit, body
    assert ("retry-after" in r.headers) == retry_after, r.headers
    if retry_after:
        assert int(r.headers["retry-after"]) > 0
    return body["detail"]


def test_queued_jobs_quota_counts_jobs_sweeps_and_retries(api: str) -> None:
    with user(api) as u, user(api) as other, user(api, admin=True) as root:
        ids = []
        for i in range(6):
            r = u.post("/api/v1/jobs", json={**SPEC, "seed": i}, headers={"Idempotency-Key": f"k{i}"})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        detail = over_quota(u.post("/api/v1/jobs", json=SPEC), "LOWRANK_MAX_QUEUED_JOBS_PER_OWNER", 6)
        assert "you have 6 queued jobs" in detail and "limit of 6" in detail
        # A replay of an accepted request is not new work: still answered.
        replay = u.post("/api/v1/jobs", json={**SPEC, "seed": 0}, headers={"Idempotency-Key": "k0"})
        assert replay.status_code == 200 and replay.json()["id"] == ids[0]
        # A sweep's jobs count: 5 queued + 2 is over.
        assert u.post(f"/api/v1/jobs/{ids[0]}/cancel").json()["status"] == "cancelled"
        sweep = {"base": SPEC, "grid": {"rank": [1, 2]}}
        over_quota(u.post("/api/v1/sweeps", json=sweep), "LOWRANK_MAX_QUEUED_JOBS_PER_OWNER", 6)
        # Room for one: a job goes in; then retrying the cancelled one would be the 7th.
        assert u.post("/api/v1/jobs", json=SPEC).status_code == 201
        over_quota(u.post(f"/api/v1/jobs/{ids[0]}/retry"), "LOWRANK_MAX_QUEUED_JOBS_PER_OWNER", 6)
        # Other users and admins are not held by this user's count; admins not by any.
        assert other.post("/api/v1/jobs", json=SPEC).status_code == 201
        for _ in range(8):
            assert root.post("/api/v1/jobs", json=SPEC).status_code == 201
        assert root.post(f"/api/v1/jobs/{ids[0]}/retry").status_code == 200  # an admin may requeue it
        # The CLI: one line naming the limit, exit code 2.
        cli = subprocess.run([sys.executable, "-m", "lowrank", "submit", "approx", "--m", "16", "--d", "8",
                              "--rank", "2", "--url", api], cwd=REPO, capture_output=True, text=True, timeout=60,
                             env={**os.environ, "LOWRANK_TOKEN": u.token})
        assert cli.returncode == 2, (cli.stdout, cli.stderr)
        assert len(cli.stderr.strip().splitlines()) == 1 and "429" in cli.stderr
        assert "LOWRANK_MAX_QUEUED_JOBS_PER_OWNER" in cli.stderr


def test_sweep_size_quota(api: str) -> None:
    with user(api) as u, user(api, admin=True) as root:
        body = {"base": SPEC, "grid": {"rank": [1, 2]}, "seeds": [0, 1, 2]}  # 6 jobs
        detail = over_quota(u.post("/api/v1/sweeps", json=body), "LOWRANK_MAX_SWEEP_JOBS_PER_OWNER", 4, retry_after=False)
        assert "would create 6 jobs" in detail
        ok = u.post("/api/v1/sweeps", json={**body, "seeds": [0, 1]})  # 4 jobs: at the limit
        assert ok.status_code == 201 and ok.json()["total"] == 4, ok.text
        assert root.post("/api/v1/sweeps", json=body).status_code == 201


def test_high_priority_quota(api: str, start_auth_api) -> None:
    with user(api) as u, user(api, admin=True) as root:
        assert u.post("/api/v1/jobs", json={**SPEC, "priority": "high"}).status_code == 201
        detail = over_quota(u.post("/api/v1/jobs", json={**SPEC, "priority": "high"}),
                            "LOWRANK_MAX_HIGH_PRIORITY_JOBS_PER_OWNER", 1)
        assert "you have 1 queued jobs with priority 'high'" in detail
        assert u.post("/api/v1/jobs", json=SPEC).status_code == 201  # normal priority: fine
        sweep = {"base": {**SPEC, "priority": "high"}, "grid": {"rank": [1, 2]}}
        over_quota(u.post("/api/v1/sweeps", json=sweep), "LOWRANK_MAX_HIGH_PRIORITY_JOBS_PER_OWNER", 1)
        for _ in range(3):
            assert root.post("/api/v1/jobs", json={**SPEC, "priority": "high"}).status_code == 201
    # 0 is no limit (for every quota setting).
    unlimited = start_auth_api({"LOWRANK_MAX_HIGH_PRIORITY_JOBS_PER_OWNER": "0",
                                "LOWRANK_MAX_QUEUED_JOBS_PER_OWNER": "0"})
    with user(unlimited) as u:
        for _ in range(8):
            assert u.post("/api/v1/jobs", json={**SPEC, "priority": "high"}).status_code == 201
