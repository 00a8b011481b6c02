"""Search sweeps on the real service (Postgres, Redis, uvicorn API, Celery workers): a multi-objective
search with a worker killed mid-job (every trial told exactly once, the front recomputed by brute force
from the jobs' own results), a single-objective search with seeds averaged, validation 422s with
nothing written, an API that died before sending its first trials, finished jobs told by the reaper,
concurrent tellers, pruning of train trials, the SDK and the CLI."""
from __future__ import annotations

import csv
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from jobs import models as m
from jobs.db import session_scope

pytestmark = pytest.mark.service
REPO = Path(__file__).resolve().parents[2]
TERMINAL = ("succeeded", "failed", "cancelled")


def _approx_base(tag: str, m_: int = 64, d: int = 32, **extra) -> dict:
    return {"kind": "approx", "weights": {"source": "gaussian", "m": m_, "d": d}, "rank": 1, "tags": [tag], **extra}


def _search(space: dict, objectives: list, n_trials: int, parallelism: int, **extra) -> dict:
    return {"space": space, "objectives": [{"metric": k, "direction": d} for k, d in objectives],
            "n_trials": n_trials, "parallelism": parallelism, **extra}


RANK_METHOD = {"rank": {"type": "int", "low": 1, "high": 32},
               "method": {"type": "categorical", "choices": ["spectral", "nkp"]}}


def wait_search(client, sweep_id: str, timeout: float = 240.0, on_poll=None) -> dict:
    deadline = time.monotonic() + timeout
    sweep: dict = {}
    while time.monotonic() < deadline:
        r = client.get(f"/api/v1/sweeps/{sweep_id}")
        assert r.status_code == 200, r.text
        sweep = r.json()
        if on_poll is not None:
            on_poll(sweep)
        if sweep["status"] not in ("queued", "running"):
            return sweep
        time.sleep(0.3)
    pytest.fail(f"search {sweep_id} unfinished after {timeout} s: {sweep.get('trials')} {sweep.get('counts')}",
                pytrace=False)


def db_trials(sweep_id: str) -> list[dict]:
    with session_scope() as s:
        rows = s.scalars(select(m.SearchTrial).where(m.SearchTrial.sweep_id == uuid.UUID(sweep_id))
                         .order_by(m.SearchTrial.number))
        return [{"number": t.number, "state": t.state, "point": t.point, "values": t.values, "told_at": t.told_at,
                 "asked_at": t.created_at, "reason": t.reason, "pruned_at": t.pruned_at,
                 "intermediate": t.intermediate} for t in rows]


def db_jobs(sweep_id: str) -> list[dict]:
    with session_scope() as s:
        rows = s.scalars(select(m.Job).where(m.Job.sweep_id == uuid.UUID(sweep_id))
                         .order_by(m.Job.sweep_point_index, m.Job.seed))
        return [{"id": str(j.id), "number": j.sweep_point_index, "seed": j.seed, "status": j.status, "result": j.result,
                 "attempts": j.attempts, "worker": j.worker, "point": j.sweep_point, "spec": j.spec} for j in rows]


class ToldOnce:
    """Watches the trial rows while a search runs: once a trial is told, its state, values and told_at
    never change again (a second tell would rewrite told_at)."""

    def __init__(self, sweep_id: str) -> None:
        self.sweep_id, self.first = sweep_id, {}

    def check(self, _sweep: dict | None = None) -> None:
        for t in db_trials(self.sweep_id):
            if t["told_at"] is None:
                continue
            seen = self.first.setdefault(t["number"], (t["state"], t["values"], t["told_at"]))
            assert (t["state"], t["values"], t["told_at"]) == seen, f"trial {t['number']} told again: {seen} -> {t}"


def brute_front(values: dict[int, list[float]], directions: list[str]) -> set[int]:
    """The non-dominated trials by definition, every pair compared (no shared code with the service)."""
    signs = [1 if d == "minimize" else -1 for d in directions]
    v = {n: [s * x for s, x in zip(signs, vals)] for n, vals in values.items()}
    return {a for a in v if not any(all(y <= x for x, y in zip(v[a], v[b])) and any(y < x for x, y in zip(v[a], v[b]))
                                    for b in v if b != a)}


def max_overlap(trials: list[dict]) -> int:
    """Most trials between their ask and their tell at one time (a tell before an ask at the same time)."""
    events = sorted([(t["asked_at"], 1) for t in trials] + [(t["told_at"], -1) for t in trials if t["told_at"]],
                    key=lambda e: (e[0], e[1]))
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


# ------------------------------------------------------------------------------------------ multi-objective

