"""The job supervisor: kill -9 anywhere in a worker, a LAPACK call that holds the GIL, cancel, time limits.

Each job runs in a process of its own, supervised by a thread of the Celery worker's process, which
heartbeats, holds the job's lease, and stops the job by signal (worker/supervisor.py). These tests kill
and starve the processes of a real worker on the private Postgres and Redis (heartbeat 1 s, stale after
6 s, reaper every 1 s) and check that no kill wedges the worker and that nothing the job's code does can
silence its heartbeat or outlive a cancel or a time limit.
"""
from __future__ import annotations

import os
import signal
import time

import pytest

from faults.faultlib import (
    SMALL_APPROX,
    TINY_TRAIN,
    alive,
    assert_complete_train_metrics,
    descendants,
    job_pid,
    submit,
    wait_for,
    wait_job,
)
from jobs import store
from jobs.settings import get_settings

pytestmark = [pytest.mark.service]

# An approximation whose time goes mostly into scipy's LAPACK dsyevr (the top half of the eigenvectors of a
# 3500 x 3500 Gram matrix), which holds the GIL for all of it: about 5 s of Gram product (torch), then 25-35 s
# of dsyevr on one loaded core here, and at least 10 s of dsyevr on a fast idle core.
LAPACK_APPROX = {"kind": "approx", "weights": {"source": "gaussian", "m": 3500, "d": 3500}, "rank": 1750,
                 "method": "spectral"}
# Its Gram product (2 * 8192^3 flops, torch) is one C call of 20 s or more on any single core (60 s here),
# which starts a second or two after the approximation does (converting W to float64 comes first).
LONG_C_CALL_APPROX = {"kind": "approx", "weights": {"source": "gaussian", "m": 8192, "d": 8192}, "rank": 1,
                      "method": "spectral"}


def _heartbeat_age(job_id: str) -> float:
    job = store.get_job(job_id)
    return (time.time() - job.heartbeat_at.timestamp()) if job.heartbeat_at else float("inf")


@pytest.mark.timeout(300)
def test_killed_idle_children_never_wedge_the_worker(fault_client, spawn_worker, unique_tag):
    """kill -9 of every idle process below a worker (after a job finished): the next job runs, and SIGTERM
    still stops the worker. (A prefork pool child killed this way left the pool blocked on a semaphore.)"""
    worker = spawn_worker("idle-kill@faults")
    first = wait_job(fault_client, submit(fault_client, SMALL_APPROX, unique_tag), timeout=120)
    assert first["status"] == "succeeded", first["error"]
    idle = descendants(worker.proc.pid)
    assert idle, "a worker has its job-process server below it"
    mark = len(worker.logs())
    for pid in idle:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_for(lambda: not any(alive(p) for p in idle), 10, "the killed processes to be gone")

    t0 = time.monotonic()
    second = wait_job(fault_client, submit(fault_client, {**SMALL_APPROX, "seed": 1}, unique_tag), timeout=120)
    recovered_s = time.monotonic() - t0
    assert second["status"] == "succeeded", (second["error"], worker.logs()[mark:][-3000:])
    assert second["worker"].startswith("idle-kill@faults")

    worker.kill(signal.SIGTERM)  # warm shutdown of an idle worker
    t0 = time.monotonic()
    worker.proc.wait(60)
    print(f"\nidle children {idle} killed: the next job succeeded {recovered_s:.1f} s after its submission "
          f"(a fresh job-process server); SIGTERM stopped the worker in {time.monotonic() - t0:.1f} s")


@pytest.mark.timeout(300)
def test_killed_job_process_is_requeued_at_once_and_resumes(fault_client, spawn_worker, unique_tag):
    """kill -9 of a busy job process (what the OOM killer does): its supervisor re-queues the job at once
    (no waiting for a stale heartbeat), and the next run resumes from the checkpoint, metrics complete."""
    epochs = 3
    worker = spawn_worker("busy-kill@faults")
    job_id = submit(fault_client, {**TINY_TRAIN, "epochs": epochs}, unique_tag)
    pid = job_pid(worker, job_id, timeout=90)
    ckpt = get_settings().artifacts / job_id / "checkpoints" / "last.pt"
    wait_for(ckpt.exists, 90, "the first epoch's checkpoint", interval=0.02)
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    again = wait_for(lambda: (j := store.get_job(job_id)).attempts == 2 and j.status == "running" and j, 60,
                     "the job to be claimed again")
    takeover_s = time.monotonic() - killed_at
    assert (f"job {job_id}: the job's process was killed by signal 9 (SIGKILL) (out of memory? the kernel's OOM "
            f"killer sends it); re-queued") in worker.logs()
    assert "stopped heartbeating" not in worker.logs()  # not the reaper's slow path
    job = wait_job(fault_client, job_id, timeout=120)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 2 and job["error"] is None and again.worker.startswith("busy-kill@faults")
    assert 1 <= job["result"]["resumed_from_epoch"] < epochs
    assert_complete_train_metrics(fault_client, job_id, epochs)
    print(f"\njob process SIGKILLed: claimed again after {takeover_s:.2f} s "
          f"(stale_after_s={get_settings().stale_after_s:g}), resumed from epoch {job['result']['resumed_from_epoch']}")


