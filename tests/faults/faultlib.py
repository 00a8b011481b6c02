"""Helpers of the fault tests (see conftest.py): private Redis and Postgres, process helpers, assertions."""
from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_service_helpers():
    name = "lowrank_service_test_helpers"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "service" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


svc = _load_service_helpers()
ServiceProcess = svc.ServiceProcess
free_port = svc.free_port
wait_job = svc._wait_job
SHARED_PORTS = (5432, 6379)

# A dense ResNet-18 on 8 px synthetic images: 4 steps of 4 images an epoch (well under a second on an idle
# 2-core machine), a metric every step, a checkpoint every epoch. Tests set "epochs".
TINY_TRAIN = {"kind": "train", "model": "resnet18", "dataset": "synthetic", "init": "dense", "batch_size": 4,
              "synthetic_train_size": 16, "synthetic_val_size": 8, "image_size": 8, "lr": 0.01,
              "log_every": 1}
TINY_TRAIN_STEPS_PER_EPOCH = 4
SMALL_APPROX = {"kind": "approx", "weights": {"source": "gaussian", "m": 64, "d": 32}, "rank": 4,
                "method": "spectral"}


def _missing(tool: str, why: str) -> None:
    """FAIL (never skip): with LOWRANK_TEST_REQUIRE_SERVICES=1 (.ci/run) or without."""
    required = os.environ.get("LOWRANK_TEST_REQUIRE_SERVICES") == "1"
    required = " - required by LOWRANK_TEST_REQUIRE_SERVICES=1" if required else ""
    pytest.fail(f"fault tests need {tool} ({why}){required}; install postgresql (postgresql-common) and redis-server",
                pytrace=False)


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}", pytrace=False)


# ------------------------------------------------------------------------------------------------
# Private Redis.

class PrivateRedis:
    """redis-server on `port` with its files in `folder`; AOF on (as docker-compose runs it) unless told."""

    def __init__(self, folder: Path, port: int, appendonly: bool = True) -> None:
        self.folder, self.port, self.appendonly = folder, port, appendonly
        self.proc: subprocess.Popen | None = None
        self.log_path = folder / "redis.log"
        self.url = f"redis://127.0.0.1:{port}/0"

    def start(self, timeout: float = 20.0) -> None:
        import redis

        exe = shutil.which("redis-server")
        if exe is None:
            _missing("redis-server", "a private Redis to restart")
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.folder),
                 "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec",
                 "--daemonize", "no", "--protected-mode", "no"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, process_group=0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"redis-server exited with {self.proc.returncode}:\n{self.logs()[-3000:]}", pytrace=False)
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=1).ping():
                    return
            except redis.RedisError:
                pass
            time.sleep(0.05)
        pytest.fail(f"private redis-server not answering after {timeout:.0f} s:\n{self.logs()[-3000:]}", pytrace=False)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        """SIGTERM: Redis shuts down cleanly (flushes its AOF); SIGKILL: a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def wipe(self) -> None:
        """Delete the persisted data (call while stopped): the next start has no messages at all."""
        assert self.proc is None, "stop Redis before wiping it"
        for p in self.folder.iterdir():
            if p != self.log_path:
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# ------------------------------------------------------------------------------------------------
# Private Postgres.

def _pg_version() -> str:
    for tool in ("pg_createcluster", "pg_ctlcluster", "pg_dropcluster"):
        if shutil.which(tool) is None:
            _missing(tool, "a private Postgres cluster to stop and start")
    root = Path("/usr/lib/postgresql")
    versions = sorted((p.name for p in root.iterdir() if (p / "bin" / "postgres").exists()), key=float) \
        if root.is_dir() else []
    if not versions:
        _missing("a PostgreSQL server under /usr/lib/postgresql", "pg_createcluster needs one")
    return versions[-1]


class PrivatePostgres:
    """A throwaway cluster `lrfault<hex>` on `port` (trust auth on loopback, fsync off)."""

    def __init__(self, port: int) -> None:
        self.version = _pg_version()
        self.name = f"lrfault{secrets.token_hex(4)}"
        self.port = port
        self.admin_url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/lowrank_faults"

    def _run(self, *argv: str, timeout: float = 60.0) -> None:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            pytest.fail(f"{' '.join(argv)} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}",
                        pytrace=False)

    def create(self) -> None:
        self._run("pg_createcluster", self.version, self.name, "-p", str(self.port), "--start-conf", "manual",
                  "-o", "fsync=off", "-o", "synchronous_commit=off", "-o", "full_page_writes=off",
                  "-o", "max_connections=200",
                  "--", "-A", "trust", "-N")
        self.start()
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute("CREATE DATABASE lowrank_faults")

    def start(self, timeout: float = 30.0) -> None:
        self._run("pg_ctlcluster", self.version, self.name, "start", timeout=timeout)
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.admin_url, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self, mode: str = "fast") -> None:
        """`fast`: disconnects every client at once (what a restart or a failover does to them)."""
        self._run("pg_ctlcluster", self.version, self.name, "stop", "-m", mode)

    def drop(self) -> None:
        subprocess.run(["pg_dropcluster", "--stop", self.version, self.name], capture_output=True, timeout=60)


def submit(client: httpx.Client, spec: dict, tag: str) -> str:
    r = client.post("/api/v1/jobs", json={**spec, "tags": [tag]})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def series(client: httpx.Client, job_id: str) -> dict[str, dict]:
    r = client.get(f"/api/v1/jobs/{job_id}/metrics", params={"max_points": 100_000})
    r.raise_for_status()
    return {s["name"]: s for s in r.json()["series"]}


def assert_complete_train_metrics(client: httpx.Client, job_id: str, epochs: int) -> dict[str, dict]:
    """Every optimizer step's train_loss_step exactly once, one val_top1 and one (epoch-mean)
    train_loss per epoch (the unique key makes a double impossible in the table; a gap means a lost write)."""
    s = series(client, job_id)
    total = epochs * TINY_TRAIN_STEPS_PER_EPOCH
    assert s["train_loss_step"]["steps"] == list(range(1, total + 1)), s["train_loss_step"]["steps"]
    assert s["train_loss_step"]["total"] == total
    ends = [TINY_TRAIN_STEPS_PER_EPOCH * (e + 1) for e in range(epochs)]
    assert s["val_top1"]["steps"] == ends
    assert s["train_loss"]["steps"] == ends
    assert s["epoch"]["total"] == total  # ("epoch", step) rows: one per step report and epoch end share steps
    return s


# ------------------------------------------------------------------------------------------------
# Processes of a worker.

def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children first, then theirs)."""
    out, todo = [], children(pid)
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(children(p))
    return out


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False


def job_pid(worker: ServiceProcess, job_id: str, timeout: float = 60) -> int:
    """The pid of `job_id`'s job process, as its supervisor logged it (`job <id>: process <pid> started`)."""
    import re

    pattern = re.compile(rf"job {job_id}: process (\d+) started")

    def found() -> int | None:
        hits = pattern.findall(worker.logs())
        return int(hits[-1]) if hits else None

    return wait_for(found, timeout, f"the worker to start job {job_id}'s process")
