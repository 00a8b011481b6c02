"""Limits and unsafe input on a live API: size/rank/epochs/mc_samples limits (422 naming the setting),
malicious pickles in `.pt` uploads (rejected, never executed), `imagefolder` paths outside
LOWRANK_DATA_ROOTS (symlink escapes and `..` included). Body and upload size (413) are covered in
test_api_jobs.py::test_body_and_upload_limits_are_413_naming_the_setting.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest

from jobs.settings import get_settings

pytestmark = pytest.mark.service

GAUSS = {"source": "gaussian", "m": 16, "d": 8}
TRAIN = {"kind": "train", "model": "resnet18", "dataset": "synthetic", "rank": 2, "epochs": 1}


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("data_roots")
    allowed = base / "allowed"
    (allowed / "imgs" / "class_a").mkdir(parents=True)
    outside = base / "outside"
    (outside / "class_a").mkdir(parents=True)
    (allowed / "escape").symlink_to(outside, target_is_directory=True)
    return {"base": base, "allowed": allowed, "outside": outside}


@pytest.fixture
def limited(spawn_api, service_env: dict[str, str], roots: dict[str, Path]) -> httpx.Client:
    server = spawn_api(env={
        "LOWRANK_MAX_RANK": "8", "LOWRANK_MAX_MATRIX_ELEMENTS": "4096", "LOWRANK_MAX_EPOCHS": "3",
        "LOWRANK_MAX_MC_SAMPLES": "100", "LOWRANK_DATA_ROOTS": json.dumps([str(roots["allowed"])]),
        "LOWRANK_QUEUE_PREFIX": f"{service_env['LOWRANK_QUEUE_PREFIX']}limits."})
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def _detail(r: httpx.Response) -> dict:
    assert r.status_code == 422, r.text
    return r.json()["detail"][0]


def test_spec_limits_are_422_naming_the_setting(limited: httpx.Client) -> None:
    cases = [
        ({"kind": "approx", "weights": {"source": "gaussian", "m": 100, "d": 100}, "rank": 2},
         "d", "LOWRANK_MAX_MATRIX_ELEMENTS"),
        ({"kind": "approx", "weights": {"source": "gaussian", "m": 64, "d": 32}, "rank": 9}, "rank", "LOWRANK_MAX_RANK"),
        ({"kind": "learn", "teacher": {"source": "gaussian", "m": 64, "d": 32}, "rank": 9}, "rank", "LOWRANK_MAX_RANK"),
        ({**TRAIN, "rank": 9}, "rank", "LOWRANK_MAX_RANK"),
        ({**TRAIN, "epochs": 4}, "epochs", "LOWRANK_MAX_EPOCHS"),
        ({"kind": "approx", "weights": GAUSS, "rank": 2, "mc_samples": 101}, "mc_samples", "LOWRANK_MAX_MC_SAMPLES"),
    ]
    for spec, field, setting in cases:
        d = _detail(limited.post("/api/v1/jobs", json=spec))
        assert d["loc"][-1] == field and setting in d["msg"], (spec, d)
    # At the limits: accepted.
    for spec in ({"kind": "approx", "weights": {"source": "gaussian", "m": 64, "d": 64}, "rank": 8, "mc_samples": 100},
                 {**TRAIN, "rank": 8, "epochs": 3}):
        assert limited.post("/api/v1/jobs", json=spec).status_code == 201


def test_imagefolder_paths_must_lie_under_data_roots(limited: httpx.Client, roots: dict[str, Path]) -> None:
    base = {**TRAIN, "dataset": "imagefolder"}
    ok = limited.post("/api/v1/jobs", json={**base, "data_root": str(roots["allowed"] / "imgs")})
    assert ok.status_code == 201, ok.text
    assert ok.json()["spec"]["data_root"] == str((roots["allowed"] / "imgs").resolve())
    for bad in (str(roots["outside"]),                            # plainly outside
                str(roots["allowed"] / ".." / "outside"),          # `..` out of the root
                str(roots["allowed"] / "escape"),                  # a symlink inside pointing outside
                str(roots["allowed"] / "escape" / "class_a"),
                "/etc", "relative/path", "~"):
        d = _detail(limited.post("/api/v1/jobs", json={**base, "data_root": bad}))
        assert d["loc"] == ["body", "train", "data_root"] and "LOWRANK_DATA_ROOTS" in d["msg"], (bad, d)
        # The setting is named, its value (the server's folders) never shown beyond what was sent.
        assert str(roots["allowed"]) not in d["msg"].replace(bad, ""), d
    d = _detail(limited.post("/api/v1/jobs", json=base))  # imagefolder without a path
    assert d["loc"] == ["body", "train", "data_root"]


# ----------------------------------------------------------------------------------------------
# Malicious pickles.

class _CreatesFile:
    """Unpickling this calls open(path, "w"): a file appears if the pickle is ever executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class _RunsShell:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _torch_zip(payload: bytes, name: str = "archive") -> bytes:
    """A zip laid out like torch.save's, with `payload` as its data.pkl."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(f"{name}/data.pkl", payload)
        z.writestr(f"{name}/byteorder", "little")
        z.writestr(f"{name}/version", "3\n")
    return buf.getvalue()


def test_malicious_pt_upload_is_rejected_and_never_executed(idle_client: httpx.Client, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    uploads = get_settings().artifacts / "uploads"
    before = set(uploads.glob("*")) if uploads.exists() else set()
    payloads = {
        "open-p2.pt": _torch_zip(pickle.dumps({"weight": _CreatesFile(str(marker))}, protocol=2)),
        "system-p4.pt": _torch_zip(pickle.dumps(_RunsShell(str(marker)), protocol=4)),
        "system-p5.pth": _torch_zip(pickle.dumps([1, _RunsShell(str(marker))], protocol=5)),
        "raw-pickle.pt": pickle.dumps(_CreatesFile(str(marker))),  # legacy / bare pickle, not a zip
    }
    for name, content in payloads.items():
        r = idle_client.post("/api/v1/uploads", files={"file": (name, content)})
        assert r.status_code == 422, (name, r.text)
        d = r.json()["detail"][0]
        assert d["loc"] == ["body", "file"] and "not a valid .pt" in d["msg"], (name, d)
        if name != "raw-pickle.pt":
            assert "global " in d["msg"] and "is not allowed" in d["msg"], d  # names the refused global
    assert not marker.exists()
    after = set(uploads.glob("*")) if uploads.exists() else set()
    assert after == before  # nothing stored, no half-written file left

    # Defence in depth: the worker's loader (torch.load weights_only=True) refuses the same file.
    from core.weights import WeightsError, load_weights

    evil = tmp_path / "evil.pt"
    evil.write_bytes(payloads["open-p2.pt"])
    with pytest.raises(WeightsError, match="weights_only=True"):
        load_weights(str(evil))
    assert not marker.exists()


def test_real_pt_upload_runs_in_the_worker(client: httpx.Client, wait_job, worker_process) -> None:
    import torch

    w = torch.from_numpy(np.random.default_rng(0).standard_normal((12, 8)).astype(np.float32))
    buf = io.BytesIO()
    torch.save({"model": {"layer.weight": w, "layer.bias": torch.zeros(12)}}, buf)
    r = client.post("/api/v1/uploads", files={"file": ("ckpt.pt", buf.getvalue())})
    assert r.status_code == 201, r.text
    spec = {"kind": "approx", "weights": {"source": "upload", "upload_id": r.json()["id"], "key": "layer.weight"},
            "rank": 3}
    job = client.post("/api/v1/jobs", json=spec)
    assert job.status_code == 201, job.text
    done = wait_job(client, job.json()["id"], timeout=120)
    assert done["status"] == "succeeded", done
    assert 0 < done["result"]["error"] < 1
