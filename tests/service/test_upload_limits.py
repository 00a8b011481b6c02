"""Upload bombs and the matrix-size limit (issue 18, defect 2), on live APIs and a real worker.

The probe: a 4 MB deflated `.npz` of a 32768 x 32768 float32 zero matrix (4 GiB expanded) was
accepted after 22.7 s with 5.2 GiB RSS in the API, and an 8192 x 16384 upload ran although a
Gaussian matrix of that size is a 422. Now what a file expands to is read from its headers and held
to LOWRANK_MAX_MATRIX_ELEMENTS (per array) and LOWRANK_MAX_UPLOAD_EXPANDED_BYTES (all arrays) at
upload, at submit and in the worker before it loads anything. The unit tests below call
jobs/weightfiles.py directly (how many bytes of the file it reads; .pt and safetensors headers).
"""
from __future__ import annotations

import io
import json
import struct
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import save as st_save
from weightbombs import deflated_zeros_npz

from jobs.settings import get_settings
from jobs.weightfiles import Limits, OverByteLimit, OverElementLimit, WeightsFileError, inspect_weights

pytestmark = pytest.mark.service

LIMIT = 1 << 26  # LOWRANK_MAX_MATRIX_ELEMENTS' default
ELEMENT_LIMIT_MSG = "exceeds the limit of 67108864 elements (LOWRANK_MAX_MATRIX_ELEMENTS)"


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bombs")
    return {"probe": deflated_zeros_npz(folder / "probe.npz", (32768, 32768)),        # 4 GiB in 4 MB
            "wide": deflated_zeros_npz(folder / "wide.npz", (8192, 16384))}           # 512 MiB in 0.5 MB


def _vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _stored_uploads() -> set[Path]:
    folder = get_settings().artifacts / "uploads"
    return set(folder.iterdir()) if folder.exists() else set()


def test_probe_bomb_is_refused_from_its_header_with_bounded_memory(spawn_api, bombs) -> None:
    """The 4 MB / 4 GiB .npz: 422 naming the limit; the API's peak RSS (VmHWM) barely moves."""
    server = spawn_api()
    pid = server.proc.pid
    with httpx.Client(base_url=server.url, timeout=120) as c:
        small = io.BytesIO()
        np.savez_compressed(small, w=np.ones((64, 32), np.float32))
        warm = c.post("/api/v1/uploads", files={"file": ("warm.npz", small.getvalue())})  # imports, buffers
        assert warm.status_code == 201, warm.text
        before = _stored_uploads()
        peak_before = _vm_kib(pid, "VmHWM")
        t0 = time.monotonic()
        r = c.post("/api/v1/uploads", files={"file": ("probe.npz", bombs["probe"].read_bytes())})
        seconds = time.monotonic() - t0
    growth_mib = (_vm_kib(pid, "VmHWM") - peak_before) / 1024
    print(f"probe bomb answered {r.status_code} in {seconds:.2f} s; API peak RSS {peak_before / 1024:.0f} MiB "
          f"-> +{growth_mib:.1f} MiB")
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["loc"] == ["body", "file"]
    assert "'arr_0' has shape [32768, 32768] = 1073741824 elements" in detail["msg"], detail
    assert "LOWRANK_MAX_MATRIX_ELEMENTS" in detail["msg"]
    assert growth_mib < 64, f"the API's peak RSS grew by {growth_mib:.0f} MiB answering a 4 MB upload"
    assert _stored_uploads() == before  # nothing stored, no temporary file left