@pytest.mark.timeout(300)
def test_lapack_call_keeps_its_heartbeat(fault_client, spawn_worker, unique_tag):
    """A job inside LAPACK (holding its process's GIL for tens of seconds) keeps heartbeating from its
    supervisor, so it is never re-queued while it computes, and it finishes on its first run. (A heartbeat
    thread inside the job's own process was silent for the whole call, and the job was re-queued.)"""
    worker = spawn_worker("lapack-beat@faults")
    job_id = submit(fault_client, LAPACK_APPROX, unique_tag)
    job_pid(worker, job_id, timeout=90)
    worst_age, samples = 0.0, 0
    while (job := store.get_job(job_id)).status == "running":
        assert job.attempts == 1
        worst_age = max(worst_age, _heartbeat_age(job_id))
        samples += 1
        time.sleep(0.5)
    stale = get_settings().stale_after_s
    assert job.status == "succeeded" and job.attempts == 1, job.error
    assert samples >= 20 and worst_age < stale / 2, (samples, worst_age)
    print(f"\nLAPACK job: heartbeat at most {worst_age:.1f} s old over {samples} samples (stale after {stale:g} s)")


@pytest.mark.timeout(300)
def test_time_limit_kills_a_long_c_call(fault_client, spawn_worker, unique_tag):
    """Both time limits land inside one long C call: the stop request (soft limit, 6 s) cannot act, the hard
    limit (10 s) SIGKILLs the job's process group, the job is recorded failed naming the limit, and the worker
    serves the next job."""
    worker = spawn_worker("c-call-limit@faults", env={"LOWRANK_JOB_SOFT_TIME_LIMIT_S": "6",
                                                      "LOWRANK_JOB_TIME_LIMIT_S": "10"})
    job_id = submit(fault_client, LONG_C_CALL_APPROX, unique_tag)
    pid = job_pid(worker, job_id, timeout=90)
    job = wait_job(fault_client, job_id, timeout=60)
    assert job["status"] == "failed" and job["attempts"] == 1
    assert job["error"] == ("time limit exceeded: the job did not stop within 10 s (LOWRANK_JOB_TIME_LIMIT_S); "
                            "its process was killed")
    logs = worker.logs()
    assert f"job {job_id}: stopping (soft limit)" in logs and f"job {job_id}: killing its process group" in logs
    wait_for(lambda: not alive(pid), 10, "the killed job process to be gone")
    nxt = wait_job(fault_client, submit(fault_client, SMALL_APPROX, unique_tag), timeout=90)
    assert nxt["status"] == "succeeded" and nxt["worker"].startswith("c-call-limit@faults")


@pytest.mark.timeout(300)
def test_cancel_during_a_long_c_call_kills_the_job_within_its_grace(fault_client, spawn_worker, unique_tag):
    """Cancel a job stuck in one long C call (a Python-level stop flag cannot act): its process group is
    SIGKILLed after LOWRANK_STOP_GRACE_S, the job is recorded cancelled, and the worker serves the next job."""
    worker = spawn_worker("lapack-cancel@faults", env={"LOWRANK_STOP_GRACE_S": "3"})
    job_id = submit(fault_client, LONG_C_CALL_APPROX, unique_tag)
    pid = job_pid(worker, job_id, timeout=90)
    # Progress 0.05 is set just before the approximation; 5 s later the job is inside its Gram product, so
    # the stop signal's handler cannot run before the grace ends.
    wait_for(lambda: (store.get_job(job_id).progress or 0) >= 0.05, 60, "the approximation to start")
    time.sleep(5.0)
    assert store.get_job(job_id).status == "running"
    t0 = time.monotonic()
    assert fault_client.post(f"/api/v1/jobs/{job_id}/cancel").json()["cancel_requested"] is True
    job = wait_job(fault_client, job_id, timeout=30)
    latency = time.monotonic() - t0
    assert job["status"] == "cancelled" and job["result"] is None and job["error"] is None
    wait_for(lambda: not alive(pid), 10, "the job process to be gone")
    assert f"job {job_id}: killed after 3 s of stop grace (it did not stop by itself)" in worker.logs()
    nxt = wait_job(fault_client, submit(fault_client, SMALL_APPROX, unique_tag), timeout=90)
    assert nxt["status"] == "succeeded" and nxt["worker"].startswith("lapack-cancel@faults")
    print(f"\ncancel during a long C call: recorded cancelled {latency:.1f} s after the request (grace 3 s)")


@pytest.mark.timeout(300)
def test_cold_shutdown_requeues_the_running_job_at_once(fault_client, spawn_worker, unique_tag):
    """SIGTERM (warm: the running job may finish) then SIGQUIT (cold): the worker kills its job process,
    re-queues the job at once and exits; another worker resumes it from its checkpoint."""
    epochs = 3
    doomed = spawn_worker("cold@faults")
    job_id = submit(fault_client, {**TINY_TRAIN, "epochs": epochs}, unique_tag)
    pid = job_pid(doomed, job_id, timeout=90)
    wait_for((get_settings().artifacts / job_id / "checkpoints" / "last.pt").exists, 90, "the first checkpoint",
             interval=0.02)
    doomed.kill(signal.SIGTERM)
    time.sleep(0.5)
    assert store.get_job(job_id).status == "running"  # warm shutdown lets it run
    doomed.kill(signal.SIGQUIT)
    t0 = time.monotonic()
    doomed.proc.wait(60)
    exit_s = time.monotonic() - t0
    assert not alive(pid)
    queued = store.get_job(job_id)
    assert queued.status == "queued" and queued.attempts == 1, queued
    assert "its worker shut down (cold shutdown) while it ran; re-queued" in doomed.logs()
    spawn_worker("cold-survivor@faults")
    job = wait_job(fault_client, job_id, timeout=120)
    assert job["status"] == "succeeded" and job["attempts"] == 2, job["error"]
    assert 1 <= job["result"]["resumed_from_epoch"] < epochs
    assert_complete_train_metrics(fault_client, job_id, epochs)
    print(f"\ncold shutdown: worker exited {exit_s:.1f} s after SIGQUIT with its job re-queued")
