"""The latency job kind on the real stack (Postgres, Redis, a Celery worker, uvicorn, chromium): a spec that
cannot run is a 422 naming the field before anything is queued; a job at a rank ratio measures every factored
layer of ResNet-18; a job whose source is a real compress job measures exactly that job's per-layer ranks; the
CLI submits and prints the tables; the job page draws the per-layer bars with a slower layer flagged; migration
0007 runs both ways.

Timings on a loaded 2-core machine: nothing asserts an absolute time. The one "slower" layer relied on is a 1x1
convolution factored at full rank (a second 1x1 convolution after the first, 1.5x its multiply-adds), at
32 px, interleaved with its dense original (core.latency.time_paired).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import torch
from conftest import _finish_job, _insert_job, _wait_job
from test_dashboard import POLL, browser, context, web  # noqa: F401 - the dashboard tests' fixtures (same folder)
from test_dashboard_injection import INJECTED_JS, LINK, texts

from core import model_layers

pytestmark = pytest.mark.service

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 600  # a loaded 2-core machine
SMALL = {"model": "resnet18", "rank_ratio": 0.25, "image_size": 32, "batches": [1, 4], "repeats": 3, "threads": 1}
# A compress result as the store holds one, with the two ranks a dashboard test measures: layer2.0.downsample.0
# (a 128 x 64 1x1 conv) at full rank 64 is slower than dense for sure, layer3.0.conv2 at rank 32 is faster.
FORGED_RANKS = {"layer2.0.downsample.0": 64, "layer3.0.conv2": 32}


def wait(c: httpx.Client, job_id: str, timeout: float = TIMEOUT) -> dict:
    return _wait_job(c, job_id, timeout=timeout)  # conftest's poll, a loaded machine's timeout


def detail(r: httpx.Response) -> dict:
    assert r.status_code == 422, r.text
    return r.json()["detail"][0]


@pytest.fixture(scope="module")
def api(api_server, worker_process):
    with httpx.Client(base_url=api_server.url, timeout=60) as c:
        yield c


def forged_compress(insert_job, finish_job, tag: str, *, ranks: dict[str, int] = FORGED_RANKS,
                    status: str = "succeeded", **result) -> str:
    """A compress job in the store with a result of the stored form (no worker runs it; one left queued carries
    `tag`, so unique_tag's teardown cancels it before the session's worker would claim it)."""
    job = insert_job({"kind": "compress", "source": {"job": str(uuid.uuid4())}, "budget": 0.5, "tags": [tag]},
                     str(uuid.uuid4()))
    layers = [{"layer": name, "status": "factored", "rank": r} for name, r in ranks.items()]
    layers.append({"layer": "fc", "status": "skipped", "rank": None})
    res = {"model": "resnet18", "num_classes": 10, "small_input": True, "data": {"image_size": 32}, "layers": layers,
           **result}
    if status == "succeeded":
        finish_job(job, result=res)
    elif status == "failed":
        finish_job(job, error="boom")
    return job


def check_rows(res: dict, batches: list[int]) -> None:
    """Every timing positive; every speed-up the ratio of the p50s it is printed from."""
    lat = res["latency"]
    e2e = {(e["batch"], e["variant"]): e for e in lat["end_to_end"]}
    for b in batches:
        dense, fact = e2e[(b, "dense")], e2e[(b, "factored")]
        assert dense["timing"]["p50_ms"] > 0 and fact["timing"]["p50_ms"] > 0
        assert fact["speedup"] == pytest.approx(dense["timing"]["p50_ms"] / fact["timing"]["p50_ms"])
        assert res[f"speedup_b{b}"] == pytest.approx(fact["speedup"])
        assert res[f"latency_ms_b{b}"] == fact["timing"]["p50_ms"]
        assert res[f"dense_latency_ms_b{b}"] == dense["timing"]["p50_ms"]
        assert fact["throughput"] == pytest.approx(b / (fact["timing"]["p50_ms"] / 1000))
        for row in lat["layers"].get(str(b), []):
            assert row["dense"]["p50_ms"] > 0 and row["factored"]["p50_ms"] > 0
            assert row["dense"]["p90_ms"] >= row["dense"]["p50_ms"]
            assert row["speedup"] == pytest.approx(row["dense"]["p50_ms"] / row["factored"]["p50_ms"])
            assert row["slower"] == (row["speedup"] < 1)
        if lat["layers"]:
            assert res[f"slower_layers_b{b}"] == sum(r["slower"] for r in lat["layers"][str(b)])
    assert res["speedup"] == res[f"speedup_b{batches[0]}"]


# ------------------------------------------------------------------------------------------ spec


def test_latency_specs_that_cannot_run_are_422_naming_the_field(idle_client, insert_job, finish_job, unique_tag):
    # Accepted jobs carry the tag: unique_tag cancels them at the end, so the session's worker (which claims the
    # oldest queued job of the database, whichever API took it) never runs them.
    tag = unique_tag
    def refused(**spec) -> dict:
        return detail(idle_client.post("/api/v1/jobs", json={"kind": "latency", "tags": [tag], **spec}))

    for spec, field, words in [
        ({"model": "resnet18"}, "rank", "give exactly one of rank, rank_ratio or source"),
        ({"model": "resnet18", "rank": 4, "rank_ratio": 0.5}, "rank_ratio", "not rank and rank_ratio"),
        ({"rank": 4}, "model", "model is required with rank"),
        ({"model": "resnet18", "rank": 1000}, "rank", "rank 1000 factorizes no layer of resnet18"),
        ({"model": "resnet18", "rank_ratio": 1.0}, "rank_ratio", "rank_ratio 1.0 factorizes no layer"),
        ({"model": "vgg16", "rank": 4}, "model", "resnet18"),
        ({**SMALL, "batches": [1, 2, 4, 8, 16]}, "batches", "at most 4"),
        ({**SMALL, "batches": [1, 300]}, "batches", "each batch size must be 1..256"),
        ({**SMALL, "batches": [4, 4]}, "batches", "each batch size once"),
        ({**SMALL, "batches": []}, "batches", "at least 1"),
        ({**SMALL, "device": "tpu"}, "device", "'cpu' or 'cuda'"),
        ({**SMALL, "repeats": 2}, "repeats", "greater than or equal to 3"),
        ({**SMALL, "repeats": 201}, "repeats", "less than or equal to 200"),
        ({**SMALL, "threads": 0}, "threads", "greater than or equal to 1"),
        ({**SMALL, "image_size": 4}, "image_size", "greater than or equal to 8"),
        ({**SMALL, "latency_batch": 4}, "latency_batch", "give latency_aware=true too"),
        ({**SMALL, "colour": "red"}, "colour", "Extra inputs are not permitted"),
    ]:
        d = refused(**spec)
        assert d["loc"] == ["body", "latency", field], (spec, d)
        assert words in d["msg"], (spec, d["msg"])

    # The source: a succeeded compress job that factored something.
    missing = str(uuid.uuid4())
    d = refused(source=missing)
    assert d["loc"] == ["body", "latency", "source"] and d["msg"] == f"source: no job with id {missing}"
    train = insert_job({"kind": "train", "model": "resnet18", "init": "dense", "tags": [tag]}, str(uuid.uuid4()))
    assert f"job {train} is a train job; a latency source is a succeeded compress job" in refused(source=train)["msg"]
    queued = forged_compress(insert_job, finish_job, tag, status="queued")
    assert f"job {queued} is queued" in refused(source=queued)["msg"]
    failed = forged_compress(insert_job, finish_job, tag, status="failed")
    assert f"job {failed} is failed" in refused(source=failed)["msg"]
    nothing = forged_compress(insert_job, finish_job, tag, ranks={})
    assert "factored no layer" in refused(source=nothing)["msg"]
    job = forged_compress(insert_job, finish_job, tag)
    d = refused(source=job, model="resnet50")
    assert d["loc"] == ["body", "latency", "model"] and "model 'resnet18', not 'resnet50'" in d["msg"]
    assert refused(source=job, rank=4)["loc"] == ["body", "latency", "source"]  # exactly one of the three

    # Accepted: the compress job's model, classes, stem and image size are stored in the spec, an image size given wins.
    r = idle_client.post("/api/v1/jobs", json={"kind": "latency", "source": job, "tags": [tag]})
    assert r.status_code == 201, r.text
    spec = r.json()["spec"]
    assert (spec["source"], spec["model"], spec["image_size"], spec["num_classes"], spec["small_input"]) == (
        job, "resnet18", 32, 10, True)
    assert spec["batches"] == [1, 32] and spec["repeats"] == 20 and spec["device"] == "cpu"
    assert r.json()["queue"] == "cpu"
    spec = idle_client.post("/api/v1/jobs", json={"kind": "latency", "source": job, "image_size": 64,
                                                  "device": "cuda", "tags": [tag]}).json()
    assert spec["spec"]["image_size"] == 64 and spec["queue"] == "gpu"
    # Without a source the defaults are stored too.
    spec = idle_client.post("/api/v1/jobs", json={"kind": "latency", "model": "resnet50", "rank": 8,
                                                  "tags": [tag]}).json()["spec"]
    assert (spec["image_size"], spec["num_classes"], spec["small_input"]) == (224, 10, False)


def test_latency_sweeps_store_the_resolved_source(idle_client, insert_job, finish_job, unique_tag):
    """A grid sweep and a search over a latency base with a source: every job's stored spec has the compress job's
    model and image size; a source that is no compress job refuses the sweep, naming the point's field."""
    tag = unique_tag
    job = forged_compress(insert_job, finish_job, tag)
    base = {"kind": "latency", "source": job, "batches": [1], "tags": [tag]}
    r = idle_client.post("/api/v1/sweeps", json={"base": base, "grid": {"repeats": [3, 5]}, "seeds": [0, 1]})
    assert r.status_code == 201, r.text
    sweep = r.json()
    assert sweep["kind"] == "latency" and sweep["total"] == 4
    jobs = idle_client.get("/api/v1/jobs", params={"sweep": sweep["id"]}).json()["items"]
    assert sorted(j["spec"]["repeats"] for j in jobs) == [3, 3, 5, 5]
    assert {(j["spec"]["model"], j["spec"]["image_size"], j["spec"]["source"]) for j in jobs} == {("resnet18", 32, job)}
    search = {"space": {"repeats": {"type": "int", "low": 3, "high": 9}},
              "objectives": [{"metric": "speedup", "direction": "maximize"}], "n_trials": 2, "parallelism": 2}
    r = idle_client.post("/api/v1/sweeps", json={"base": base, "strategy": "search", "search": search})
    assert r.status_code == 201, r.text
    jobs = idle_client.get("/api/v1/jobs", params={"sweep": r.json()["id"]}).json()["items"]
    assert len(jobs) == 2 and all(j["spec"]["model"] == "resnet18" and j["spec"]["image_size"] == 32 for j in jobs)
    train = insert_job({"kind": "train", "model": "resnet18", "init": "dense", "tags": [tag]}, str(uuid.uuid4()))
    r = idle_client.post("/api/v1/sweeps", json={"base": {**base, "source": train}, "grid": {"repeats": [3, 5]}})
    assert r.status_code == 422 and "is a train job; a latency source is a succeeded compress job" in r.text


