"""The embedded default: `lowrank up` in an empty folder with no LOWRANK_* configuration runs on a
SQLite file and Celery's filesystem transport under ./.lowrank/ (no Postgres, no Redis), and one
approximation job goes all the way through it. Also the process commands' refusals.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOWRANK_")}
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


@pytest.mark.timeout(240)
def test_up_embedded_default_runs_a_job(tmp_path):
    port = free_port()
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log:
        up = subprocess.Popen([sys.executable, "-m", "lowrank", "up", "--port", str(port)], cwd=tmp_path,
                              env=clean_env(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        deadline = t0 + 120
        ready = None
        while time.monotonic() < deadline and up.poll() is None:
            try:
                r = httpx.get(f"{base}/readyz", timeout=2)
                if r.status_code == 200:
                    ready = r.json()
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        assert ready is not None, f"`lowrank up` not ready (rc={up.poll()}):\n{log_path.read_text()[-4000:]}"
        startup = time.monotonic() - t0
        home = tmp_path / ".lowrank"
        assert (home / "lowrank.db").is_file() and (home / "broker").is_dir()
        text = log_path.read_text()
        assert "SQLite + filesystem broker under" in text
        # Auth is off by default on loopback, and a start that passed its checks says so.
        assert "lowrank up: authentication is OFF (LOWRANK_AUTH=off)" in text

        with httpx.Client(base_url=base, timeout=30) as client:
            spec = {"kind": "approx", "weights": {"source": "gaussian", "m": 128, "d": 64}, "rank": 8, "method": "nkp"}
            t1 = time.monotonic()
            r = client.post("/api/v1/jobs", json=spec)
            assert r.status_code == 201, r.text
            job_id = r.json()["id"]
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                job = client.get(f"/api/v1/jobs/{job_id}").json()
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(0.2)
            roundtrip = time.monotonic() - t1
            assert job["status"] == "succeeded", (job, log_path.read_text()[-4000:])
            assert 0 < job["result"]["error"] < 1 and job["result"]["rank"] == 8
            (artifact,) = client.get(f"/api/v1/jobs/{job_id}/artifacts").json()
            assert artifact["name"] == "factors.safetensors"
            assert client.get(artifact["url"]).status_code == 200
        assert (home / "artifacts" / job_id / "factors.safetensors").is_file()
        kids = _children(up.pid)
        assert len(kids) == 2  # the API and the worker

        # Ctrl-C: both children stop cleanly and `lowrank up` exits 0.
        up.send_signal(signal.SIGINT)
        rc = up.wait(timeout=60)
        text = log_path.read_text()
        assert rc == 0, text[-4000:]
        assert "lowrank up: api stopped" in text and "lowrank up: worker stopped (exit 0)" in text
        assert not any(Path(f"/proc/{k}").exists() for k in kids)  # exited and reaped
        print(f"\nembedded: up -> ready {startup:.1f} s; submit -> succeeded {roundtrip:.2f} s")
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test_api_refuses_a_database_not_at_head(tmp_path):
    out = subprocess.run([sys.executable, "-m", "lowrank", "api", "--port", str(free_port())], cwd=tmp_path,
                         env=clean_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    db = tmp_path / ".lowrank" / "lowrank.db"
    assert out.stderr.strip().splitlines() == [
        f"error: database sqlite:///{db} is at revision none (empty), head is "
        f"{_head()}: run `lowrank db upgrade` first"]
    # After `lowrank db upgrade` the check passes (the port check comes next: it is taken here).
    up = subprocess.run([sys.executable, "-m", "lowrank", "db", "upgrade"], cwd=tmp_path, env=clean_env(),
                        capture_output=True, text=True, timeout=60)
    assert up.returncode == 0 and f"database at head revision {_head()}" in up.stdout


def test_a_bad_setting_is_one_line_naming_the_variable(tmp_path):
    out = subprocess.run([sys.executable, "-m", "lowrank", "api", "--port", str(free_port())], cwd=tmp_path,
                         env=clean_env(LOWRANK_API_THREADS="many"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: invalid settings: LOWRANK_API_THREADS='many': Input should be a valid integer, unable to parse "
        "string as an integer"]


def test_a_bad_auth_cache_setting_is_one_line_naming_the_variable(tmp_path):
    """LOWRANK_AUTH_CACHE_S is a setting like the others (jobs/settings.py), not read from os.environ."""
    out = subprocess.run([sys.executable, "-m", "lowrank", "api", "--port", str(free_port())], cwd=tmp_path,
                         env=clean_env(LOWRANK_AUTH_CACHE_S="-1"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: invalid settings: LOWRANK_AUTH_CACHE_S='-1': Input should be greater than or equal to 0"]


@pytest.mark.timeout(120)
def test_api_starts_the_configured_number_of_processes(tmp_path):
    """LOWRANK_API_PROCESSES (what compose sets) is the default of `lowrank api --workers`."""
    env = clean_env(LOWRANK_API_PROCESSES="2")
    subprocess.run([sys.executable, "-m", "lowrank", "db", "upgrade"], cwd=tmp_path, env=env, check=True,
                   capture_output=True, timeout=60)
    port = free_port()
    with open(tmp_path / "api.log", "wb") as log:
        api = subprocess.Popen([sys.executable, "-m", "lowrank", "api", "--port", str(port)], cwd=tmp_path, env=env,
                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and api.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            pytest.fail(f"`lowrank api` not ready: {(tmp_path / 'api.log').read_text()[-3000:]}")
        servers = [k for k in _children(api.pid)
                   if "multiprocessing.spawn" in Path(f"/proc/{k}/cmdline").read_text().replace("\0", " ")
                   and "resource_tracker" not in Path(f"/proc/{k}/cmdline").read_text()]
        assert len(servers) == 2, (tmp_path / "api.log").read_text()[-3000:]
    finally:
        api.send_signal(signal.SIGINT)
        try:
            api.wait(30)
        except subprocess.TimeoutExpired:
            api.kill()
            api.wait()


def test_up_refuses_a_busy_port(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "lowrank", "up", "--port", str(port)], cwd=tmp_path,
                             env=clean_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip() == (f"error: --port {port} on 127.0.0.1 is not available (Address already in use); "
                                  f"pick another with --port")


def _head() -> str:
    from jobs.migrate import head_revision

    return head_revision()


def test_demo_sweep_is_twelve_valid_jobs():
    from jobs.sweeps import SweepCreate, expand
    from lowrank.cli.service import DEMO_METHODS, DEMO_RANKS, demo_sweep

    sweep = demo_sweep("demo-x")
    points = expand(SweepCreate(**sweep))  # every demo job is a valid spec (InvalidInput otherwise)
    assert len(points) == len(DEMO_RANKS) * len(DEMO_METHODS) == 12
    assert {(spec.rank, spec.method) for _, spec in points} == {(r, m) for r in (1, 4, 16, 64) for m in ("spectral", "rescale", "nkp")}
    assert sweep["grid"] == {"rank": [1, 4, 16, 64], "method": ["spectral", "rescale", "nkp"]}
