"""The fair claim: which queued job a worker runs next, and the running-jobs quota.

A Celery message is a *slot* for its device (cpu, gpu, gpu2..gpu8), not a ticket for the job it
names: the worker that receives one claims the next job of that device fairly, in one transaction:

  1. the highest priority that has a claimable job (high, then normal, then low);
  2. among the owners with queued jobs of that priority, the one with the fewest running jobs
     (all devices), then the one served longest ago (owner_turns), then by name;
  3. that owner's oldest job (created_at; a sweep's jobs, created together, in grid order, then seed).

Owners at LOWRANK_MAX_RUNNING_JOBS_PER_OWNER running jobs are skipped (admins and ownerless jobs are
exempt). Exactly one job runs per message; a message that finds nothing claimable is dropped. The
number of messages on a device's queues therefore stays >= the number of claimable queued jobs:
every job sends one, a cancelled queued job leaves its message to the next job, and when an owner
drops below the quota its supervisor sends one more (`released_slots`). The reaper re-sends the
difference if a broker loses messages (`claimable_backlog`).

Postgres: the candidate row is taken with SELECT ... FOR UPDATE SKIP LOCKED (concurrent claims take
different jobs) and claims of one quota-bound owner are serialized by an advisory transaction lock
(so the quota holds exactly). SQLite: every write transaction is BEGIN IMMEDIATE (jobs/db.py), so
whole claims are serialized.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable

from sqlalchemy import func, literal_column, select, text
from sqlalchemy.orm import Session

from jobs import models as m
from jobs.db import session_scope
from jobs.dispatch import JobDispatch
from jobs.rows import dialect_insert, is_postgres, utcnow
from jobs.store import JobRecord
from jobs.vocabulary import PRIORITIES

# Spelled out (not a bound parameter) so the planner can use the partial index ix_jobs_claim.
QUEUED = literal_column("'queued'")
OLDEST_FIRST = (m.Job.created_at, m.Job.sweep_point_index, m.Job.seed, m.Job.id)  # the order of ix_jobs_claim
OWNER_LOCK_CLASS = 0x10C4  # first key of the two-key advisory lock that serializes one owner's claims

# Distinct owners of queued jobs of one (device, priority), one index probe each (a loose index scan
# over ix_jobs_claim): scanning every queued row would cost O(backlog) per claim.
_QUEUED_OWNERS = text("""
WITH RECURSIVE o(owner) AS (
    SELECT min(owner) FROM jobs WHERE status = 'queued' AND queue = :device AND priority = :priority
  UNION ALL
    SELECT (SELECT min(j.owner) FROM jobs j
            WHERE j.status = 'queued' AND j.queue = :device AND j.priority = :priority AND j.owner > o.owner)
    FROM o WHERE o.owner IS NOT NULL
)
SELECT owner FROM o WHERE owner IS NOT NULL
""")


@dataclasses.dataclass(frozen=True)
class Claim:
    job: JobRecord | None  # the claimed job (now running under the worker), or None
    blocked_owners: tuple[str, ...] = ()  # owners whose queued jobs wait for their running quota


def _owner_key(owner: str | None) -> str:
    return owner or ""


def running_by_owner(session: Session) -> dict[str | None, int]:
    rows = session.execute(select(m.Job.owner, func.count()).where(m.Job.status == "running").group_by(m.Job.owner))
    return {owner: n for owner, n in rows}


def exempt_owners(session: Session, owners: Iterable[str | None]) -> set[str | None]:
    """Owners the running quota does not apply to: None (auth off) and names with a live admin token."""
    names = {o for o in owners if o is not None}
    admins = set(session.scalars(select(m.ApiToken.name).where(
        m.ApiToken.name.in_(names), m.ApiToken.admin.is_(True), m.ApiToken.revoked_at.is_(None)))) if names else set()
    return admins | {None}


def _queued_owners(session: Session, device: str, priority: str) -> list[str | None]:
    owners: list[str | None] = list(session.scalars(_QUEUED_OWNERS, {"device": device, "priority": priority}))
    ownerless = session.scalar(select(m.Job.id).where(m.Job.status == QUEUED, m.Job.queue == device,
                                                      m.Job.priority == priority, m.Job.owner.is_(None)).limit(1))
    if ownerless is not None:
        owners.append(None)
    return owners


def _owner_is(owner: str | None):
    return m.Job.owner.is_(None) if owner is None else m.Job.owner == owner


def _serialize_owner(session: Session, owner: str) -> int:
    """Postgres: wait for concurrent claims of `owner` to commit, then count its running jobs afresh."""
    if is_postgres(session):
        session.execute(text("SELECT pg_advisory_xact_lock(:cls, hashtext(:owner))"),
                        {"cls": OWNER_LOCK_CLASS, "owner": owner})
    return session.scalar(select(func.count()).where(m.Job.status == "running", m.Job.owner == owner)) or 0


def claim_next_job(device: str, worker_name: str, *, max_running_per_owner: int) -> Claim:
    """Take the next job of `device` fairly (module docstring) and mark it running under `worker_name`
    (attempts += 1, leased = True: the caller takes the job's lease next). max_running_per_owner=0: no quota."""
    now = utcnow()
    blocked: list[str] = []
    with session_scope() as session:
        running = running_by_owner(session)
        for priority in PRIORITIES:
            owners = _queued_owners(session, device, priority)
            if not owners:
                continue
            exempt = exempt_owners(session, owners)
            turns = dict(session.execute(select(m.OwnerTurn.owner, m.OwnerTurn.last_claimed_at).where(
                m.OwnerTurn.owner.in_({_owner_key(o) for o in owners}))).all())
            never = dt.datetime.min.replace(tzinfo=dt.UTC)
            order = sorted(owners, key=lambda o: (running.get(o, 0), turns.get(_owner_key(o)) or never,
                                                  _owner_key(o)))
            for owner in order:
                quota_bound = max_running_per_owner > 0 and owner not in exempt
                if quota_bound and running.get(owner, 0) >= max_running_per_owner:
                    blocked.append(owner)  # type: ignore[arg-type]
                    continue
                if quota_bound and _serialize_owner(session, owner) >= max_running_per_owner:  # type: ignore[arg-type]
                    blocked.append(owner)  # type: ignore[arg-type]
                    continue
                row = session.scalars(
                    select(m.Job).where(m.Job.status == QUEUED, m.Job.queue == device,
                                        m.Job.priority == priority, _owner_is(owner))
                    .order_by(*OLDEST_FIRST).limit(1).with_for_update(skip_locked=True)
                ).one_or_none()
                if row is None:  # every one of its jobs is being claimed by someone else right now
                    continue
                row.status, row.worker, row.heartbeat_at, row.leased = "running", worker_name, now, True
                row.started_at = row.started_at or now
                row.attempts = (row.attempts or 0) + 1
                insert = dialect_insert(session)
                stmt = insert(m.OwnerTurn).values(owner=_owner_key(owner), last_claimed_at=now)
                session.execute(stmt.on_conflict_do_update(index_elements=["owner"],
                                                           set_={"last_claimed_at": now}))
                session.flush()
                return Claim(JobRecord.from_row(row), tuple(dict.fromkeys(blocked)))
    return Claim(None, tuple(dict.fromkeys(blocked)))


def claimable_backlog(older_than_s: float, max_running_per_owner: int) -> dict[str, int]:
    """Per device: how many queued jobs, waiting (enqueued) longer than `older_than_s`, could be claimed
    now (per owner at most its free quota). The reaper compares it with the broker's messages."""
    cutoff = utcnow() - dt.timedelta(seconds=older_than_s)
    out: dict[str, int] = {}
    with session_scope() as session:
        rows = session.execute(select(m.Job.queue, m.Job.owner, func.count())
                               .where(m.Job.status == QUEUED, m.Job.enqueued_at < cutoff)
                               .group_by(m.Job.queue, m.Job.owner)).all()
        if not rows:
            return out
        running = running_by_owner(session)
        exempt = exempt_owners(session, {owner for _, owner, _ in rows})
        for device, owner, n in rows:
            if max_running_per_owner > 0 and owner not in exempt:
                n = min(n, max(0, max_running_per_owner - running.get(owner, 0)))
            out[device] = out.get(device, 0) + n
    return out


def oldest_queued(device: str, limit: int, older_than_s: float) -> list[JobDispatch]:
    """The messages of up to `limit` queued jobs of `device` waiting longer than `older_than_s`,
    oldest first: the jobs a re-sent slot message names."""
    cutoff = utcnow() - dt.timedelta(seconds=older_than_s)
    with session_scope() as session:
        rows = session.execute(select(m.Job.id, m.Job.queue, m.Job.priority)
                               .where(m.Job.status == QUEUED, m.Job.queue == device, m.Job.enqueued_at < cutoff)
                               .order_by(*OLDEST_FIRST).limit(limit)).all()
    return [JobDispatch(str(i), q, p) for i, q, p in rows]


def released_slots(owner: str | None, max_running_per_owner: int) -> list[JobDispatch]:
    """After one of `owner`'s jobs stopped running: if the owner was at its quota (it now runs one job
    fewer than the quota), one message (JobDispatch) per device where it has queued jobs, oldest
    first. Messages for its queued jobs may have been dropped while it was at the quota; the caller
    sends these as fresh slots. (Two of its jobs ending at the same instant can both miss the moment;
    the reaper then sends the missing slot once the jobs have waited stale_after_s.)"""
    if max_running_per_owner <= 0 or owner is None:
        return []
    with session_scope() as session:
        if owner in exempt_owners(session, [owner]):
            return []
        running = session.scalar(select(func.count()).where(m.Job.status == "running", m.Job.owner == owner))
        if running != max_running_per_owner - 1:
            return []
        devices = session.scalars(select(m.Job.queue).where(m.Job.status == QUEUED, m.Job.owner == owner)
                                  .group_by(m.Job.queue)).all()
        out = []
        for device in devices:
            job_id, priority = session.execute(
                select(m.Job.id, m.Job.priority).where(m.Job.status == QUEUED, m.Job.owner == owner,
                                                       m.Job.queue == device)
                .order_by(*OLDEST_FIRST).limit(1)).one()
            out.append(JobDispatch(str(job_id), device, priority))
    return out


def unsent_queued_jobs() -> list[JobDispatch]:
    """The messages of queued jobs whose send failed (jobs.dispatch.mark_not_enqueued)."""
    with session_scope() as session:
        rows = session.execute(select(m.Job.id, m.Job.queue, m.Job.priority)
                               .where(m.Job.status == QUEUED, m.Job.enqueued_at.is_(None))
                               .order_by(*OLDEST_FIRST)).all()
    return [JobDispatch(str(i), q, p) for i, q, p in rows]
