"""`lowrank worker`: plan and supervise Celery worker processes, one per GPU.

The launcher process never imports torch and never initializes CUDA: the GPU list comes from
`--gpus 0,1`, from the parent's `CUDA_VISIBLE_DEVICES`, or from `nvidia-smi -L`. Each GPU gets
its own `celery worker` child with `CUDA_VISIBLE_DEVICES` set to that one device and a distinct
node name (`worker@<host>-gpu<N>`), so a job sees exactly one GPU as `cuda:0`.

Multi-GPU jobs (a train spec with `devices: N`) go to the queue family `gpu<N>`. `--gpus-per-worker N`
groups the GPU list into workers of N GPUs each (`CUDA_VISIBLE_DEVICES=0,1,2,3`, node
`worker@<host>-gpu0-3`) that consume the `gpu<N>` queues; the job's training then runs one process
per GPU under torchrun (core/distributed.py).

Supervision is deliberately plain: the first SIGTERM or SIGINT the launcher receives is forwarded
to every child as SIGTERM (Celery's warm shutdown: running jobs finish; uvicorn: graceful stop),
a second one or SIGQUIT as SIGQUIT (Celery's cold shutdown). Children run in their own process
group, so a terminal's Ctrl-C reaches them only through the launcher, once.
A child that exits on its own is reported on stderr and NOT restarted; the others keep serving;
the launcher exits when all children have exited, with the first non-zero exit code (so the
supervisor above it, compose or Slurm, sees the failure).

`plan_workers` returns the planned processes (argv + environment overrides) without starting
anything, which is what the process-layout tests check; `run_processes` starts and supervises.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from jobs.vocabulary import MAX_JOB_DEVICES  # cpu, gpu, gpu2..gpu8
from jobs.vocabulary import QUEUES as DEVICES

PRIORITIES = ("high", "normal", "low")  # consumption order: Redis queue_order_strategy="priority"
CELERY_APP = "worker.celery_app:app"


class LaunchError(ValueError):
    """A launcher argument or environment that cannot work; the message names the field."""


@dataclass(frozen=True)
class PlannedProcess:
    """One child process: `argv` to exec, `env` = overrides applied on top of the parent's env."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- GPU discovery


def parse_gpu_option(value: str, environ: Mapping[str, str] | None = None,
                     nvidia_smi: str = "nvidia-smi") -> list[str]:
    """`--gpus all|0,1|GPU-uuid,...` -> list of CUDA_VISIBLE_DEVICES tokens, one per worker.

    "all" = the parent's CUDA_VISIBLE_DEVICES entries if set (Slurm/docker set it), else the
    indices `nvidia-smi -L` lists. Explicit ids must be among CUDA_VISIBLE_DEVICES when that is set
    (a worker must not escape the allocation it was given). Raises LaunchError.
    """
    environ = os.environ if environ is None else environ
    visible = _visible_devices(environ)
    text = value.strip()
    if text == "all":
        gpus = visible if visible is not None else _nvidia_smi_gpus(nvidia_smi)
        if not gpus:
            raise LaunchError("--gpus all: no GPU found (CUDA_VISIBLE_DEVICES is empty or "
                              "nvidia-smi -L lists none); use --queues cpu for a CPU worker")
        return gpus
    gpus = [t.strip() for t in text.split(",") if t.strip()]
    if not gpus:
        raise LaunchError(f"--gpus must be 'all' or a comma-separated list of GPU ids, got {value!r}")
    if len(set(gpus)) != len(gpus):
        raise LaunchError(f"--gpus lists a GPU twice: {value!r}")
    for g in gpus:
        if not re.fullmatch(r"\d+|(GPU|MIG)-[0-9A-Za-z/-]+", g):
            raise LaunchError(f"--gpus: {g!r} is not a GPU index or GPU-/MIG- UUID")
    if visible is not None:
        outside = [g for g in gpus if g not in visible]
        if outside:
            raise LaunchError(f"--gpus {','.join(outside)} not in CUDA_VISIBLE_DEVICES="
                              f"{environ.get('CUDA_VISIBLE_DEVICES')!r} (the GPUs this process may use)")
    return gpus