@pytest.mark.timeout(420)
def test_search_with_a_killed_worker_tells_every_trial_once(spawn_api, spawn_worker, service_env, unique_tag):
    """error min x rank min over rank in [1, 32] x method in {spectral, nkp}: 12 trials, 2 at once, on a
    private queue prefix. Worker A is killed (SIGKILL, its whole process group) while it runs a job of
    the sweep; worker B's reaper re-queues that job (stale after 10 s), B runs it once more and the
    search finishes. Every trial is told exactly once (told_at and values never change once set; told
    trials = asked = 12 = succeeded jobs, one job each); at most 2 trials were between ask and tell at
    any time; each trial's values are its job's result; the front is the brute-force non-dominated set
    of the jobs' results, as JSON and CSV."""
    prefix = f"{service_env['LOWRANK_QUEUE_PREFIX']}kill{uuid.uuid4().hex[:6]}."
    env = {"LOWRANK_QUEUE_PREFIX": prefix}
    api = spawn_api(env=env)
    worker_a = spawn_worker(env=env, name=f"killme-{uuid.uuid4().hex[:6]}@localhost")
    import httpx

    with httpx.Client(base_url=api.url, timeout=30) as client:
        # ~1 s of Monte Carlo per job: long enough to kill a worker inside one.
        body = {"name": "kill", "base": _approx_base(unique_tag, mc_samples=150_000), "strategy": "search",
                "search": _search(RANK_METHOD, [("error", "minimize"), ("rank", "minimize")], 12, 2)}
        r = client.post("/api/v1/sweeps", json=body)
        assert r.status_code == 201, r.text
        sweep = r.json()
        sid = sweep["id"]
        assert sweep["strategy"] == "search" and sweep["trials"]["asked"] == 2 and sweep["total"] == 12
        watch = ToldOnce(sid)

        victim = None
        deadline = time.monotonic() + 120
        while victim is None and time.monotonic() < deadline:
            victim = next((j for j in db_jobs(sid) if j["status"] == "running"
                           and (j["worker"] or "").startswith(worker_a.name)), None)
            watch.check()
            time.sleep(0.05)
        assert victim is not None, worker_a.logs()[-3000:]
        worker_a.kill()
        worker_a.proc.wait(10)
        spawn_worker(env=env)

        done = wait_search(client, sid, on_poll=watch.check)
        watch.check()
        assert done["status"] == "succeeded", done
        assert done["trials"] == {"running": 0, "complete": 12, "pruned": 0, "failed": 0, "asked": 12, "told": 12,
                                  "n_trials": 12}
        assert done["progress"] == 1.0

        trials, jobs = db_trials(sid), db_jobs(sid)
        assert [t["number"] for t in trials] == list(range(12)) and len(watch.first) == 12
        assert len(jobs) == 12 and sorted(j["number"] for j in jobs) == list(range(12))
        assert all(j["status"] == "succeeded" for j in jobs)
        killed = next(j for j in jobs if j["id"] == victim["id"])
        assert killed["attempts"] == 2 and not killed["worker"].startswith(worker_a.name)  # re-run once, elsewhere
        assert max_overlap(trials) <= 2
        # Points are distinct (a repeat would rerun the same job) and inside the space.
        assert len({json.dumps(t["point"], sort_keys=True) for t in trials}) == 12
        for t in trials:
            assert 1 <= t["point"]["rank"] <= 32 and t["point"]["method"] in ("spectral", "nkp")

        by_number = {j["number"]: j for j in jobs}
        values = {}
        for t in trials:
            job = by_number[t["number"]]
            assert job["point"] == t["point"] and job["spec"]["rank"] == t["point"]["rank"]
            assert job["spec"]["method"] == t["point"]["method"]
            values[t["number"]] = [job["result"]["error"], job["result"]["rank"]]
            assert t["values"] == values[t["number"]]
        expected_front = brute_front(values, ["minimize", "minimize"])

        doc = client.get(f"/api/v1/sweeps/{sid}/results").json()
        assert doc["strategy"] == "search" and doc["counts"]["complete"] == 12
        assert {r["number"] for r in doc["rows"] if r["on_front"]} == expected_front == set(doc["front"])
        front_doc = client.get(f"/api/v1/sweeps/{sid}/results", params={"front": "true"}).json()
        assert [r["number"] for r in front_doc["rows"]] == doc["front"]
        errors = [r["values"]["error"] for r in front_doc["rows"]]
        assert errors == sorted(errors)  # best first by the first objective
        for r in front_doc["rows"]:
            assert r["values"] == {"error": values[r["number"]][0], "rank": values[r["number"]][1]}
            assert r["job_ids"] == [by_number[r["number"]]["id"]]
        text = client.get(f"/api/v1/sweeps/{sid}/results", params={"front": "true", "format": "csv"}).text
        rows = list(csv.DictReader(io.StringIO(text)))
        assert [int(r["number"]) for r in rows] == doc["front"]
        assert set(rows[0]) == {"number", "state", "method", "rank", "error", "on_front", "n", "job_ids", "reason"}
        for r in rows:
            assert float(r["error"]) == values[int(r["number"])][0] and r["on_front"] == "true"


