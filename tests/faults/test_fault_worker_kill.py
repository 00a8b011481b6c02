"""kill -9 a worker in the middle of a train job: its job process dies with it, a peer sees the death at once
(the job's lease is free) and re-queues the job without waiting for the stale timeout; the job resumes from
its checkpoint elsewhere, metrics complete."""
from __future__ import annotations

import time

import pytest

from faults.faultlib import TINY_TRAIN, alive, assert_complete_train_metrics, job_pid, submit, wait_for, wait_job
from jobs import store
from jobs.settings import get_settings

pytestmark = [pytest.mark.service]

EPOCHS = 3


@pytest.mark.timeout(240)
def test_killed_worker_job_resumes_from_checkpoint_on_another_worker(fault_client, spawn_worker, fault_env,
                                                                    unique_tag):
    # Both workers are up before the job starts (a worker's start can take longer than this tiny job). The
    # second consumes a queue prefix of its own, so it gets the job only through its reaper, which is what
    # notices the first one's death and re-queues the job on its prefix.
    second = spawn_worker("survivor@faults", env={"LOWRANK_QUEUE_PREFIX": fault_env["LOWRANK_QUEUE_PREFIX"] + "s."})
    first = spawn_worker("doomed@faults")
    job_id = submit(fault_client, {**TINY_TRAIN, "epochs": EPOCHS}, unique_tag)
    wait_for(lambda: store.get_job(job_id).status == "running", 60, "the first worker to claim the job")
    pid = job_pid(first, job_id)
    ckpt = get_settings().artifacts / job_id / "checkpoints" / "last.pt"
    # Kill right after the first checkpoint: the epoch's metrics must already be stored by then
    # (otherwise the resume, which starts after that epoch, would never write them again).
    wait_for(ckpt.exists, 90, "the first epoch's checkpoint", interval=0.02)
    before = store.get_job(job_id)
    assert before.status == "running" and before.worker.startswith("doomed@faults")
    first.kill()  # SIGKILL to the worker's process group: its main process and job-process server
    first.proc.wait(10)
    killed_at = time.monotonic()
    # The job process (a process group of its own) dies with its server: no orphan computes on.
    wait_for(lambda: not alive(pid), 10, "the dead worker's job process to end")

    resumed = wait_for(lambda: (j := store.get_job(job_id)).attempts == 2 and j.status == "running" and j,
                       60, "another worker to take the job over")
    takeover_s = time.monotonic() - killed_at
    assert resumed.worker.startswith("survivor@faults")
    # Re-queued by the lease rule (the dead worker's lease was free), not after stale_after_s of silence.
    assert f"job {job_id}: worker {before.worker!r} is gone (its process released the job's lease" in second.logs()
    job = wait_job(fault_client, job_id, timeout=120)
    total_s = time.monotonic() - killed_at
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 2
    res = job["result"]
    assert res["resumed_from_epoch"] is not None and 1 <= res["resumed_from_epoch"] < EPOCHS, res["resumed_from_epoch"]
    assert f"job {job_id}: resuming from" in second.logs()
    assert_complete_train_metrics(fault_client, job_id, EPOCHS)
    print(f"\nworker SIGKILLed after epoch >= 1: re-claimed by another worker after {takeover_s:.1f} s "
          f"(stale after {get_settings().stale_after_s:g} s), resumed from epoch {res['resumed_from_epoch']}, "
          f"finished {total_s:.1f} s after the kill")
