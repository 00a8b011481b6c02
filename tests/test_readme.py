"""README.md's commands, as written there, through the real entry point (`.venv/bin/lowrank`).

The commands come from the README's ```sh blocks (tests/readme_commands.py): editing an example
changes what runs here. The local ones run here (`make demo`'s `lowrank demo`, approx, factorize,
train); `lowrank submit train` runs against the real API and worker in
tests/service/test_readme_submit.py. Each subprocess gets one intra-op thread (OMP_NUM_THREADS=1):
on the shared two-core test machine two OpenMP threads per process oversubscribe the cores (a
digits epoch measured 7 s with one thread, 140 s with two under load); the command line is the
README's. Measured on the shared machine: approx ~30-90 s, factorize ~30-90 s, train ~90 s, demo ~60 s.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from readme_commands import README, REPO, find, readme_commands

LOWRANK = Path(sys.executable).with_name("lowrank")
# The README trains twice: a factored run (its accuracy promise) and a dense run that `lowrank compress` compresses.
FACTORED_TRAIN = ["lowrank", "train", "--model", "resnet18", "--dataset", "digits", "--rank-ratio"]
DENSE_TRAIN = ["lowrank", "train", "--model", "resnet18", "--dataset", "digits", "--init", "dense"]
# Two factorize examples: the method comparison and the latency-aware one.
FACTORIZE = ["lowrank", "factorize", "--model", "resnet50"]
FACTORIZE_AWARE = ["lowrank", "factorize", "--model", "resnet18"]
pytestmark = pytest.mark.slow


def env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LOWRANK_")}
    return {**clean, "OMP_NUM_THREADS": "1"}


def run_lowrank(argv: list[str], tmp_path: Path, timeout: float) -> subprocess.CompletedProcess:
    assert argv[0] == "lowrank", argv
    return subprocess.run([str(LOWRANK), *argv[1:]], cwd=tmp_path, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def test_the_readme_shows_the_commands_these_tests_run():
    """Deleting or renaming an example must fail here, not silently run nothing."""
    commands = readme_commands()
    assert ["make", "demo"] in commands and ["make", "test"] in commands
    for prefix in (["lowrank", "approx"], FACTORIZE, FACTORIZE_AWARE, ["lowrank", "latency"], FACTORED_TRAIN,
                   DENSE_TRAIN, ["lowrank", "compress"], ["lowrank", "recipes"], ["lowrank", "submit", "train"]):
        find(prefix)
    # the extraction itself: continuation lines, several commands on a line, comments
    text = "```sh\nlowrank jobs --status running ; lowrank logs ID  # a comment\nlowrank train \\\n  --epochs 3\n```\n"
    assert readme_commands(text) == [["lowrank", "jobs", "--status", "running"], ["lowrank", "logs", "ID"],
                                      ["lowrank", "train", "--epochs", "3"]]


@pytest.mark.timeout(420)
def test_readme_approx(tmp_path):
    argv = find(["lowrank", "approx"])
    proc = run_lowrank(argv, tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)  # the README's command asks for --json
    ranks = [int(r) for r in argv[argv.index("--ranks") + 1].split(",")]
    methods = argv[argv.index("--methods") + 1].split(",")
    assert sorted((r["method"], r["rank"]) for r in rows) == sorted((m, r) for m in methods for r in ranks)
    by = {(r["method"], r["rank"]): r["error"] for r in rows}
    for r in ranks:  # the README's point: NKP's function error is below the SVD's at every rank
        assert 0 < by[("nkp", r)] < by[("spectral", r)] < 1


@pytest.mark.timeout(420)
def test_readme_factorize(tmp_path):
    argv = find(FACTORIZE)
    proc = run_lowrank(argv, tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr
    model = argv[argv.index("--model") + 1]
    summary = re.search(r"(\d+) of (\d+) layers factored; parameters ([\d,]+) -> ([\d,]+)", proc.stdout)
    assert summary, proc.stdout[-2000:]
    assert int(summary[1]) > 0 and int(summary[3].replace(",", "")) > int(summary[4].replace(",", ""))
    means = dict(re.findall(r"^  (\w+): mean error ([\d.]+)", proc.stdout, flags=re.M))
    assert float(means["nkp"]) < float(means["spectral"]), (model, means)


@pytest.mark.timeout(420)
def test_readme_latency(tmp_path):
    """The latency example: end to end per batch for dense, factored and latency-aware, per layer at each batch."""
    argv = find(["lowrank", "latency"])
    proc = run_lowrank(argv, tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr
    batches = argv[argv.index("--batch") + 1].split(",")
    for b in batches:
        for variant in ("dense", "factored", "latency-aware"):
            assert re.search(rf"│\s+{b} │ {variant}\s+│[\d, ]+│\s+[\d.]+ │", proc.stdout), (b, variant, proc.stdout[-3000:])
        assert re.search(rf"batch {b}: \d+ of 19 factored layers slower than dense", proc.stdout), proc.stdout[-2000:]
    assert re.search(r"latency-aware \(timed at batch 1\): kept \d+ layer\(s\) dense, \d+ factored", proc.stdout)


@pytest.mark.timeout(420)
def test_readme_factorize_latency_aware(tmp_path):
    argv = find(FACTORIZE_AWARE)
    proc = run_lowrank(argv, tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr
    kept = re.search(r"latency-aware \(cpu, batch 1, 32 px, 1 thread\(s\), timed in [\d.]+ s\): (\d+) layer\(s\) kept dense",
                     proc.stdout)
    assert kept, proc.stdout[-2000:]
    summary = re.search(r"(\d+) of (\d+) layers factored", proc.stdout)
    assert int(summary[1]) + int(kept[1]) == 19, (summary[0], kept[0])  # resnet18: 19 layers factorable at 0.25
    assert len(re.findall(r"^  \S+: factored not faster on cpu: [\d.]+ ms vs dense [\d.]+ ms", proc.stdout,
                          flags=re.M)) == int(kept[1])


@pytest.mark.timeout(600)
def test_readme_train_reaches_the_documented_accuracy(tmp_path):
    """The README promises val top-1 >= 0.90 on digits for its train command, with the recipe's defaults."""
    argv = find(FACTORED_TRAIN)
    assert "val top-1 >= 0.90" in README.read_text(), "the README states the outcome this test checks"
    proc = run_lowrank(argv, tmp_path, timeout=580)
    assert proc.returncode == 0, proc.stderr
    val = re.search(r"val_top1 ([\d.]+)", proc.stdout)
    assert val, proc.stdout
    assert float(val[1]) >= 0.90, proc.stderr
    assert "recipe digits:" in proc.stderr and "warning:" not in proc.stdout
    print(f"\nREADME train: val_top1 {val[1]}")


