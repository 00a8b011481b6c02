"""`lowrank worker` process layout: one Celery worker per GPU, from fake GPU lists.

The planning tests run no process. The last test starts real `celery worker` children through
`lowrank worker --gpus all` with a fake CUDA_VISIBLE_DEVICES on Redis, pings them by node name,
reads their environment from /proc, kills one (it is reported, not restarted) and stops the
launcher with SIGTERM (forwarded: the other one shuts down warm).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from worker.launcher import LaunchError, parse_gpu_option, parse_queues, plan_workers

QUEUES = ["t.gpu.high", "t.gpu.normal", "t.gpu.low"]


def fake_nvidia_smi(tmp_path: Path, lines: str) -> str:
    exe = tmp_path / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\ncat <<'EOF'\n{lines}\nEOF\n")
    exe.chmod(0o755)
    return str(exe)


def test_gpus_all_from_cuda_visible_devices():
    assert parse_gpu_option("all", {"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    uuids = "GPU-1a2b3c4d-0000-1111-2222-333344445555,GPU-9f8e7d6c-0000-1111-2222-333344445555"
    assert parse_gpu_option("all", {"CUDA_VISIBLE_DEVICES": uuids}) == uuids.split(",")


def test_gpus_all_from_nvidia_smi(tmp_path):
    smi = fake_nvidia_smi(tmp_path, "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaa)\n"
                                    "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-bbb)\n"
                                    "GPU 2: NVIDIA H100 80GB HBM3 (UUID: GPU-ccc)")
    assert parse_gpu_option("all", {}, nvidia_smi=smi) == ["0", "1", "2"]


def test_gpu_errors_name_the_field(tmp_path):
    with pytest.raises(LaunchError, match="--gpus all: nvidia-smi not found"):
        parse_gpu_option("all", {}, nvidia_smi=str(tmp_path / "missing-nvidia-smi"))
    with pytest.raises(LaunchError, match="no GPU found"):
        parse_gpu_option("all", {"CUDA_VISIBLE_DEVICES": ""})
    with pytest.raises(LaunchError, match=r"--gpus 4 not in CUDA_VISIBLE_DEVICES='2,3'"):
        parse_gpu_option("2,4", {"CUDA_VISIBLE_DEVICES": "2,3"})
    with pytest.raises(LaunchError, match="lists a GPU twice"):
        parse_gpu_option("0,0", {})
    with pytest.raises(LaunchError, match="not a GPU index"):
        parse_gpu_option("0,x", {})
    assert parse_queues("gpu4,cpu") == ["gpu4", "cpu"]
    with pytest.raises(LaunchError, match="unknown queue 'gpu9'; allowed: cpu, gpu, gpu2..gpu8"):
        parse_queues("gpu9")
    with pytest.raises(LaunchError, match="unknown queue 'tpu'; allowed: cpu, gpu"):
        parse_queues("cpu,tpu")


def test_plan_one_worker_per_gpu():
    plan = plan_workers(queues=QUEUES, gpus=["0", "1", "3"], hostname="node7", cpu_count=12, environ={})
    assert [p.name for p in plan] == ["worker@node7-gpu0", "worker@node7-gpu1", "worker@node7-gpu3"]
    for p, gpu in zip(plan, ["0", "1", "3"]):
        assert p.env["CUDA_VISIBLE_DEVICES"] == gpu
        assert p.env["OMP_NUM_THREADS"] == "4"  # 12 cores / 3 workers
        argv = p.argv
        assert argv[1:6] == ["-m", "celery", "-A", "worker.celery_app:app", "worker"]
        assert argv[argv.index("-n") + 1] == p.name
        assert argv[argv.index("-Q") + 1] == ",".join(QUEUES)
        assert argv[argv.index("-c") + 1] == "1"
    # UUID GPUs get positional names; a caller's OMP_NUM_THREADS is kept.
    plan = plan_workers(queues=QUEUES, gpus=["GPU-aaa", "GPU-bbb"], hostname="n", environ={"OMP_NUM_THREADS": "2"})
    assert [p.name for p in plan] == ["worker@n-gpu0", "worker@n-gpu1"]
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plan] == ["GPU-aaa", "GPU-bbb"]
    assert all("OMP_NUM_THREADS" not in p.env for p in plan)
    # No --gpus: one worker, environment untouched.
    (single,) = plan_workers(queues=QUEUES, gpus=None, hostname="n", concurrency=2)
    assert single.name == "worker@n" and single.env == {}
    assert single.argv[single.argv.index("-c") + 1] == "2"


def test_plan_multi_gpu_workers():
    """--gpus-per-worker N: one worker per N consecutive GPUs, all N visible to it (DDP jobs of devices=N)."""
    q4 = ["t.gpu4.high", "t.gpu4.normal", "t.gpu4.low"]
    plan = plan_workers(queues=q4, gpus=[str(i) for i in range(8)], gpus_per_worker=4, hostname="n",
                        cpu_count=32, environ={})
    assert [p.name for p in plan] == ["worker@n-gpu0-3", "worker@n-gpu4-7"]
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plan] == ["0,1,2,3", "4,5,6,7"]
    assert [p.env["OMP_NUM_THREADS"] for p in plan] == ["16", "16"]  # 32 cores / 2 workers
    assert all(p.argv[p.argv.index("-Q") + 1] == ",".join(q4) for p in plan)
    with pytest.raises(LaunchError, match=r"--gpus-per-worker 4: the 6 GPUs \(0,1,2,3,4,5\) do not split"):
        plan_workers(queues=q4, gpus=[str(i) for i in range(6)], gpus_per_worker=4, environ={})
    with pytest.raises(LaunchError, match="--gpus-per-worker must be an integer from 1 to 8, got 9"):
        plan_workers(queues=q4, gpus=["0"], gpus_per_worker=9, environ={})


def test_multi_gpu_train_specs_route_to_their_queue_family():
    from jobs.queue import queue_name
    from jobs.settings import Settings
    from jobs.specs import parse_spec, queue_for

    base = {"kind": "train", "model": "resnet18", "dataset": "digits", "rank_ratio": 0.25, "init": "nkp"}
    assert queue_for(parse_spec(base)) == "cpu"
    assert queue_for(parse_spec({**base, "device": "cuda"})) == "gpu"
    assert queue_for(parse_spec({**base, "device": "cuda", "devices": 4})) == "gpu4"
    assert queue_name("gpu4", "high", Settings(queue_prefix="p.")) == "p.gpu4.high"
    with pytest.raises(ValueError, match="less than or equal to 8"):
        parse_spec({**base, "device": "cuda", "devices": 9})
    with pytest.raises(ValueError, match="devices > 1 needs device='cuda'"):
        parse_spec({**base, "devices": 2})


def _lowrank(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowrank", *args], env=env, capture_output=True, text=True,
                          timeout=60)


def test_cli_dry_run_and_errors(tmp_path):
    env = {**os.environ, "LOWRANK_HOME": str(tmp_path), "LOWRANK_QUEUE_PREFIX": "dry.",
           "CUDA_VISIBLE_DEVICES": "1,2"}
    out = _lowrank("worker", "--gpus", "all", "--hostname", "h", "--dry-run", env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("worker@h-gpu1: CUDA_VISIBLE_DEVICES=1 ")
    assert lines[1].startswith("worker@h-gpu2: CUDA_VISIBLE_DEVICES=2 ")
    assert "-Q dry.gpu.high,dry.gpu.normal,dry.gpu.low " in lines[0]  # default with --gpus: gpu queues
    out = _lowrank("worker", "--hostname", "h", "--dry-run", env=env)
    assert "-Q dry.cpu.high,dry.gpu.high,dry.cpu.normal,dry.gpu.normal,dry.cpu.low,dry.gpu.low " in out.stdout
    out = _lowrank("worker", "--gpus", "all", "--gpus-per-worker", "2", "--hostname", "h", "--dry-run", env=env)
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.strip().splitlines()
    assert line.startswith("worker@h-gpu1-2: CUDA_VISIBLE_DEVICES=1,2 ")
    assert "-Q dry.gpu2.high,dry.gpu2.normal,dry.gpu2.low " in line
    out = _lowrank("worker", "--gpus-per-worker", "2", "--dry-run", env=env)
    assert out.returncode == 2
    assert out.stderr.strip() == "error: --gpus-per-worker needs --gpus (the GPUs to group)"
    out = _lowrank("worker", "--gpus", "7", "--dry-run", env=env)
    assert out.returncode == 2
    assert out.stderr.strip() == "error: --gpus 7 not in CUDA_VISIBLE_DEVICES='1,2' (the GPUs this process may use)"


# ----------------------------------------------------------------------------- real processes


REDIS_URL = os.environ.get("LOWRANK_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def _redis_up() -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping())
    except Exception:  # noqa: BLE001 - any failure to ping means no Redis for this test
        return False


def _clean_redis(prefix: str) -> None:
    import redis

    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(match=f"*{prefix}*", count=1000))
    if keys:
        r.delete(*keys)


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(x) for x in text.split()]


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def _ping(app, names: list[str], timeout: float) -> set[str]:
    """Node names among `names` that answer a broadcast ping within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    while time.monotonic() < deadline and seen != set(names):
        for reply in app.control.ping(destination=names, timeout=1.0) or []:
            seen.update(reply)
    return seen


