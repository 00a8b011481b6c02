"""The jobs/uploads REST API over HTTP against a live uvicorn server, real Postgres and Redis.

Jobs here go through `idle_client`: an API whose queue no worker consumes, so they stay queued
and each test drives the lifecycle it needs through the store's worker contract (claim, finish,
record_metrics, add_artifact) exactly as a worker would. Running jobs end to end is tested in
test_e2e_*.py.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import os
import subprocess
import sys
import time
import uuid

import httpx
import numpy as np
import pytest
import redis
from safetensors.numpy import save as st_save

from jobs import store
from jobs.errors import Forbidden
from jobs.settings import get_settings

APPROX = {"kind": "approx", "weights": {"source": "gaussian", "m": 64, "d": 32}, "rank": 4, "method": "nkp"}


def approx(**over) -> dict:
    return {**APPROX, **over}


def submit(client, spec: dict, **kw):
    return client.post("/api/v1/jobs", json=spec, **kw)


def test_healthz_and_readyz(idle_client) -> None:
    assert idle_client.get("/healthz").json() == {"status": "ok", "checks": {}}
    r = idle_client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok"}}
    assert idle_client.get("/docs").status_code == 200
    paths = idle_client.get("/openapi.json").json()["paths"]
    assert {"/api/v1/jobs", "/api/v1/jobs/{job_id}/metrics", "/api/v1/uploads"} <= set(paths)


def test_create_and_get_job_is_stored_and_enqueued(idle_client, idle_api_server, service_env, unique_tag) -> None:
    r = submit(idle_client, approx(name="first", tags=[unique_tag], seed=7, priority="high"))
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["status"] == "queued" and job["kind"] == "approx" and job["queue"] == "cpu"
    assert job["priority"] == "high" and job["seed"] == 7 and job["tags"] == [unique_tag]
    # The stored spec is the canonical one: every default filled in.
    assert job["spec"]["mc_samples"] == 0 and job["spec"]["weights"] == {"source": "gaussian", "m": 64, "d": 32}
    got = idle_client.get(f"/api/v1/jobs/{job['id']}").json()
    assert got["id"] == job["id"] and got["enqueued_at"] is not None
    # Exactly one message, payload = the job id, on <prefix>cpu.high of the idle API.
    queue = f"{service_env['LOWRANK_QUEUE_PREFIX']}idle.cpu.high"
    messages = [json.loads(m) for m in redis.Redis.from_url(service_env["LOWRANK_BROKER_URL"]).lrange(queue, 0, -1)]
    mine = [m for m in messages if m["headers"]["argsrepr"] == repr([job["id"]])]
    assert len(mine) == 1 and mine[0]["headers"]["task"] == "lowrank.run_job"


def test_train_on_cuda_goes_to_the_gpu_queue(idle_client) -> None:
    spec = {"kind": "train", "model": "resnet18", "dataset": "digits", "rank_ratio": 0.25, "device": "cuda",
            "epochs": 1}
    job = submit(idle_client, spec).json()
    assert job["queue"] == "gpu" and job["spec"]["init"] == "nkp"


def test_a_train_spec_is_stored_with_its_recipe_resolved(idle_client) -> None:
    """Fields left out take the data set's recipe, a field set wins; the stored spec (GET) holds them all."""
    from core.recipes import recipe_values

    spec = {"kind": "train", "model": "resnet18", "dataset": "digits", "rank_ratio": 0.25, "lr": 0.05}
    job = submit(idle_client, spec).json()
    got = idle_client.get(f"/api/v1/jobs/{job['id']}").json()["spec"]
    assert got == job["spec"]
    recipe = recipe_values("digits", "resnet18")
    assert got["recipe"] == "digits" and got["lr"] == 0.05
    assert {k: got[k] for k in recipe if k != "lr"} == {k: v for k, v in recipe.items() if k != "lr"}
    assert (got["epochs"], got["batch_size"], got["nesterov"], got["image_size"], got["small_input"]) == (3, 64, True, 8, True)
    assert None not in (got[k] for k in ("optimizer", "momentum", "weight_decay", "schedule", "warmup_epochs"))


