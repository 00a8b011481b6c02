"""deploy/gpu_smoke.py: the end-to-end GPU-worker check (API + per-GPU worker + a train job).

On a machine with a CUDA GPU it runs for real on GPU 0. Elsewhere the full run is opt-in with
LOWRANK_TEST_SMOKE_CPU=1 (the same path on a CPU worker; it takes minutes on a small shared CPU,
too long for every run of the suite).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "gpu_smoke.py"


def test_help_names_the_options() -> None:
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for opt in ("--device", "--gpus", "--use-env", "--timeout", "--keep"):
        assert opt in r.stdout


def _device() -> str | None:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if os.environ.get("LOWRANK_TEST_SMOKE_CPU") == "1" else None


@pytest.mark.slow
@pytest.mark.skipif(_device() is None, reason="no CUDA GPU here; LOWRANK_TEST_SMOKE_CPU=1 runs it on CPU")
def test_worker_runs_a_train_job_end_to_end() -> None:
    device = _device()
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", device, "--timeout", "500"],
                       capture_output=True, text=True, timeout=580, cwd=ROOT)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("PASS", "FAIL"))]
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert lines and all(ln.startswith("PASS") for ln in lines), lines
    assert any(f"ran on {device}" in ln for ln in lines)