def test_another_users_compress_job_is_not_a_source(spawn_api, service_env, finish_job, unique_tag):
    """With auth on, a latency source must be the caller's own compress job (an admin may use anyone's)."""
    from jobs import auth

    server = spawn_api(env={"LOWRANK_AUTH": "required",
                            "LOWRANK_QUEUE_PREFIX": f"{service_env['LOWRANK_QUEUE_PREFIX']}idle-latency."})
    from jobs import store
    from jobs.db import session_scope
    from jobs.specs import parse_spec

    made = {name: auth.create_token(f"{name}-{uuid.uuid4().hex[:6]}", admin=name == "root")
            for name in ("alice", "bob", "root")}
    clients = {n: httpx.Client(base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {t}"})
               for n, (_, t) in made.items()}
    try:
        row = store.build_job_row(parse_spec({"kind": "compress", "source": {"job": str(uuid.uuid4())}, "budget": 0.5}),
                                  owner=made["alice"][0].name)  # alice's compress job, as the store holds one
        with session_scope() as session:
            session.add(row)
        job = str(row.id)
        finish_job(job, result={"model": "resnet18", "num_classes": 10, "small_input": True,
                                "data": {"image_size": 32}, "layers": [{"layer": "layer3.0.conv2", "status": "factored",
                                                                        "rank": 32}]})
        spec = {"kind": "latency", "source": job, "tags": [unique_tag]}
        d = detail(clients["bob"].post("/api/v1/jobs", json=spec))
        assert d["loc"] == ["body", "latency", "source"] and "belongs to another user" in d["msg"]
        assert clients["alice"].post("/api/v1/jobs", json=spec).status_code == 201
        assert clients["root"].post("/api/v1/jobs", json=spec).status_code == 201
    finally:
        for c in clients.values():
            c.close()


# ------------------------------------------------------------------------------------------ real jobs


@pytest.fixture(scope="module")
def measured(api) -> dict:
    r = api.post("/api/v1/jobs", json={**SMALL, "kind": "latency", "name": "r18-latency", "tags": ["latency-service"]})
    assert r.status_code == 201, r.text
    job = wait(api, r.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    return job


def test_a_latency_job_measures_every_factored_layer(api, measured):
    res = measured["result"]
    print(f"\nlatency job: speedup b1 {res['speedup_b1']:.2f}x, b4 {res['speedup_b4']:.2f}x, "
          f"slower layers b1 {res['slower_layers_b1']}")
    planned = [p.name for p in model_layers.plan("resnet18", rank_ratio=0.25, num_classes=10, small_input=True)
               if p.status == "factored"]
    assert res["layers_factored"] == len(planned) > 10
    for b in (1, 4):
        rows = res["latency"]["layers"][str(b)]
        assert [r["layer"] for r in rows] == planned
        assert all(r["input_shape"][0] == b for r in rows)
    assert [(e["batch"], e["variant"]) for e in res["latency"]["end_to_end"]] == [
        (1, "dense"), (1, "factored"), (4, "dense"), (4, "factored")]
    check_rows(res, [1, 4])
    assert res["latency"]["threads"] == 1 and res["latency"]["device"] == "cpu" and res["small_input"] is True
    assert res["params_factored"] < res["params_dense"]
    # The same numbers as metrics (step 0), for sweeps and the results table.
    series = {s["name"]: s for s in api.get(f"/api/v1/jobs/{measured['id']}/metrics").json()["series"]}
    for key in ("speedup_b1", "speedup_b4", "latency_ms_b1", "dense_latency_ms_b4", "slower_layers_b1", "speedup"):
        assert series[key]["steps"] == [0] and series[key]["values"] == [pytest.approx(res[key])], key


def test_a_latency_sweep_on_the_worker_tabulates_speedup_and_size_per_rank(api, unique_tag):
    """A grid sweep of latency jobs run by the real worker: one row per rank ratio in the results table, the
    speedup (the kind's default metric) and the factored network's size, which falls with the rank."""
    base = {**SMALL, "kind": "latency", "batches": [1], "tags": [unique_tag]}
    r = api.post("/api/v1/sweeps", json={"base": base, "grid": {"rank_ratio": [0.125, 0.5]}})
    assert r.status_code == 201, r.text
    sweep = r.json()
    deadline = time.monotonic() + TIMEOUT
    while (s := api.get(f"/api/v1/sweeps/{sweep['id']}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, s
        time.sleep(0.5)
    assert s["counts"]["succeeded"] == 2, s["counts"]
    table = api.get(f"/api/v1/sweeps/{sweep['id']}/results").json()
    assert table["metric"] == "speedup" and table["group_by"] == ["rank_ratio"], table
    rows = {row["point"]["rank_ratio"]: row for row in table["rows"]}
    assert sorted(rows) == [0.125, 0.5] and all(row["n"] == 1 for row in rows.values()), rows
    jobs = {ratio: api.get(f"/api/v1/jobs/{row['job_ids'][0]}").json()["result"] for ratio, row in rows.items()}
    for ratio, row in rows.items():
        # The table's numbers are the jobs' own: speedup at the first batch, the factored network's parameters.
        assert row["mean"] == pytest.approx(jobs[ratio]["speedup"]) and row["mean"] > 0, (row, jobs[ratio])
        assert row["params"] == jobs[ratio]["params_factored"]
    assert rows[0.125]["params"] < rows[0.5]["params"] < jobs[0.5]["params_dense"]
    csv = api.get(f"/api/v1/sweeps/{sweep['id']}/results", params={"format": "csv"})
    assert csv.status_code == 200 and csv.text.splitlines()[0].startswith("rank_ratio,"), csv.text[:300]


def test_a_compress_jobs_ranks_are_measured(api):
    """A real compress job (an uploaded fresh ResNet-18, spectral at rank ratio 0.25 on layer2) as the source: its
    model, stem and image size go into the spec, and exactly its factored layers are measured at its ranks."""
    from safetensors.torch import save

    from core.models import build_model

    torch.manual_seed(0)
    state = build_model("resnet18", num_classes=10, small_input=True).state_dict()
    up = api.post("/api/v1/uploads", files={"file": ("r18.safetensors", save(state))})
    assert up.status_code == 201, up.text
    r = api.post("/api/v1/jobs", json={
        "kind": "compress", "source": {"upload": up.json()["id"], "model": "resnet18"}, "method": "spectral",
        "rank_ratio": 0.25, "image_size": 8, "calib_images": 16, "heldout_images": 16, "include": ["layer2"],
        "max_val_batches": 1, "bn_reestimate": False})
    assert r.status_code == 201, r.text
    compress = wait(api, r.json()["id"])
    assert compress["status"] == "succeeded", compress["error"]
    ranks = {row["layer"]: row["rank"] for row in compress["result"]["layers"] if row["status"] == "factored"}
    assert len(ranks) == 5

    r = api.post("/api/v1/jobs", json={"kind": "latency", "source": compress["id"], "batches": [2], "repeats": 3,
                                       "threads": 1})
    assert r.status_code == 201, r.text
    spec = r.json()["spec"]
    assert (spec["model"], spec["image_size"], spec["small_input"], spec["num_classes"]) == ("resnet18", 8, True, 10)
    job = wait(api, r.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    res = job["result"]
    assert res["ranks"] == ranks and res["source"] == {"job": compress["id"]}
    assert {row["layer"]: row["rank"] for row in res["latency"]["layers"]["2"]} == ranks
    assert res["layers_factored"] == len(ranks) and res["rank"] is None and res["rank_ratio"] is None
    assert res["params_factored"] == compress["result"]["params_compressed"]  # the same network, in size
    check_rows(res, [2])


def test_a_running_latency_job_stops_between_measurements_when_cancelled(api):
    """Cancel once the first measurement has reported progress: the job ends cancelled, long before its ~80
    measurements are done. (The supervisor's signal interrupts it too, so the runner's own check between
    measurements is shown in tests/test_latency_runner.py.)"""
    spec = {**SMALL, "kind": "latency", "batches": [1, 2], "repeats": 100, "tags": ["latency-cancel"]}
    job_id = api.post("/api/v1/jobs", json=spec).json()["id"]
    try:
        deadline = time.monotonic() + TIMEOUT
        while (job := api.get(f"/api/v1/jobs/{job_id}").json())["status"] in ("queued", "running") and not (
                job["progress"] or 0) > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert job["status"] == "running" and 0 < job["progress"] < 0.5, job
        t0 = time.monotonic()
        assert api.post(f"/api/v1/jobs/{job_id}/cancel").json()["cancel_requested"] is True
        job = wait(api, job_id, timeout=120)
        print(f"\ncancel -> cancelled latency job: {time.monotonic() - t0:.1f} s")
        assert job["status"] == "cancelled" and job["result"] is None and job["error"] is None
        assert job["progress"] < 0.5
    finally:
        api.post(f"/api/v1/jobs/{job_id}/cancel")


# ------------------------------------------------------------------------------------------ CLI


def lowrank(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowrank", *argv], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


def test_cli_submit_latency_waits_and_prints_the_tables(api_server, api, measured):
    url = ("--url", api_server.url)
    out = lowrank("submit", "latency", "--model", "resnet18", "--rank-ratio", "0.25", "--image-size", "32",
                  "--batch", "1,4", "--repeats", "3", "--threads", "1", "--no-per-layer", "--wait", *url,
                  timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr
    job_id, status = out.stdout.splitlines()[0].split()
    assert status == "succeeded" and "speedup=" in out.stdout.splitlines()[1]
    assert "end to end (forward, eval mode)" in out.stdout and "per factored layer" not in out.stdout
    spec = api.get(f"/api/v1/jobs/{job_id}").json()["spec"]
    assert (spec["batches"], spec["repeats"], spec["per_layer"], spec["image_size"]) == ([1, 4], 3, False, 32)
    # `lowrank job ID` of a latency job: lowrank latency's tables, per layer too.
    out = lowrank("job", measured["id"][:8], *url)
    assert out.returncode == 0, out.stderr
    assert f"job {measured['id']} (latency) succeeded" in out.stdout
    assert "resnet18 at 32 px, factored at ratio 0.25; device cpu, 1 CPU thread(s)" in out.stdout
    for text in ("end to end (forward, eval mode)", "per factored layer, batch 1", "per factored layer, batch 4",
                 f"batch 1: {measured['result']['slower_layers_b1']} of {measured['result']['layers_factored']} "
                 "factored layers slower than dense"):
        assert text in out.stdout, text


def test_cli_submit_latency_source_by_prefix_and_bad_flags(idle_api_server, insert_job, finish_job, unique_tag):
    url = ("--url", idle_api_server.url)
    tag = unique_tag
    job = forged_compress(insert_job, finish_job, tag)
    out = lowrank("submit", "latency", "--source", job[:8], "--batch", "1,8", "--latency-aware", "--latency-batch", "8",
                  "--channels-last", "--seed", "3", "--tag", tag, "--json", *url)
    assert out.returncode == 0, out.stderr
    spec = json.loads(out.stdout)["spec"]
    assert spec["source"] == job and spec["model"] == "resnet18" and spec["batches"] == [1, 8]
    assert spec["latency_aware"] is True and spec["latency_batch"] == 8 and spec["channels_last"] is True
    assert spec["seed"] == 3 and spec["per_layer"] is True and spec["repeats"] == 20
    from lowrank.client import Client

    with Client(idle_api_server.url) as c:  # the SDK: the same spec from a prefix and keyword fields
        sdk = c.latency(source=job[:8], batches=[1, 8], latency_aware=True, latency_batch=8, channels_last=True,
                        seed=3, tags=[tag])["spec"]
        assert sdk == spec
        assert c.latency("resnet18", rank_ratio=0.25, image_size=32, tags=[tag])["spec"]["small_input"] is True
    for argv, message in [
        (("--model", "resnet18", "--rank", "1000"), "latency.rank: rank 1000 factorizes no layer of resnet18"),
        (("--model", "resnet18", "--rank", "4", "--batch", "1,x"), "--batch must be"),
        (("--source", job, "--model", "resnet50"), "latency.model: model: compress job"),
        (("--model", "resnet18", "--rank", "4", "--repeats", "1"), "latency.repeats"),
    ]:
        out = lowrank("submit", "latency", *argv, *url)
        assert out.returncode == 2 and message in out.stderr and out.stderr.count("\n") == 1, (argv, out.stderr)


def test_readme_submit_latency_as_written(api_server, api):
    """README.md's `lowrank submit latency ...` command, exactly as written, against the real API and worker."""
    import os

    from readme_commands import find

    argv = find(["lowrank", "submit", "latency"])
    assert "--wait" in argv
    env = {**{k: v for k, v in os.environ.items() if k not in ("LOWRANK_URL", "LOWRANK_TOKEN")},
           "LOWRANK_URL": api_server.url}
    proc = subprocess.run([str(Path(sys.executable).with_name("lowrank")), *argv[1:]], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env, cwd=REPO)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    job_id, status = proc.stdout.split()[:2]
    assert status == "succeeded"
    for text in ("end to end (forward, eval mode)", "per factored layer, batch 8", "latency-aware (timed at batch 1)"):
        assert text in proc.stdout, text
    res = api.get(f"/api/v1/jobs/{job_id}").json()["result"]
    assert res["batches"] == [1, 8] and "latency-aware" in res["factorize"]
    check_rows(res, [1, 8])


# ------------------------------------------------------------------------------------------ dashboard


@pytest.fixture(scope="module")
def with_slower_layer(api, worker_process) -> dict:
    """A real latency job at a forged compress job's ranks (the compress job is only its result): a full-rank
    1x1 conv that is slower, latency-aware, so the page lists the layer it kept dense."""
    job_id = forged_compress(_insert_job, _finish_job, "latency-page")
    r = api.post("/api/v1/jobs", json={"kind": "latency", "source": job_id, "batches": [1, 2], "repeats": 7,
                                       "threads": 1, "latency_aware": True, "name": LINK})
    assert r.status_code == 201, r.text
    job = wait(api, r.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    return job


@pytest.mark.browser
def test_latency_job_page_flags_the_slower_layer(web, with_slower_layer):
    job = with_slower_layer
    res = job["result"]
    rows = res["latency"]["layers"]["1"]
    assert [r["layer"] for r in rows] == list(FORGED_RANKS)
    by_layer = {r["layer"]: r for r in rows}
    assert by_layer["layer2.0.downsample.0"]["slower"], rows  # full rank: more work than dense, for sure
    assert not by_layer["layer3.0.conv2"]["slower"], rows
    check_rows(res, [1, 2])
    page = web.page
    page.goto(f"/jobs/{job['id']}?{POLL}")
    dense, fact = web.wait_traces("plot-latency-layers", 2)
    assert (dense["name"], fact["name"]) == ("dense", "factored")
    assert fact["x"] == list(FORGED_RANKS) and dense["x"] == list(FORGED_RANKS)
    assert dense["y"] == pytest.approx([r["dense"]["p50_ms"] for r in rows])
    assert fact["y"] == pytest.approx([r["factored"]["p50_ms"] for r in rows])
    trace = page.evaluate("() => { const t = document.getElementById('plot-latency-layers').data[1]; "
                          "return {color: t.marker.color, custom: t.customdata, hover: t.hovertemplate}; }")
    assert trace["color"][0] == "#d62728" != trace["color"][1]  # the slower layer in its own colour
    assert [c[2] for c in trace["custom"]] == ["slower than dense", "faster than dense"]  # in the hover
    assert [c[0] for c in trace["custom"]] == [64, 32] and "%{customdata[2]}" in trace["hover"]
    drawn = page.eval_on_selector_all("#plot-latency-layers g.trace.bars", "gs => gs.map(g => Array.from("
                                      "g.querySelectorAll('g.point path')).map(p => p.style.fill))")
    assert drawn[1][0] == "rgb(214, 39, 40)" != drawn[1][1] and drawn[0][0] == drawn[0][1]  # as drawn
    assert texts(page, "#latency-layers-table tbody td.flag") == ["slower", ""]
    assert page.eval_on_selector_all("#latency-layers-table tbody tr.slower", "rs => rs.map(r => r.dataset.layer)") == [
        "layer2.0.downsample.0"]
    e2e = page.eval_on_selector_all("#latency-e2e tbody tr", "rs => rs.map(r => [r.dataset.batch, r.dataset.variant])")
    assert e2e == [["1", "dense"], ["1", "factored"], ["1", "latency-aware"], ["2", "dense"], ["2", "factored"],
                   ["2", "latency-aware"]]
    kept = [k["layer"] for k in res["kept_dense"]]
    assert "layer2.0.downsample.0" in kept
    assert page.eval_on_selector_all("#latency-kept li", "ls => ls.map(l => l.dataset.layer)") == kept
    # The other batch, chosen in the select.
    page.select_option("#latency-batch", "2")
    page.wait_for_function("() => document.getElementById('plot-latency-layers').layout.title.text.includes('batch 2')")
    assert web.traces("plot-latency-layers")[1]["y"] == pytest.approx(
        [r["factored"]["p50_ms"] for r in res["latency"]["layers"]["2"]])
    # The job's name (markup) shows literally.
    assert page.inner_text("#job-title").endswith(LINK) or LINK in page.inner_text("#job-title")
    assert page.evaluate(INJECTED_JS, "body") == []


@pytest.mark.browser
def test_latency_layer_names_show_literally(web, insert_job, finish_job, measured):
    """A stored result whose layer names are markup (names come from a model's modules; the page must not trust
    them): the bars' category labels and the table show them as text, nothing of them becomes an element."""
    spec = {"kind": "latency", "model": "resnet18", "rank": 4, "image_size": 32}
    job = insert_job(spec, str(uuid.uuid4()))
    res = json.loads(json.dumps(measured["result"]))
    for b in ("1", "4"):
        res["latency"]["layers"][b][0]["layer"] = LINK
    finish_job(job, result=res)
    page = web.page
    page.goto(f"/jobs/{job}?{POLL}")
    fact = web.wait_traces("plot-latency-layers", 2)[1]
    assert fact["x"][0] == LINK.replace("<", "&lt;").replace(">", "&gt;")
    page.wait_for_selector("#plot-latency-layers .xtick text")
    assert LINK in texts(page, "#plot-latency-layers .xtick text")
    assert texts(page, "#latency-layers-table tbody td.mono")[0] == LINK
    assert page.evaluate(INJECTED_JS, "body") == []


# ------------------------------------------------------------------------------------------ migration


def test_migration_0007_allows_latency_and_refuses_to_drop_stored_ones(scratch_database):
    import sqlalchemy as sa

    from jobs import migrate
    from jobs.db import make_engine

    url = scratch_database()
    migrate.upgrade(url, "0006")
    engine = make_engine(url)
    insert = sa.text("INSERT INTO jobs (id, kind, spec, status, priority, queue, tags, seed, attempts, "
                     "cancel_requested, created_at) VALUES (:id, :kind, '{}', 'queued', 'normal', 'cpu', '[]', 0, 0, "
                     "false, now())")
    try:
        with pytest.raises(sa.exc.IntegrityError, match="ck_jobs_kind"), engine.begin() as conn:
            conn.execute(insert, {"id": uuid.uuid4(), "kind": "latency"})
        migrate.upgrade(url)
        assert migrate.current_revision(url) == "0007" == migrate.head_revision()
        job = uuid.uuid4()
        with engine.begin() as conn:
            conn.execute(insert, {"id": job, "kind": "latency"})
        with pytest.raises(RuntimeError, match="cannot downgrade below 0007: 1 latency jobs or sweeps are stored"):
            migrate.downgrade(url, "0006")
        assert migrate.current_revision(url) == "0007"
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM jobs WHERE id = :id"), {"id": job})
        migrate.downgrade(url, "0006")
        assert migrate.current_revision(url) == "0006"
        with pytest.raises(sa.exc.IntegrityError, match="ck_jobs_kind"), engine.begin() as conn:
            conn.execute(insert, {"id": uuid.uuid4(), "kind": "latency"})
        migrate.upgrade(url)
    finally:
        engine.dispose()
