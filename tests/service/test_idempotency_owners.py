"""Idempotency keys are scoped by owner (issue 18, defect 6), for jobs and sweeps.

The probe: one user's Idempotency-Key blocked another user's identical request (a 409 naming the
first user's job, and wrongly saying the spec differed). With auth on, each owner's keys are their
own; with auth off every caller is the one anonymous owner (owner NULL), whose keys are unique among
themselves (tested at the store, and by test_api_jobs.py::test_idempotency_key's concurrent requests).
"""
from __future__ import annotations

import secrets
from collections.abc import Iterator

import httpx
import pytest

from jobs import auth, store, sweeps
from jobs.errors import Conflict

pytestmark = pytest.mark.service

SPEC = {"kind": "approx", "weights": {"source": "gaussian", "m": 16, "d": 8}, "rank": 2, "method": "nkp"}
SWEEP = {"base": SPEC, "grid": {"rank": [1, 2]}, "seeds": [0]}


@pytest.fixture(scope="module")
def auth_url(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from test_auth import _start_uvicorn, _stop  # same folder (rootdir-relative import)

    env = {"LOWRANK_AUTH": "required", "LOWRANK_QUEUE_PREFIX": f"{service_env['LOWRANK_QUEUE_PREFIX']}idem."}
    proc, url = _start_uvicorn("127.0.0.1", "127.0.0.1", env, tmp_path_factory.mktemp("idem") / "api.log")
    try:
        yield url
    finally:
        _stop(proc)


@pytest.fixture
def users(auth_url: str) -> Iterator[dict[str, httpx.Client]]:
    """Two user tokens with fresh names (their jobs are theirs alone)."""
    clients = {}
    for who in ("ann", "ben"):
        name = f"{who}-{secrets.token_hex(3)}"
        _, token = auth.create_token(name)
        clients[who] = httpx.Client(base_url=auth_url, timeout=30, headers={"Authorization": f"Bearer {token}"})
        clients[who].name = name  # type: ignore[attr-defined]
    yield clients
    for c in clients.values():
        c.close()


@pytest.mark.parametrize("path,body,what", [("/api/v1/jobs", SPEC, "job"), ("/api/v1/sweeps", SWEEP, "sweep")])
def test_another_users_key_never_matters(users, path: str, body: dict, what: str) -> None:
    ann, ben = users["ann"], users["ben"]
    key = {"Idempotency-Key": f"shared-{secrets.token_hex(4)}"}
    a = ann.post(path, json=body, headers=key)
    assert a.status_code == 201, a.text
    b = ben.post(path, json=body, headers=key)  # same key, same body, another user: a new one of ben's
    assert b.status_code == 201, b.text
    assert b.json()["id"] != a.json()["id"] and b.json()["owner"] == ben.name
    # Each user's repeat replays their own.
    for client, first in ((ann, a), (ben, b)):
        again = client.post(path, json=body, headers=key)
        assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
        assert again.json()["id"] == first.json()["id"]
    # The same user's key with another body: 409 naming their own, never the other user's.
    changed = {**body, "rank": 3} if what == "job" else {**body, "seeds": [0, 1]}
    for client, mine, theirs in ((ann, a, b), (ben, b, a)):
        r = client.post(path, json=changed, headers=key)
        assert r.status_code == 409 and r.json()["code"] == "conflict", r.text
        assert mine.json()["id"] in r.json()["detail"] and f"your {what}" in r.json()["detail"]
        assert theirs.json()["id"] not in r.text and theirs.json()["owner"] not in r.text


def test_anonymous_owner_is_one_scope() -> None:
    """Auth off: owner None is one owner. Its key replays, conflicts on another spec, and does not
    collide with a named owner's same key (and the other way round)."""
    key = f"anon-{secrets.token_hex(4)}"
    first, created = store.create_job(SPEC, idempotency_key=key)
    assert created and first.owner is None
    again, created = store.create_job(SPEC, idempotency_key=key)
    assert not created and again.id == first.id
    with pytest.raises(Conflict, match=f"your job {first.id}"):
        store.create_job({**SPEC, "rank": 3}, idempotency_key=key)
    named, created = store.create_job(SPEC, idempotency_key=key, owner="carol")
    assert created and named.id != first.id and named.owner == "carol"

    req = sweeps.SweepCreate(**SWEEP)
    s1, created, _ = sweeps.create_sweep(req, idempotency_key=key)
    assert created
    s2, created, _ = sweeps.create_sweep(req, idempotency_key=key)
    assert not created and s2.id == s1.id
    s3, created, _ = sweeps.create_sweep(req, idempotency_key=key, owner="carol")
    assert created and s3.id != s1.id
    with pytest.raises(Conflict, match=f"your sweep {s1.id}"):
        sweeps.create_sweep(sweeps.SweepCreate(**{**SWEEP, "seeds": [5]}), idempotency_key=key)
