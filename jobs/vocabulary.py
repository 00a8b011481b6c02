"""The service's words, defined once: job statuses, kinds and priorities, queue families (devices), sweep
strategies and search trial states.

jobs/models.py (its CHECK constraints), jobs/specs.py (what a spec accepts), the API's parameters and the
CLI's choices all import them from here. Plain Python (no pydantic, no SQLAlchemy), so the CLI pays
nothing for importing it.
"""
from __future__ import annotations

from typing import Literal, get_args

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JOB_STATUSES: tuple[str, ...] = get_args(JobStatus)
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")

JobKind = Literal["approx", "learn", "train", "compress", "latency"]
JOB_KINDS: tuple[str, ...] = get_args(JobKind)

Priority = Literal["high", "normal", "low"]
PRIORITIES: tuple[str, ...] = get_args(Priority)  # highest first: the order workers consume their queues in

# Queue families (a job's `queue`, the device a worker serves): cpu, gpu (one GPU per job), gpu<N> (one job on
# N GPUs of one node, DDP under torchrun). A Celery queue is `<prefix><device>.<priority>` (jobs.queue).
MAX_JOB_DEVICES = 8
QUEUES: tuple[str, ...] = ("cpu", "gpu", *(f"gpu{n}" for n in range(2, MAX_JOB_DEVICES + 1)))

# Search sweeps (jobs/search.py): how a sweep picks its points, and the states of a search's trials.
SweepStrategy = Literal["grid", "search"]
SWEEP_STRATEGIES: tuple[str, ...] = get_args(SweepStrategy)
TrialState = Literal["running", "complete", "pruned", "failed"]
TRIAL_STATES: tuple[str, ...] = get_args(TrialState)
