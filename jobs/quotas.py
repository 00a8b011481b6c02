"""Per-owner quotas, checked when work enters the queue (a job, a sweep, a retry): 429 naming the limit.

* queued jobs (a sweep's jobs and retried jobs count): LOWRANK_MAX_QUEUED_JOBS_PER_OWNER;
* jobs one sweep creates: LOWRANK_MAX_SWEEP_JOBS_PER_OWNER (below LOWRANK_MAX_SWEEP_POINTS, which binds
  admins too);
* queued `priority: high` jobs, which the workers take before all others:
  LOWRANK_MAX_HIGH_PRIORITY_JOBS_PER_OWNER.

0 means no limit. Admins are exempt, and so is everyone with auth off (its one anonymous caller is an
admin); the caller decides (`enforce`). A check is one indexed count (ix_jobs_queued_owner_priority) in
the submitting transaction, before the insert, so concurrent submissions of one owner may pass it
together: the overshoot is at most the API's concurrent requests. Quotas bound abuse of a shared
cluster; they are not accounting. (Running jobs per owner are the workers' rule, at claim time.)
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from jobs import models as m
from jobs.errors import QuotaExceeded
from jobs.settings import get_settings

RETRY_AFTER_S = 60  # queued jobs leave the count as workers start them: ask again in a minute


def queued_counts(db: Any, owner: str | None) -> tuple[int, int]:
    """(queued jobs, queued priority-high jobs) of `owner`; `db` is a Session or a Connection."""
    queued, high = db.execute(select(func.count(), func.count().filter(m.Job.priority == "high"))
                              .where(m.owned_by(m.Job, owner), m.Job.status == "queued")).one()
    return int(queued), int(high)


def check_sweep_size(jobs: int) -> None:
    """A sweep of `jobs` jobs must stay within LOWRANK_MAX_SWEEP_JOBS_PER_OWNER (waiting does not help:
    no Retry-After)."""
    limit = get_settings().max_sweep_jobs_per_owner
    if limit and jobs > limit:
        raise QuotaExceeded(f"this sweep would create {jobs} jobs; a user's sweep may create at most {limit} "
                            "(LOWRANK_MAX_SWEEP_JOBS_PER_OWNER): split it, or ask an admin",
                            setting="LOWRANK_MAX_SWEEP_JOBS_PER_OWNER", limit=limit, requested=jobs)


def check_queued(db: Any, owner: str | None, *, jobs: int, high: int) -> None:
    """Adding `jobs` queued jobs (`high` of them priority high) must keep `owner` within
    LOWRANK_MAX_QUEUED_JOBS_PER_OWNER and LOWRANK_MAX_HIGH_PRIORITY_JOBS_PER_OWNER."""
    settings = get_settings()
    limit, high_limit = settings.max_queued_jobs_per_owner, settings.max_high_priority_jobs_per_owner
    if not (limit or (high and high_limit)):
        return
    queued, queued_high = queued_counts(db, owner)
    if limit and queued + jobs > limit:
        raise QuotaExceeded(f"you have {queued} queued jobs; {jobs} more would pass the limit of {limit} queued jobs "
                            "per user (LOWRANK_MAX_QUEUED_JOBS_PER_OWNER): wait for some to start, or cancel some",
                            retry_after_s=RETRY_AFTER_S, setting="LOWRANK_MAX_QUEUED_JOBS_PER_OWNER", limit=limit,
                            queued=queued, requested=jobs)
    if high and high_limit and queued_high + high > high_limit:
        raise QuotaExceeded(f"you have {queued_high} queued jobs with priority 'high'; {high} more would pass the "
                            f"limit of {high_limit} per user (LOWRANK_MAX_HIGH_PRIORITY_JOBS_PER_OWNER): use "
                            "priority 'normal', or wait for them to start", retry_after_s=RETRY_AFTER_S,
                            setting="LOWRANK_MAX_HIGH_PRIORITY_JOBS_PER_OWNER", limit=high_limit,
                            queued=queued_high, requested=high)
