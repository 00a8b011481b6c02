"""Each job kind end to end: HTTP submit -> Postgres -> Redis -> real Celery worker -> core -> result.

Results are checked against core/ run here in the test process on the same inputs (the same
seeded matrix or the uploaded file), and the factors artifact is downloaded and re-evaluated.
"""
from __future__ import annotations

import hashlib
import io
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load as load_safetensors

from core.approx import approximate, function_error
from core.weights import gaussian_weights

pytestmark = [pytest.mark.service]


@pytest.fixture(autouse=True)
def _worker(worker_process):  # every test here needs the session's live worker
    return worker_process


def download_factors(client, job_id: str) -> tuple[np.ndarray, np.ndarray, dict]:
    listing = client.get(f"/api/v1/jobs/{job_id}/artifacts").json()
    (entry,) = [a for a in listing if a["name"] == "factors.safetensors"]
    r = client.get(entry["url"])
    assert r.status_code == 200
    assert hashlib.sha256(r.content).hexdigest() == entry["sha256"] == r.headers["X-Checksum-SHA256"]
    assert len(r.content) == entry["size"]
    tensors = load_safetensors(r.content)
    return tensors["U"], tensors["V"], entry


def test_approx_gaussian_job(client, wait_job, unique_tag):
    spec = {"kind": "approx", "weights": {"source": "gaussian", "m": 96, "d": 48}, "rank": 6, "method": "nkp",
            "seed": 7, "mc_samples": 4000, "tags": [unique_tag]}
    t0 = time.monotonic()
    r = client.post("/api/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    running = wait_job(client, job_id, statuses=("running", "succeeded", "failed"), timeout=30)
    submit_to_running = time.monotonic() - t0
    job = wait_job(client, job_id)
    assert job["status"] == "succeeded", job["error"]
    res = job["result"]
    assert (res["m"], res["d"], res["rank"], res["method"]) == (96, 48, 6, "nkp")
    # Same seeded matrix, same method, here: the worker's number is the real one.
    W = gaussian_weights(96, 48, 7)
    expected = approximate(W, 6, "nkp", seed=7)
    assert res["error"] == pytest.approx(expected.error, rel=1e-5)
    assert 0 < res["error"] < 1
    assert res["iterations"] >= 1 and res["time_s"] > 0
    # Monte Carlo estimate agrees with the closed form within a few standard errors.
    assert abs(res["mc_error"] - res["error"]) < 5 * res["mc_stderr"] + 1e-3
    U, V, _ = download_factors(client, job_id)
    assert U.shape == (96, 6) and V.shape == (6, 48)
    assert function_error(W, torch.from_numpy(U) @ torch.from_numpy(V)) == pytest.approx(res["error"], rel=1e-4)
    assert job["attempts"] == 1 and job["progress"] == 1.0
    assert job["started_at"] is not None and job["finished_at"] >= job["started_at"]
    print(f"\nsubmit-to-running (poll 0.2 s, {running['status']} seen): {submit_to_running:.2f} s")


def test_approx_from_uploaded_npy(client, wait_job, unique_tag):
    rng = np.random.default_rng(3)
    W = (rng.standard_normal((40, 30)) / np.sqrt(30)).astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, W)
    r = client.post("/api/v1/uploads", files={"file": ("layer.npy", buf.getvalue(), "application/octet-stream")})
    assert r.status_code == 201, r.text
    upload_id = r.json()["id"]
    spec = {"kind": "approx", "weights": {"source": "upload", "upload_id": upload_id}, "rank": 5,
            "method": "spectral", "tags": [unique_tag]}
    r = client.post("/api/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    res = job["result"]
    assert (res["m"], res["d"], res["rank"], res["method"]) == (40, 30, 5, "spectral")
    expected = approximate(torch.from_numpy(W), 5, "spectral")
    assert res["error"] == pytest.approx(expected.error, rel=1e-5)
    U, V, _ = download_factors(client, job["id"])
    assert U.shape == (40, 5) and V.shape == (5, 30)


def test_learn_job(client, wait_job, unique_tag):
    spec = {"kind": "learn", "teacher": {"source": "gaussian", "m": 32, "d": 16}, "rank": 4, "eps": 0.1,
            "delta": 0.05, "seed": 1, "tags": [unique_tag]}
    r = client.post("/api/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    res = job["result"]
    assert res["estimator"] == "least_squares" and res["samples"] > 16
    assert "n =" in res["rule"]
    # The learner's promise: within eps of NKP on the true W (noiseless: essentially equal).
    assert res["error"] <= res["nkp_error"] + 0.1
    assert 0 < res["nkp_error"] < 1
    U, V, _ = download_factors(client, job["id"])
    assert U.shape == (32, 4) and V.shape == (4, 16)
    W = gaussian_weights(32, 16, 1)
    assert function_error(W.double(), torch.from_numpy(U) @ torch.from_numpy(V)) == pytest.approx(res["error"], rel=1e-4)


@pytest.mark.timeout(300)
def test_train_job_end_to_end_and_resume_after_stale_heartbeat(client, wait_job, unique_tag, database_url):
    """A tiny factored training (two small layers of ResNet-18 at rank 4 with NKP init, 2 short epochs of
    synthetic images): summary, metrics, checkpoint and init report. Then its row is made to look
    like a dead worker's (running, heartbeat an hour old): the reaper re-queues it and the re-run
    resumes from the checkpoint instead of starting over."""
    layers = ["layer1.0.conv1", "layer2.0.conv2"]
    spec = {"kind": "train", "model": "resnet18", "dataset": "synthetic", "rank": 4, "init": "nkp",
            "include": layers, "epochs": 2, "batch_size": 32, "synthetic_train_size": 128,
            "synthetic_val_size": 64, "lr": 0.05, "log_every": 1, "tags": [unique_tag],
            "small_input": False}  # the standard stem: 32 px would get the small one, 16x the compute
    r = client.post("/api/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    job = wait_job(client, job_id, timeout=240)
    assert job["status"] == "succeeded", job["error"]
    res = job["result"]
    assert res["epochs"] == 2 and 0 <= res["val_top1"] <= 1 and res["train_loss"] > 0
    assert res["params_factored"] < res["params_dense"]
    assert res["resumed_from_epoch"] is None
    series = {s["name"]: s for s in client.get(f"/api/v1/jobs/{job_id}/metrics").json()["series"]}
    # Every row the run reported, exactly once (a lost or extra write shows here): at each of the
    # 8 steps (4 x 2 epochs, log_every=1) train_loss_step, lr and epoch; at the epoch ends 4 and 8
    # the epoch-level series.
    every_step, ends = list(range(1, 9)), [4, 8]
    assert {name: s["steps"] for name, s in series.items()} == {
        "train_loss_step": every_step, "lr": every_step, "epoch": every_step,
        **{k: ends for k in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "epoch_time_s",
                             "images_per_s")}}
    assert series["epoch"]["values"] == [1.0] * 4 + [2.0] * 4
    # The epoch means have their own series, at each epoch's last step: never mixed into the step series.
    assert series["train_loss"]["steps"] == [4, 8]
    assert series["train_loss"]["values"][-1] == pytest.approx(res["train_loss"])
    assert series["train_loss_step"]["values"][3] != pytest.approx(series["train_loss"]["values"][0])
    assert len(series["val_top1"]["values"]) == 2
    assert series["val_top1"]["values"][-1] == pytest.approx(res["val_top1"])
    names = {a["name"]: a for a in client.get(f"/api/v1/jobs/{job_id}/artifacts").json()}
    assert {"checkpoints/last.pt", "init_report.json"} <= set(names)
    report = client.get(names["init_report.json"]["url"]).json()
    assert report["totals"]["layers_factored"] == 2
    factored = [row for row in report["layers"] if row["status"] == "factored"]
    assert sorted(row["layer"] for row in factored) == layers
    assert all(row["rank"] == 4 and 0 < row["error"] <= row["spectral_error"] + 1e-6 for row in factored)

    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET status='running', worker='ghost@nowhere:1', result=NULL, "
                          "finished_at=NULL, heartbeat_at=now() - interval '1 hour' WHERE id=:id"), {"id": job_id})
    engine.dispose()
    again = wait_job(client, job_id, statuses=("succeeded", "failed"), timeout=120)
    assert again["status"] == "succeeded", again["error"]
    assert again["attempts"] == 2 and again["worker"] != "ghost@nowhere:1"
    assert again["result"]["resumed_from_epoch"] == 2
    assert again["result"]["val_top1"] == pytest.approx(res["val_top1"])  # nothing trained twice