def _visible_devices(environ: Mapping[str, str]) -> list[str] | None:
    raw = environ.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None
    # "NoDevFiles"/"-1" are how Slurm and users say "no GPU".
    return [t.strip() for t in raw.split(",") if t.strip() and t.strip() not in ("-1", "NoDevFiles")]


def _nvidia_smi_gpus(nvidia_smi: str) -> list[str]:
    exe = shutil.which(nvidia_smi)
    if exe is None:
        raise LaunchError("--gpus all: nvidia-smi not found and CUDA_VISIBLE_DEVICES is not set; "
                          "pass explicit ids (--gpus 0,1) or use --queues cpu")
    out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise LaunchError(f"--gpus all: `nvidia-smi -L` failed: {out.stderr.strip() or out.returncode}")
    return [m.group(1) for m in re.finditer(r"^GPU (\d+):", out.stdout, flags=re.M)]


# --------------------------------------------------------------------------- planning


def parse_queues(value: str | None) -> list[str]:
    """`--queues cpu,gpu` -> device names, validated. Full queue names come from jobs.queue."""
    items = [q.strip() for q in (value or "").split(",") if q.strip()]
    if not items:
        raise LaunchError("--queues must name at least one of: cpu, gpu")
    bad = [q for q in items if q not in DEVICES]
    if bad:
        raise LaunchError(f"--queues: unknown queue {bad[0]!r}; allowed: cpu, gpu, gpu2..gpu{MAX_JOB_DEVICES} "
                          "(comma-separated)")
    return list(dict.fromkeys(items))


def celery_queue_names(devices: Sequence[str]) -> list[str]:
    """Device names -> Celery queue names in consumption-priority order (all high first).

    Names come from jobs.queue.queue_name, the one place that spells them.
    """
    from jobs.queue import queue_name

    return [queue_name(dev, prio) for prio in PRIORITIES for dev in devices]


