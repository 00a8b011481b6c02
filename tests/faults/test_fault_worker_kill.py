"""kill -9 a worker in the middle of a train job: re-queued, resumed from its checkpoint elsewhere, complete."""
from __future__ import annotations

import time

import pytest

from faults.faultlib import TINY_TRAIN, assert_complete_train_metrics, submit, wait_for, wait_job
from jobs import store
from jobs.settings import get_settings

pytestmark = [pytest.mark.service]

EPOCHS = 3


@pytest.mark.timeout(240)
def test_killed_worker_job_resumes_from_checkpoint_on_another_worker(fault_client, spawn_worker, unique_tag):
    first = spawn_worker("doomed@faults")
    job_id = submit(fault_client, {**TINY_TRAIN, "epochs": EPOCHS}, unique_tag)
    wait_for(lambda: store.get_job(job_id).status == "running", 60, "the first worker to claim the job")
    # A second worker, idle until the first dies (its reaper is what notices the death).
    second = spawn_worker("survivor@faults")
    ckpt = get_settings().artifacts / job_id / "checkpoints" / "last.pt"
    # Kill right after the first checkpoint: the epoch's metrics must already be stored by then
    # (otherwise the resume, which starts after that epoch, would never write them again).
    wait_for(ckpt.exists, 90, "the first epoch's checkpoint", interval=0.02)
    before = store.get_job(job_id)
    assert before.status == "running" and before.worker.startswith("doomed@faults")
    first.kill()  # SIGKILL to the worker's whole process group: main process and pool child
    first.proc.wait(10)
    killed_at = time.monotonic()

    resumed = wait_for(lambda: (j := store.get_job(job_id)).attempts == 2 and j.status == "running" and j,
                       60, "another worker to take the job over")
    takeover_s = time.monotonic() - killed_at
    assert resumed.worker.startswith("survivor@faults")
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