@pytest.mark.service
@pytest.mark.timeout(180)
def test_real_workers_per_fake_gpu(tmp_path, unavailable):
    if not _redis_up():
        unavailable("Redis at 127.0.0.1:6379 is not reachable")
    from jobs.queue import make_celery
    from jobs.settings import Settings

    tag = uuid.uuid4().hex[:8]
    env = {**os.environ,
           "LOWRANK_HOME": str(tmp_path), "LOWRANK_BROKER_URL": REDIS_URL,
           "LOWRANK_QUEUE_PREFIX": f"launchtest-{tag}.", "LOWRANK_REAP_INTERVAL_S": "3600",
           "CUDA_VISIBLE_DEVICES": "3,5"}  # fake GPUs: nothing here touches CUDA
    env.pop("OMP_NUM_THREADS", None)
    host = f"lt{tag}"
    names = [f"worker@{host}-gpu3", f"worker@{host}-gpu5"]
    app = make_celery(Settings(broker_url=REDIS_URL, home=tmp_path))
    launcher = subprocess.Popen([sys.executable, "-m", "lowrank", "worker", "--gpus", "all", "--hostname", host,
                                 "--loglevel", "WARNING"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert _ping(app, names, timeout=90) == set(names)

        kids = _children(launcher.pid)
        assert len(kids) == 2
        by_gpu = {}
        for pid in kids:
            e, argv = _environ(pid), _cmdline(pid)
            by_gpu[e["CUDA_VISIBLE_DEVICES"]] = pid
            assert argv[argv.index("-n") + 1] == f"worker@{host}-gpu{e['CUDA_VISIBLE_DEVICES']}"
            assert e["OMP_NUM_THREADS"] == str(max(1, os.cpu_count() // 2))
            # The job-process server that forks each job's process inherits the one GPU.
            helpers = _children(pid)
            assert helpers and all(_environ(c)["CUDA_VISIBLE_DEVICES"] == e["CUDA_VISIBLE_DEVICES"] for c in helpers)
        assert set(by_gpu) == {"3", "5"}
        # Neither the launcher nor a worker's own process loads torch (so neither can initialize CUDA); the
        # worker's job-process server imported it once for the job processes it forks.
        for pid in (launcher.pid, by_gpu["3"]):
            maps = Path(f"/proc/{pid}/maps").read_text()
            assert "libtorch" not in maps and "libcuda" not in maps
        assert any("libtorch" in Path(f"/proc/{c}/maps").read_text() for c in _children(by_gpu["3"]))

        # A worker dying is reported and not restarted; the other keeps serving.
        os.kill(by_gpu["3"], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while len(_children(launcher.pid)) != 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        assert _children(launcher.pid) == [by_gpu["5"]]
        assert _ping(app, [names[1]], timeout=10) == {names[1]}

        # SIGTERM is forwarded: warm shutdown of the other; the launcher reports the earlier death.
        launcher.send_signal(signal.SIGTERM)
        rc = launcher.wait(timeout=60)
        err = launcher.stderr.read()
        assert rc == 128 + signal.SIGKILL, err
        assert f"{names[0]} pid={by_gpu['3']} exited on its own with code -9; not restarted; 1 of 2 still running" in err
        assert f"{names[1]} stopped (exit 0)" in err
        assert not Path(f"/proc/{by_gpu['5']}").exists() or "zombie" in Path(f"/proc/{by_gpu['5']}/status").read_text()
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        app.close()
        _clean_redis(f"launchtest-{tag}.")
