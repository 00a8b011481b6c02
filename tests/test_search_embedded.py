"""A search sweep on the embedded default (`lowrank up`: SQLite, Celery's filesystem broker, one worker):
created through the API, run by the worker (each finished trial told and the next asked on SQLite,
where BEGIN IMMEDIATE serializes the tellers), its front read as JSON and CSV and checked against the
jobs' own results."""
from __future__ import annotations

import csv
import io
import signal
import subprocess
import sys
import time

import httpx
import pytest
from test_embedded import clean_env, free_port


@pytest.mark.timeout(300)
def test_search_sweep_on_the_embedded_default(tmp_path):
    port = free_port()
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log:
        up = subprocess.Popen([sys.executable, "-m", "lowrank", "up", "--port", str(port)], cwd=tmp_path,
                              env=clean_env(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and up.poll() is None:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            pytest.fail(f"`lowrank up` not ready (rc={up.poll()}):\n{log_path.read_text()[-4000:]}")
        with httpx.Client(base_url=base, timeout=30) as client:
            body = {"base": {"kind": "approx", "weights": {"source": "gaussian", "m": 32, "d": 16}, "rank": 1},
                    "strategy": "search",
                    "search": {"space": {"rank": {"type": "int", "low": 1, "high": 16},
                                         "method": {"type": "categorical", "choices": ["spectral", "nkp"]}},
                               "objectives": [{"metric": "error", "direction": "minimize"},
                                              {"metric": "params", "direction": "minimize"}],
                               "n_trials": 6, "parallelism": 2}}
            r = client.post("/api/v1/sweeps", json=body)
            assert r.status_code == 201, r.text
            sid = r.json()["id"]
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                sweep = client.get(f"/api/v1/sweeps/{sid}").json()
                if sweep["status"] not in ("queued", "running"):
                    break
                time.sleep(0.5)
            assert sweep["status"] == "succeeded", (sweep, log_path.read_text()[-4000:])
            assert sweep["trials"] == {"running": 0, "complete": 6, "pruned": 0, "failed": 0, "asked": 6, "told": 6,
                                       "n_trials": 6}
            jobs = client.get("/api/v1/jobs", params={"sweep": sid, "limit": 100}).json()["items"]
            assert len(jobs) == 6 and all(j["status"] == "succeeded" for j in jobs)
            values = {j["sweep_point_index"]: (j["result"]["error"], j["result"]["rank"] * 48) for j in jobs}
            front = {a for a in values if not any(
                all(y <= x for x, y in zip(values[a], values[b])) and values[a] != values[b] for b in values)}
            doc = client.get(f"/api/v1/sweeps/{sid}/results", params={"front": "true"}).json()
            assert set(doc["front"]) == front and [r_["number"] for r_ in doc["rows"]] == doc["front"]
            for row in doc["rows"]:
                assert (row["values"]["error"], row["values"]["params"]) == values[row["number"]]
            text = client.get(f"/api/v1/sweeps/{sid}/results", params={"format": "csv"}).text
            rows = list(csv.DictReader(io.StringIO(text)))
            assert [int(r_["number"]) for r_ in rows] == list(range(6))
            assert {int(r_["number"]) for r_ in rows if r_["on_front"] == "true"} == front
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