def test_wide_upload_is_held_to_the_matrix_limit_at_upload_submit_and_worker(
        spawn_api, spawn_worker, idle_client, service_env, bombs) -> None:
    """8192 x 16384 (134 M elements, over the 64 Mi default): a 422 at upload; stored by a server with a
    larger limit, it is a 422 at submit on a default server, worded as for a Gaussian of that size; a
    job that got past a larger limit fails in a default worker before it loads anything."""
    wide = bombs["wide"].read_bytes()
    r = idle_client.post("/api/v1/uploads", files={"file": ("wide.npz", wide)})
    assert r.status_code == 422 and "[8192, 16384] = 134217728 elements" in r.json()["detail"][0]["msg"], r.text

    prefix = f"{service_env['LOWRANK_QUEUE_PREFIX']}roomy."
    roomy = spawn_api(env={"LOWRANK_MAX_MATRIX_ELEMENTS": str(1 << 28), "LOWRANK_QUEUE_PREFIX": prefix})
    with httpx.Client(base_url=roomy.url, timeout=120) as c:
        up = c.post("/api/v1/uploads", files={"file": ("wide.npz", wide)})
        assert up.status_code == 201, up.text
        assert up.json()["arrays"] == {"arr_0": {"shape": [8192, 16384], "dtype": "float32"}}
        spec = {"kind": "approx", "weights": {"source": "upload", "upload_id": up.json()["id"]}, "rank": 1,
                "method": "spectral"}

        # Submit on a server with the default limit: 422, as a Gaussian 8192 x 16384 is.
        gauss = idle_client.post("/api/v1/jobs", json={**spec, "weights": {"source": "gaussian", "m": 8192, "d": 16384}})
        assert gauss.status_code == 422 and ELEMENT_LIMIT_MSG in gauss.json()["detail"][0]["msg"], gauss.text
        for kind, field in (("approx", "weights"), ("learn", "teacher")):
            body = {"kind": kind, field: spec["weights"], "rank": 1}
            r = idle_client.post("/api/v1/jobs", json=body)
            assert r.status_code == 422, r.text
            d = r.json()["detail"][0]
            assert d["loc"] == ["body", kind, field, "upload_id"] and ELEMENT_LIMIT_MSG in d["msg"], d
            assert "m*d = 134217728" in d["msg"]
        sweep = idle_client.post("/api/v1/sweeps", json={"base": spec, "grid": {"method": ["spectral", "nkp"]}})
        assert sweep.status_code == 422 and ELEMENT_LIMIT_MSG in json.dumps(sweep.json()), sweep.text

        # The roomy server takes the job; a worker with the default limit refuses it from the headers.
        spawn_worker(env={"LOWRANK_QUEUE_PREFIX": prefix})
        job = c.post("/api/v1/jobs", json=spec)
        assert job.status_code == 201, job.text
        deadline = time.monotonic() + 120
        while (done := c.get(f"/api/v1/jobs/{job.json()['id']}").json())["status"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, done
            time.sleep(0.3)
    assert done["status"] == "failed", done
    assert done["error"] == ("OverElementLimit: array 'arr_0' has shape [8192, 16384] = 134217728 elements, over "
                             "the limit of 67108864 elements (LOWRANK_MAX_MATRIX_ELEMENTS)"), done["error"]


def test_expanded_bytes_limit_is_413_naming_the_setting(spawn_api) -> None:
    server = spawn_api(env={"LOWRANK_MAX_UPLOAD_EXPANDED_BYTES": str(1 << 20)})
    two = io.BytesIO()
    np.savez_compressed(two, a=np.zeros((512, 512), np.float32), b=np.zeros((512, 256), np.float32))  # 1.5 MiB
    one = io.BytesIO()
    np.savez_compressed(one, a=np.zeros((512, 512), np.float32))  # 1 MiB: at the limit
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/api/v1/uploads", files={"file": ("two.npz", two.getvalue())})
        assert r.status_code == 413 and r.json()["code"] == "too_large", r.text
        assert "LOWRANK_MAX_UPLOAD_EXPANDED_BYTES" in r.json()["detail"] and "1048576" in r.json()["detail"]
        assert c.post("/api/v1/uploads", files={"file": ("one.npz", one.getvalue())}).status_code == 201


def test_job_error_names_the_problem_not_server_paths(client, wait_job, worker_process) -> None:
    """A stored upload whose file went missing: the job fails with `Type: message`, the artifact root
    shown as <artifacts>, no traceback (the worker log has it)."""
    w = np.ones((12, 8), np.float32)
    buf = io.BytesIO()
    np.save(buf, w)
    up = client.post("/api/v1/uploads", files={"file": ("w.npy", buf.getvalue())}).json()
    stored = next(p for p in (get_settings().artifacts / "uploads").iterdir() if p.name.startswith(up["id"]))
    stored.unlink()
    job = client.post("/api/v1/jobs", json={"kind": "approx", "weights": {"source": "upload", "upload_id": up["id"]},
                                            "rank": 2}).json()
    done = wait_job(client, job["id"], timeout=90)
    assert done["status"] == "failed"
    root = str(get_settings().artifacts)
    assert root not in done["error"] and f"<artifacts>/uploads/{stored.name}" in done["error"], done["error"]
    assert done["error"].startswith("WeightsFileError: FileNotFoundError") and "\n" not in done["error"]
    assert f"job {job['id']} failed" in worker_process.logs()


# ----------------------------------------------------------------------------------------------
# jobs/weightfiles.py directly.

class CountingFile(io.FileIO):
    """A file that counts the bytes read from it."""

    bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        self.bytes_read += len(data)
        return data

    def readinto(self, buffer) -> int:
        n = super().readinto(buffer) or 0
        self.bytes_read += n
        return n


def test_bomb_header_is_read_without_reading_the_archive(bombs) -> None:
    with CountingFile(str(bombs["probe"])) as f:
        with pytest.raises(OverElementLimit, match="1073741824 elements"):
            inspect_weights(f, "npz", Limits(LIMIT, 1 << 30))
        read = f.bytes_read
    size = bombs["probe"].stat().st_size
    print(f"refusing the probe bomb read {read} of its {size} bytes")
    assert read < 128 * 1024 < size // 10  # the zip's end records, its directory, the first compressed block
    # The expanded-bytes limit alone stops it from the header too.
    with CountingFile(str(bombs["probe"])) as f:
        with pytest.raises(OverByteLimit, match="LOWRANK_MAX_UPLOAD_EXPANDED_BYTES"):
            inspect_weights(f, "npz", Limits(1 << 31, 1 << 30))
        assert f.bytes_read < 128 * 1024


def test_zip_members_and_methods_are_bounded(tmp_path: Path) -> None:
    many = tmp_path / "many.npz"
    with zipfile.ZipFile(many, "w") as z:
        for i in range(10_001):
            z.writestr(f"a{i}.npy", b"")
    with pytest.raises(WeightsFileError, match="10001 members"):
        inspect_weights(many, "npz", Limits(LIMIT, 1 << 30))
    packed = io.BytesIO()
    np.save(packed, np.ones((4, 4), np.float32))
    bz = tmp_path / "bz.npz"
    with zipfile.ZipFile(bz, "w", zipfile.ZIP_BZIP2) as z:
        z.writestr("w.npy", packed.getvalue())
    with pytest.raises(WeightsFileError, match="only stored or deflated"):
        inspect_weights(bz, "npz", Limits(LIMIT, 1 << 30))


def test_npz_member_lengths_are_exact(tmp_path: Path) -> None:
    """Fewer or more bytes than the member's .npy header promises is refused, whatever the zip declares."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (4, 4)})
    for name, payload, needle in (("short", b"\0" * 60, "truncated"), ("long", b"\0" * 68, "more bytes")):
        path = tmp_path / f"{name}.npz"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("w.npy", header.getvalue() + payload)
        with pytest.raises(WeightsFileError, match=needle):
            inspect_weights(path, "npz", Limits(LIMIT, 1 << 30))
        # scan=False (the worker) reads the header only: the limits, not the length.
        assert inspect_weights(path, "npz", Limits(LIMIT, 1 << 30), scan=False)["w"].shape == (4, 4)


def test_safetensors_header_is_bounded_and_checked(tmp_path: Path) -> None:
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(WeightsFileError, match="its header is 1099511627776 bytes"):
        inspect_weights(huge, "safetensors", Limits(LIMIT, 1 << 30))
    # A header declaring a 32768 x 32768 tensor over a few bytes of data: the limit, from the header.
    header = json.dumps({"w": {"dtype": "F32", "shape": [32768, 32768], "data_offsets": [0, 16]}}).encode()
    bomb = tmp_path / "bomb.safetensors"
    bomb.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(OverElementLimit, match=r"\[32768, 32768\] = 1073741824 elements"):
        inspect_weights(bomb, "safetensors", Limits(LIMIT, 1 << 30))
    lying = tmp_path / "lying.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 16]}}).encode()
    lying.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(WeightsFileError, match="data_offsets"):
        inspect_weights(lying, "safetensors", Limits(LIMIT, 1 << 30))
    good = tmp_path / "good.safetensors"
    good.write_bytes(st_save({"a": np.ones((3, 5), np.float32), "b": np.arange(4, dtype=np.int64)}))
    found = inspect_weights(good, "safetensors", Limits(LIMIT, 1 << 30))
    assert {k: v.public() for k, v in found.items()} == {"a": {"shape": [3, 5], "dtype": "float32"},
                                                         "b": {"shape": [4], "dtype": "int64"}}
    nan = tmp_path / "nan.safetensors"
    nan.write_bytes(st_save({"a": np.array([[1.0, np.inf]], np.float32)}))
    with pytest.raises(WeightsFileError, match="NaN or infinite"):
        inspect_weights(nan, "safetensors", Limits(LIMIT, 1 << 30))


def test_pt_shapes_and_storages_come_from_the_pickle(tmp_path: Path) -> None:
    """An expanded view (stride 0) is a few bytes on disk and a 32768 x 32768 tensor once loaded; a
    storage is held to the expanded-bytes limit; a data member must hold exactly its storage's bytes."""
    import torch

    def saved(obj, name: str) -> Path:
        path = tmp_path / name
        torch.save(obj, path)
        return path

    view = saved({"w": torch.zeros(1).expand(32768, 32768)}, "view.pt")
    assert view.stat().st_size < 4096
    with pytest.raises(OverElementLimit,
                       match=r"tensor #0 of its pickle has shape \[32768, 32768\] = 1073741824 elements"):
        inspect_weights(view, "pt", Limits(LIMIT, 1 << 30))
    ok = saved({"model": {"w": torch.ones(64, 32), "b": torch.zeros(64, dtype=torch.bfloat16)}}, "ok.pt")
    listed = inspect_weights(ok, "pt", Limits(LIMIT, 1 << 30))  # a wrapped state_dict, listed by its keys
    assert {k: (a.shape, a.dtype) for k, a in listed.items()} == {"w": ((64, 32), "float32"), "b": ((64,), "bf16")}
    with pytest.raises(OverByteLimit, match="LOWRANK_MAX_UPLOAD_EXPANDED_BYTES"):
        inspect_weights(ok, "pt", Limits(LIMIT, 64 * 32 * 4))  # the bf16 storage brings it over
    # A data member shorter than its storage (torch would fail to load it): refused at upload.
    cut = tmp_path / "cut.pt"
    with zipfile.ZipFile(ok) as src, zipfile.ZipFile(cut, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info.filename, data[:-4] if info.filename.endswith("/data/0") else data)
    with pytest.raises(WeightsFileError, match="declares"):
        inspect_weights(cut, "pt", Limits(LIMIT, 1 << 30))