# ------------------------------------------------------------------------------------------ one objective

@pytest.mark.timeout(300)
def test_single_objective_search_averages_seeds_and_reports_the_best(client, worker_process, unique_tag):
    """Minimize error over rank in [1, 8] x method in 3 choices with seeds [0, 1]: 8 trials, 3 at once.
    Each trial runs one job per seed and its value is their mean; the best trial (the front of one
    objective) is the minimum over trials of that mean, recomputed from the jobs."""
    space = {"rank": {"type": "int", "low": 1, "high": 8},
             "method": {"type": "categorical", "choices": ["spectral", "nkp", "rescale"]}}
    r = client.post("/api/v1/sweeps", json={"base": _approx_base(unique_tag, 32, 16), "strategy": "search",
                                            "seeds": [0, 1],
                                            "search": _search(space, [("error", "minimize")], 8, 3, seed=7)})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    assert r.json()["total"] == 16 and r.json()["trials"]["asked"] == 3
    watch = ToldOnce(sid)
    done = wait_search(client, sid, on_poll=watch.check)
    assert done["status"] == "succeeded" and done["trials"]["complete"] == 8
    jobs = db_jobs(sid)
    assert len(jobs) == 16
    means = {}
    for n in range(8):
        mine = [j for j in jobs if j["number"] == n]
        assert sorted(j["seed"] for j in mine) == [0, 1] and all(j["status"] == "succeeded" for j in mine)
        means[n] = statistics.fmean(j["result"]["error"] for j in mine)
    trials = db_trials(sid)
    for t in trials:
        assert t["values"] == [pytest.approx(means[t["number"]], rel=1e-12)]
    best = min(means.values())
    doc = client.get(f"/api/v1/sweeps/{sid}/results", params={"front": "true"}).json()
    assert {r_["number"] for r_ in doc["rows"]} == {n for n, v in means.items() if v == best}
    assert doc["rows"][0]["values"]["error"] == pytest.approx(best, rel=1e-12) and doc["rows"][0]["n"] == 2
    assert max_overlap(trials) <= 3

    from lowrank.client import Client

    with Client(client.base_url.__str__()) as c:
        front = c.front(sid[:8])
        assert front[0]["error"] == pytest.approx(best, rel=1e-12) and front[0]["number"] == doc["rows"][0]["number"]
        assert set(front[0]) >= {"number", "rank", "method", "error", "job_ids"}
        assert len(c.results(sid)) == 8
        assert c.wait_sweep(sid, timeout=10)["status"] == "succeeded"

    # A search sweep's results are its trials: the grid's parameters are refused; retries are refused.
    bad = client.get(f"/api/v1/sweeps/{sid}/results", params={"metric": "error"})
    assert bad.status_code == 422 and "grid sweeps" in bad.text
    r = client.post(f"/api/v1/sweeps/{sid}/retry-failed")
    assert r.status_code == 409 and "search sweep" in r.text
    r = client.post(f"/api/v1/jobs/{jobs[0]['id']}/retry")
    assert r.status_code == 409 and "told to the sampler" in r.text


# ------------------------------------------------------------------------------------------ validation

def _counts() -> tuple[int, int, int]:
    with session_scope() as s:
        return (s.scalar(select(func.count()).select_from(m.Sweep)), s.scalar(select(func.count()).select_from(m.Job)),
                s.scalar(select(func.count()).select_from(m.SearchTrial)))


OBJ = [{"metric": "error", "direction": "minimize"}]


