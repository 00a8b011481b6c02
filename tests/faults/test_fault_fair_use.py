"""Fair use of shared workers: owners take turns, high priority goes first, the running quota holds.

A message is a slot for its device; the worker that receives it claims the next job fairly in the
database (jobs/claims.py). The jobs here are stored with their owners set through the store (what the API
records from each token's name) and their messages sent as the API sends them, before any worker runs,
so the order in which one worker then starts them is the order the claim chose.
"""
from __future__ import annotations

import datetime as dt

import pytest

from faults.faultlib import TINY_TRAIN, wait_for
from jobs import auth, store
from jobs.queue import enqueue_job, make_celery

pytestmark = [pytest.mark.service]

QUICK = {"kind": "approx", "weights": {"source": "gaussian", "m": 64, "d": 32}, "rank": 4, "method": "spectral"}
# About a second or more of LAPACK each: long enough that jobs claimed together run at the same time.
SECONDS = {"kind": "approx", "weights": {"source": "gaussian", "m": 1024, "d": 1024}, "rank": 512,
           "method": "spectral"}


def queue_jobs(owner: str, n: int, spec: dict, tag: str, **extra) -> list[str]:
    app = make_celery()
    ids = []
    for i in range(n):
        job, _ = store.create_job({**spec, "seed": i, "tags": [tag], **extra}, owner=owner)
        enqueue_job(app, job.id, job.queue, job.priority)
        ids.append(job.id)
    return ids


def finished(ids: list[str], timeout: float = 240) -> list[store.JobRecord]:
    jobs = wait_for(lambda: (js := [store.get_job(j) for j in ids]) and all(
        j.status in ("succeeded", "failed", "cancelled") for j in js) and js, timeout, f"{len(ids)} jobs to finish")
    assert all(j.status == "succeeded" for j in jobs), [(j.id, j.status, j.error) for j in jobs]
    return jobs


def max_overlap(jobs: list[store.JobRecord]) -> int:
    """The most of `jobs` that were running at one moment (started_at .. finished_at)."""
    events = sorted([(j.started_at, 1) for j in jobs] + [(j.finished_at, -1) for j in jobs])
    most = now = 0
    for _, step in events:  # at equal times the end (-1) sorts first: a claim after a finish is no overlap
        now += step
        most = max(most, now)
    return most


@pytest.mark.timeout(300)
def test_two_owners_sweeps_alternate(spawn_worker, unique_tag):
    """alice queued a sweep first, bob after her: one worker alternates between them instead of draining
    alice's sweep before bob's first job starts."""
    alice, bob = f"alice-{unique_tag}", f"bob-{unique_tag}"
    ids = queue_jobs(alice, 4, QUICK, unique_tag) + queue_jobs(bob, 4, QUICK, unique_tag)
    spawn_worker("fair@faults")
    jobs = sorted(finished(ids), key=lambda j: j.started_at)
    owners = [j.owner for j in jobs]
    assert all(a != b for a, b in zip(owners, owners[1:])), owners
    print(f"\nclaim order: {' '.join('A' if o == alice else 'B' for o in owners)}")


@pytest.mark.timeout(300)
def test_high_priority_job_starts_next(spawn_worker, unique_tag):
    """While a worker is busy, normal jobs queue up; a high-priority job submitted after them starts next."""
    carol = f"carol-{unique_tag}"
    worker = spawn_worker("prio@faults")
    busy = queue_jobs(carol, 1, {**TINY_TRAIN, "epochs": 2}, unique_tag)
    wait_for(lambda: store.get_job(busy[0]).status == "running", 90, "the busy job to start")
    normal = queue_jobs(carol, 3, QUICK, unique_tag)
    high = queue_jobs(carol, 1, {**QUICK, "seed": 99}, unique_tag, priority="high")
    assert store.get_job(busy[0]).status == "running", "the busy job ended before the queue was built"
    jobs = sorted(finished(busy + normal + high), key=lambda j: j.started_at)
    assert [j.id for j in jobs][:2] == [busy[0], high[0]], [(j.priority, j.started_at) for j in jobs]
    assert worker.alive()


@pytest.mark.timeout(300)
def test_running_quota_holds_and_admins_are_exempt(spawn_worker, unique_tag):
    """LOWRANK_MAX_RUNNING_JOBS_PER_OWNER=2 on a worker that runs 3 jobs at once: dave (5 jobs queued) never
    has more than 2 running, erin's job runs beside his, all finish; an admin's 3 jobs run all at once."""
    dave, erin, root = f"dave-{unique_tag}", f"erin-{unique_tag}", f"root-{unique_tag}"
    auth.create_token(root, admin=True)
    daves = queue_jobs(dave, 5, SECONDS, unique_tag)
    erins = queue_jobs(erin, 1, QUICK, unique_tag)  # done in a moment: its thread then meets dave at his quota
    worker = spawn_worker("quota@faults", env={"LOWRANK_MAX_RUNNING_JOBS_PER_OWNER": "2"}, concurrency=3)
    jobs = finished(daves + erins)
    dave_jobs = [j for j in jobs if j.owner == dave]
    assert max_overlap(dave_jobs) == 2, [(j.started_at, j.finished_at) for j in dave_jobs]
    erin_job = next(j for j in jobs if j.owner == erin)
    assert erin_job.started_at < max(j.started_at for j in dave_jobs)  # not queued behind dave's backlog
    assert f"({dave} at their running quota of 2, LOWRANK_MAX_RUNNING_JOBS_PER_OWNER)" in worker.logs()

    roots = finished(queue_jobs(root, 3, SECONDS, unique_tag))
    assert max_overlap(roots) == 3, [(j.started_at, j.finished_at) for j in roots]
    assert all(j.finished_at - j.started_at > dt.timedelta(0) for j in roots)
