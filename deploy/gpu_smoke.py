"""End-to-end check of a GPU worker on this node: API + one Celery worker per GPU + a small train job.

    python deploy/gpu_smoke.py                      # GPU 0, embedded SQLite + filesystem broker
    python deploy/gpu_smoke.py --gpus 0,1           # two workers, two jobs (one per GPU)
    python deploy/gpu_smoke.py --use-env            # the lab's Postgres/Redis from LOWRANK_* instead
    python deploy/gpu_smoke.py --device cpu         # the same path on a CPU worker (no GPU needed)

It runs the commands production runs (`lowrank db upgrade`, `lowrank api`, `lowrank worker
--queues gpu --gpus ...`), submits a factored ResNet-18 train job per GPU on synthetic data
(device=cuda, 2 epochs, a few steps each) through the REST API, and checks: every job succeeded
on a GPU worker, on the device it was given, with metrics, a checkpoint and an artifact recorded,
and /metrics counts it. Prints one line per check; exit code 0 only if all pass. Without
--use-env everything lives in a temporary LOWRANK_HOME, removed at the end (--keep keeps it).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

TINY_TRAIN = {
    "kind": "train", "model": "resnet18", "dataset": "synthetic", "small_input": True, "image_size": 32,
    "rank_ratio": 0.25, "init": "nkp", "epochs": 2, "batch_size": 16, "lr": 0.05,
    "synthetic_train_size": 64, "synthetic_val_size": 32, "max_train_batches": 3, "max_val_batches": 2,
    "log_every": 1, "tags": ["gpu-smoke"],
}


class Smoke:
    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.failed = 0

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        print(f"{'PASS' if ok else 'FAIL'}  {what}{'' if ok or not detail else ': ' + detail}", flush=True)
        self.failed += not ok
        return ok

    def lowrank(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "lowrank", *args]

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, process_group=0)
        log.close()
        self.procs.append((name, proc))
        return proc

    def stop_all(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)  # warm shutdown
        deadline = time.monotonic() + 60
        for _, proc in reversed(self.procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def tail(self, name: str, n: int = 40) -> str:
        path = self.log_dir / f"{name}.log"
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        return "\n".join(lines[-n:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond, timeout: float, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    return None


def metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def run(args: argparse.Namespace) -> int:
    home = Path(tempfile.mkdtemp(prefix="lowrank-smoke-"))
    env = dict(os.environ)
    if not args.use_env:
        for k in [k for k in env if k.startswith("LOWRANK_")]:
            del env[k]
        env["LOWRANK_HOME"] = str(home)  # SQLite + filesystem broker + artifacts under here
    env.update({"LOWRANK_AUTH": "off", "LOWRANK_HEARTBEAT_INTERVAL_S": "1", "LOWRANK_STALE_AFTER_S": "30"})
    smoke = Smoke(env, home)
    gpus = [g for g in args.gpus.split(",") if g] if args.device == "cuda" else []
    n_jobs = max(1, len(gpus))
    try:
        r = subprocess.run(smoke.lowrank("db", "upgrade"), env=env, capture_output=True, text=True, timeout=300)
        if not smoke.check(r.returncode == 0, "lowrank db upgrade", r.stderr[-2000:]):
            return 1
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        smoke.start("api", smoke.lowrank("api", "--host", "127.0.0.1", "--port", str(port)))
        worker_argv = (smoke.lowrank("worker", "--queues", "gpu", "--gpus", ",".join(gpus)) if gpus
                       else smoke.lowrank("worker", "--queues", "cpu"))
        smoke.start("worker", worker_argv)
        with httpx.Client(base_url=base, timeout=30) as client:
            def ready() -> bool:
                try:
                    return client.get("/readyz").status_code == 200
                except httpx.TransportError:
                    return False

            if not smoke.check(bool(wait_until(ready, 120)), "API ready", smoke.tail("api")):
                return 1
            # Every worker ready before submitting, so that each GPU gets one of the jobs.
            n_workers = max(1, len(gpus))
            workers_up = wait_until(lambda: smoke.tail("worker", 10_000).count(" ready.") >= n_workers, 300)
            if not smoke.check(bool(workers_up), f"{n_workers} worker(s) ready", smoke.tail("worker")):
                return 1
            ids = []
            for i in range(n_jobs):
                spec = {**TINY_TRAIN, "device": args.device, "seed": i, "epochs": args.epochs, "init": args.init,
                        "name": f"gpu smoke {i}"}
                r = client.post("/api/v1/jobs", json=spec)
                if not smoke.check(r.status_code == 201, f"job {i} accepted", r.text[:500]):
                    return 1
                ids.append(r.json()["id"])

            def finished() -> list[dict] | None:
                jobs = [client.get(f"/api/v1/jobs/{j}").json() for j in ids]
                return jobs if all(j["status"] in ("succeeded", "failed", "cancelled") for j in jobs) else None

            t0 = time.monotonic()
            jobs = wait_until(finished, args.timeout, poll=1.0)
            if not smoke.check(jobs is not None, f"{n_jobs} job(s) finished within {args.timeout:.0f} s",
                               smoke.tail("worker")):
                return 1
            print(f"      {n_jobs} job(s) in {time.monotonic() - t0:.1f} s", flush=True)
            workers = set()
            for job in jobs:
                jid = job["id"]
                ok = smoke.check(job["status"] == "succeeded", f"job {jid} succeeded",
                                 f"{job['status']}: {(job.get('error') or '')[-1500:]}")
                if not ok:
                    continue
                result = job["result"] or {}
                device = str(result.get("device", ""))
                smoke.check(device.startswith(args.device), f"job {jid} ran on {args.device}", f"device={device!r}")
                workers.add(job["worker"])
                if gpus:
                    smoke.check(bool(re.search(r"-gpu\w+$", job["worker"] or "")), f"job {jid} ran on a GPU worker",
                                f"worker={job['worker']!r}")
                series = client.get(f"/api/v1/jobs/{jid}/metrics").json()["series"]
                smoke.check(any(s["total"] > 0 for s in series), f"job {jid} recorded metrics",
                            f"series={[s['name'] for s in series]}")
                names = [a["name"] for a in client.get(f"/api/v1/jobs/{jid}/artifacts").json()]
                smoke.check("checkpoints/last.pt" in names, f"job {jid} recorded its checkpoint", f"{names}")
            if len(gpus) > 1:
                smoke.check(len(workers) == len(gpus), f"the {len(gpus)} jobs ran on {len(gpus)} different GPU workers",
                            f"{sorted(w or '' for w in workers)}")
            text = client.get("/metrics").text
            done = metric(text, "lowrank_jobs", status="succeeded", kind="train")
            smoke.check(done is not None and done >= n_jobs, "/metrics counts the succeeded train jobs", f"{done}")
        return 1 if smoke.failed else 0
    finally:
        smoke.stop_all()
        if args.keep or smoke.failed:
            print(f"logs and data kept in {home}", flush=True)
        else:
            shutil.rmtree(home, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--gpus", default="0", help="GPU ids, one worker and one job each (default 0)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--init", default="nkp", choices=["nkp", "spectral", "rescale", "random"],
                   help="factor initialization of the train job (default nkp)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the jobs (default 600)")
    p.add_argument("--use-env", action="store_true", help="use LOWRANK_* from the environment (lab services)")
    p.add_argument("--keep", action="store_true", help="keep the temporary LOWRANK_HOME and logs")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
