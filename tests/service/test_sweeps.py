"""Sweeps on the real service (Postgres, Redis, uvicorn API, Celery worker): create, results, cancel,
retry-failed, validation with nothing written, idempotency, size limit, early stopping."""
from __future__ import annotations

import csv
import datetime as dt
import io
import statistics
import time
import uuid

import pytest
from sqlalchemy import func, select

from jobs import models as m
from jobs.db import session_scope

TERMINAL = ("succeeded", "failed", "cancelled")


def _approx_base(tag: str, m_: int = 32, d: int = 16) -> dict:
    return {"kind": "approx", "weights": {"source": "gaussian", "m": m_, "d": d}, "rank": 1, "tags": [tag]}


def wait_sweep(client, sweep_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    sweep: dict = {}
    while time.monotonic() < deadline:
        r = client.get(f"/api/v1/sweeps/{sweep_id}")
        assert r.status_code == 200, r.text
        sweep = r.json()
        if sweep["counts"]["queued"] + sweep["counts"]["running"] == 0:
            return sweep
        time.sleep(0.3)
    pytest.fail(f"sweep {sweep_id} unfinished after {timeout} s: {sweep.get('counts')}", pytrace=False)


def _sweep_jobs(client, sweep_id: str) -> list[dict]:
    r = client.get("/api/v1/jobs", params={"sweep": sweep_id, "limit": 1000})
    assert r.status_code == 200, r.text
    return r.json()["items"]


def _db_counts() -> tuple[int, int]:
    with session_scope() as s:
        return s.scalar(select(func.count()).select_from(m.Sweep)), s.scalar(select(func.count()).select_from(m.Job))


@pytest.mark.timeout(180)
def test_approx_sweep_runs_and_results_match_the_jobs(client, worker_process, unique_tag):
    """2 ranks x 2 methods x 2 seeds = 8 jobs; each grid point's row is the mean/std/min/max of its
    two jobs' own result.error; CSV and group_by agree; the list shows the sweep."""
    body = {"name": "ranks x methods", "base": _approx_base(unique_tag),
            "grid": {"rank": [2, 4], "method": ["spectral", "nkp"]}, "seeds": [0, 1]}
    r = client.post("/api/v1/sweeps", json=body)
    assert r.status_code == 201, r.text
    sweep = r.json()
    assert sweep["kind"] == "approx" and sweep["total"] == 8 and sweep["n_points"] == 4
    assert sum(sweep["counts"].values()) == 8 and 0 <= sweep["progress"] <= 1

    done = wait_sweep(client, sweep["id"])
    assert done["status"] == "succeeded" and done["counts"]["succeeded"] == 8 and done["progress"] == 1.0

    jobs = _sweep_jobs(client, sweep["id"])
    assert len(jobs) == 8
    points = {(j["sweep_point"]["rank"], j["sweep_point"]["method"], j["seed"]) for j in jobs}
    assert len(points) == 8  # a unique (grid point, seed) each
    for j in jobs:  # the grid value landed in the spec
        assert j["spec"]["rank"] == j["sweep_point"]["rank"] and j["spec"]["method"] == j["sweep_point"]["method"]
        assert j["spec"]["seed"] == j["seed"] and unique_tag in j["tags"]

    res = client.get(f"/api/v1/sweeps/{sweep['id']}/results")
    assert res.status_code == 200, res.text
    table = res.json()
    assert table["metric"] == "error" and sorted(table["group_by"]) == ["method", "rank"]
    assert len(table["rows"]) == 4
    for row in table["rows"]:
        mine = [j for j in jobs if j["sweep_point"] == row["point"]]
        errs = [j["result"]["error"] for j in mine]
        assert sorted(row["job_ids"]) == sorted(j["id"] for j in mine)
        assert row["n"] == 2
        assert row["mean"] == pytest.approx(statistics.fmean(errs), rel=1e-12)
        assert row["std"] == pytest.approx(statistics.stdev(errs), rel=1e-9, abs=1e-15)
        assert row["min"] == min(errs) and row["max"] == max(errs)
        assert row["params"] == row["point"]["rank"] * (32 + 16)  # U (m x r) and V (r x d) of the 32 x 16 matrix
    by_point = {(r_["point"]["rank"], r_["point"]["method"]): r_ for r_ in table["rows"]}
    # More rank, less error, for each method (the numbers are real approximations).
    for meth in ("spectral", "nkp"):
        assert by_point[(4, meth)]["mean"] < by_point[(2, meth)]["mean"]

    grouped = client.get(f"/api/v1/sweeps/{sweep['id']}/results", params={"group_by": "method"}).json()
    assert [r_["point"] for r_ in grouped["rows"]] == [{"method": "spectral"}, {"method": "nkp"}]
    for row in grouped["rows"]:
        errs = [j["result"]["error"] for j in jobs if j["spec"]["method"] == row["point"]["method"]]
        assert row["n"] == 4 and row["mean"] == pytest.approx(statistics.fmean(errs), rel=1e-12)

    other = client.get(f"/api/v1/sweeps/{sweep['id']}/results", params={"metric": "time_s"}).json()
    assert other["metric"] == "time_s" and all(r_["n"] == 2 and r_["mean"] > 0 for r_ in other["rows"])

    text = client.get(f"/api/v1/sweeps/{sweep['id']}/results", params={"format": "csv"})
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(text.text)))
    assert len(rows) == 4 and set(rows[0]) == {*table["group_by"], "mean", "std", "min", "max", "n", "params",
                                               "params_min", "params_max", "job_ids"}
    for row in rows:
        js = by_point[(int(row["rank"]), row["method"])]
        assert float(row["mean"]) == js["mean"] and int(row["n"]) == 2
        assert sorted(row["job_ids"].split()) == sorted(js["job_ids"])

    listed = client.get("/api/v1/sweeps", params={"limit": 1000}).json()["items"]
    mine = next(s for s in listed if s["id"] == sweep["id"])
    assert mine["counts"]["succeeded"] == 8 and mine["status"] == "succeeded"

    bad = client.get(f"/api/v1/sweeps/{sweep['id']}/results", params={"metric": "nope"})
    assert bad.status_code == 422 and "nope" in bad.text and "error" in bad.text
    bad = client.get(f"/api/v1/sweeps/{sweep['id']}/results", params={"group_by": "rank,weights.d"})
    assert bad.status_code == 422 and "weights.d" in bad.text