@pytest.mark.timeout(900)
def test_readme_compress_after_its_dense_train(tmp_path):
    """The README's dense train command, then its compress command on that checkpoint, in one folder: the
    compressed model keeps the accuracy the README states, at the stated budget, and is saved."""
    train = run_lowrank(find(DENSE_TRAIN), tmp_path, timeout=580)
    assert train.returncode == 0, train.stderr
    argv = find(["lowrank", "compress"])
    assert "keeps val top-1 >= 0.90" in README.read_text(), "the README states the outcome this test checks"
    proc = run_lowrank([*argv, "--json"], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    save = Path(tmp_path, argv[argv.index("--save") + 1])
    assert save.stat().st_size > 0
    top1 = report["top1"]
    print(f"\nREADME compress: top-1 {top1}")
    assert top1["dense"] >= 0.90 and top1["compressed"] >= 0.90, top1
    budget = float(argv[argv.index("--budget") + 1])
    assert report["totals"]["budget_used"] <= budget + 1e-9, report["totals"]


def test_readme_recipes(tmp_path):
    proc = run_lowrank(find(["lowrank", "recipes"]), tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^digits\s+all\s+digits\s+3\s+64\s+0\.02\s+sgd", proc.stdout, flags=re.M), proc.stdout


def _demo_argv() -> list[str]:
    """`make demo`'s command, read from the Makefile's demo recipe ($(BIN) = this venv's bin)."""
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^demo:.*\n\t(.+)$", makefile, flags=re.M)
    assert recipe, "Makefile has no demo target"
    line = recipe[1].replace("$(BIN)/", "")
    return line.split()


@pytest.mark.timeout(400)
def test_make_demo_prints_the_table_and_the_dashboard_then_stops_on_ctrl_c(tmp_path):
    assert find(["make", "demo"]) == ["make", "demo"]
    argv = _demo_argv()
    assert argv[:2] == ["lowrank", "demo"], argv
    with socket.socket() as s:  # the README's port 8000 may be taken on a shared machine
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(LOWRANK), *argv[1:], "--port", str(port)], cwd=tmp_path, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 330
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "serving until Ctrl-C" in line:
                break
        out = "".join(lines)
        assert "serving until Ctrl-C" in out, out[-4000:]
        assert re.search(r"method\s*[│┃]\s*rank \d+", out) and "normalized function error" in out, out
        for method in ("spectral", "rescale", "nkp"):
            assert re.search(rf"│ {method}\s*│\s*0\.\d{{4}}", out), (method, out)
        assert f"dashboard: http://127.0.0.1:{port}/" in out
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the demo stops its `lowrank up` and exits 0
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
