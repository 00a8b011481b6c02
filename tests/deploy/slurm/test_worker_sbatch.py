"""deploy/slurm/worker.sbatch under a real Slurm (22.05, single node, fake GPUs; see slurmlib.py).

The project's own batch script is submitted with `sbatch`, its resource lines overridden for this
machine on the command line, against the test session's Postgres, Redis, API and artifact folder.
There is no CUDA here, so the workers are pointed at the cpu queues (LOWRANK_WORKER_QUEUES=cpu, as
the script documents) and every job is a CPU job. "The next allocation" that takes over a job is
the script's CPU variant (`--gres=none`), as a CPU partition would run it.
"""
from __future__ import annotations

import datetime as dt
import math
import os
import re
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from jobs import models as m
from jobs import store
from jobs.db import session_scope
from jobs.settings import get_settings
from lowrank.client import Client
from slurm.slurmlib import REPO, TIME_LIMIT_CHECK_S, SlurmCluster, load_fault_helpers, wait_until

pytestmark = [pytest.mark.service, pytest.mark.slurm]

SBATCH = REPO / "deploy" / "slurm" / "worker.sbatch"
VENV = Path(sys.executable).parent.parent  # the virtualenv running the tests: LOWRANK_VENV for the jobs
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")

faults = load_fault_helpers()
# A dense ResNet-18 on 8 px synthetic images, 4 steps an epoch, a checkpoint every epoch; it starts in
# a second (a factored one spends longer on its initialization than on its epochs).
TRAIN = faults.TINY_TRAIN
STEPS_PER_EPOCH = faults.TINY_TRAIN_STEPS_PER_EPOCH


@dataclass
class WorkerJob:
    """A submitted worker.sbatch job."""

    id: int
    output: Path

    def text(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""


def submit_workers(slurm: SlurmCluster, folder: Path, *, gres: str, cpus: int,
                   env: dict[str, str | None] | None = None) -> WorkerJob:
    """sbatch worker.sbatch as a lab user would, with this machine's resources on the command line.

    The job inherits the submitting environment (sbatch's --export=ALL): the session's LOWRANK_*
    settings (service_env), LOWRANK_VENV, the cpu queues and a 2 s warm shutdown; `env` changes it
    (None removes a variable)."""
    assert (VENV / "bin" / "lowrank").exists(), f"no {VENV}/bin/lowrank: run the tests with .venv/bin/python"
    submit_env = {**os.environ, "LOWRANK_VENV": str(VENV), "LOWRANK_WORKER_QUEUES": "cpu",
                  "LOWRANK_WARM_SHUTDOWN_S": "2", **(env or {})}
    job_id = slurm.sbatch(SBATCH, f"--gres={gres}", f"--cpus-per-task={cpus}", "--mem=2G", "--time=10",
                          f"--output={folder}/worker-%j.out",
                          env={k: v for k, v in submit_env.items() if v is not None}, cwd=folder)
    return WorkerJob(job_id, folder / f"worker-{job_id}.out")


@pytest.fixture
def workers(slurm: SlurmCluster, service_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., WorkerJob]]:
    """submit(gres=, cpus=, env=) -> WorkerJob; what a test leaves running is cancelled when it ends,
    so the next test finds the node free."""
    submitted: list[WorkerJob] = []

    def submit(**kwargs) -> WorkerJob:
        submitted.append(submit_workers(slurm, tmp_path, **kwargs))
        return submitted[-1]

    yield submit
    left = [j for j in submitted if slurm.job(j.id)["JobState"] not in ENDED]
    if left:
        slurm.run("scancel", *(str(j.id) for j in left))
        for j in left:
            slurm.wait_state(j.id, ENDED, 60, j.output)