def test_bad_grid_point_is_rejected_with_nothing_written(client):
    """rank 32 does not fit a 32 x 16 matrix: 422 names the point; no sweep and no job row written."""
    before = _db_counts()
    body = {"base": _approx_base("bad"), "grid": {"rank": [2, 4, 32], "weights.m": [32, 64]}, "seeds": [0, 1]}
    r = client.post("/api/v1/sweeps", json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["loc"] == ["body", "grid", "rank"]
    assert '"rank": 32' in detail["msg"] and "min(m, d) = 16" in detail["msg"]
    assert _db_counts() == before

    for body, where in [
        ({"base": _approx_base("x"), "grid": {"rnak": [1, 2]}}, "rnak"),                      # unknown field
        ({"base": _approx_base("x"), "grid": {"seed": [1, 2]}}, "seed"),                      # use seeds
        ({"base": _approx_base("x"), "grid": {"rank": []}}, "empty"),
        ({"base": _approx_base("x"), "grid": {"rank": [1, 1]}}, "twice"),
        ({"base": _approx_base("x"), "grid": {"method": ["nkp", "svd"]}}, "svd"),
        ({"base": {**_approx_base("x"), "kind": "nope"}, "grid": {"rank": [1]}}, "base.kind"),
        ({"base": _approx_base("x"), "grid": {"rank": [1]}, "seeds": [0, 0]}, "distinct"),
        ({"base": _approx_base("x"), "grid": {"rank": [1]},
          "early_stopping": {"epochs": [1]}}, "train sweeps"),
    ]:
        r = client.post("/api/v1/sweeps", json=body)
        assert r.status_code == 422, (body, r.text)
        assert where in r.text, (where, r.text)
    assert _db_counts() == before

    # Over the size limit (LOWRANK_MAX_SWEEP_POINTS, default 10,000): 413 naming the setting.
    big = {"base": _approx_base("x"), "grid": {"rank": list(range(1, 102))}, "seeds": list(range(100))}
    r = client.post("/api/v1/sweeps", json=big)
    assert r.status_code == 413, r.text
    assert "LOWRANK_MAX_SWEEP_POINTS" in r.text and "10100" in r.text
    assert _db_counts() == before


def test_idempotency_key_creates_one_sweep(idle_client, unique_tag):
    body = {"name": "idem", "base": _approx_base(unique_tag), "grid": {"rank": [1, 2]}, "seeds": [0, 1, 2]}
    key = f"sweep-{unique_tag}"
    first = idle_client.post("/api/v1/sweeps", json=body, headers={"Idempotency-Key": key})
    again = idle_client.post("/api/v1/sweeps", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 201 and again.status_code == 200, (first.text, again.text)
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert first.json()["id"] == again.json()["id"]
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(m.Sweep).where(m.Sweep.idempotency_key == key)) == 1
        assert s.scalar(select(func.count()).select_from(m.Job).where(m.Job.sweep_id == first.json()["id"])) == 6
    changed = idle_client.post("/api/v1/sweeps", json={**body, "seeds": [0]}, headers={"Idempotency-Key": key})
    assert changed.status_code == 409 and first.json()["id"] in changed.text
    idle_client.post(f"/api/v1/sweeps/{first.json()['id']}/cancel")


def test_sweep_list_pages_newest_first_with_a_cursor(idle_client, unique_tag):
    """Keyset pagination: pages of 2 chained by next_cursor visit every sweep once, newest first;
    our 3 new sweeps come first, in reverse order of creation; a forged cursor is a 422."""
    ids = []
    for i in range(3):
        r = idle_client.post("/api/v1/sweeps", json={"name": f"page {i}", "base": _approx_base(unique_tag),
                                                      "grid": {"rank": [1]}, "seeds": [0]})
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = idle_client.get("/api/v1/sweeps", params=params).json()
        assert len(page["items"]) <= 2
        seen += [(dt.datetime.fromisoformat(sw["created_at"].replace("Z", "+00:00")), uuid.UUID(sw["id"]))
                 for sw in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    with session_scope() as s:
        total = s.scalar(select(func.count()).select_from(m.Sweep))
    assert len(seen) == len({sid for _, sid in seen}) == total and pages == -(-total // 2)
    assert seen == sorted(seen, reverse=True)
    assert [str(sid) for _, sid in seen[:3]] == ids[::-1]
    r = idle_client.get("/api/v1/sweeps", params={"cursor": "not-a-cursor"})
    assert r.status_code == 422 and "cursor" in r.text
    for sid in ids:
        idle_client.post(f"/api/v1/sweeps/{sid}/cancel")


def test_cancel_then_retry_cancelled(idle_client, unique_tag):
    """No worker consumes the idle API's queues: the jobs stay queued, cancel makes them all cancelled,
    retry-failed?include_cancelled puts them back in the queue."""
    r = idle_client.post("/api/v1/sweeps", json={"base": _approx_base(unique_tag), "grid": {"rank": [1, 2, 3]}})
    sweep = r.json()
    assert r.status_code == 201 and sweep["status"] == "queued" and sweep["counts"]["queued"] == 3
    c = idle_client.post(f"/api/v1/sweeps/{sweep['id']}/cancel").json()
    assert c["status"] == "cancelled" and c["counts"]["cancelled"] == 3 and c["progress"] == 1.0
    assert c["cancel_requested"] is True
    # retry-failed alone touches failed jobs only: none here.
    same = idle_client.post(f"/api/v1/sweeps/{sweep['id']}/retry-failed").json()
    assert same["counts"]["cancelled"] == 3
    back = idle_client.post(f"/api/v1/sweeps/{sweep['id']}/retry-failed", params={"include_cancelled": True}).json()
    assert back["counts"]["queued"] == 3 and back["status"] == "queued" and back["cancel_requested"] is False
    idle_client.post(f"/api/v1/sweeps/{sweep['id']}/cancel")
    assert idle_client.get("/api/v1/sweeps/00000000-0000-0000-0000-000000000000").status_code == 404


@pytest.mark.timeout(180)
def test_retry_failed_reruns_only_the_failed_jobs(client, worker_process, wait_job, unique_tag):
    """A grid over model layers where one layer name does not exist: its jobs really fail on the worker
    (the layer is only known once the model is built). retry-failed re-queues exactly those (same ids,
    attempts restarted); they fail again for the same reason, the others are left alone."""
    base = {"kind": "approx", "weights": {"source": "model_layer", "model": "resnet18", "layer": "conv1"},
            "rank": 2, "method": "spectral", "tags": [unique_tag]}
    r = client.post("/api/v1/sweeps", json={"base": base, "grid": {"weights.layer": ["conv1", "layer9.nope"]},
                                            "seeds": [0, 1]})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    done = wait_sweep(client, sid)
    assert done["counts"] == {"queued": 0, "running": 0, "succeeded": 2, "failed": 2, "cancelled": 0}
    assert done["status"] == "failed"
    jobs = {j["id"]: j for j in _sweep_jobs(client, sid)}
    failed = sorted(i for i, j in jobs.items() if j["status"] == "failed")
    assert all(jobs[i]["sweep_point"]["weights.layer"] == "layer9.nope" for i in failed)

    back = client.post(f"/api/v1/sweeps/{sid}/retry-failed")
    assert back.status_code == 200, back.text
    assert back.json()["counts"]["succeeded"] == 2 and back.json()["counts"]["failed"] == 0
    for i in failed:
        again = wait_job(client, i, timeout=60)
        assert again["status"] == "failed" and again["attempts"] == 1 and "layer9.nope" in again["error"]
    after = {j["id"]: j for j in _sweep_jobs(client, sid)}
    for i, j in jobs.items():
        if j["status"] == "succeeded":
            assert after[i]["finished_at"] == j["finished_at"]  # not re-run
    table = client.get(f"/api/v1/sweeps/{sid}/results").json()
    rows = {r_["point"]["weights.layer"]: r_ for r_ in table["rows"]}
    assert rows["conv1"]["n"] == 2 and rows["layer9.nope"]["n"] == 0 and rows["layer9.nope"]["mean"] is None
    assert len(rows["layer9.nope"]["job_ids"]) == 2


def _es_base(tag: str) -> dict:
    return {"kind": "train", "model": "resnet18", "dataset": "synthetic", "rank": 4, "init": "nkp",
            "include": ["layer1.0.conv1"], "epochs": 2, "batch_size": 32, "synthetic_train_size": 128,
            "synthetic_val_size": 32, "lr": 0.01, "schedule": "constant", "log_every": 1, "tags": [tag],
            "small_input": False}  # the standard stem: 32 px would get the small one, 16x the compute


@pytest.mark.timeout(420)
def test_early_stopping_cancels_the_worse_points(client, worker_process, unique_tag):
    """Successive halving on a train sweep, judged by the worker after each epoch's metrics. The metric
    is the learning rate recorded at epoch ends (a constant schedule), so which points are worse is
    known in advance: lower lr is better (mode=min). One worker runs the 3 points in order; with
    min_points=1 each point is judged on reaching epoch 1 against all values so far, keeping the best
    half: point lr=0.01 is kept and trains both epochs, lr=0.02 and 0.04 are each worse than the
    ceil(n/2)-th best when they arrive, and are cancelled during epoch 2."""
    base = _es_base(unique_tag)
    rule = {"metric": "lr", "mode": "min", "epochs": [1], "keep": 0.5, "min_points": 1}
    r = client.post("/api/v1/sweeps", json={"name": "es", "base": base, "grid": {"lr": [0.01, 0.02, 0.04]},
                                            "early_stopping": rule})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    done = wait_sweep(client, sid, timeout=360)
    jobs = {j["sweep_point"]["lr"]: j for j in _sweep_jobs(client, sid)}
    assert jobs[0.01]["status"] == "succeeded" and jobs[0.01]["result"]["epochs"] == 2
    for lr in (0.02, 0.04):
        assert jobs[lr]["status"] == "cancelled", (lr, jobs[lr]["status"], jobs[lr]["error"])
        series = {s["name"]: s for s in client.get(f"/api/v1/jobs/{jobs[lr]['id']}/metrics").json()["series"]}
        assert len(series["val_top1"]["steps"]) == 1  # stopped in epoch 2, before its end
        assert 1.0 in series["epoch"]["values"] and "val_top1" in series  # it did reach the milestone
    decisions = done["early_stopping"]["decisions"]["1"]
    assert decisions["decided"] == {"0": "kept", "1": "stopped", "2": "stopped"}
    assert decisions["values"]["0"] == pytest.approx(0.01) and decisions["values"]["2"] == pytest.approx(0.04)
    assert done["status"] == "succeeded" and done["counts"]["cancelled"] == 2
    table = client.get(f"/api/v1/sweeps/{sid}/results").json()
    assert table["metric"] == "val_top1"
    kept = next(r_ for r_ in table["rows"] if r_["point"] == {"lr": 0.01})
    assert kept["n"] == 1 and kept["mean"] == pytest.approx(jobs[0.01]["result"]["val_top1"])
    assert kept["params"] == jobs[0.01]["result"]["params_factored"]
    assert all(r_["n"] == 0 for r_ in table["rows"] if r_["point"] != {"lr": 0.01})


@pytest.mark.timeout(400)
def test_early_stopping_default_waits_for_every_point(client, worker_process, unique_tag):
    """The default rule (no min_points: synchronous successive halving) judges a milestone only once
    every point has a value there. One worker runs the points in order, so points lr=0.01 and 0.02
    finish both epochs before lr=0.04 reaches epoch 1; then all three are compared at once, the best
    ceil(0.5 * 3) = 2 are kept and lr=0.04 is cancelled during its epoch 2. (With min_points=1, as
    above, lr=0.02 would have been stopped on arrival.)"""
    rule = {"metric": "lr", "mode": "min", "epochs": [1], "keep": 0.5}
    r = client.post("/api/v1/sweeps", json={"name": "es-sync", "base": _es_base(unique_tag),
                                            "grid": {"lr": [0.01, 0.02, 0.04]}, "early_stopping": rule})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    done = wait_sweep(client, sid, timeout=360)
    jobs = {j["sweep_point"]["lr"]: j for j in _sweep_jobs(client, sid)}
    for lr in (0.01, 0.02):
        assert jobs[lr]["status"] == "succeeded" and jobs[lr]["result"]["epochs"] == 2, (lr, jobs[lr]["error"])
    assert jobs[0.04]["status"] == "cancelled", (jobs[0.04]["status"], jobs[0.04]["error"])
    series = {s["name"]: s for s in client.get(f"/api/v1/jobs/{jobs[0.04]['id']}/metrics").json()["series"]}
    assert len(series["val_top1"]["steps"]) == 1  # reached the milestone, stopped before epoch 2 ended
    decisions = done["early_stopping"]["decisions"]["1"]
    assert decisions["decided"] == {"0": "kept", "1": "kept", "2": "stopped"}
    assert sorted(decisions["values"].values()) == pytest.approx([0.01, 0.02, 0.04])
    assert done["counts"] == {**done["counts"], "succeeded": 2, "cancelled": 1}