@pytest.mark.parametrize("search, where, words", [
    ({"space": {"rank": {"type": "int", "low": 8, "high": 2}}, "objectives": OBJ, "n_trials": 4},
     ["body", "search", "space", "rank", "int"], "must be >= low"),
    ({"space": {"rank": {"type": "int", "low": 0, "high": 8, "log": True}}, "objectives": OBJ, "n_trials": 4},
     ["body", "search", "space", "rank", "int"], "log scale needs low >= 1"),
    ({"space": {"rnak": {"type": "int", "low": 1, "high": 8}}, "objectives": OBJ, "n_trials": 4},
     ["body", "search", "space", "rnak"], "did you mean 'rank'"),
    ({"space": {"seed": {"type": "int", "low": 1, "high": 8}}, "objectives": OBJ, "n_trials": 4},
     ["body", "search", "space"], "use `seeds`"),
    ({"space": {"method": {"type": "categorical", "choices": ["nkp", "nkp"]}}, "objectives": OBJ, "n_trials": 1},
     ["body", "search", "space", "method", "categorical", "choices"], "twice"),
    ({"space": {"method": {"type": "categorical", "choices": ["nkp", "svd"]}}, "objectives": OBJ, "n_trials": 2},
     ["body", "search", "space", "method"], "'svd'"),
    ({"space": {"rank": {"type": "int", "low": 1, "high": 64}}, "objectives": OBJ, "n_trials": 4},
     ["body", "search", "space", "rank"], "min(m, d) = 32"),
    ({"space": {"rank": {"type": "int", "low": 1, "high": 8}}, "objectives": [{"metric": "eror", "direction": "minimize"}],
      "n_trials": 4}, ["body", "search", "objectives", 0, "metric"], "did you mean 'error'"),
    ({"space": {"rank": {"type": "int", "low": 1, "high": 8}}, "objectives": OBJ * 2, "n_trials": 4},
     ["body", "search", "objectives"], "twice"),
    ({"space": {"rank": {"type": "int", "low": 1, "high": 8}}, "objectives": OBJ, "n_trials": 4, "parallelism": 5},
     ["body", "search"], "parallelism (5) must be <= n_trials (4)"),
    ({"space": {"rank": {"type": "int", "low": 1, "high": 8}}, "objectives": OBJ, "n_trials": 9},
     ["body", "search", "n_trials"], "more than the 8 points"),
    ({"space": {"rank": {"type": "int", "low": 1, "high": 8}}, "objectives": OBJ, "n_trials": 4, "sampler": "nsga2"},
     ["body", "search"], "nsga2 is for several objectives"),
    ({"space": {"rank": {"type": "int", "low": 1, "high": 8}}, "objectives": OBJ, "n_trials": 4,
      "pruner": {"metric": "val_top1"}}, ["body", "search", "pruner"], "train sweeps only"),
    ({"space": {"rank": {"type": "int", "low": 1, "high": 8}}, "objectives": OBJ, "n_trials": 4,
      "pruner": {"metric": "params"}}, ["body", "search", "pruner", "metric"], "recorded at epoch ends"),
    ({"space": {"rank": {"type": "float", "low": 0.5, "high": 1.0, "step": 0.3}}, "objectives": OBJ, "n_trials": 2},
     ["body", "search", "space", "rank", "float"], "multiple of step"),
])
def test_search_validation_422_names_the_field(idle_client, search, where, words):
    """Each mistake is a 422 whose loc names the field and whose message says what is allowed; nothing
    is written."""
    before = _counts()
    r = idle_client.post("/api/v1/sweeps", json={"base": _approx_base("v"), "strategy": "search", "search": search})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["loc"][:len(where)] == where, detail
    assert words in detail["msg"], detail
    assert _counts() == before


def test_search_request_shape_errors(idle_client):
    before = _counts()
    base = _approx_base("v")
    search = _search({"rank": {"type": "int", "low": 1, "high": 8}}, [("error", "minimize")], 4, 2)
    for body, words in [
        ({"base": base, "strategy": "search"}, "needs `search`"),
        ({"base": base, "strategy": "search", "search": search, "grid": {"rank": [1, 2]}}, "has no grid"),
        ({"base": base, "search": search}, "needs strategy 'search'"),
        ({"base": {**base, "kind": "train", "model": "resnet18", "dataset": "digits"}, "strategy": "search",
          "search": search, "early_stopping": {"epochs": [1]}}, "search.pruner"),
    ]:
        r = idle_client.post("/api/v1/sweeps", json=body)
        assert r.status_code == 422 and words in r.text, (body, r.text)
    space = {"weights.d": {"type": "int", "low": 16, "high": 32}, "mc_samples": {"type": "int", "low": 0, "high": 10**5}}
    big = {"base": base, "strategy": "search", "seeds": list(range(20)),
           "search": _search(space, [("error", "minimize")], 600, 2)}
    r = idle_client.post("/api/v1/sweeps", json=big)
    assert r.status_code == 413 and "LOWRANK_MAX_SWEEP_POINTS" in r.text and "12000" in r.text
    assert _counts() == before
    # A grid sweep's results take no front.
    g = idle_client.post("/api/v1/sweeps", json={"base": base, "grid": {"rank": [1]}}).json()
    r = idle_client.get(f"/api/v1/sweeps/{g['id']}/results", params={"front": "true"})
    assert r.status_code == 422 and "search sweeps" in r.text
    idle_client.post(f"/api/v1/sweeps/{g['id']}/cancel")