def wait_ready(slurm: SlurmCluster, job: WorkerJob, n: int, timeout: float = 120) -> list[str]:
    """The Celery node names of the job's workers, once `n` of them logged `<node> ready.`."""
    def ready() -> list[str]:
        return re.findall(r"(worker@\S+) ready\.", job.text())

    return wait_until(lambda: len(ready()) >= n and sorted(ready()), timeout,
                      f"{n} Celery worker(s) of Slurm job {job.id} to be ready",
                      on_timeout=lambda: f"job {job.id}: {slurm.job(job.id)}\n--- output:\n{job.text()[-4000:]}")


def wait_running_on(job_id: str, node: str, timeout: float, allocation: WorkerJob) -> store.JobRecord:
    """Wait until the job runs under a worker process of Celery node `node`; returns its row."""
    return wait_until(lambda: (j := store.get_job(job_id)).status == "running" and j.worker
                      and j.worker.startswith(f"{node}:") and j, timeout, f"job {job_id} to run on {node}",
                      on_timeout=lambda: f"job row: {store.get_job(job_id)}\n--- output of Slurm job "
                                         f"{allocation.id}:\n{allocation.text()[-4000:]}")


def process_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def stop_warm(slurm: SlurmCluster, allocation: WorkerJob) -> None:
    """`scancel --batch --signal=TERM`, the documented clean stop: the workers exit, the job with 0."""
    slurm.run("scancel", "--batch", "--signal=TERM", str(allocation.id))
    final = slurm.wait_state(allocation.id, ENDED, 60, allocation.output)
    assert (final["JobState"], final["ExitCode"]) == ("COMPLETED", "0:0"), allocation.text()[-4000:]
    assert "workers exited with code 0" in allocation.text()


def assert_resumed_once(client, job: dict, epochs: int) -> None:
    """Succeeded on its second run, which continued from a stored checkpoint; every metric point once."""
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 2, job["attempts"]
    resumed_from = job["result"]["resumed_from_epoch"]
    assert resumed_from is not None and 1 <= resumed_from < epochs, resumed_from
    # One history entry per epoch, the first run's (from the checkpoint) then the second's: none twice.
    assert [h["epoch"] for h in job["result"]["history"]] == list(range(1, epochs + 1))
    faults.assert_complete_train_metrics(client, job["id"], epochs)


def epoch_ends(job_id: str) -> dict[int, dt.datetime]:
    """Epoch number -> when its end-of-epoch metrics (val_loss) were stored (UTC)."""
    with session_scope() as s:
        rows = s.execute(select(m.Metric.step, m.Metric.recorded_at).where(
            m.Metric.job_id == uuid.UUID(job_id), m.Metric.name == "val_loss")).all()
    return {step // STEPS_PER_EPOCH: at.replace(tzinfo=dt.UTC) if at.tzinfo is None else at
            for step, at in rows}