def test_get_unknown_job_is_404(idle_client) -> None:
    r = idle_client.get(f"/api/v1/jobs/{uuid.uuid4()}")
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    assert idle_client.get("/api/v1/jobs/not-a-uuid").status_code == 422


def test_list_filters_and_keyset_pagination(idle_client, unique_tag) -> None:
    ids = []
    for i in range(5):
        spec = approx(tags=[unique_tag], seed=i) if i % 2 == 0 else {
            "kind": "learn", "teacher": {"source": "gaussian", "m": 16, "d": 8}, "rank": 2, "tags": [unique_tag]}
        ids.append(submit(idle_client, spec).json()["id"])
    newest_first = ids[::-1]

    seen, cursor, pages = [], None, 0
    while True:
        params = {"tag": unique_tag, "limit": 2} | ({"cursor": cursor} if cursor else {})
        page = idle_client.get("/api/v1/jobs", params=params).json()
        seen += [j["id"] for j in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == newest_first and pages == 3

    learn = idle_client.get("/api/v1/jobs", params={"tag": unique_tag, "kind": "learn"}).json()["items"]
    assert [j["id"] for j in learn] == [newest_first[1], newest_first[3]]
    store.request_cancel(ids[0])
    cancelled = idle_client.get("/api/v1/jobs", params={"tag": unique_tag, "status": "cancelled"}).json()["items"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    assert idle_client.get("/api/v1/jobs", params={"tag": "no-such-tag-" + unique_tag}).json() == {
        "items": [], "next_cursor": None}

    r = idle_client.get("/api/v1/jobs", params={"cursor": "garbage"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "cursor"]
    r = idle_client.get("/api/v1/jobs", params={"status": "done"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "status"]


def test_cancel_queued_job_and_running_job(idle_client) -> None:
    queued = submit(idle_client, approx()).json()
    r = idle_client.post(f"/api/v1/jobs/{queued['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["finished_at"]
    # A cancelled job can never be claimed by a worker.
    assert store.claim_job(queued["id"], "w-test", stale_after_s=60) is None
    assert idle_client.post(f"/api/v1/jobs/{queued['id']}/cancel").json()["status"] == "cancelled"

    running = submit(idle_client, approx()).json()
    assert store.claim_job(running["id"], "w-test", stale_after_s=60) is not None
    assert store.heartbeat(running["id"], "w-test") is False
    r = idle_client.post(f"/api/v1/jobs/{running['id']}/cancel")
    assert r.json()["status"] == "running" and r.json()["cancel_requested"] is True
    assert store.heartbeat(running["id"], "w-test") is True  # the worker learns it must stop
    assert store.finish_job(running["id"], "w-test", "cancelled")
    assert idle_client.get(f"/api/v1/jobs/{running['id']}").json()["status"] == "cancelled"

    done = submit(idle_client, approx()).json()
    store.claim_job(done["id"], "w-test", stale_after_s=60)
    store.finish_job(done["id"], "w-test", "succeeded", result={"error": 0.5})
    r = idle_client.post(f"/api/v1/jobs/{done['id']}/cancel")
    assert r.status_code == 409 and r.json()["code"] == "invalid_state" and "succeeded" in r.json()["detail"]


def test_retry_failed_and_cancelled_jobs(idle_client) -> None:
    job = submit(idle_client, approx()).json()
    r = idle_client.post(f"/api/v1/jobs/{job['id']}/retry")
    assert r.status_code == 409 and "queued" in r.json()["detail"]
    store.claim_job(job["id"], "w-test", stale_after_s=60)
    assert store.finish_job(job["id"], "w-test", "failed", error="boom")
    failed = idle_client.get(f"/api/v1/jobs/{job['id']}").json()
    assert failed["status"] == "failed" and failed["error"] == "boom" and failed["attempts"] == 1
    r = idle_client.post(f"/api/v1/jobs/{job['id']}/retry")
    assert r.status_code == 200, r.text
    again = r.json()
    assert again["id"] == job["id"] and again["status"] == "queued" and again["attempts"] == 0
    assert again["error"] is None and again["finished_at"] is None and again["result"] is None
    assert idle_client.get(f"/api/v1/jobs/{job['id']}").json()["enqueued_at"] is not None
    assert store.claim_job(job["id"], "w-test", stale_after_s=60).attempts == 1

    cancelled = submit(idle_client, approx()).json()
    idle_client.post(f"/api/v1/jobs/{cancelled['id']}/cancel")
    assert idle_client.post(f"/api/v1/jobs/{cancelled['id']}/retry").json()["status"] == "queued"


def test_idempotency_key(idle_client, unique_tag) -> None:
    key = f"key-{unique_tag}"
    spec = approx(tags=[unique_tag])
    first = submit(idle_client, spec, headers={"Idempotency-Key": key})
    assert first.status_code == 201
    again = submit(idle_client, spec, headers={"Idempotency-Key": key})
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    # Same spec spelled with its defaults is the same spec.
    spelled = submit(idle_client, {**spec, "mc_samples": 0, "seed": 0}, headers={"Idempotency-Key": key})
    assert spelled.json()["id"] == first.json()["id"]
    other = submit(idle_client, approx(tags=[unique_tag], rank=5), headers={"Idempotency-Key": key})
    assert other.status_code == 409 and other.json()["code"] == "conflict"

    # Concurrent first requests with one key create one job.
    key2 = f"race-{unique_tag}"
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(lambda _: submit(idle_client, spec, headers={"Idempotency-Key": key2}), range(8)))
    assert sorted(r.status_code for r in rs) == [200] * 7 + [201]
    assert len({r.json()["id"] for r in rs}) == 1
    assert len(idle_client.get("/api/v1/jobs", params={"tag": unique_tag}).json()["items"]) == 2


GAUSS = {"source": "gaussian", "m": 64, "d": 32}
TRAIN = {"kind": "train", "model": "resnet18", "dataset": "digits", "rank": 4}
BAD_SPECS = [
    ("unknown kind", {"kind": "finetune"}, [], "kind"),
    ("unknown field", approx(ranks=4), ["approx", "ranks"], "Extra inputs"),
    ("missing rank", {"kind": "approx", "weights": GAUSS}, ["approx", "rank"], "Field required"),
    ("rank above min(m,d)", approx(rank=33), ["approx", "rank"], "rank must be <= min(m, d) = 32"),
    ("rank zero", approx(rank=0), ["approx", "rank"], "greater than or equal to 1"),
    ("bad method", approx(method="svd"), ["approx", "method"], "'spectral'"),
    ("bad weights source", approx(weights={"source": "url", "url": "x"}), ["approx", "weights"], "gaussian"),
    ("matrix too large", approx(weights={"source": "gaussian", "m": 100_000, "d": 100_000}),
     ["approx", "weights", "gaussian", "d"], "LOWRANK_MAX_MATRIX_ELEMENTS"),
    ("bad layer name", approx(weights={"source": "model_layer", "model": "resnet18", "layer": "../x"}),
     ["approx", "weights", "model_layer", "layer"], "pattern"),
    ("bad model", {**TRAIN, "model": "vgg16"}, ["train", "model"], "resnet18"),
    ("rank and rank_ratio", {**TRAIN, "rank_ratio": 0.5}, ["train", "rank_ratio"], "exactly one of rank or rank_ratio"),
    ("neither rank nor ratio", {k: v for k, v in TRAIN.items() if k != "rank"}, ["train", "init"], "rank_ratio"),
    ("dense with a rank", {**TRAIN, "init": "dense"}, ["train", "init"], "leave rank and rank_ratio out"),
    ("bad layer in include", {**TRAIN, "include": ["layer1/conv"]}, ["train", "include"], "dotted layer name"),
    ("too many epochs", {**TRAIN, "epochs": 10**6}, ["train", "epochs"], "LOWRANK_MAX_EPOCHS"),
    ("bad amp", {**TRAIN, "amp": "fp8"}, ["train", "amp"], "'bf16'"),
    ("amp on cpu", {**TRAIN, "amp": "bf16"}, ["train", "device"], "amp='bf16' needs a CUDA device; on device cpu"),
    ("rank that factorizes no layer", {**TRAIN, "rank": 1000}, ["train", "rank"],
     "rank 1000 factorizes no layer of resnet18 (every layer would keep its full size"),
    ("ratio that factorizes no included layer", {**TRAIN, "rank": None, "rank_ratio": 0.9, "include": ["layer1"]},
     ["train", "rank_ratio"], "rank_ratio 0.9 factorizes no layer of the included layers of resnet18"),
    ("latency-aware dense baseline", {**TRAIN, "rank": None, "init": "dense", "latency_aware": True},
     ["train", "latency_aware"], "latency_aware chooses which layers to factor: give rank or rank_ratio too"),
    ("latency batch 0", {**TRAIN, "latency_aware": True, "latency_batch": 0}, ["train", "latency_batch"],
     "greater than or equal to 1"),
    ("unknown layer in include", {**TRAIN, "include": ["layer9"]}, ["train", "include"],
     "include: no Conv2d/Linear layer named 'layer9'"),
    ("batch larger than the data", {**TRAIN, "batch_size": 2000}, ["train", "batch_size"],
     "exceeds the 1437 training images of digits"),
    ("recipe warm-up longer than the run", {**TRAIN, "dataset": "cifar10", "recipe": "imagenet",
                                            "model": "efficientnet_b0", "epochs": 2},
     ["train", "warmup_epochs"], "warmup_epochs must be <= epochs (2), got 5.0 (the value of recipe 'imagenet')"),
    ("unknown recipe", {**TRAIN, "recipe": "mnist"}, ["train", "recipe"], "'digits'"),
    ("imagefolder outside roots", {**TRAIN, "dataset": "imagefolder", "data_root": "/etc"}, ["train", "data_root"],
     "LOWRANK_DATA_ROOTS"),
    ("negative seed", approx(seed=-1), ["approx", "seed"], "greater than or equal to 0"),
    ("bad priority", approx(priority="urgent"), ["approx", "priority"], "'high'"),
    ("bad tag", approx(tags=["has space"]), ["approx", "tags", 0], "pattern"),
    ("eps out of range", {"kind": "learn", "teacher": GAUSS, "rank": 2, "eps": 1.5}, ["learn", "eps"], "less than 1"),
    ("unknown upload", approx(weights={"source": "upload", "upload_id": str(uuid.uuid4())}),
     ["approx", "weights", "upload_id"], "no upload with id"),
]


@pytest.mark.parametrize("spec,loc,msg", [b[1:] for b in BAD_SPECS], ids=[b[0] for b in BAD_SPECS])
def test_bad_spec_is_422_naming_the_field(idle_client, spec, loc, msg) -> None:
    r = submit(idle_client, spec)
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert errors, r.text
    err = errors[0]
    assert err["loc"][0] == "body" and err["loc"][1:] == loc, errors
    assert msg in err["msg"] or msg in json.dumps(err), errors


def test_malformed_json_is_422(idle_client) -> None:
    r = idle_client.post("/api/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_metrics_downsampling(idle_client) -> None:
    job = submit(idle_client, approx()).json()
    n = 10_000
    steps = np.arange(n)
    loss = np.exp(-steps / 3000) + 0.01 * np.sin(steps)
    loss[1234] = 5.0  # a spike the chart must show
    loss[8765] = -1.0  # and a dip
    rows = [("loss", int(s), float(v)) for s, v in zip(steps, loss)] + [("lr", int(s), 0.1) for s in range(0, n, 100)]
    store.record_metrics(job["id"], rows[:6000])
    store.record_metrics(job["id"], rows[5000:])  # overlapping batch (a resumed run): no duplicates
    store.record_metrics(job["id"], [("nan_metric", 0, float("nan")), ("nan_metric", 1, 2.0)])

    r = idle_client.get(f"/api/v1/jobs/{job['id']}/metrics", params={"name": "loss", "max_points": 200})
    assert r.status_code == 200
    (series,) = r.json()["series"]
    assert series["name"] == "loss" and series["total"] == n and series["downsampled"] is True
    assert len(series["steps"]) <= 200 and len(series["steps"]) >= 150
    assert series["steps"][0] == 0 and series["steps"][-1] == n - 1
    assert series["steps"] == sorted(series["steps"])
    assert 1234 in series["steps"] and 8765 in series["steps"]
    assert max(series["values"]) == 5.0 and min(series["values"]) == -1.0
    # Every returned point is a stored point.
    assert all(loss[s] == v for s, v in zip(series["steps"], series["values"]))

    every = idle_client.get(f"/api/v1/jobs/{job['id']}/metrics", params={"max_points": 100_000}).json()["series"]
    by_name = {s["name"]: s for s in every}
    assert sorted(by_name) == ["loss", "lr", "nan_metric"]
    assert by_name["lr"]["total"] == 100 and by_name["lr"]["downsampled"] is False
    assert by_name["loss"]["steps"] == list(range(n))
    assert by_name["nan_metric"]["values"] == [None, 2.0]

    assert idle_client.get(f"/api/v1/jobs/{job['id']}/metrics", params={"max_points": 1}).status_code == 422
    assert idle_client.get(f"/api/v1/jobs/{uuid.uuid4()}/metrics").status_code == 404


def test_artifact_listing_and_download(idle_client) -> None:
    job = submit(idle_client, approx()).json()
    folder = get_settings().artifacts / job["id"]
    folder.mkdir(parents=True)
    data = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    payload = st_save({"U": data, "V": data.T.copy()})
    path = folder / "factors.safetensors"
    path.write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    store.add_artifact(job["id"], "factors.safetensors", path, len(payload), digest)
    store.add_artifact(job["id"], "factors.safetensors", path, len(payload), digest)  # idempotent
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "last.pt").write_bytes(b"ckpt")
    store.add_artifact(job["id"], "checkpoints/last.pt", folder / "checkpoints" / "last.pt", 4,
                       hashlib.sha256(b"ckpt").hexdigest())

    listing = idle_client.get(f"/api/v1/jobs/{job['id']}/artifacts").json()
    assert [a["name"] for a in listing] == ["checkpoints/last.pt", "factors.safetensors"]
    fac = listing[1]
    assert fac["size"] == len(payload) and fac["sha256"] == digest
    r = idle_client.get(fac["url"])
    assert r.status_code == 200 and r.content == payload and r.headers["x-checksum-sha256"] == digest
    assert idle_client.get(listing[0]["url"]).content == b"ckpt"

    assert idle_client.get(f"/api/v1/jobs/{job['id']}/artifacts/nope.bin").status_code == 404
    # A row pointing outside the artifact root is never served.
    store.add_artifact(job["id"], "passwd", "/etc/passwd", 1, "0" * 64)
    assert idle_client.get(f"/api/v1/jobs/{job['id']}/artifacts/passwd").status_code == 404


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def test_upload_round_trip_and_validation(idle_client) -> None:
    w = np.random.default_rng(1).standard_normal((12, 8)).astype(np.float32)
    r = idle_client.post("/api/v1/uploads", files={"file": ("w.npy", _npy(w))})
    assert r.status_code == 201, r.text
    up = r.json()
    assert up["format"] == "npy" and up["arrays"] == {"array": {"shape": [12, 8], "dtype": "float32"}}
    assert up["sha256"] == hashlib.sha256(_npy(w)).hexdigest()
    stored = store.get_upload_path(up["id"])
    assert stored.parent == get_settings().artifacts / "uploads" and np.array_equal(np.load(stored), w)
    assert idle_client.get(f"/api/v1/uploads/{up['id']}").json()["id"] == up["id"]

    ok = submit(idle_client, approx(weights={"source": "upload", "upload_id": up["id"]}, rank=8))
    assert ok.status_code == 201, ok.text
    too_big = submit(idle_client, approx(weights={"source": "upload", "upload_id": up["id"]}, rank=9))
    assert too_big.status_code == 422
    assert too_big.json()["detail"][0]["loc"] == ["body", "approx", "rank"]
    assert "min(m, d) = 8" in too_big.json()["detail"][0]["msg"]

    # .safetensors with two matrices: `key` picks one and must name a stored array.
    st = st_save({"a": w, "b": np.ones((3, 5), np.float32)})
    up2 = idle_client.post("/api/v1/uploads", files={"file": ("two.safetensors", st)}).json()
    assert up2["arrays"]["b"] == {"shape": [3, 5], "dtype": "float32"}
    needs_key = submit(idle_client, {"kind": "learn", "teacher": {"source": "upload", "upload_id": up2["id"]},
                                     "rank": 2})
    assert needs_key.status_code == 422 and needs_key.json()["detail"][0]["loc"] == ["body", "learn", "teacher", "key"]
    with_key = {"kind": "learn", "teacher": {"source": "upload", "upload_id": up2["id"], "key": "b"}, "rank": 3}
    assert submit(idle_client, with_key).status_code == 201
    assert submit(idle_client, {**with_key, "rank": 4}).status_code == 422

    npz = io.BytesIO()
    np.savez(npz, weight=w)
    assert idle_client.post("/api/v1/uploads", files={"file": ("w.npz", npz.getvalue())}).json()["arrays"] == {
        "weight": {"shape": [12, 8], "dtype": "float32"}}
    import torch  # the test process may; the API never does

    buf = io.BytesIO()
    torch.save({"weight": torch.from_numpy(w)}, buf)
    pt = idle_client.post("/api/v1/uploads", files={"file": ("w.pt", buf.getvalue())})
    assert pt.status_code == 201 and pt.json()["format"] == "pt"
    assert pt.json()["arrays"] == {"weight": {"shape": [12, 8], "dtype": "float32"}}  # a .pt's state_dict, by name

    for name, content, needle in [
        ("w.txt", b"1 2 3", "unsupported extension"),
        ("w.npy", b"garbage", "not a valid .npy"),
        ("w.npy", _npy(np.array([{"x": 1}], dtype=object)), "not a valid .npy"),  # pickled object: refused
        ("w.npy", _npy(np.ones(5, np.float32)), "no 2-D array"),
        ("w.npy", _npy(np.array([[1.0, np.nan]])), "NaN"),
        ("w.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}", "not a valid .safetensors"),
        ("w.npy", b"", "empty"),
    ]:
        r = idle_client.post("/api/v1/uploads", files={"file": (name, content)})
        assert r.status_code == 422, (name, r.text)
        assert r.json()["detail"][0]["loc"] == ["body", "file"] and needle in r.json()["detail"][0]["msg"], r.text
    # Nothing half-written is left behind by the rejected files.
    assert not list((get_settings().artifacts / "uploads").glob(".incoming-*"))


def test_broker_down_readyz_503_and_jobs_kept_for_resend(spawn_api) -> None:
    server = spawn_api(env={"LOWRANK_BROKER_URL": "redis://127.0.0.1:1/0"}, ready_path="/healthz")
    t0 = time.monotonic()
    r = httpx.get(f"{server.url}/readyz", timeout=30)
    assert r.status_code == 503
    assert r.json()["checks"]["database"] == "ok" and r.json()["checks"]["broker"].startswith("unreachable")
    assert time.monotonic() - t0 < 10
    # A job submitted while the broker is down is stored (201) and marked for the reaper to re-send.
    t0 = time.monotonic()
    r = httpx.post(f"{server.url}/api/v1/jobs", json=approx(), timeout=30)
    assert r.status_code == 201, r.text
    assert time.monotonic() - t0 < 10
    job = store.get_job(r.json()["id"])
    assert job.status == "queued" and job.enqueued_at is None
    assert job.id in [j for j, _, _ in store.find_lost_queued_jobs(3600)]
    store.mark_enqueued([job.id])
    assert job.id not in [j for j, _, _ in store.find_lost_queued_jobs(3600)]


def test_api_refuses_to_start_on_a_database_not_at_head(scratch_database) -> None:
    url = scratch_database()
    env = {**os.environ, "LOWRANK_DATABASE_URL": url}
    proc = subprocess.run([sys.executable, "-m", "uvicorn", "api.main:app", "--port", "0"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "not at head" in proc.stderr and "lowrank db upgrade" in proc.stderr, proc.stderr[-2000:]


def test_body_and_upload_limits_are_413_naming_the_setting(spawn_api) -> None:
    server = spawn_api(env={"LOWRANK_MAX_BODY_BYTES": "2048", "LOWRANK_MAX_UPLOAD_BYTES": "4096"})
    with httpx.Client(base_url=server.url, timeout=30) as c:
        big = approx(name="x" * 100, tags=[f"t{i}" for i in range(30)]) | {"pad": "y" * 3000}
        r = c.post("/api/v1/jobs", json=big)
        assert r.status_code == 413 and "LOWRANK_MAX_BODY_BYTES" in r.json()["detail"]

        def chunks():  # no Content-Length: counted as it streams
            yield b'{"kind": "approx", "name": "'
            for _ in range(10):
                yield b"z" * 500
            yield b'"}'

        r = c.post("/api/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "LOWRANK_MAX_BODY_BYTES" in r.json()["detail"]
        assert c.post("/api/v1/jobs", json=approx()).status_code == 201  # under the limit: fine

        w = np.zeros((40, 40), np.float32)  # 6.5 kB as .npy: over the 4 kB upload limit
        r = c.post("/api/v1/uploads", files={"file": ("w.npy", _npy(w))})
        assert r.status_code == 413 and "LOWRANK_MAX_UPLOAD_BYTES" in r.json()["detail"]
        assert not list((get_settings().artifacts / "uploads").glob(".incoming-*"))
        small = c.post("/api/v1/uploads", files={"file": ("w.npy", _npy(np.zeros((8, 8), np.float32)))})
        assert small.status_code == 201


def test_unstorable_input_is_422_not_500(idle_client) -> None:
    """Values Postgres cannot store (NUL bytes, NaN, infinity) are rejected by validation."""
    for spec, loc in [
        (approx(name="a\x00b"), ["body", "approx", "name"]),
        ({"kind": "learn", "teacher": GAUSS, "rank": 2, "noise": float("inf")}, ["body", "learn", "noise"]),
        ({**TRAIN, "lr": float("nan")}, ["body", "train", "lr"]),
    ]:
        r = idle_client.post("/api/v1/jobs", content=json.dumps(spec).encode(),
                             headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == loc, r.text
    assert idle_client.get("/api/v1/jobs", params={"tag": "a\x00"}).status_code == 422
    assert idle_client.get("/api/v1/jobs", params={"owner": "a\x00"}).status_code == 422
    job = submit(idle_client, approx()).json()
    r = idle_client.get(f"/api/v1/jobs/{job['id']}/metrics", params={"name": "x\x00"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "name", 0]
    w = np.ones((3, 3), np.float32)
    r = idle_client.post("/api/v1/uploads", files={"file": ("../../a\x01b.npy", _npy(w))})
    # Only the last path component is kept, as a display name (httpx percent-encodes the \x01).
    assert r.status_code == 201 and r.json()["filename"] == "a%01b.npy"


def test_only_owner_or_admin_may_cancel_or_retry(idle_client) -> None:
    """The store's ownership rule (the API passes the caller; with auth off every caller is an admin)."""
    job, _ = store.create_job(approx(), owner="alice")
    with pytest.raises(Forbidden, match="belongs to alice"):
        store.request_cancel(job.id, actor="bob", admin=False)
    assert store.get_job(job.id).status == "queued"
    assert store.request_cancel(job.id, actor="alice", admin=False).status == "cancelled"
    with pytest.raises(Forbidden):
        store.retry_job(job.id, actor="bob", admin=False)
    assert store.retry_job(job.id, actor="carol", admin=True).status == "queued"
    # Auth off: anonymous callers act as admins.
    assert idle_client.post(f"/api/v1/jobs/{job.id}/cancel").json()["status"] == "cancelled"