def test_invalid_points_are_told_failed_and_a_cancelled_job_fails_its_trial(idle_client, unique_tag):
    """rank in [1, 16] x weights.d in {8, 32} on a 64-row matrix passes the submit check (every value is
    valid with some other), but rank > 8 with d = 8 is not a job spec. With n_trials = the space's 32
    points, all asked at once: the 8 invalid points are told failed at once with the validation message
    and run nothing; the 24 others are running with one job each. Cancelling one of those jobs tells
    its trial failed ("cancelled"), once, and asks nothing (the budget is spent)."""
    from jobs import search

    space = {"rank": {"type": "int", "low": 1, "high": 16},
             "weights.d": {"type": "categorical", "choices": [8, 32]}}
    r = idle_client.post("/api/v1/sweeps", json={"base": _approx_base(unique_tag), "strategy": "search",
                                                 "search": _search(space, [("error", "minimize")], 32, 32)})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    try:
        assert r.json()["trials"] == {"running": 24, "complete": 0, "pruned": 0, "failed": 8, "asked": 32,
                                      "told": 8, "n_trials": 32}
        trials, jobs = db_trials(sid), db_jobs(sid)
        bad = [t for t in trials if t["point"]["weights.d"] == 8 and t["point"]["rank"] > 8]
        assert len(bad) == 8 and all(t["state"] == "failed" for t in bad)
        assert all(t["reason"].startswith("not a valid approx job spec: rank: ") and "min(m, d) = 8" in t["reason"]
                   for t in bad)
        assert {j["number"] for j in jobs} == {t["number"] for t in trials} - {t["number"] for t in bad}
        victim = jobs[0]
        assert idle_client.post(f"/api/v1/jobs/{victim['id']}/cancel").json()["status"] == "cancelled"
        assert search.advance(sid) == [] and search.advance(sid) == []
        told = next(t for t in db_trials(sid) if t["number"] == victim["number"])
        assert told["state"] == "failed" and told["reason"] == f"job {victim['id'][:8]} (seed 0) was cancelled"
        doc = idle_client.get(f"/api/v1/sweeps/{sid}/results").json()
        assert doc["counts"] == {"running": 23, "complete": 0, "pruned": 0, "failed": 9} and doc["front"] == []
    finally:
        idle_client.post(f"/api/v1/sweeps/{sid}/cancel")