def log_time(text: str, message: str) -> dt.datetime:
    """UTC time of the batch script's log line containing `message` (whole seconds)."""
    stamp = re.search(rf"^(\S+Z) worker\.sbatch: {re.escape(message)}", text, flags=re.M)
    assert stamp, f"no log line {message!r} in:\n{text[-4000:]}"
    return dt.datetime.strptime(stamp.group(1), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


# ------------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_missing_database_url_fails_the_batch_job_fast(slurm, workers):
    job = workers(gres="gpu:1", cpus=1, env={"LOWRANK_DATABASE_URL": None})
    final = slurm.wait_state(job.id, ENDED, 60, job.output)
    assert (final["JobState"], final["ExitCode"]) == ("FAILED", "2:0"), final
    lines = job.text().splitlines()
    assert len(lines) == 1, lines  # the script's one error line: nothing was started
    assert re.fullmatch(r"\S+Z worker\.sbatch: error: LOWRANK_DATABASE_URL not set: export it before sbatch "
                        r"\(or put it in LOWRANK_ENV_FILE\); .*never the embedded defaults", lines[0]), lines[0]


WARM_S = 4  # the first allocation's warm shutdown: its running job goes on this long, then the cold one


@pytest.mark.timeout(420)
def test_gpu_allocation_serves_a_sweep_then_hands_its_running_job_over_at_the_time_limit(
        slurm, workers, api_server, client, wait_job, unique_tag):
    """One allocation's life: one worker per fake GPU serves a sweep; then its time limit comes while
    it runs a train job: Slurm's --signal warning, a warm shutdown (the job goes on, checkpointing),
    the cold one (the job goes back to the queue), and the next allocation resumes it."""
    # One CPU of the node's two: the next allocation starts while this one still runs.
    first = workers(gres="gpu:2", cpus=1, env={"LOWRANK_WARM_SHUTDOWN_S": str(WARM_S)})
    nodes = assert_one_worker_per_gpu(slurm, first)
    epoch_s, first_epoch_s = serve_a_sweep(Client(api_server.url), first, nodes, unique_tag)

    # The time limit. Slurm checks limits every 30 s and sends the script's --signal=B:TERM@120 at the
    # first check within 120 + 30 s of the end. A train job is submitted for one of the idle workers to
    # claim; once it has stored a checkpoint (its second epoch's metrics are stored after the first
    # epoch's checkpoint was written), the allocation's limit is cut so that the next check warns.
    # Waiting for the checkpoint, not for a time predicted from the sweep, keeps a loaded machine (CI)
    # from cutting the job before it has one: that was a flake, resumed_from_epoch None.
    warn_s = int(re.search(r"^#SBATCH --signal=B:TERM@(\d+)$", SBATCH.read_text(), flags=re.M).group(1))
    # After that checkpoint the job must outlast the wait for the next check (at most 31 s), the warm
    # window and the cold shutdown: twice that at the sweep's pace (a job alone may run faster).
    epochs = 2 + math.ceil(2.0 * (TIME_LIMIT_CHECK_S + 1 + WARM_S + 3) / epoch_s)
    job_id = faults.submit(client, {**TRAIN, "epochs": epochs}, unique_tag)
    wait_until(lambda: len(epoch_ends(job_id)) >= 2, 60 + 4 * first_epoch_s,
               f"job {job_id} to store its first checkpoint (two epochs' metrics)",
               on_timeout=lambda: f"job row: {store.get_job(job_id)}\n--- output:\n{first.text()[-4000:]}")
    assert store.get_job(job_id).worker.rsplit(":", 1)[0] in nodes
    check = slurm.next_time_limit_check(not_before=time.time() + 1.5)
    slurm.end_allocation_at(first.id, check, warn_s)
    second = workers(gres="none", cpus=1)  # only now: it must not take the job first

    ended = slurm.wait_state(first.id, ENDED, 90, first.output)
    out = first.text()
    # The workers stopped before the limit itself: the job ended cleanly, not TIMEOUT.
    assert (ended["JobState"], ended["ExitCode"]) == ("COMPLETED", "0:0"), out[-4000:]
    assert re.search(rf"warning signal 15 to JobId={first.id}\b", slurm.logs(chars=10**7)), \
        "TERM did not come from Slurm's time-limit warning"
    # Warm first, in both workers (Celery's own log line); the running job held on for the whole warm
    # window, then the cold shutdown gave its message back.
    assert out.count("Warm shutdown (MainProcess)") == 2, out[-4000:]
    term_at = log_time(out, "TERM received: warm shutdown of the workers")
    quit_at = log_time(out, f"warm shutdown still running after {WARM_S}s: QUIT (cold shutdown, running job re-queued)")
    assert quit_at - term_at >= dt.timedelta(seconds=WARM_S)

    wait_running_on(job_id, f"worker@{slurm.node}-j{second.id}", 120, second)
    job = wait_job(client, job_id, timeout=180)
    assert_resumed_once(client, job, epochs)
    assert f"job {job_id}: resuming from" in second.text()
    stop_warm(slurm, second)


def assert_one_worker_per_gpu(slurm: SlurmCluster, job: WorkerJob) -> list[str]:
    """Two Celery workers, one per fake GPU, each started with its own CUDA_VISIBLE_DEVICES."""
    nodes = wait_ready(slurm, job, 2)
    prefix = f"worker@{slurm.node}-j{job.id}-gpu"
    assert nodes == [f"{prefix}0", f"{prefix}1"], job.text()
    out = job.text()
    # Slurm's gpu plugin gave the batch script both devices; the launcher one to each worker.
    assert "one worker per GPU on CUDA devices 0,1 (queues cpu)" in out, out
    started = dict(re.findall(r"started (worker@\S+) pid=\d+ CUDA_VISIBLE_DEVICES=(\S+)", out))
    assert started == {f"{prefix}0": "0", f"{prefix}1": "1"}, out
    return nodes


def serve_a_sweep(c: Client, job: WorkerJob, nodes: list[str], tag: str) -> tuple[float, float]:
    """A 2-job train sweep runs on both (idle) workers at once, each job in a process that sees its own
    GPU. Returns the median seconds per epoch, checkpoint included, the jobs took on this machine, and
    the longest time from a job's start to its first epoch's end."""
    sweep = c.sweep(base={**TRAIN, "epochs": 2, "tags": [tag]}, grid={"lr": [0.01, 0.02]})
    done = c.wait_sweep(sweep["id"], timeout=180)
    assert done["counts"]["succeeded"] == 2, done["counts"]
    rows = c.results(sweep["id"])
    assert [r["lr"] for r in rows] == [0.01, 0.02] and all(r["n"] == 1 for r in rows), rows
    jobs = [c.job(i) for r in rows for i in r["job_ids"]]
    ran_on = {j["worker"].rsplit(":", 1)[0]: int(j["worker"].rsplit(":", 1)[1]) for j in jobs}
    assert sorted(ran_on) == nodes, ran_on  # both GPU workers served the sweep
    for node, pid in ran_on.items():  # the pool process that ran the job, still alive: what it was given
        env = process_env(pid)
        assert env["CUDA_VISIBLE_DEVICES"] == node.rsplit("-gpu", 1)[1], (node, env)
        assert env["SLURM_JOB_ID"] == str(job.id)
    gaps, firsts = [], []
    for j in jobs:
        ends = epoch_ends(j["id"])
        gaps.append((ends[2] - ends[1]).total_seconds())
        started = dt.datetime.fromisoformat(j["started_at"])
        started = started.replace(tzinfo=dt.UTC) if started.tzinfo is None else started
        firsts.append((ends[1] - started).total_seconds())
    return statistics.median(gaps), max(firsts)


@pytest.mark.timeout(300)
def test_scancel_requeues_the_running_job_and_the_next_allocation_resumes_it(slurm, workers, client, wait_job,
                                                                             unique_tag):
    epochs = 8  # the 7 after the first checkpoint outlast the scancel, on a loaded machine too
    job_id = faults.submit(client, {**TRAIN, "epochs": epochs}, unique_tag)
    first = workers(gres="gpu:1", cpus=1)
    wait_running_on(job_id, f"worker@{slurm.node}-j{first.id}-gpu0", 120, first)
    second = workers(gres="none", cpus=1)  # the CPU variant, on the same queues
    checkpoint = get_settings().artifacts / job_id / "checkpoints" / "last.pt"
    wait_until(checkpoint.exists, 120, "the first epoch's checkpoint", interval=0.05)

    # Plain scancel signals every process of the job at once (then KILL after KillWait): the running
    # job is cut at once, its message given back to Redis, and the next allocation resumes it.
    slurm.run("scancel", str(first.id))
    ended = slurm.wait_state(first.id, ENDED, 60, first.output)
    assert ended["JobState"] == "CANCELLED", ended

    wait_running_on(job_id, f"worker@{slurm.node}-j{second.id}", 120, second)
    job = wait_job(client, job_id, timeout=180)
    assert_resumed_once(client, job, epochs)
    out = second.text()
    assert "CPU workers running 1 job(s) at once (queues cpu)" in out, out
    assert f"job {job_id}: resuming from" in out
