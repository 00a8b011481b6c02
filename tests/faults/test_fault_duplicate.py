"""The same Celery message delivered twice (and again after the job finished) runs the job once."""
from __future__ import annotations

import uuid

import pytest

from faults.faultlib import TINY_TRAIN, assert_complete_train_metrics, wait_for, wait_job
from jobs import store
from jobs.queue import TASK_RUN_JOB, make_celery, queue_name
from jobs.specs import parse_spec

pytestmark = [pytest.mark.service]

EPOCHS = 2


@pytest.mark.timeout(240)
def test_same_message_twice_runs_the_job_once(fault_client, spawn_worker, unique_tag):
    workers = spawn_worker("dup-a@faults", "dup-b@faults")
    # Stored without a message (as the API's commit), then one message published twice: same task id,
    # same body - what a broker redelivery hands out. Both idle workers get a copy at the same moment.
    job, created = store.create_job(parse_spec({**TINY_TRAIN, "epochs": EPOCHS, "tags": [unique_tag]}))
    assert created
    app = make_celery()
    task_id = str(uuid.uuid4())
    queue = queue_name(job.queue, job.priority)

    def publish() -> None:
        app.send_task(TASK_RUN_JOB, args=[job.id], queue=queue, task_id=task_id)

    def logs() -> str:
        return "".join(w.logs() for w in workers)

    publish()
    publish()
    done = wait_job(fault_client, job.id, timeout=180)
    assert done["status"] == "succeeded", done["error"]
    wait_for(lambda: logs().count(f"job {job.id}: not claimable") == 1, 60, "the second copy to be skipped")
    # Once more after the job finished (a redelivery after a visibility timeout): still nothing runs.
    publish()
    wait_for(lambda: logs().count(f"job {job.id}: not claimable") == 2, 60, "the late copy to be skipped")
    assert logs().count(f"Task {TASK_RUN_JOB}[{task_id}] received") == 3
    assert logs().count(f"job {job.id} (train): claimed") == 1
    after = fault_client.get(f"/api/v1/jobs/{job.id}").json()
    assert after["status"] == "succeeded" and after["attempts"] == 1
    assert after["finished_at"] == done["finished_at"] and after["result"] == done["result"]
    assert after["result"]["resumed_from_epoch"] is None  # one run from the start, none resumed
    assert_complete_train_metrics(fault_client, job.id, EPOCHS)