@pytest.mark.timeout(180)
def test_a_diverging_train_job_fails_with_what_to_change(client, wait_job, unique_tag):
    """lr 100: the loss is NaN within a few steps. The job is `failed` with core's one-line message
    (where, the loss, what to change), no traceback."""
    spec = {"kind": "train", "model": "resnet18", "dataset": "synthetic", "rank": 4, "init": "nkp",
            "include": ["layer1.0.conv1"], "epochs": 2, "batch_size": 16, "synthetic_train_size": 64,
            "synthetic_val_size": 16, "small_input": False, "lr": 100, "tags": [unique_tag]}
    r = client.post("/api/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    job = wait_job(client, r.json()["id"], timeout=150)
    assert job["status"] == "failed" and job["result"] is None
    # a step's loss, or the first epoch's val loss, is NaN (which comes first depends on the data)
    assert re.match(r"diverged at (epoch 1 step \d+: loss|the end of epoch 1: val_loss) nan \(started at [\d.]+\); ",
                    job["error"]), job["error"]
    assert job["error"].endswith("lower lr (now 100) or warm up longer (warmup_epochs now 0.5)"), job["error"]
    assert "\n" not in job["error"] and "Traceback" not in job["error"]


@pytest.mark.timeout(180)
def test_a_train_job_at_chance_level_succeeds_with_a_warning(client, wait_job, unique_tag):
    """Two steps at lr 1e-6 learn nothing: the job succeeds and its result says so in `warnings`."""
    spec = {"kind": "train", "model": "resnet18", "dataset": "synthetic", "init": "dense", "epochs": 1,
            "batch_size": 16, "synthetic_train_size": 64, "synthetic_val_size": 256, "small_input": False,
            "image_size": 16, "lr": 1e-6, "warmup_epochs": 0, "max_train_batches": 2, "tags": [unique_tag]}
    r = client.post("/api/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    job = wait_job(client, r.json()["id"], timeout=150)
    assert job["status"] == "succeeded", job["error"]
    (warning,) = job["result"]["warnings"]
    assert f"val_top1 {job['result']['val_top1']:.3f} is at chance level: 10 classes give 1/10 = 0.100" in warning


def _process_group(pgid: int) -> set[int]:
    """The live processes of process group `pgid` (a job process leads its own: it and its loader workers)."""
    members = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.add(int(stat.parent.name))
    return members


@pytest.mark.timeout(180)
def test_train_job_with_dataloader_worker_processes(client, wait_job, unique_tag, worker_process):
    """num_workers > 0: the job's process is not daemonic (Celery's prefork pool processes were, and
    multiprocessing refused to start their children: the job failed). The job succeeds, its summary records
    the two loader workers, and none of them outlives the job (its process group is empty afterwards)."""
    spec = {"kind": "train", "model": "resnet18", "dataset": "synthetic", "rank": 4, "init": "nkp",
            "include": ["layer1.0.conv1"], "epochs": 2, "batch_size": 32, "synthetic_train_size": 64,
            "synthetic_val_size": 32, "num_workers": 2, "small_input": False, "tags": [unique_tag]}
    r = client.post("/api/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    job = wait_job(client, r.json()["id"], timeout=150)
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["epochs"] == 2 and job["result"]["config"]["num_workers"] == 2
    (job_pid,) = map(int, re.findall(rf"job {job['id']}: process (\d+) started", worker_process.logs()))
    deadline = time.monotonic() + 10
    while _process_group(job_pid) and time.monotonic() < deadline:  # loader workers exit as the epoch ends
        time.sleep(0.2)
    assert _process_group(job_pid) == set()
