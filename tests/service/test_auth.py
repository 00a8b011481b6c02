"""API tokens end to end: the `lowrank token` CLI, Bearer verification on a live API (uvicorn) over the
real Postgres, the owner/admin rule on cancel and retry, revocation, and the loopback rule.

The API under test runs with LOWRANK_AUTH=required and a queue prefix no worker consumes, so the jobs
it takes stay queued (cancel and retry act on known states).
"""
from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy.engine import make_url

from api.security import auth_required, is_loopback_host
from jobs import auth
from jobs.settings import Settings

pytestmark = pytest.mark.service

REPO = Path(__file__).resolve().parents[2]
SPEC = {"kind": "approx", "weights": {"source": "gaussian", "m": 16, "d": 8}, "rank": 2, "method": "nkp"}


def lowrank(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowrank", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=60)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def auth_api(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A live API with LOWRANK_AUTH=required (token cache 1 s) whose jobs no worker runs."""
    log_dir = tmp_path_factory.mktemp("auth_api")
    env = {"LOWRANK_AUTH": "required", "LOWRANK_AUTH_CACHE_S": "1",
           "LOWRANK_QUEUE_PREFIX": f"{service_env['LOWRANK_QUEUE_PREFIX']}auth."}
    proc, url = _start_uvicorn("127.0.0.1", "127.0.0.1", env, log_dir / "api.log")
    try:
        yield url
    finally:
        _stop(proc)


def _start_uvicorn(bind: str, connect: str, env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind((bind, 0))
        port = s.getsockname()[1]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "api.main:app", "--host", bind, "--port", str(port),
                                 "--log-level", "warning"], cwd=REPO, env={**os.environ, **env}, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, process_group=0)
    url = f"http://{connect}:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"API exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}", pytrace=False)
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    _stop(proc)
    pytest.fail(f"API not ready:\n{log_path.read_text()[-3000:]}", pytrace=False)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="module")
def tokens(service_env: dict[str, str]) -> dict[str, str]:
    """alice: created with the CLI (its printed token); bob and root (admin) through jobs.auth."""
    r = lowrank("token", "create", "alice")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) >= 2, r.stdout  # a message, then the token alone on the last line
    alice = lines[-1]
    assert alice.startswith(auth.TOKEN_PREFIX) and " " not in alice
    _, bob = auth.create_token("bob")
    _, root = auth.create_token("root", admin=True)
    return {"alice": alice, "bob": bob, "root": root}


def test_only_the_hash_is_stored(tokens: dict[str, str], database_url: str) -> None:
    url = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT name, token_hash, admin FROM api_tokens WHERE name IN ('alice','root')").fetchall()
        dump = str(conn.execute("SELECT * FROM api_tokens").fetchall())
    assert dict((n, (h, a)) for n, h, a in rows) == {
        "alice": (hashlib.sha256(tokens["alice"].encode()).hexdigest(), False),
        "root": (hashlib.sha256(tokens["root"].encode()).hexdigest(), True)}
    for token in tokens.values():
        assert token not in dump and token[len(auth.TOKEN_PREFIX):] not in dump


def test_no_or_bad_token_is_401_with_challenge(auth_api: str, tokens: dict[str, str]) -> None:
    with httpx.Client(base_url=auth_api, timeout=30) as c:
        for method, path in (("GET", "/api/v1/jobs"), ("POST", "/api/v1/jobs"), ("GET", "/metrics"),
                             ("POST", "/api/v1/uploads"), ("GET", "/api/v1/nonexistent")):
            for headers in ({}, bearer("lrk_" + "x" * 43), bearer(tokens["alice"] + "x"), {"Authorization": "Basic YTpi"}):
                r = c.request(method, path, headers=headers, json=SPEC if method == "POST" else None)
                assert r.status_code == 401, (method, path, headers, r.text)
                assert r.headers["www-authenticate"].startswith("Bearer"), r.headers
                assert r.json()["code"] == "unauthorized"
        assert "invalid_token" in c.get("/api/v1/jobs", headers=bearer("lrk_nope_nope_nope_nope")).headers["www-authenticate"]
        # Liveness, readiness and the schema stay open; /metrics answers with a token.
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 200
        schema = c.get("/openapi.json").json()
        assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        assert "401" in schema["paths"]["/api/v1/jobs"]["post"]["responses"]
        assert c.get("/metrics", headers=bearer(tokens["bob"])).status_code == 200


