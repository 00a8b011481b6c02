"""`lowrank approx`, run as the user runs it: a subprocess of the installed console script."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from core.approx import METHODS, approximate, function_error
from core.weights import gaussian_weights

LOWRANK = [sys.executable, "-m", "lowrank"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # small problems; avoid thread hand-offs on shared cores


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*LOWRANK, "approx", *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=ENV)


def assert_usage_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # one clear line, no traceback
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_cli_methods_list_matches_core():
    from lowrank.cli import approx as cli_approx

    assert cli_approx.METHODS == METHODS


def test_gaussian_json_save_and_mc(tmp_path):
    out = tmp_path / "factors"
    proc = run("--m", "60", "--d", "12", "--ranks", "1,3", "--methods", "spectral,rescale,nkp,random",
               "--seed", "4", "--mc-samples", "20000", "--save", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [(r["method"], r["rank"]) for r in rows] == [
        (m, r) for m in ("spectral", "rescale", "nkp", "random") for r in (1, 3)]
    W = gaussian_weights(60, 12, seed=4)
    for row in rows:
        assert {"method", "rank", "error", "time_s", "iterations", "mc_error", "mc_stderr"} <= set(row)
        # the same numbers as the library, and the Monte Carlo estimate agrees with the closed form
        assert row["error"] == pytest.approx(approximate(W, row["rank"], row["method"], seed=4).error, rel=1e-9)
        assert abs(row["mc_error"] - row["error"]) <= 4 * row["mc_stderr"]
        saved = load_file(str(out / f"{row['method']}-r{row['rank']}.safetensors"))
        assert saved["U"].shape == (60, row["rank"]) and saved["V"].shape == (row["rank"], 12)
        assert function_error(W, (saved["U"], saved["V"])) == pytest.approx(row["error"], rel=1e-9)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{r['method']}-r{r['rank']}.safetensors" for r in rows)
    by = {(r["method"], r["rank"]): r["error"] for r in rows}
    assert by[("nkp", 1)] <= by[("rescale", 1)] <= by[("spectral", 1)]


def test_table_from_weights_file(tmp_path):
    p = tmp_path / "layer.npz"
    W = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    np.savez(p, weight=W, bias=np.zeros(20, dtype=np.float32))
    proc = run("--weights", f"{p}:weight", "--ranks", "2", "--methods", "spectral,nkp")
    assert proc.returncode == 0, proc.stderr
    assert "spectral" in proc.stdout and "nkp" in proc.stdout and "20 x 8" in proc.stdout
    expected = approximate(torch.from_numpy(W), 2, "nkp").error
    assert f"{expected:.6f}" in proc.stdout


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("--m", "20", "--d", "8", "--ranks", "0"), ("--ranks", "not positive")),
        (("--m", "20", "--d", "8", "--ranks", "1,9"), ("--ranks", "rank 9 exceeds min(m, d) = 8")),
        (("--m", "20", "--d", "8", "--ranks", "1,x"), ("--ranks", "comma-separated list of integers")),
        (("--m", "20", "--d", "8", "--ranks", "1", "--methods", "nkp,svd"), ("--methods", "'svd'", "spectral, rescale, nkp, random, reference")),
        (("--m", "20", "--ranks", "1"), ("--m M and --d D",)),
        (("--weights", "w.npy", "--m", "3", "--d", "3", "--ranks", "1"), ("not both",)),
        (("--m", "20", "--d", "8", "--ranks", "1", "--mc-samples", "1"), ("--mc-samples", ">= 2")),
        (("--m", "20", "--d", "8", "--ranks", "1", "--device", "tpu"), ("--device", "invalid choice")),
        (("--weights", "does/not/exist.npy", "--ranks", "1"), ("--weights", "not found", "does/not/exist.npy")),
    ],
)
def test_bad_input_exits_2_with_one_line(args, fragments):
    assert_usage_error(run(*args), *fragments)


def test_bad_weight_files_exit_2(tmp_path):
    nan = np.ones((4, 3), dtype=np.float32)
    nan[2, 1] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "conv.npy", np.ones((4, 3, 3, 3), dtype=np.float32))
    np.savez(tmp_path / "two.npz", a=np.ones((2, 2)), b=np.ones((2, 2)))
    torch.save({"fc.weight": torch.ones(3, 2)}, tmp_path / "sd.pt")
    cases = [
        (f"{tmp_path / 'nan.npy'}", ("NaN/Inf",)),
        (f"{tmp_path / 'conv.npy'}", ("2-D", "(4, 3, 3, 3)")),
        (f"{tmp_path / 'two.npz'}", ("holds 2 arrays", "'a', 'b'")),
        (f"{tmp_path / 'sd.pt'}:fc.bias", ("no key 'fc.bias'", "'fc.weight'")),
    ]
    for ref, fragments in cases:
        save = tmp_path / "out"
        assert_usage_error(run("--weights", ref, "--ranks", "1", "--save", str(save)), *fragments)
        assert not save.exists()  # nothing written for a bad input


def test_bad_input_leaves_save_dir_untouched(tmp_path):
    save = tmp_path / "out"
    save.mkdir()
    (save / "keep.txt").write_text("x")
    # the second rank is invalid: no file may be written for the first one either
    assert_usage_error(run("--m", "20", "--d", "8", "--ranks", "2,50", "--save", str(save)), "rank 50")
    assert [p.name for p in save.iterdir()] == ["keep.txt"]
    not_dir = tmp_path / "file"
    not_dir.write_text("x")
    assert_usage_error(run("--m", "20", "--d", "8", "--ranks", "2", "--save", str(not_dir)), "--save", "not a directory")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is absent")
def test_cuda_when_absent_is_a_clear_error(tmp_path):
    assert_usage_error(run("--m", "20", "--d", "8", "--ranks", "1", "--device", "cuda", "--save", str(tmp_path / "o")),
                       "--device cuda", "CUDA is not available")
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_run_matches_cpu():
    cpu = json.loads(run("--m", "200", "--d", "64", "--ranks", "1,8", "--json").stdout)
    gpu = json.loads(run("--m", "200", "--d", "64", "--ranks", "1,8", "--device", "cuda", "--json").stdout)
    for a, b in zip(cpu, gpu):
        assert b["error"] == pytest.approx(a["error"], abs=1e-6)