def test_idempotency_key_creates_one_search(idle_client, unique_tag):
    """The same key and body: the same sweep (200, replayed), its first trials asked once; another body: 409."""
    body = {"base": _approx_base(unique_tag), "strategy": "search",
            "search": _search(RANK_METHOD, [("error", "minimize")], 6, 2)}
    key = f"search-{unique_tag}"
    first = idle_client.post("/api/v1/sweeps", json=body, headers={"Idempotency-Key": key})
    again = idle_client.post("/api/v1/sweeps", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 201 and again.status_code == 200, (first.text, again.text)
    assert again.headers.get("Idempotent-Replayed") == "true" and again.json()["id"] == first.json()["id"]
    sid = first.json()["id"]
    assert len(db_trials(sid)) == 2 and len(db_jobs(sid)) == 2
    other = {**body, "search": {**body["search"], "n_trials": 7}}
    r = idle_client.post("/api/v1/sweeps", json=other, headers={"Idempotency-Key": key})
    assert r.status_code == 409 and sid in r.text
    idle_client.post(f"/api/v1/sweeps/{sid}/cancel")


# ------------------------------------------------------------------------------------------ restarts

@pytest.mark.timeout(300)
def test_api_killed_before_sending_and_jobs_finished_without_a_tell(spawn_api, spawn_worker, service_env,
                                                                    finish_job, unique_tag):
    """An API whose broker is down stores the sweep and its first two trials but cannot send their jobs,
    and is then killed (SIGKILL). Both jobs are recorded by hand as a worker would (one succeeded, one
    failed) and nobody tells them (a worker killed between recording and telling). Only a worker's
    reaper can go on: a worker started later (reaper every 2 s) tells both (the failed one as failed,
    with its error), asks the other four trials, sends their jobs, and a second API shows the search
    finished: nothing lost, nothing doubled."""
    prefix = f"{service_env['LOWRANK_QUEUE_PREFIX']}rst{uuid.uuid4().hex[:6]}."
    import httpx

    dead_broker = spawn_api(env={"LOWRANK_QUEUE_PREFIX": prefix, "LOWRANK_BROKER_URL": "redis://127.0.0.1:1/0"},
                            ready_path="/healthz")
    space = {"rank": {"type": "int", "low": 1, "high": 16},
             "method": {"type": "categorical", "choices": ["spectral", "nkp"]}}
    body = {"base": _approx_base(unique_tag, 32, 16), "strategy": "search",
            "search": _search(space, [("error", "minimize"), ("params", "minimize")], 6, 2)}
    r = httpx.post(f"{dead_broker.url}/api/v1/sweeps", json=body, timeout=60)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    dead_broker.kill()
    jobs = db_jobs(sid)
    assert len(jobs) == 2 and all(j["status"] == "queued" for j in jobs)
    first, second = jobs
    written = {"error": 0.25, "time_s": 0.01, "iterations": 1, "m": 32, "d": 16,
               "rank": first["point"]["rank"], "method": first["point"]["method"], "device": "cpu"}
    finish_job(first["id"], written)
    finish_job(second["id"], error="RuntimeError: out of memory\n(traceback)")

    env = {"LOWRANK_QUEUE_PREFIX": prefix}
    spawn_worker(env=env)
    api = spawn_api(env=env)
    with httpx.Client(base_url=api.url, timeout=30) as client:
        watch = ToldOnce(sid)
        done = wait_search(client, sid, timeout=180, on_poll=watch.check)
        assert done["status"] == "succeeded" and done["trials"]["told"] == 6 and done["trials"]["asked"] == 6
        assert done["trials"]["failed"] == 1 and done["trials"]["complete"] == 5
        trials = db_trials(sid)
        assert trials[0]["state"] == "complete" and trials[0]["values"] == [0.25, first["point"]["rank"] * (32 + 16)]
        assert trials[1]["state"] == "failed" and trials[1]["values"] is None
        assert trials[1]["reason"] == f"job {second['id'][:8]} (seed 0) failed: RuntimeError: out of memory"
        jobs = db_jobs(sid)
        assert len(jobs) == 6 and [j["status"] for j in jobs] == ["succeeded", "failed"] + ["succeeded"] * 4
        assert all(j["attempts"] == 1 for j in jobs)  # each ran once (the hand-written ones count their claim)
        doc = client.get(f"/api/v1/sweeps/{sid}/results").json()
        values = {t["number"]: t["values"] for t in trials if t["state"] == "complete"}
        assert set(doc["front"]) == brute_front(values, ["minimize", "minimize"])
        failed_row = next(r_ for r_ in doc["rows"] if r_["number"] == 1)
        assert failed_row["state"] == "failed" and not failed_row["on_front"] and "out of memory" in failed_row["reason"]


def _run_threads(fns: list) -> list[str]:
    """Run the functions in threads released at once; the errors they raised (repr)."""
    start, errors = threading.Barrier(len(fns)), []

    def run(fn) -> None:
        start.wait()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - a thread's error is collected and asserted on
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(fn,)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return errors


@pytest.mark.timeout(300)
def test_concurrent_tellers_ask_each_trial_once(scratch_database, environment, finish_job, unique_tag):
    """The sweep row lock serializes ask-and-tell. (1) Eight threads advance the search at the same moment
    after its three running trials finished: three are told, three new ones asked (numbers 3-5), none
    fails, and a later advance changes nothing (no trial told twice). (2) Four rounds in which three
    threads each record their own trial's job and advance at once, as three workers finishing together
    do: each sees a different set of finished trials; every thread succeeds and each round tells three
    and asks three (without the lock two of them ask the same trial number, and one fails with its tell
    rolled back). A private database: no worker's reaper advances this search meanwhile."""
    from jobs import migrate, search, sweeps

    url = scratch_database()
    migrate.upgrade(url)
    with environment({"LOWRANK_DATABASE_URL": url}):
        req = sweeps.SweepCreate(base=_approx_base(unique_tag, 64, 32), strategy="search", search=_search(
            {"rank": {"type": "int", "low": 1, "high": 32}}, [("error", "minimize")], 18, 3))
        rec, created, first = sweeps.create_sweep(req)
        sid = rec.id
        assert created and len(first) == 3

        def record(job: dict) -> None:
            finish_job(job["id"], {"error": 1 / (1 + job["point"]["rank"]), "rank": job["point"]["rank"],
                                   "m": 64, "d": 32})

        for j in db_jobs(sid):
            record(j)
        sent: list = []
        assert _run_threads([lambda: sent.extend(search.advance(sid))] * 8) == []
        trials = db_trials(sid)
        assert [t["number"] for t in trials] == list(range(6))
        assert [t["state"] for t in trials] == ["complete"] * 3 + ["running"] * 3
        assert len(sent) == 3 and len(db_jobs(sid)) == 6
        told = [t["told_at"] for t in trials]
        assert search.advance(sid) == []  # nothing finished: nothing told or asked
        assert [t["told_at"] for t in db_trials(sid)] == told

        for round_ in range(4):
            queued = [j for j in db_jobs(sid) if j["status"] == "queued"]
            assert len(queued) == 3

            def finish_and_advance(job: dict) -> None:
                record(job)
                search.advance(sid)

            assert _run_threads([lambda j=j: finish_and_advance(j) for j in queued]) == [], round_
            trials = db_trials(sid)
            assert len(trials) == 9 + 3 * round_, round_
            assert [t["state"] for t in trials].count("running") == min(3, 18 - 6 - 3 * round_), round_
        assert [t["state"] for t in db_trials(sid)] == ["complete"] * 15 + ["running"] * 3


# ------------------------------------------------------------------------------------------ pruning

TRAIN = {"kind": "train", "model": "resnet18", "dataset": "synthetic", "rank": 4, "init": "nkp",
         "include": ["layer1.0.conv1"], "epochs": 2, "batch_size": 32, "synthetic_train_size": 128,
         "synthetic_val_size": 32, "schedule": "constant", "log_every": 1}
LRS = [0.01, 0.02, 0.04, 0.08]


@pytest.mark.timeout(420)
def test_pruner_stops_trials_worse_than_the_median(client, worker_process, unique_tag):
    """A train search over lr (4 choices, one at a time) whose pruner watches the learning rate recorded
    at epoch ends (a constant schedule: the value is the trial's lr, so the verdicts are known): lower
    is better, median of the completed trials, after 1 completed trial. Trial k is pruned at epoch 1
    exactly when its lr is above the median of the lrs of the trials completed before it; a pruned
    trial's job is cancelled during epoch 2 (one val_top1 point), it is told pruned with its epoch-1
    value, and completed trials keep both epochs' values."""
    body = {"base": {**TRAIN, "tags": [unique_tag]}, "strategy": "search",
            "search": _search({"lr": {"type": "categorical", "choices": LRS}}, [("val_top1", "maximize")], 4, 1,
                              pruner={"metric": "lr", "direction": "minimize", "startup_trials": 1})}
    r = client.post("/api/v1/sweeps", json=body)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    done = wait_search(client, sid, timeout=400)
    trials = db_trials(sid)
    jobs = {j["number"]: j for j in db_jobs(sid)}
    assert len(trials) == 4 and sorted(t["point"]["lr"] for t in trials) == LRS
    completed: list[float] = []
    for t in trials:
        lr = t["point"]["lr"]
        expect_pruned = bool(completed) and lr > float(np.percentile(completed, 50))
        job = jobs[t["number"]]
        series = {s_["name"]: s_ for s_ in client.get(f"/api/v1/jobs/{job['id']}/metrics").json()["series"]}
        if expect_pruned:
            assert t["state"] == "pruned" and t["pruned_at"] == 1, (t, completed)
            assert job["status"] == "cancelled" and len(series["val_top1"]["steps"]) == 1
            assert t["intermediate"] == {"1": pytest.approx(lr)} and "pruned at epoch 1" in t["reason"]
            assert t["values"] is None
        else:
            assert t["state"] == "complete", (t, completed)
            assert job["status"] == "succeeded" and job["result"]["epochs"] == 2
            assert t["values"] == [job["result"]["val_top1"]]
            assert t["intermediate"] == {"1": pytest.approx(lr), "2": pytest.approx(lr)}
            completed.append(lr)
    assert done["trials"]["pruned"] == 4 - len(completed) and done["status"] == "succeeded"
    assert done["trials"]["pruned"] >= 1  # the lrs come in some order; the largest after the first is pruned


# ------------------------------------------------------------------------------------------ CLI

def _cli(url: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "LOWRANK_URL": url, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "lowrank", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_creates_a_search_and_shows_its_front(idle_api_server, idle_client, finish_job, tmp_path, unique_tag):
    """`lowrank sweep create --strategy search --space ... --objective ... --trials --parallel`, then its
    trials finished through the store as a worker would and told (search.advance); `lowrank results ID`
    prints the front (the trials the brute-force check finds), --all every trial, --csv the API's CSV;
    mistakes exit 2 with one line."""
    from jobs import search

    base = tmp_path / "base.json"
    base.write_text(json.dumps(_approx_base(unique_tag, 32, 16)))
    url = idle_api_server.url
    p = _cli(url, "sweep", "create", "--base", str(base), "--strategy", "search", "--space", "rank=int:1:16",
             "--space", "method=spectral,nkp", "--objective", "error:min", "--objective", "params:min",
             "--trials", "4", "--parallel", "4", "--json")
    assert p.returncode == 0, p.stderr
    sweep = json.loads(p.stdout)
    sid = sweep["id"]
    assert sweep["search"]["space"] == {"rank": {"type": "int", "low": 1, "high": 16, "step": 1, "log": False},
                                        "method": {"type": "categorical", "choices": ["spectral", "nkp"]}}
    assert sweep["search"]["objectives"] == [{"metric": "error", "direction": "minimize"},
                                             {"metric": "params", "direction": "minimize"}]
    try:
        values = {}
        for j in db_jobs(sid):
            rank = j["point"]["rank"]
            err = 1 / (1 + rank) + (0.01 if j["point"]["method"] == "spectral" else 0.0)
            finish_job(j["id"], {"error": err, "rank": rank, "m": 32, "d": 16})
            values[j["number"]] = [err, rank * 48]
        search.advance(sid)
        front = brute_front(values, ["minimize", "minimize"])
        p = _cli(url, "results", sid[:8])
        assert p.returncode == 0, p.stderr
        assert "Pareto front" in p.stdout
        shown = {int(line.split()[1]) for line in p.stdout.splitlines() if line.strip().startswith("│")
                 and line.split()[1].isdigit()}
        assert shown == front, p.stdout
        p = _cli(url, "results", sid[:8], "--all")
        assert p.returncode == 0 and p.stdout.count("complete") >= 4
        p = _cli(url, "results", sid, "--csv")
        assert p.stdout == idle_client.get(f"/api/v1/sweeps/{sid}/results", params={"front": "true",
                                                                                    "format": "csv"}).text
        p = _cli(url, "sweep", "show", sid[:8])
        assert p.returncode == 0 and "4 of 4 trials told" in p.stdout and "objectives error min, params min" in p.stdout
        for args, words in [
            (("--space", "rank=int:1"), "not a dimension"),
            (("--space", "rank=int:1:16", "--objective", "error:low", "--trials", "2"), "METRIC:min or METRIC:max"),
            (("--space", "rank=int:1:16", "--objective", "error:min"), "--trials"),
            (("--grid", "rank=1,2", "--space", "rank=int:1:16"), "--grid is for grid sweeps"),
            (("--strategy", "grid", "--trials", "3"), "--trials is for search sweeps"),
        ]:
            p = _cli(url, "sweep", "create", "--base", str(base), *args)
            assert p.returncode == 2 and words in p.stderr and len(p.stderr.strip().splitlines()) == 1, (args, p.stderr)
        p = _cli(url, "sweep", "create", "--base", str(base), "--space", "rank=int:1:64", "--objective", "error:min",
                 "--trials", "3")
        assert p.returncode == 2 and "min(m, d) = 16" in p.stderr
        p = _cli(url, "results", sid, "--metric", "error")
        assert p.returncode == 2 and "--metric is for grid sweeps" in p.stderr
    finally:
        idle_client.post(f"/api/v1/sweeps/{sid}/cancel")


def test_sdk_search_short_forms(idle_client, unique_tag):
    """Client.search takes short dimensions ("int:1:16", "float:...:log", a list) and "metric:min"."""
    from lowrank.client import Client, ClientError, parse_dimension

    with Client(str(idle_client.base_url)) as c:
        s = c.search(_approx_base(unique_tag, 32, 16), {"rank": "int:1:16", "method": ["spectral", "nkp"]},
                     ["error:min", "params:min"], 5, parallelism=2, seed=3)
        try:
            assert s["strategy"] == "search" and s["search"]["seed"] == 3 and s["trials"]["asked"] == 2
            assert s["search"]["space"]["method"] == {"type": "categorical", "choices": ["spectral", "nkp"]}
        finally:
            c.cancel_sweep(s["id"])
    assert parse_dimension("lr", "float:1e-3:0.3:log") == {"type": "float", "low": 1e-3, "high": 0.3, "log": True}
    with pytest.raises(ClientError, match="lr"):
        parse_dimension("lr", "float:a:b")


def test_readme_search_examples_are_accepted(idle_api_server, idle_client, tmp_path):
    """The README's search lines: its approx.json and `sweep create --strategy search` line (without
    --watch), and its search.json with the README's train.json, each make the search they describe."""
    import re
    import shlex

    text = (REPO / "README.md").read_text()
    approx = re.search(r"echo '(.*?)' > approx\.json", text).group(1)
    (tmp_path / "approx.json").write_text(approx)
    start = text.index("lowrank sweep create --base approx.json --strategy search")
    line = text[start:text.index("\n", text.index("\\\n", start) + 2)].replace("\\\n", " ")
    argv = [a if a != "approx.json" else str(tmp_path / "approx.json") for a in shlex.split(line)[1:] if a != "--watch"]
    p = _cli(idle_api_server.url, *argv, "--json")
    assert p.returncode == 0, p.stderr
    sweep = json.loads(p.stdout)
    assert sweep["search"]["n_trials"] == 40 and sweep["search"]["parallelism"] == 4
    assert sweep["search"]["space"]["method"]["choices"] == ["spectral", "rescale", "nkp"]
    idle_client.post(f"/api/v1/sweeps/{sweep['id']}/cancel")
    train = re.search(r"cat > train\.json <<'JSON'\n(.*?)\nJSON", text, re.S).group(1)
    search = re.search(r"`search.json` holds .*?```json\n(.*?)\n```", text, re.S).group(1)
    (tmp_path / "train.json").write_text(train)
    (tmp_path / "search.json").write_text(search)
    p = _cli(idle_api_server.url, "sweep", "create", "--base", str(tmp_path / "train.json"), "--search",
             f"@{tmp_path / 'search.json'}", "--json")
    assert p.returncode == 0, p.stderr
    sweep = json.loads(p.stdout)
    assert sweep["kind"] == "train" and sweep["search"]["objectives"][0] == {"metric": "val_top1",
                                                                             "direction": "maximize"}
    assert sweep["trials"]["asked"] == 4
    idle_client.post(f"/api/v1/sweeps/{sweep['id']}/cancel")