def test_owner_rule_on_cancel_and_retry(auth_api: str, tokens: dict[str, str]) -> None:
    alice, bob, root = (httpx.Client(base_url=auth_api, timeout=30, headers=bearer(tokens[n]))
                        for n in ("alice", "bob", "root"))
    with alice, bob, root:
        r = alice.post("/api/v1/jobs", json=SPEC)
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["owner"] == "alice"
        # Reading is open to every valid token.
        assert bob.get(f"/api/v1/jobs/{job['id']}").json()["owner"] == "alice"
        assert job["id"] in [j["id"] for j in bob.get("/api/v1/jobs", params={"owner": "alice"}).json()["items"]]
        # Not the owner, not an admin: 403, and nothing changed.
        r = bob.post(f"/api/v1/jobs/{job['id']}/cancel")
        assert r.status_code == 403 and r.json()["code"] == "forbidden", r.text
        assert "alice" in r.json()["detail"]
        assert alice.get(f"/api/v1/jobs/{job['id']}").json()["status"] == "queued"
        # The owner may.
        r = alice.post(f"/api/v1/jobs/{job['id']}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
        r = bob.post(f"/api/v1/jobs/{job['id']}/retry")
        assert r.status_code == 403, r.text
        # An admin may act on anyone's job.
        r = root.post(f"/api/v1/jobs/{job['id']}/retry")
        assert r.status_code == 200 and r.json()["status"] == "queued", r.text
        r = root.post(f"/api/v1/jobs/{job['id']}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
        r = alice.post(f"/api/v1/jobs/{job['id']}/retry")
        assert r.status_code == 200 and r.json()["owner"] == "alice", r.text
        # What an admin creates is the admin's; the owner rule applies to it too.
        r = root.post("/api/v1/jobs", json=SPEC)
        assert r.status_code == 201 and r.json()["owner"] == "root"
        assert alice.post(f"/api/v1/jobs/{r.json()['id']}/cancel").status_code == 403


def test_revocation_and_cli(auth_api: str, tokens: dict[str, str]) -> None:
    _, temp = auth.create_token("temp")
    # alice's token is used once here (bob's never), so last_used_at below does not depend on other tests.
    assert httpx.get(f"{auth_api}/api/v1/jobs", headers=bearer(tokens["alice"]), timeout=30).status_code == 200
    with httpx.Client(base_url=auth_api, timeout=30, headers=bearer(temp)) as c:
        assert c.get("/api/v1/jobs").status_code == 200
        r = lowrank("token", "revoke", "temp")
        assert r.returncode == 0 and "revoked token" in r.stdout, r.stderr
        deadline = time.monotonic() + 10  # the API caches verification for LOWRANK_AUTH_CACHE_S=1 s
        while c.get("/api/v1/jobs").status_code != 401:
            assert time.monotonic() < deadline, "a revoked token was still accepted after 10 s"
            time.sleep(0.2)
    listed = lowrank("token", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    import json

    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["temp"]["revoked_at"] is not None and rows["alice"]["revoked_at"] is None
    assert rows["alice"]["last_used_at"] is not None  # used above
    assert not any("token" in r for r in rows.values())  # never the token itself
    # Errors: one line, exit 2.
    for args in (("revoke", "temp"), ("revoke", "nobody-at-all"), ("create", "bad name!")):
        r = lowrank("token", *args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)


def test_loopback_rule_unit() -> None:
    off = Settings(auth="off")
    assert not auth_required(off, {"server": ("127.0.0.1", 8000)})
    assert not auth_required(off, {"server": ("::1", 8000)})
    assert auth_required(off, {"server": ("192.0.2.2", 8000)})
    assert auth_required(off, {"server": None})  # unix socket: could be a proxy's
    assert auth_required(Settings(auth="required"), {"server": ("127.0.0.1", 8000)})
    assert is_loopback_host("127.0.0.5") and not is_loopback_host("0.0.0.0") and not is_loopback_host("example.org")


TEST_ADDRESS = "198.18.0.1"  # RFC 2544 benchmarking range: never routed, safe to put on lo for a test


def _interface_ipv4_addresses() -> list[str]:
    """The primary IPv4 address of each network interface (Linux SIOCGIFADDR), loopback ones left out."""
    import fcntl
    import struct

    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue  # no IPv4 address on this interface
            addr = socket.inet_ntoa(packed[20:24])
            if not is_loopback_host(addr):
                found.append(addr)
    return found


@pytest.fixture
def non_loopback_ipv4(unavailable) -> Iterator[str]:
    """An IPv4 address of this machine that is not loopback: an interface's own, or on a loopback-only
    machine (a CI container) TEST_ADDRESS added to lo for this test (root: `ip addr add`), removed after."""
    found = _interface_ipv4_addresses()
    if found:
        yield found[0]
        return
    cmd = ["ip", "addr", "add", f"{TEST_ADDRESS}/32", "dev", "lo"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        why = r.stderr.strip()
        ok = r.returncode == 0 or "File exists" in why
    except OSError as exc:
        ok, why = False, str(exc)
    if not ok:
        unavailable(f"no non-loopback IPv4 address here, and `{' '.join(cmd)}` failed: {why}")
    try:
        yield TEST_ADDRESS
    finally:
        subprocess.run(["ip", "addr", "del", f"{TEST_ADDRESS}/32", "dev", "lo"], capture_output=True, timeout=10)


def test_non_loopback_bind_requires_auth(service_env: dict[str, str], tmp_path: Path, non_loopback_ipv4: str) -> None:
    """`lowrank api --host 0.0.0.0` with auth off refuses; raw uvicorn on 0.0.0.0 with auth off still
    demands a token from a non-loopback connection, and not from a loopback one."""
    r = lowrank("api", "--host", "0.0.0.0", "--port", "1", env={"LOWRANK_AUTH": "off"})
    assert r.returncode == 2 and "LOWRANK_AUTH=required" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = lowrank("up", "--host", "0.0.0.0", "--port", str(_free_port()), env={"LOWRANK_AUTH": "off"})
    assert r.returncode == 2 and "not a loopback address" in r.stderr, r.stderr
    public = non_loopback_ipv4
    proc, _ = _start_uvicorn("0.0.0.0", "127.0.0.1", {"LOWRANK_AUTH": "off"}, tmp_path / "api.log")
    try:
        port = proc.args[proc.args.index("--port") + 1]
        assert httpx.get(f"http://127.0.0.1:{port}/api/v1/jobs", timeout=10).status_code == 200
        r = httpx.get(f"http://{public}:{port}/api/v1/jobs", timeout=10)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), r.text
        assert httpx.get(f"http://{public}:{port}/healthz", timeout=10).status_code == 200
    finally:
        _stop(proc)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