def plan_workers(*, queues: Sequence[str], gpus: Sequence[str] | None,
                 gpus_per_worker: int = 1,
                 concurrency: int = 1, loglevel: str = "INFO",
                 hostname: str | None = None, cpu_count: int | None = None,
                 python: str = sys.executable,
                 environ: Mapping[str, str] | None = None) -> list[PlannedProcess]:
    """The celery worker processes `lowrank worker` starts (nothing is started here).

    queues: full Celery queue names, in the order a worker should prefer them.

    gpus=None: one worker `worker@<host>` with the environment unchanged. gpus=[...]: one worker
    per entry, `CUDA_VISIBLE_DEVICES=<entry>`, node name `worker@<host>-gpu<entry or index>`, and
    OMP/MKL threads split between them (unless the caller already set OMP_NUM_THREADS).
    gpus_per_worker=N > 1: one worker per N consecutive entries (`CUDA_VISIBLE_DEVICES=a,b,...`); the
    caller passes the `gpu<N>` queues. The GPU count must be a multiple of N.
    """
    if concurrency < 1:
        raise LaunchError(f"--concurrency must be >= 1, got {concurrency}")
    environ = os.environ if environ is None else environ
    host = hostname or socket.gethostname()
    if not queues:
        raise LaunchError("--queues must name at least one of: cpu, gpu")
    queue_list = ",".join(queues)

    def argv(node: str) -> list[str]:
        # mingle/gossip only slow start-up and add broadcast chatter; nothing here uses them.
        # No -P: the app's pool (worker.supervisor.SupervisorPool: -c threads, each supervising one job process).
        return [python, "-m", "celery", "-A", CELERY_APP, "worker", "-n", node, "-Q", queue_list,
                "-c", str(concurrency), "-l", loglevel, "--without-mingle", "--without-gossip"]

    if gpus is None:
        return [PlannedProcess(name=f"worker@{host}", argv=argv(f"worker@{host}"), env={})]
    k = gpus_per_worker
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_JOB_DEVICES:
        raise LaunchError(f"--gpus-per-worker must be an integer from 1 to {MAX_JOB_DEVICES}, got {k!r}")
    if len(gpus) % k:
        raise LaunchError(f"--gpus-per-worker {k}: the {len(gpus)} GPUs ({','.join(gpus)}) do not split "
                          f"into groups of {k}")
    plan = []
    groups = [list(gpus[i:i + k]) for i in range(0, len(gpus), k)]
    threads = max(1, (cpu_count or os.cpu_count() or 1) // len(groups))
    for i, group in enumerate(groups):
        tags = [g if g.isdigit() else str(i * k + j) for j, g in enumerate(group)]
        tag = tags[0] if k == 1 else f"{tags[0]}-{tags[-1]}"
        node = f"worker@{host}-gpu{tag}"
        visible = ",".join(group)
        env = {"CUDA_VISIBLE_DEVICES": visible, "LOWRANK_WORKER_GPU": visible}
        if "OMP_NUM_THREADS" not in environ:
            # N workers each spinning all cores' worth of CPU threads would oversubscribe the node.
            env["OMP_NUM_THREADS"] = str(threads)
            env["MKL_NUM_THREADS"] = str(threads)
        plan.append(PlannedProcess(name=node, argv=argv(node), env=env))
    return plan


# --------------------------------------------------------------------------- supervision

_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def _die_with_parent() -> None:
    """Child pre-exec: SIGTERM (warm shutdown) when the launcher dies, even by SIGKILL (Linux)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def start_process(proc: PlannedProcess, environ: Mapping[str, str] | None = None) -> subprocess.Popen:
    env = dict(os.environ if environ is None else environ)
    env.update(proc.env)
    # Own process group: a terminal's Ctrl-C reaches the child only via our forwarding (once).
    return subprocess.Popen(proc.argv, env=env, process_group=0,
                            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)


def run_processes(plan: Iterable[PlannedProcess], *, label: str = "lowrank",
                  stop_all_on_exit: bool = False, environ: Mapping[str, str] | None = None,
                  poll_s: float = 0.2) -> int:
    """Start every planned process, forward termination signals, wait for all to exit.

    stop_all_on_exit=False (workers): a child exiting by itself is reported, not restarted, the
    others keep running. stop_all_on_exit=True (`lowrank up`: API + worker belong together): the
    first exit forwards SIGTERM to the rest. Returns the first non-zero exit code, else 0 (a child
    ended by a forwarded signal counts as a clean exit).
    """
    plan = list(plan)
    procs: dict[str, subprocess.Popen] = {}
    forwarded: list[int] = []
    stopping = False

    def forward(signum, _frame=None):
        nonlocal stopping
        # Celery: SIGTERM = warm shutdown (running jobs finish, exit 0), SIGQUIT = cold shutdown.
        # A first SIGINT/SIGTERM becomes SIGTERM (Celery's own SIGINT handler exits 1); a second
        # request, or SIGQUIT, becomes SIGQUIT: stop now.
        sig = signal.SIGQUIT if (stopping or signum == signal.SIGQUIT) else signal.SIGTERM
        stopping = True
        forwarded.append(sig)
        for p in procs.values():
            if p.poll() is None:
                try:
                    os.kill(p.pid, sig)
                except ProcessLookupError:
                    pass

    previous = {s: signal.signal(s, forward) for s in _FORWARDED}
    try:
        for proc in plan:
            procs[proc.name] = start_process(proc, environ)
            extra = " ".join(f"{k}={v}" for k, v in proc.env.items())
            print(f"{label}: started {proc.name} pid={procs[proc.name].pid} {extra}".rstrip(),
                  file=sys.stderr, flush=True)
        rc = 0
        alive = dict(procs)
        while alive:
            time.sleep(poll_s)
            for name, p in list(alive.items()):
                code = p.poll()
                if code is None:
                    continue
                del alive[name]
                clean = code == 0 or (stopping and code in _signal_codes(forwarded))
                if not clean and rc == 0:
                    rc = code if code > 0 else 128 - code
                if stopping:
                    print(f"{label}: {name} stopped (exit {code})", file=sys.stderr, flush=True)
                    continue
                print(f"{label}: {name} pid={p.pid} exited on its own with code {code}; "
                      f"not restarted; {len(alive)} of {len(procs)} still running",
                      file=sys.stderr, flush=True)
                if stop_all_on_exit and alive:
                    forward(signal.SIGTERM)
        return rc
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for p in procs.values():  # only reached with live children on an exception above
            if p.poll() is None:
                p.terminate()


def _signal_codes(signums: Sequence[int]) -> set[int]:
    return {-s for s in signums} | {128 + s for s in signums}
