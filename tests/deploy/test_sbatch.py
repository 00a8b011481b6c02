"""deploy/slurm/worker.sbatch: lint it, run its launcher logic with a fake Slurm environment.

Layout checks use the real `lowrank worker --dry-run` (through LOWRANK_WORKER_ARGS). The shutdown
checks put a `lowrank` on PATH that runs the real CLI parser, the real launcher plan and the real
supervisor (worker/launcher.py), with each Celery worker replaced by a small script that records
its CUDA_VISIBLE_DEVICES and the signals it receives: sbatch trap -> launcher -> each worker.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "deploy" / "slurm" / "worker.sbatch"
VENV_BIN = Path(sys.executable).parent
BASH = shutil.which("bash") or "/bin/bash"


def sbatch_env(tmp_path: Path, **overrides: str | None) -> dict[str, str]:
    env = {
        "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "SLURM_JOB_ID": "4242",
        "SLURM_GPUS_ON_NODE": "3",
        "CUDA_VISIBLE_DEVICES": "0,1,2",
        "LOWRANK_DATABASE_URL": "postgresql+psycopg://lowrank:secret@db.lab:5432/lowrank",
        "LOWRANK_BROKER_URL": "redis://:secret@redis.lab:6379/0",
        "LOWRANK_ARTIFACT_ROOT": str(tmp_path / "artifacts"),
    }
    for k, v in overrides.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def run_sbatch(env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BASH, str(SBATCH)], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=env["HOME"])


# ------------------------------------------------------------------------------------ static


def test_bash_syntax() -> None:
    r = subprocess.run([BASH, "-n", str(SBATCH)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_shellcheck_clean(unavailable) -> None:
    if shutil.which("shellcheck") is None:
        unavailable("shellcheck is not installed (`make tools`, or apt-get install shellcheck)")
    r = subprocess.run(["shellcheck", "--shell=bash", "--severity=style", str(SBATCH)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_sbatch_directives() -> None:
    lines = SBATCH.read_text().splitlines()
    assert lines[0].startswith("#!") and "bash" in lines[0]
    # sbatch reads #SBATCH lines only up to the first command: all must come before it.
    first_cmd = next(i for i, ln in enumerate(lines[1:], 1) if ln.strip() and not ln.lstrip().startswith("#"))
    directives = [ln.split(None, 1)[1].strip() for ln in lines if ln.startswith("#SBATCH")]
    assert all(i < first_cmd for i, ln in enumerate(lines) if ln.startswith("#SBATCH"))
    assert "--signal=B:TERM@120" in directives
    assert any(d.startswith(("--gres=gpu", "--gpus")) for d in directives), directives
    assert "--nodes=1" in directives
    # The trap forwards TERM; the comments explain why a running job is not lost.
    text = SBATCH.read_text()
    assert re.search(r"^trap on_term TERM$", text, flags=re.M)
    for phrase in ("acks_late", "re-queues the job at once", "checkpoint", "warm shutdown", "cold shutdown"):
        assert phrase in text, phrase


# ------------------------------------------------------------------------------------ fail fast


@pytest.mark.parametrize("missing", ["LOWRANK_DATABASE_URL", "LOWRANK_BROKER_URL", "LOWRANK_ARTIFACT_ROOT"])
def test_missing_service_settings_fail_fast(tmp_path: Path, missing: str) -> None:
    r = run_sbatch(sbatch_env(tmp_path, **{missing: None, "LOWRANK_WORKER_ARGS": "--dry-run"}))
    assert r.returncode == 2
    assert f"{missing} not set" in r.stderr
    assert "worker@" not in r.stdout  # nothing was started


@pytest.mark.parametrize(("var", "value", "expected"), [
    ("LOWRANK_DATABASE_URL", "sqlite:////tmp/x.db", "LOWRANK_DATABASE_URL must be a postgresql:// URL"),
    ("LOWRANK_BROKER_URL", "filesystem://", "LOWRANK_BROKER_URL must be a redis:// or rediss:// URL"),
    ("SLURM_GPUS_ON_NODE", None, "no GPU allocated to this job"),
    ("SLURM_GPUS_ON_NODE", "0", "no GPU allocated to this job"),
    ("SLURM_GPUS_ON_NODE", "2", "list 3 GPUs (0,1,2) but SLURM_GPUS_ON_NODE=2"),
    ("CUDA_VISIBLE_DEVICES", "NoDevFiles", "Slurm found no GPU device files"),
    ("SLURM_JOB_NUM_NODES", "2", "for N nodes submit an array"),
    ("LOWRANK_VENV", "/nonexistent/venv", "LOWRANK_VENV=/nonexistent/venv has no bin/lowrank"),
])
def test_wrong_environment_fails_fast(tmp_path: Path, var: str, value: str | None, expected: str) -> None:
    r = run_sbatch(sbatch_env(tmp_path, **{var: value, "LOWRANK_WORKER_ARGS": "--dry-run"}))
    assert r.returncode == 2, r.stdout + r.stderr
    assert expected in r.stderr
    assert "secret" not in r.stderr  # URLs carry passwords: never echoed


def test_lowrank_not_on_path(tmp_path: Path) -> None:
    env = sbatch_env(tmp_path, PATH="/usr/bin:/bin")
    r = run_sbatch(env)
    assert r.returncode == 2
    assert "lowrank is not on PATH: set LOWRANK_VENV" in r.stderr


def test_env_file_is_read(tmp_path: Path) -> None:
    env_file = tmp_path / "lowrank.env"
    env_file.write_text("LOWRANK_BROKER_URL=redis://:secret@redis.lab:6379/0\n")
    env = sbatch_env(tmp_path, LOWRANK_BROKER_URL=None, LOWRANK_ENV_FILE=str(env_file),
                     LOWRANK_WORKER_ARGS="--dry-run")
    r = run_sbatch(env)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 3


# ------------------------------------------------------------------------------------ process layout


def planned(stdout: str) -> list[dict[str, str]]:
    """Parse `lowrank worker --dry-run` lines: '<node>: K=V ... <argv>'."""
    rows = []
    for line in stdout.strip().splitlines():
        node, rest = line.split(": ", 1)
        env = dict(re.findall(r"(\w+)=(\S+)", rest.split(" -m celery ")[0]))
        queues = re.search(r" -Q (\S+)", rest).group(1)
        rows.append({"node": node, "CUDA_VISIBLE_DEVICES": env.get("CUDA_VISIBLE_DEVICES", ""),
                     "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", ""), "queues": queues,
                     "concurrency": re.search(r" -c (\d+)", rest).group(1)})
    return rows


@pytest.mark.parametrize(("slurm", "expected_gpus"), [
    ({"SLURM_GPUS_ON_NODE": "3", "CUDA_VISIBLE_DEVICES": "0,1,2"}, ["0", "1", "2"]),
    # No gres-set CUDA_VISIBLE_DEVICES: the job's GPU indices from Slurm.
    ({"SLURM_GPUS_ON_NODE": "2", "CUDA_VISIBLE_DEVICES": None, "SLURM_JOB_GPUS": "5,7"}, ["5", "7"]),
    # Only a count: a cgroup-constrained node shows the job its GPUs as 0..N-1.
    ({"SLURM_GPUS_ON_NODE": "2", "CUDA_VISIBLE_DEVICES": None}, ["0", "1"]),
    ({"SLURM_GPUS_ON_NODE": "2", "CUDA_VISIBLE_DEVICES": "GPU-1a2b,GPU-3c4d"}, ["GPU-1a2b", "GPU-3c4d"]),
    ({"SLURM_GPUS_ON_NODE": "1", "CUDA_VISIBLE_DEVICES": "3"}, ["3"]),
])
def test_one_worker_per_allocated_gpu(tmp_path: Path, slurm: dict[str, str | None],
                                      expected_gpus: list[str]) -> None:
    env = sbatch_env(tmp_path, LOWRANK_WORKER_ARGS="--dry-run", SLURM_CPUS_PER_TASK="16",
                     LOWRANK_QUEUE_PREFIX="lab.", **slurm)
    r = run_sbatch(env)
    assert r.returncode == 0, r.stderr
    rows = planned(r.stdout)
    assert [row["CUDA_VISIBLE_DEVICES"] for row in rows] == expected_gpus
    nodes = [row["node"] for row in rows]
    assert len(set(nodes)) == len(nodes)
    assert all("-j4242-gpu" in n for n in nodes), nodes  # unique per Slurm job, even on a shared host
    assert {row["queues"] for row in rows} == {"lab.gpu.high,lab.gpu.normal,lab.gpu.low"}
    # The script exported OMP_NUM_THREADS itself (from the job's CPUs), so the launcher leaves it.
    assert {row["OMP_NUM_THREADS"] for row in rows} == {""}
    assert f"one worker per GPU on CUDA devices {','.join(expected_gpus)}" in r.stderr


def test_multi_gpu_workers_group_the_allocation(tmp_path: Path) -> None:
    env = sbatch_env(tmp_path, LOWRANK_WORKER_ARGS="--dry-run", SLURM_CPUS_PER_TASK="16", LOWRANK_QUEUE_PREFIX="lab.",
                     SLURM_GPUS_ON_NODE="4", CUDA_VISIBLE_DEVICES="0,1,2,3", LOWRANK_GPUS_PER_WORKER="2")
    r = run_sbatch(env)
    assert r.returncode == 0, r.stderr
    rows = planned(r.stdout)
    assert [row["CUDA_VISIBLE_DEVICES"] for row in rows] == ["0,1", "2,3"]
    assert {row["queues"] for row in rows} == {"lab.gpu2.high,lab.gpu2.normal,lab.gpu2.low"}
    assert "one worker per 2 GPUs on CUDA devices 0,1,2,3 (queues gpu2)" in r.stderr
    bad = run_sbatch(sbatch_env(tmp_path, SLURM_GPUS_ON_NODE="4", CUDA_VISIBLE_DEVICES="0,1,2,3",
                                LOWRANK_GPUS_PER_WORKER="3"))
    assert bad.returncode == 2
    assert "LOWRANK_GPUS_PER_WORKER='3' must be 1..8 and divide the 4 allocated GPUs" in bad.stderr


def test_worker_queues_option_routes_other_queues_to_the_gpu_workers(tmp_path: Path) -> None:
    env = sbatch_env(tmp_path, LOWRANK_WORKER_ARGS="--dry-run", LOWRANK_QUEUE_PREFIX="lab.",
                     SLURM_GPUS_ON_NODE="2", CUDA_VISIBLE_DEVICES="0,1", LOWRANK_WORKER_QUEUES="gpu,cpu")
    r = run_sbatch(env)
    assert r.returncode == 0, r.stderr
    rows = planned(r.stdout)
    assert [row["CUDA_VISIBLE_DEVICES"] for row in rows] == ["0", "1"]  # still one worker per GPU
    assert {row["queues"] for row in rows} == {
        "lab.gpu.high,lab.cpu.high,lab.gpu.normal,lab.cpu.normal,lab.gpu.low,lab.cpu.low"}
    assert "one worker per GPU on CUDA devices 0,1 (queues gpu,cpu)" in r.stderr


@pytest.mark.parametrize("queues", ["tpu", "gpu9", "cpu,", "cpu gpu", "gpu1"])
def test_bad_worker_queues_fail_fast(tmp_path: Path, queues: str) -> None:
    r = run_sbatch(sbatch_env(tmp_path, LOWRANK_WORKER_QUEUES=queues, LOWRANK_WORKER_ARGS="--dry-run"))
    assert r.returncode == 2
    assert f"LOWRANK_WORKER_QUEUES='{queues}' must be a comma-separated list of cpu, gpu, gpu2..gpu8" in r.stderr
    assert "worker@" not in r.stdout


def test_cpu_variant_runs_without_gpus(tmp_path: Path) -> None:
    # A CPU partition's job: no GPU from Slurm, a CUDA_VISIBLE_DEVICES left in the submitting shell.
    env = sbatch_env(tmp_path, LOWRANK_WORKER_ARGS="--dry-run", LOWRANK_QUEUE_PREFIX="lab.", SLURM_CPUS_PER_TASK="16",
                     SLURM_GPUS_ON_NODE=None, CUDA_VISIBLE_DEVICES="0,1", LOWRANK_WORKER_QUEUES="cpu",
                     LOWRANK_CPU_WORKERS="4")
    r = run_sbatch(env)
    assert r.returncode == 0, r.stderr
    [row] = planned(r.stdout)  # one Celery worker running 4 jobs at once
    assert row["node"] == f"worker@{os.uname().nodename.split('.')[0]}-j4242"
    assert (row["queues"], row["concurrency"]) == ("lab.cpu.high,lab.cpu.normal,lab.cpu.low", "4")
    assert "CPU workers running 4 job(s) at once (queues cpu)" in r.stderr


@pytest.mark.parametrize(("overrides", "expected"), [
    # GPU queues without a GPU: the message says how to ask for GPUs, or for the CPU variant.
    ({"SLURM_GPUS_ON_NODE": None}, "or run CPU workers: LOWRANK_WORKER_QUEUES=cpu sbatch --gres=none"),
    ({"SLURM_GPUS_ON_NODE": None, "LOWRANK_WORKER_QUEUES": "cpu,gpu"}, "no GPU allocated to this job"),
    ({"SLURM_GPUS_ON_NODE": None, "LOWRANK_WORKER_QUEUES": "cpu", "LOWRANK_CPU_WORKERS": "0"},
     "LOWRANK_CPU_WORKERS must be a whole number from 1 to 999, got '0'"),
    ({"SLURM_GPUS_ON_NODE": None, "LOWRANK_WORKER_QUEUES": "cpu", "LOWRANK_CPU_WORKERS": "two"},
     "LOWRANK_CPU_WORKERS must be a whole number from 1 to 999, got 'two'"),
])
def test_cpu_variant_errors(tmp_path: Path, overrides: dict[str, str | None], expected: str) -> None:
    r = run_sbatch(sbatch_env(tmp_path, LOWRANK_WORKER_ARGS="--dry-run", **overrides))
    assert r.returncode == 2, r.stdout + r.stderr
    assert expected in r.stderr


# ------------------------------------------------------------------------------------ shutdown

FAKE_CELERY = '''\
import json, os, signal, sys, time
out = os.environ["FAKE_OUT"]
node = sys.argv[sys.argv.index("-n") + 1]
path = os.path.join(out, node + ".json")
record = {"node": node, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
          "omp": os.environ.get("OMP_NUM_THREADS"), "signals": []}
hold = os.environ.get("FAKE_HOLD_TERM") == "1"  # a long job: warm shutdown never completes

def save():
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)

def on_signal(signum, frame):
    record["signals"].append(signal.Signals(signum).name)
    save()
    if signum == signal.SIGQUIT or not hold:
        sys.exit(0)

for s in (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT):
    signal.signal(s, on_signal)
save()
while True:
    time.sleep(0.05)
'''

FAKE_LOWRANK = '''\
#!{python}
# The real `lowrank worker` argument parsing, plan and supervision; fake Celery worker processes.
import sys
sys.path.insert(0, {root!r})
from lowrank.cli import build_parser
from lowrank.cli.service import plan_from_args
from worker.launcher import PlannedProcess, run_processes

args = build_parser().parse_args(sys.argv[1:])
assert args.command == "worker", args
plan = [PlannedProcess(p.name, [sys.executable, {fake!r}, *p.argv[3:]], p.env) for p in plan_from_args(args)]
sys.exit(run_processes(plan, label="lowrank worker", poll_s=0.05))
'''


def start_with_fake_workers(tmp_path: Path, n_gpus: int, **overrides: str) -> tuple[subprocess.Popen, Path]:
    bindir, out = tmp_path / "bin", tmp_path / "out"
    bindir.mkdir()
    out.mkdir()
    fake = tmp_path / "fake_celery.py"
    fake.write_text(FAKE_CELERY)
    lowrank = bindir / "lowrank"
    lowrank.write_text(FAKE_LOWRANK.format(python=sys.executable, root=str(ROOT), fake=str(fake)))
    lowrank.chmod(0o755)
    gpus = ",".join(str(i) for i in range(n_gpus))
    env = sbatch_env(tmp_path, **{"PATH": f"{bindir}:/usr/bin:/bin", "SLURM_GPUS_ON_NODE": str(n_gpus),
                                  "CUDA_VISIBLE_DEVICES": gpus, "FAKE_OUT": str(out), **overrides})
    proc = subprocess.Popen([BASH, str(SBATCH)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    return proc, out


def records(out: Path) -> list[dict]:
    rows = []
    for p in sorted(out.glob("*.json")):
        rows.append(json.loads(p.read_text()))
    return rows


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_term_is_forwarded_to_every_worker_for_warm_shutdown(tmp_path: Path) -> None:
    proc, out = start_with_fake_workers(tmp_path, n_gpus=3, SLURM_CPUS_PER_TASK="16")
    try:
        wait_for(lambda: len(records(out)) == 3, 60, "3 fake workers to start")
        assert sorted(r["cuda"] for r in records(out)) == ["0", "1", "2"]
        # The job's 16 CPUs split between its 3 GPUs.
        assert [r["omp"] for r in records(out)] == ["5"] * 3
        os.kill(proc.pid, signal.SIGTERM)  # what --signal=B:TERM@120 does: the batch shell only
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        stop_group(proc)
    assert proc.returncode == 0, stderr
    rows = records(out)
    assert [r["signals"] for r in rows] == [["SIGTERM"]] * 3, rows
    assert "TERM received: warm shutdown" in stderr
    assert "QUIT" not in stderr.split("TERM received")[1]  # finished within the warm window
    assert "workers exited with code 0" in stderr


def test_cold_shutdown_follows_when_a_job_outlasts_the_warm_window(tmp_path: Path) -> None:
    proc, out = start_with_fake_workers(tmp_path, n_gpus=2, FAKE_HOLD_TERM="1", LOWRANK_WARM_SHUTDOWN_S="1")
    try:
        wait_for(lambda: len(records(out)) == 2, 60, "2 fake workers to start")
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        stop_group(proc)
    rows = records(out)
    # Warm first; the running "job" holds on, so QUIT (Celery's cold shutdown) follows after ~1 s.
    assert [r["signals"] for r in rows] == [["SIGTERM", "SIGQUIT"]] * 2, rows
    assert elapsed >= 1.0
    assert "cold shutdown" in stderr
    assert proc.returncode == 0, stderr


def test_cpu_variant_hides_inherited_gpus_and_splits_the_cpus(tmp_path: Path) -> None:
    proc, out = start_with_fake_workers(tmp_path, n_gpus=2, SLURM_GPUS_ON_NODE="", LOWRANK_WORKER_QUEUES="cpu",
                                        LOWRANK_CPU_WORKERS="4", SLURM_CPUS_PER_TASK="8")
    try:
        wait_for(lambda: len(records(out)) == 1, 60, "the CPU worker to start")
        [rec] = records(out)
        # No GPU for a job that was given none, even though the submitting shell had CUDA_VISIBLE_DEVICES=0,1;
        # the job's 8 CPUs split between its 4 concurrent jobs.
        assert (rec["cuda"], rec["omp"]) == ("", "2"), rec
        os.kill(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        stop_group(proc)
    assert proc.returncode == 0, stderr
    assert records(out)[0]["signals"] == ["SIGTERM"]
