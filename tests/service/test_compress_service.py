"""The compress job kind on the real stack (Postgres, Redis, a Celery worker, uvicorn): a dense ResNet-18 trained
by a train job is compressed by its job id (and fine-tuned), compressed again from the compress job, and an
uploaded state_dict is compressed; a source that is missing, unfinished, of the wrong kind, another user's or not
the architecture's is a 422 naming the field before anything is queued.

Kept small (digits at its native 8 px, a part of one training epoch, a few calibration images, two stages of
the network), so the numbers checked are the recorded ones against each other and against an independent
evaluation of the downloaded artifact in this process, not accuracies worth reporting.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from test_dashboard import POLL, browser, context, web  # noqa: F401 - the dashboard tests' fixtures (same folder)

from jobs import auth

pytestmark = pytest.mark.service

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 600  # a loaded 2-core machine: the dense train takes ~1-2 min, a compress job ~1 min
SMALL = {"calib_images": 64, "heldout_images": 32, "include": ["layer1", "layer2"]}


def wait(c: httpx.Client, job_id: str, timeout: float = TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    pytest.fail(f"job {job_id} not finished after {timeout} s: {job}", pytrace=False)


def submit(c: httpx.Client, spec: dict) -> httpx.Response:
    return c.post("/api/v1/jobs", json=spec)


def detail(r: httpx.Response) -> dict:
    assert r.status_code == 422, r.text
    return r.json()["detail"][0]


@pytest.fixture(scope="module")
def api(api_server, worker_process):
    with httpx.Client(base_url=api_server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def dense(api) -> dict:
    """A dense ResNet-18 trained by a train job: digits' recipe (8 px, small-input stem), 8 steps of one epoch."""
    r = submit(api, {"kind": "train", "model": "resnet18", "dataset": "digits", "init": "dense", "epochs": 1,
                     "max_train_batches": 8, "tags": ["compress-service"]})
    assert r.status_code == 201, r.text
    job = wait(api, r.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    return job


def download(c: httpx.Client, job_id: str, name: str, path) -> None:
    r = c.get(f"/api/v1/jobs/{job_id}/artifacts/{name}")
    assert r.status_code == 200, r.text
    path.write_bytes(r.content)


def digits_top1(model: torch.nn.Module) -> float:
    """Top-1 on digits' validation split at 8 px, computed here (not by the service)."""
    from torch.utils.data import DataLoader

    from core.calibration import evaluate_top1
    from core.data import build_datasets

    _, val, _ = build_datasets("digits", image_size=8, seed=0)
    return evaluate_top1(model, DataLoader(val, batch_size=64), torch.device("cpu"))["top1"]


def series(c: httpx.Client, job_id: str) -> dict[str, dict]:
    return {s["name"]: s for s in c.get(f"/api/v1/jobs/{job_id}/metrics").json()["series"]}


@pytest.fixture(scope="module")
def compressed(api, dense) -> dict:
    """The dense job compressed by its id (whiten, half of layer1-2's weights) and fine-tuned for one epoch."""
    spec = {"kind": "compress", "source": {"job": dense["id"]}, "method": "whiten", "budget": 0.5, **SMALL,
            "finetune_epochs": 1, "finetune": {"max_train_batches": 4}, "tags": ["compress-service"]}
    r = submit(api, spec)
    assert r.status_code == 201, r.text
    stored = r.json()["spec"]
    assert stored["finetune"]["lr"] == 0.02 and stored["finetune"]["recipe"] == "digits"  # the recipe, resolved
    job = wait(api, r.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    return job


def test_a_train_job_compressed_by_id_records_its_numbers(api, dense, compressed, tmp_path):
    res = compressed["result"]
    print(f"\ncompress job: top-1 dense {res['top1_dense']:.4f} -> compressed {res['top1_compressed_before_bn']:.4f} "
          f"(BN re-estimated {res['top1_compressed']:.4f}) -> fine-tuned {res['top1_finetuned']}; params "
          f"{res['params_dense']:,} -> {res['params_compressed']:,}; {res['run_time_s']:.1f} s")
    # The dense model compressed is the train job's: the same top-1 on the same validation split.
    assert res["top1_dense"] == pytest.approx(dense["result"]["val_top1"], abs=1e-9)
    assert res["model"] == "resnet18" and res["small_input"] is True and res["num_classes"] == 10
    assert res["source"]["from"] == f"train job {dense['id']}" and res["source"]["kind"] == "train_checkpoint"
    assert res["params_dense"] == dense["result"]["params_dense"]
    # Per layer: layer1-2's convs factored within the budget, the rest dense with a reason; sizes add up.
    rows = {row["layer"]: row for row in res["layers"]}
    factored = [row for row in rows.values() if row["status"] == "factored"]
    assert res["layers_factored"] == len(factored) >= 8
    assert all(r["layer"].startswith(("layer1", "layer2")) for r in factored)
    assert rows["layer3.0.conv1"]["reason"] == "not included" and rows["fc"]["status"] == "skipped"
    assert res["budget_used"] <= 0.5 and res["weights_compressible_kept"] <= 0.5 * res["weights_compressible_dense"]
    assert res["params_dense"] - res["params_compressed"] == sum(r["params_dense"] - r["params_compressed"]
                                                                 for r in rows.values())
    for row in factored:
        m, d = row["shape"][0], int(np.prod(row["shape"][1:]))
        assert 1 <= row["rank"] < m * d / (m + d)
        assert row["params_compressed"] == row["rank"] * (m + d)  # U and V; no bias in ResNet convs
        assert 0 <= row["linear_error"] < 1 and 0 <= row["block_error"] < 1 and row["surrogate_error"] >= 0
    assert res["macs_compressed"] < res["macs_dense"]
    assert res["top1_finetuned"] == [res["val_top1"]] and res["finetune"]["recipe"] == "digits"
    assert res["finetune"]["max_train_batches"] == 4 and res["finetune"]["epochs"] == 1
    # Metrics: the top-1 steps at step 0, the fine-tune epoch at step 1 with the rows early stopping reads.
    s = series(api, compressed["id"])
    assert s["top1_dense"]["values"] == [pytest.approx(res["top1_dense"])]
    assert s["top1_compressed"]["values"] == [pytest.approx(res["top1_compressed"])]
    assert s["val_top1"]["steps"] == [1] and s["val_top1"]["values"] == [pytest.approx(res["val_top1"])]
    assert s["epoch"]["values"] == [1.0] and s["epoch_time_s"]["values"][0] > 0
    # The artifact rebuilds the final (fine-tuned) model: its top-1, computed here, is the recorded one.
    names = {a["name"] for a in api.get(f"/api/v1/jobs/{compressed['id']}/artifacts").json()}
    assert names == {"compressed.safetensors", "compress_report.json"}
    download(api, compressed["id"], "compressed.safetensors", tmp_path / "c.safetensors")
    from core.artifact import load_compressed

    model, spec = load_compressed(tmp_path / "c.safetensors")
    assert {e["layer"]: e["rank"] for e in spec["factored"]} == {r["layer"]: r["rank"] for r in factored}
    assert digits_top1(model) == pytest.approx(res["val_top1"], abs=1e-9)


def test_a_compress_job_is_a_source_too(api, compressed):
    """Re-evaluate the compressed model: budget 1 factors nothing more, spectral needs no calibration."""
    r = submit(api, {"kind": "compress", "source": {"job": compressed["id"]}, "method": "spectral", "budget": 1.0,
                     "calib_images": 16, "heldout_images": 16, "bn_reestimate": False})
    assert r.status_code == 201, r.text
    job = wait(api, r.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    res = job["result"]
    assert res["source"]["kind"] == "compressed" and res["layers_factored"] == 0
    assert res["top1_dense"] == pytest.approx(compressed["result"]["val_top1"], abs=1e-9)
    assert res["top1_compressed"] == pytest.approx(res["top1_dense"], abs=1e-9)
    assert res["params_dense"] == res["params_compressed"] == compressed["result"]["params_compressed"]


def _state_dict(api, dense, tmp_path) -> dict[str, torch.Tensor]:
    download(api, dense["id"], "checkpoints/last.pt", tmp_path / "last.pt")
    return torch.load(tmp_path / "last.pt", weights_only=True)["model"]


def _upload(c: httpx.Client, state: dict[str, torch.Tensor], name: str) -> dict:
    buf = io.BytesIO()
    if name.endswith(".safetensors"):
        from safetensors.torch import save

        buf.write(save({k: v.contiguous() for k, v in state.items()}))
    else:
        torch.save(state, buf)
    r = c.post("/api/v1/uploads", files={"file": (name, buf.getvalue())})
    assert r.status_code == 201, r.text
    return r.json()


def test_an_uploaded_state_dict_is_listed_checked_and_compressed(api, dense, tmp_path):
    state = _state_dict(api, dense, tmp_path)
    up = _upload(api, state, "r18.safetensors")
    listed = api.get(f"/api/v1/uploads/{up['id']}").json()["arrays"]
    assert {k: v["shape"] for k, v in listed.items()} == {k: list(v.shape) for k, v in state.items()}
    source = {"upload": up["id"], "model": "resnet18"}
    r = submit(api, {"kind": "compress", "source": source, "method": "asvd", "rank_ratio": 0.25,
                     "image_size": 8, "calib_images": 32, "heldout_images": 16, "include": ["layer2"]})
    assert r.status_code == 201, r.text
    job = wait(api, r.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    res = job["result"]
    assert res["source"]["from"].startswith(f"upload {up['id']}") and res["small_input"] is True  # from the stem
    assert res["top1_dense"] == pytest.approx(dense["result"]["val_top1"], abs=1e-9)
    assert {r_["layer"] for r_ in res["layers"] if r_["status"] == "factored"} == {
        "layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv1", "layer2.1.conv2"}

    # Not the architecture: the first mismatched key (in the model's order), or the missing ones, before queueing.
    bad = dict(state)
    bad["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    bad["layer3.0.conv2.weight"] = torch.zeros(256, 256, 1, 1)
    d = detail(submit(api, {"kind": "compress", "budget": 0.5,
                            "source": {"upload": _upload(api, bad, "bad.safetensors")["id"], "model": "resnet18"}}))
    assert d["loc"] == ["body", "compress", "source", "upload"]
    assert "first mismatched key 'layer1.0.conv1.weight': file has shape (64, 64, 1, 1), the model expects " \
           "(64, 64, 3, 3) (2 mismatched in all)" in d["msg"]
    missing = {k: v for k, v in state.items() if k != "layer4.1.bn2.running_var"}
    d = detail(submit(api, {"kind": "compress", "budget": 0.5,
                            "source": {"upload": _upload(api, missing, "missing.pt")["id"], "model": "resnet18"}}))
    assert "1 missing key(s): 'layer4.1.bn2.running_var'" in d["msg"]
    d = detail(submit(api, {"kind": "compress", "budget": 0.5, "source": {**source, "model": "resnet34"}}))
    assert "do not fit resnet34" in d["msg"] and "missing key(s): 'layer1.2.conv1.weight'" in d["msg"]
    # A weights-only .pt of the same state_dict is accepted as well (listed from its pickle, no torch in the API).
    pt = _upload(api, state, "r18.pt")
    assert pt["arrays"] == listed
    assert submit(api, {"kind": "compress", "budget": 0.5, "source": {"upload": pt["id"], "model": "resnet18"},
                        "priority": "low", "include": ["layer9"]}).status_code == 422  # include names checked too


def test_sources_that_cannot_be_compressed_are_422_naming_the_field(idle_client, insert_job, finish_job, tmp_path):
    from jobs import store

    def refused(source: dict, **extra) -> dict:
        return detail(submit(idle_client, {"kind": "compress", "source": source, "budget": 0.5, **extra}))

    missing = str(uuid.uuid4())
    d = refused({"job": missing})
    assert d["loc"] == ["body", "compress", "source", "job"] and d["msg"] == f"source.job: no job with id {missing}"
    approx = insert_job({"kind": "approx", "weights": {"source": "gaussian", "m": 8, "d": 4}, "rank": 2},
                        str(uuid.uuid4()))
    assert "is a approx job; a compress source is a train job's checkpoint" in refused({"job": approx})["msg"]
    train = insert_job({"kind": "train", "model": "resnet18", "init": "dense"}, str(uuid.uuid4()))
    assert f"source.job: job {train} is queued" in refused({"job": train})["msg"]
    finish_job(train, result={"val_top1": 0.5})  # succeeded, but no checkpoint artifact
    assert "has no artifact 'checkpoints/last.pt'" in refused({"job": train})["msg"]
    npz = io.BytesIO()
    np.savez(npz, w=np.ones((4, 3), np.float32))
    up = idle_client.post("/api/v1/uploads", files={"file": ("w.npz", npz.getvalue())}).json()
    d = refused({"upload": up["id"], "model": "resnet18"})
    assert d["loc"] == ["body", "compress", "source", "upload"] and "is a .npz file" in d["msg"]
    assert refused({"upload": missing, "model": "resnet18"})["msg"] == f"source.upload: no upload with id {missing}"
    # A recipe that differs per model family, for a job that is no ResNet: its model must be named.
    effnet = insert_job({"kind": "train", "model": "efficientnet_b0", "init": "dense"}, str(uuid.uuid4()))
    finish_job(effnet)
    store.add_artifact(effnet, "checkpoints/last.pt", tmp_path / "x", 1, "0" * 64)
    tune = {"dataset": "synthetic", "finetune_epochs": 6, "finetune": {"recipe": "imagenet"}}
    d = refused({"job": effnet}, **tune)
    assert d["loc"] == ["body", "compress", "source", "model"] and "give source.model 'efficientnet_b0'" in d["msg"]
    ok = submit(idle_client, {"kind": "compress", "source": {"job": effnet, "model": "efficientnet_b0"},
                              "budget": 0.5, **tune})
    assert ok.status_code == 201 and ok.json()["spec"]["finetune"]["lr"] == 0.125, ok.text  # EfficientNet's
    d = refused({"job": effnet, "model": "resnet18"})
    assert d["loc"] == ["body", "compress", "source", "model"] and "trained a efficientnet_b0" in d["msg"]
    d = refused({"job": train}, budget=None)  # the spec's own fields are checked before any lookup
    assert d["loc"] == ["body", "compress", "budget"] and "give exactly one of budget, rank, rank_ratio" in d["msg"]


def test_another_users_job_is_not_a_source(spawn_api, service_env, finish_job, tmp_path):
    """With auth on, a compress source must be the caller's own job or upload (an admin may use anyone's)."""
    from jobs import store

    server = spawn_api(env={"LOWRANK_AUTH": "required",
                            "LOWRANK_QUEUE_PREFIX": f"{service_env['LOWRANK_QUEUE_PREFIX']}idle-compress."})
    tokens = {name: auth.create_token(f"{name}-{uuid.uuid4().hex[:6]}", admin=name == "root")[1]
              for name in ("alice", "bob", "root")}
    clients = {n: httpx.Client(base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {t}"})
               for n, t in tokens.items()}
    try:
        r = submit(clients["alice"], {"kind": "train", "model": "resnet18", "init": "dense", "epochs": 1})
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        finish_job(job_id, result={"val_top1": 0.5})
        ckpt = tmp_path / "last.pt"
        ckpt.write_bytes(b"not used: the job is never run")
        store.add_artifact(job_id, "checkpoints/last.pt", ckpt, ckpt.stat().st_size, "0" * 64)
        spec = {"kind": "compress", "source": {"job": job_id}, "budget": 0.5}
        d = detail(submit(clients["bob"], spec))
        assert d["loc"] == ["body", "compress", "source", "job"] and "belongs to another user" in d["msg"]
        assert submit(clients["alice"], spec).status_code == 201
        assert submit(clients["root"], spec).status_code == 201
    finally:
        for c in clients.values():
            c.close()


def lowrank(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowrank", *argv], capture_output=True, text=True, timeout=120,
                          cwd=REPO)


def test_cli_upload_and_submit_compress(idle_api_server, idle_client, insert_job, finish_job, tmp_path):
    """`lowrank upload FILE` prints the id and the tensors; `lowrank submit compress` builds the spec from
    `lowrank compress`'s flags (a source job by its short id, fine-tuning flags into `finetune`)."""
    from safetensors.torch import save_file

    from jobs import store

    url = ("--url", idle_api_server.url)
    save_file({"fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)}, tmp_path / "head.safetensors")
    out = lowrank("upload", str(tmp_path / "head.safetensors"), *url)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    upload_id = lines[0]
    assert idle_client.get(f"/api/v1/uploads/{upload_id}").json()["filename"] == "head.safetensors"
    size = (tmp_path / "head.safetensors").stat().st_size
    assert lines[1].strip() == f"head.safetensors: safetensors, {size:,} bytes, 2 tensor(s)"
    assert sorted(ln.split() for ln in lines[2:]) == [["fc.bias", "10", "float32"], ["fc.weight", "10x512", "float32"]]
    # The upload is not a whole resnet18: submit names the field and the first problem, exit 2, one line.
    out = lowrank("submit", "compress", "--upload", upload_id, "--model", "resnet18", "--budget", "0.5", *url)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "compress.source.upload: source.upload: the tensors of upload" in out.stderr
    assert "missing key(s): 'conv1.weight'" in out.stderr

    job = insert_job({"kind": "train", "model": "resnet18", "init": "dense"}, str(uuid.uuid4()))
    finish_job(job)
    (tmp_path / "last.pt").write_bytes(b"never read: the job stays queued")
    store.add_artifact(job, "checkpoints/last.pt", tmp_path / "last.pt", 1, "0" * 64)
    out = lowrank("submit", "compress", "--source-job", job[:8], "--method", "asvd", "--budget", "0.25",
                  "--allocation", "greedy", "--include", "layer1,layer2", "--calib-images", "128",
                  "--finetune-epochs", "2", "--lr", "0.01", "--no-nesterov", "--seed", "3", "--json", *url)
    assert out.returncode == 0, out.stderr
    spec = json.loads(out.stdout)["spec"]
    assert spec["source"] == {"job": job, "model": None} and spec["seed"] == 3
    assert (spec["method"], spec["budget"], spec["allocation"], spec["include"], spec["calib_images"]) == (
        "asvd", 0.25, "greedy", ["layer1", "layer2"], 128)
    assert spec["finetune_epochs"] == 2 and spec["finetune"]["lr"] == 0.01 and spec["finetune"]["nesterov"] is False
    assert spec["finetune"]["batch_size"] == 64  # the digits recipe's, resolved by the API
    for argv, message in [
        (("--upload", upload_id, "--budget", "0.5"), "--upload needs --model"),
        (("--source-job", job, "--method", "whiten"), "give one of --budget, --rank, --rank-ratio"),
        (("--source-job", job, "--budget", "x"), "--budget must be a number, got 'x'"),
        (("--source-job", job, "--budget", "0.5", "--lr", "fast"), "--lr must be a number, got 'fast'"),
    ]:
        out = lowrank("submit", "compress", *argv, *url)
        assert out.returncode == 2 and message in out.stderr and out.stderr.count("\n") == 1, (argv, out.stderr)


# ------------------------------------------------------------------------------------------ sweeps


def wait_sweep(c: httpx.Client, sweep_id: str, timeout: float = TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sweep = c.get(f"/api/v1/sweeps/{sweep_id}").json()
        if sweep["counts"]["queued"] + sweep["counts"]["running"] == 0:
            return sweep
        time.sleep(0.5)
    pytest.fail(f"sweep {sweep_id} unfinished after {timeout} s: {sweep['counts']}", pytrace=False)


def sweep_jobs(c: httpx.Client, sweep_id: str) -> list[dict]:
    return c.get("/api/v1/jobs", params={"sweep": sweep_id, "limit": 1000}).json()["items"]


@pytest.fixture(scope="module")
def compress_sweep(api, dense) -> dict:
    """Method x budget over the dense job's layer1 (4 jobs, evaluate only)."""
    base = {"kind": "compress", "source": {"job": dense["id"]}, "include": ["layer1"], "calib_images": 32,
            "heldout_images": 16}
    r = api.post("/api/v1/sweeps", json={"name": "compress-frontier", "base": base, "seeds": [0],
                                         "grid": {"method": ["spectral", "whiten"], "budget": [0.5, 0.2]}})
    assert r.status_code == 201, r.text
    done = wait_sweep(api, r.json()["id"])
    assert done["counts"]["succeeded"] == 4, done["counts"]
    return done


def test_a_compress_sweep_tabulates_accuracy_and_parameters(api, compress_sweep):
    jobs = {(j["sweep_point"]["method"], j["sweep_point"]["budget"]): j["result"]
            for j in sweep_jobs(api, compress_sweep["id"])}
    table = api.get(f"/api/v1/sweeps/{compress_sweep['id']}/results").json()
    assert table["metric"] == "val_top1" and len(table["rows"]) == 4
    for row in table["rows"]:
        res = jobs[(row["point"]["method"], row["point"]["budget"])]
        assert row["n"] == 1 and row["mean"] == pytest.approx(res["val_top1"])
        assert row["params"] == res["params_compressed"]  # the compressed model's parameters, never averaged
    for method in ("spectral", "whiten"):
        assert jobs[(method, 0.2)]["params_compressed"] < jobs[(method, 0.5)]["params_compressed"]
        assert jobs[(method, 0.2)]["budget_used"] <= 0.2 < jobs[(method, 0.5)]["budget_used"] <= 0.5
    errors = api.get(f"/api/v1/sweeps/{compress_sweep['id']}/results", params={"metric": "mean_linear_error"}).json()
    by_point = {(r["point"]["method"], r["point"]["budget"]): r["mean"] for r in errors["rows"]}
    for budget in (0.5, 0.2):  # whiten minimizes the linear error at every rank (MATH.md Section 8)
        assert by_point[("whiten", budget)] <= by_point[("spectral", budget)] + 1e-9


@pytest.mark.timeout(TIMEOUT + 60)
def test_early_stopping_on_fine_tune_epochs(api, dense):
    """Successive halving on a compress sweep's fine-tuning epochs, as for train sweeps. The metric is the learning
    rate at epoch ends (a constant schedule), so the worse point is known: with min_points=1 the point at lr 0.01
    is kept and fine-tunes 2 epochs, the one at lr 0.02 is judged worse on reaching epoch 1 and cancelled."""
    base = {"kind": "compress", "source": {"job": dense["id"]}, "method": "spectral", "budget": 0.5,
            "include": ["layer1"], "calib_images": 32, "heldout_images": 16, "finetune_epochs": 2,
            "finetune": {"max_train_batches": 2, "schedule": "constant", "warmup_epochs": 0}}
    rule = {"metric": "lr", "mode": "min", "epochs": [1], "keep": 0.5, "min_points": 1}
    r = api.post("/api/v1/sweeps", json={"name": "compress-es", "base": base, "grid": {"finetune.lr": [0.01, 0.02]},
                                         "early_stopping": rule})
    assert r.status_code == 201, r.text
    done = wait_sweep(api, r.json()["id"])
    jobs = {j["sweep_point"]["finetune.lr"]: j for j in sweep_jobs(api, done["id"])}
    assert jobs[0.01]["status"] == "succeeded" and len(jobs[0.01]["result"]["top1_finetuned"]) == 2
    assert jobs[0.02]["status"] == "cancelled", (jobs[0.02]["status"], jobs[0.02]["error"])
    assert len(series(api, jobs[0.02]["id"])["val_top1"]["steps"]) == 1  # reached epoch 1, stopped in epoch 2
    assert done["early_stopping"]["decisions"]["1"]["decided"] == {"0": "kept", "1": "stopped"}
    bad = api.post("/api/v1/sweeps", json={"base": base, "grid": {"finetune.lr": [0.01, 0.02]},
                                           "early_stopping": {**rule, "epochs": [2]}})
    assert bad.status_code == 422 and "below the points' finetune_epochs (2)" in bad.text


# ------------------------------------------------------------------------------------------ dashboard


@pytest.mark.browser
def test_compress_job_page(web, api, compressed):
    """Accuracy steps, the per-layer bar chart and the sortable per-layer table of a real compress job."""
    res = compressed["result"]
    page = web.page
    page.goto(f"/jobs/{compressed['id']}?{POLL}")
    (steps,) = web.wait_traces("plot-compress-steps", 1)
    assert steps["y"] == pytest.approx([res["top1_dense"], res["top1_compressed_before_bn"], res["top1_compressed"],
                                        *res["top1_finetuned"]])
    assert steps["x"][0] == "dense" and steps["x"][-1] == "fine-tuned, epoch 1" and len(steps["x"]) == 4
    factored = [r for r in res["layers"] if r["status"] == "factored"]
    bars = web.wait_traces("plot-compress-layers", 3)
    assert [t["name"] for t in bars] == ["block (empirical)", "linear", "Gaussian surrogate"]
    assert bars[0]["x"] == [r["layer"] for r in factored]
    assert bars[1]["y"] == pytest.approx([r["linear_error"] for r in factored])
    visible = "#compress-table tbody tr:not(.unchanged)"
    layers_js = "rows => rows.map(r => r.dataset.layer)"
    assert page.eval_on_selector_all(visible, layers_js) == [r["layer"] for r in factored]
    # Sorting by a column: largest block error first, then (clicked again) smallest first.
    page.click("#compress-table th[data-key=block_error]")
    shown = page.eval_on_selector_all(visible, layers_js)
    assert shown == [r["layer"] for r in sorted(factored, key=lambda r: -r["block_error"])]
    page.click("#compress-table th[data-key=block_error]")
    shown = page.eval_on_selector_all(visible, layers_js)
    assert shown == [r["layer"] for r in sorted(factored, key=lambda r: r["block_error"])]
    assert not page.is_visible("#compress-table tr[data-layer='fc']")
    page.check("#compress-all")
    assert page.is_visible("#compress-table tr[data-layer='fc']")
    assert page.eval_on_selector_all("#compress-table tbody tr", "rows => rows.length") == len(res["layers"])
    assert "whiten, budget 0.5 (uniform)" in page.inner_text("#compress-note")


@pytest.mark.browser
def test_compress_sweep_page_draws_a_frontier_per_method(web, api, compress_sweep):
    rows = api.get(f"/api/v1/sweeps/{compress_sweep['id']}/results", params={"metric": "val_top1"}).json()["rows"]
    page = web.page
    page.goto(f"/sweeps/{compress_sweep['id']}?{POLL}")
    traces = web.wait_traces("plot-tradeoff", 4)
    for method in ("spectral", "whiten"):
        pts = [r for r in rows if r["point"]["method"] == method]
        front = sorted((r for r in pts if not any(
            q is not r and q["params"] <= r["params"] and q["mean"] >= r["mean"]
            and (q["params"] < r["params"] or q["mean"] > r["mean"]) for q in pts)), key=lambda r: r["params"])
        points = next(t for t in traces if t["name"] == f"{method} (points)")
        line = next(t for t in traces if t["name"] == method)
        assert (points["role"], line["role"]) == ("points", "frontier")
        assert sorted(points["x"]) == sorted(r["params"] for r in pts)
        assert line["x"] == [r["params"] for r in front] and line["y"] == pytest.approx([r["mean"] for r in front])
    assert not page.is_hidden("#tradeoff-section")
    # The frontier on rows of our own: a point beaten by one with fewer parameters and more accuracy drops out,
    # ties stay, and the frontier is in parameter order.
    rows = [{"params": 10, "mean": 0.5}, {"params": 20, "mean": 0.4}, {"params": 30, "mean": 0.9},
            {"params": 5, "mean": 0.5}, {"params": 40, "mean": 0.9}, {"params": 30, "mean": 0.9}]
    assert page.evaluate("rows => LR.frontier(rows)", rows) == [rows[3], rows[2], rows[5]]


def test_readme_compress_examples_are_accepted(idle_api_server, insert_job, finish_job, tmp_path):
    """The README's service compress commands as written (ids filled in; without --wait: no worker takes the idle
    API's jobs): the upload lists a state_dict, each submit stores the flags' spec, the compress sweep is 27 jobs."""
    import re
    import shlex

    from safetensors.torch import save_file

    from core.models import build_model
    from jobs import store

    text = (REPO / "README.md").read_text()
    job = insert_job({"kind": "train", "model": "resnet18", "dataset": "digits", "init": "dense"}, str(uuid.uuid4()))
    finish_job(job)
    (tmp_path / "last.pt").write_bytes(b"never read: the jobs stay queued")
    store.add_artifact(job, "checkpoints/last.pt", tmp_path / "last.pt", 1, "0" * 64)
    torch.manual_seed(0)
    save_file(build_model("resnet18", num_classes=10, small_input=True).state_dict(), tmp_path / "r18.safetensors")
    url = ("--url", idle_api_server.url)

    def run(line: str) -> subprocess.CompletedProcess:
        argv = shlex.split(line, comments=True)
        assert argv[0] == "lowrank", line
        return subprocess.run([sys.executable, "-m", "lowrank", *argv[1:], *url], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path)

    upload_line = next(ln for ln in text.splitlines() if ln.startswith("lowrank upload "))
    out = run(upload_line)
    assert out.returncode == 0, out.stderr
    upload_id = out.stdout.split()[0]
    assert re.search(r"^  conv1.weight +64x3x3x3 +float32$", out.stdout, re.M), out.stdout
    submits = [ln for ln in text.splitlines() if ln.startswith("lowrank submit compress ")]
    assert len(submits) == 2
    for line in submits:
        line = line.replace("TRAIN_JOB_ID", job[:8]).replace("UPLOAD_ID", upload_id).replace(" --wait", "")
        out = run(line + " --json")
        assert out.returncode == 0, (line, out.stderr)
        spec = json.loads(out.stdout)["spec"]
        argv = shlex.split(line)
        for flag in ("--method", "--budget", "--allocation", "--rank-ratio", "--image-size", "--finetune-epochs"):
            if flag in argv:
                given = argv[argv.index(flag) + 1]
                assert str(spec[flag[2:].replace("-", "_")]) == given, (flag, spec)
        assert spec["source"].get("job", upload_id) in (job, upload_id)
    spec_text = re.search(r"cat > compress\.json <<'JSON'\n(.*?)\nJSON", text, re.S).group(1)
    (tmp_path / "compress.json").write_text(spec_text.replace("TRAIN_JOB_ID", job))
    line = next(ln for ln in text.splitlines() if ln.startswith("lowrank sweep create --base compress.json"))
    out = run(line + " --json")
    assert out.returncode == 0, out.stderr
    sweep = json.loads(out.stdout)
    assert sweep["kind"] == "compress" and sweep["total"] == 27
    assert subprocess.run([sys.executable, "-m", "lowrank", "sweep", "cancel", sweep["id"], *url],
                          capture_output=True, timeout=60).returncode == 0


def test_a_compress_search_sweep_is_accepted(idle_client, insert_job, finish_job, tmp_path):
    """A search over compress specs: its first trials are compress jobs; `params` is the compressed model's."""
    from jobs import store
    from jobs.search import _objective_value

    job = insert_job({"kind": "train", "model": "resnet18", "init": "dense"}, str(uuid.uuid4()))
    finish_job(job)
    (tmp_path / "last.pt").write_bytes(b"never read")
    store.add_artifact(job, "checkpoints/last.pt", tmp_path / "last.pt", 1, "0" * 64)
    search = {"space": {"method": {"type": "categorical", "choices": ["spectral", "whiten"]},
                        "budget": {"type": "float", "low": 0.1, "high": 0.5}},
              "objectives": [{"metric": "val_top1", "direction": "maximize"},
                             {"metric": "params", "direction": "minimize"}], "n_trials": 4, "parallelism": 2}
    base = {"kind": "compress", "source": {"job": job}, "budget": 0.5}
    r = idle_client.post("/api/v1/sweeps", json={"base": base, "strategy": "search", "search": search})
    assert r.status_code == 201, r.text
    jobs = idle_client.get("/api/v1/jobs", params={"sweep": r.json()["id"]}).json()["items"]
    assert len(jobs) == 2 and {j["kind"] for j in jobs} == {"compress"}
    assert all(0.1 <= j["spec"]["budget"] <= 0.5 and j["spec"]["source"]["job"] == job for j in jobs)
    assert _objective_value("compress", {"params_compressed": 1234, "params_dense": 9}, "params") == 1234
    bad = idle_client.post("/api/v1/sweeps", json={"base": base, "strategy": "search", "search": {
        **search, "objectives": [{"metric": "params_factored", "direction": "minimize"}]}})
    assert bad.status_code == 422 and "params_factored" in bad.text
