"""Where a job's liveness, cancel and time limit live: in its supervisor, never in the job's own process.

A Celery worker is one process whose task threads (Celery's thread pool; no forked pool processes that
a kill could wedge) are supervisors. Each job runs in a process of its own, forked from the worker's
job-process server (a multiprocessing forkserver that has worker/jobproc.py, and so torch and core/,
imported once: worker/jobserver.py), so a job starts in milliseconds instead of re-importing torch, and
each job's memory, GPU memory included, is returned when it ends. The supervisor thread

  * heartbeats the job every heartbeat_interval_s and polls its cancel flag every second, from the
    worker's process: a LAPACK call that holds the job's GIL cannot silence either;
  * holds the job's lease (jobs/lease.py): if the worker's process dies, a peer sees it at once;
  * stops the job on cancel (SIGUSR1 interrupts the job's Python code at once, worker/jobproc.py;
    a job inside one long C call cannot be interrupted, and after stop_grace_s its whole process group
    is SIGKILLed) and on the time limits (soft: the same stop, recorded as a time limit; hard: SIGKILL);
  * records the outcome the job process sends back, or, if that process died without one (killed by
    signal 9: the OOM killer?), re-queues the job at once (failed after max_attempts runs).

The job process is in a process group of its own (its DataLoader workers and torchrun ranks with it)
and dies with the worker: PR_SET_PDEATHSIG ties it to the job-process server, which exits as soon as
the worker's process is gone.
"""
from __future__ import annotations

import ctypes
import dataclasses
import logging
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.connection import wait as wait_any
from typing import Any

from celery.concurrency.thread import TaskPool as ThreadTaskPool

from jobs import store
from jobs.lease import JobLease

log = logging.getLogger(__name__)

JOB_SERVER_PRELOAD = "worker.jobserver"  # what the job-process server imports once
CANCEL_POLL_S = 1.0  # how often a supervisor reads its job's cancel flag between heartbeats
PROGRESS_MIN_INTERVAL_S = 0.5  # the job process reports progress at most this often
PR_SET_PDEATHSIG = 1
# How a supervisor asks its job to stop. Not SIGTERM: anyone may send that (systemd to a whole cgroup),
# and a job that dies of it is re-queued, not recorded as cancelled.
STOP_SIGNAL = signal.SIGUSR1

# Set when the worker shuts down cold (SIGQUIT, or a second Ctrl-C): every supervisor kills its job and
# re-queues it at once instead of waiting for the job to end.
ABORT = threading.Event()


def _context() -> multiprocessing.context.BaseContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([JOB_SERVER_PRELOAD])
    return ctx


def _noop() -> None:
    """A job process that does nothing: starting one proves the job-process server ready."""


def start_job_process_server() -> float:
    """Start the job-process server (it imports torch once) and wait until it forks; returns the start-up
    time of one (empty) job process from the ready server, in seconds. A server that died (kill -9) is
    started again by the next job's start."""
    ctx = _context()
    warm_up = ctx.Process(target=_noop, name="job-process-server-check")
    warm_up.start()
    warm_up.join()
    t0 = time.monotonic()
    probe = ctx.Process(target=_noop, name="job-process-server-check")
    probe.start()
    started = time.monotonic() - t0
    probe.join()
    return started


class SupervisorPool(ThreadTaskPool):
    """Celery's thread pool, whose task threads supervise job processes. A cold shutdown cancels the running
    requests through `terminate_job`, which Celery's thread pool does not implement: here it tells every
    supervisor to stop its job and re-queue it."""

    def terminate_job(self, pid: int, signal: int | None = None) -> None:
        ABORT.set()

    def on_apply(self, *args: Any, **kwargs: Any) -> Any:
        result = super().on_apply(*args, **kwargs)
        result.terminate = lambda *_: ABORT.set()  # Request.cancel calls it after terminate_job
        return result

    def on_stop(self) -> None:
        if _cold_shutdown():
            ABORT.set()
        super().on_stop()


def _cold_shutdown() -> bool:
    from celery.worker import state

    return bool(state.should_terminate)


# --------------------------------------------------------------------------- the job process


def _job_main(payload: dict[str, Any], conn: Any) -> None:
    """Entry point of a job process (forked from the job-process server)."""
    _detach()
    from worker import jobproc

    jobproc.run(payload, conn)


def _detach() -> None:
    """First thing in a job process: its own process group (so a stop reaches everything it starts),
    death with its parent, no hold on the server's liveness pipe, and the default signal handlers the
    server set aside (worker/jobserver.py)."""
    os.setpgid(0, 0)
    for sig in (signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    from multiprocessing import forkserver

    # Every forked process inherits the write end of the pipe whose EOF tells the server its worker is
    # gone; a job holding it would keep the server (and so itself) alive after the worker died.
    fd = forkserver._forkserver._forkserver_alive_fd
    if fd is not None:
        os.close(fd)
        forkserver._forkserver._forkserver_alive_fd = None
    parent = os.getppid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    if os.getppid() != parent:  # the server died before the prctl: the worker is gone
        os._exit(1)
    try:  # the out-of-memory killer should pick a job, not its worker
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("500")
    except OSError:
        pass


class JobProcess:
    """One job's process, as seen from its supervisor. It is started on a thread of its own: a start waits
    for the job-process server, which may be starting again (importing torch) after it was killed, and
    the supervisor keeps heartbeating meanwhile."""

    def __init__(self, payload: dict[str, Any]) -> None:
        ctx = _context()
        self.reader, self._writer = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_job_main, args=(payload, self._writer), name=f"job-{payload['id'][:8]}",
                                   daemon=False)
        self.pid: int | None = None
        self.start_s: float | None = None
        self.start_error: BaseException | None = None
        self.started = threading.Event()
        self.messages: list[tuple] = []
        self._lock = threading.Lock()
        self._pending: list[tuple[int, bool]] = []  # signals asked for before the process existed
        threading.Thread(target=self._start, name=f"start-{payload['id'][:8]}", daemon=True).start()

    def _start(self) -> None:
        t0 = time.monotonic()
        try:
            self.process.start()
        except BaseException as exc:  # noqa: BLE001 - reported to the supervisor, which re-queues the job
            self.start_error = exc
        finally:
            self._writer.close()  # the job holds the only write end now: EOF once it is gone
            with self._lock:
                if self.start_error is None:
                    self.pid, self.start_s = self.process.pid, time.monotonic() - t0
                    for sig, group in self._pending:
                        _signal(self.pid, sig, group=group)
                self.started.set()

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` s for a message or the exit; collect messages. True when the process ended
        (or could not be started)."""
        timeout = max(0.0, timeout)
        if not self.started.is_set():
            if not self.started.wait(timeout):
                return False
            if self.start_error is not None:
                return True
            timeout = 0.0
        ready = wait_any([self.process.sentinel, self.reader], timeout)
        if self.reader in ready:
            self._drain()
        if self.process.sentinel in ready:
            self._drain()
            return True
        return False

    def _drain(self) -> None:
        try:
            while self.reader.poll():
                self.messages.append(self.reader.recv())
        except (EOFError, OSError):
            pass

    def _send(self, sig: int, *, group: bool) -> None:
        with self._lock:
            if self.pid is None:
                self._pending.append((sig, group))
            else:
                _signal(self.pid, sig, group=group)

    def stop(self) -> None:
        """Ask the job to stop (STOP_SIGNAL: the job process sets its stop flag)."""
        self._send(STOP_SIGNAL, group=False)

    def kill(self) -> None:
        """SIGKILL the job's process group (the job, its DataLoader workers, torchrun ranks)."""
        self._send(signal.SIGKILL, group=True)

    def join(self) -> int:
        """Wait for the end; the exit code (negative: killed by that signal; 255: vanished or never started)."""
        self.started.wait()
        if self.start_error is not None:
            self.reader.close()
            return 255
        self.process.join()
        code = self.process.exitcode
        # Whatever it started and left behind (a DataLoader worker, a torchrun rank) goes with it.
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._drain()
        self.reader.close()
        self.process.close()
        return code if code is not None else 255


def _signal(pid: int, sig: int, *, group: bool) -> None:
    targets = [lambda: os.killpg(pid, sig), lambda: os.kill(pid, sig)] if group else [lambda: os.kill(pid, sig)]
    for send in targets:  # the group may not exist yet (a job killed as it starts): the pid too
        try:
            send()
        except (ProcessLookupError, PermissionError):
            pass


def describe_exit(code: int) -> str:
    """Why a job process ended without reporting an outcome, in words."""
    if code < 0:
        sig = -code
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        hint = " (out of memory? the kernel's OOM killer sends it)" if sig == signal.SIGKILL else ""
        return f"the job's process was killed by signal {sig} ({name}){hint}"
    if code == 255:
        return "the job's process vanished (its job-process server was killed)"
    return f"the job's process exited with code {code} without reporting an outcome"


# --------------------------------------------------------------------------- supervision


@dataclasses.dataclass
class Outcome:
    """What to record: a final status (with result/error), "requeue" (with the reason in `error`), or
    "lost" (another claim owns the job now: record nothing)."""

    status: str
    result: dict[str, Any] | None = None
    error: str | None = None


@dataclasses.dataclass
class Limits:
    heartbeat_interval_s: float
    soft_time_limit_s: float
    time_limit_s: float
    stop_grace_s: float


def supervise(job: store.JobRecord, worker: str, payload: dict[str, Any], limits: Limits) -> Outcome:
    """Run `job` in a job process and watch it until it ends (module docstring). The caller records the
    outcome. The job's lease is held while this runs."""
    lease = JobLease(job.id)
    if not lease.acquire():
        log.warning("job %s: could not take its lease; the stale-heartbeat rule alone guards it", job.id)
    try:
        return _watch(job, worker, JobProcess(payload), lease, limits)
    finally:
        lease.release()


# When several reasons to stop a job meet, the strongest decides what is recorded.
_PRECEDENCE = {"soft limit": 1, "hard limit": 2, "cancel": 3, "shutdown": 4, "lost": 5}


class _Watch:
    """The state of one supervision: the latest progress, the outcome message, why and when it stops."""

    def __init__(self, job: store.JobRecord, proc: JobProcess) -> None:
        self.job, self.proc = job, proc
        self.progress: float | None = None
        self.reported: tuple | None = None
        self.stop_reason: str | None = None
        self.kill_at: float | None = None  # when a requested stop escalates to SIGKILL
        self.killed = False
        self.start_noted = False

    def note_start(self) -> None:
        if self.proc.started.is_set() and not self.start_noted:
            self.start_noted = True
            if self.proc.start_error is None:
                log.info("job %s: process %d started in %.0f ms", self.job.id, self.proc.pid, self.proc.start_s * 1000)
            else:
                log.error("job %s: its process could not be started: %r", self.job.id, self.proc.start_error)

    def take_messages(self) -> None:
        for message in self.proc.messages:
            if message[0] == "progress":
                self.progress = message[1]
            elif message[0] == "outcome":
                self.reported = message
        self.proc.messages.clear()

    def _reason(self, reason: str) -> None:
        if self.stop_reason is None or _PRECEDENCE[reason] > _PRECEDENCE[self.stop_reason]:
            self.stop_reason = reason

    def request_stop(self, reason: str, grace_s: float) -> None:
        """STOP_SIGNAL now, SIGKILL after `grace_s` unless the job has stopped."""
        if self.stop_reason is None:
            log.info("job %s: stopping (%s); its process is killed in %g s unless it stops", self.job.id, reason,
                     grace_s)
            self.proc.stop()
            self.kill_at = time.monotonic() + grace_s
        self._reason(reason)

    def kill(self, reason: str | None = None) -> None:
        """SIGKILL the job's process group now; `reason` None escalates the stop already requested."""
        if reason is not None:
            self._reason(reason)
        if not self.killed:
            log.warning("job %s: killing its process group %d (%s)", self.job.id, self.proc.pid, self.stop_reason)
            self.proc.kill()
            self.killed = True


def _watch(job: store.JobRecord, worker: str, proc: JobProcess, lease: JobLease, limits: Limits) -> Outcome:
    w = _Watch(job, proc)
    started = time.monotonic()
    next_beat = started + limits.heartbeat_interval_s
    next_poll = started + CANCEL_POLL_S
    while True:
        now = time.monotonic()
        deadlines = [next_poll]  # at most CANCEL_POLL_S away: a cold shutdown is seen within a second
        if not w.killed:
            deadlines += [next_beat, started + limits.time_limit_s]
            deadlines += [started + limits.soft_time_limit_s] if w.stop_reason is None else []
            deadlines += [w.kill_at] if w.kill_at is not None else []
        exited = proc.wait(min(deadlines) - now)
        w.note_start()
        w.take_messages()
        if exited:
            break
        now = time.monotonic()
        if w.killed:
            next_poll = now + CANCEL_POLL_S
            continue  # it is going: wait for the exit
        if ABORT.is_set() or _cold_shutdown():
            w.kill("shutdown")
            continue
        control = None
        if now >= next_beat:
            next_beat, next_poll = now + limits.heartbeat_interval_s, now + CANCEL_POLL_S
            try:
                control = store.beat(job.id, worker, w.progress, attempt=job.attempts)
            except Exception:
                log.warning("job %s: heartbeat failed", job.id, exc_info=True)
            lease.keep()
        elif now >= next_poll:
            next_poll = now + CANCEL_POLL_S
            try:
                control = store.job_control(job.id, worker, attempt=job.attempts)
            except Exception:  # noqa: BLE001 - database blip: the next poll or heartbeat asks again
                pass
        if control == "lost":
            w.kill("lost")
        elif control == "cancel":
            w.request_stop("cancel", limits.stop_grace_s)
        elapsed = now - started
        if elapsed >= limits.time_limit_s:
            w.kill("hard limit")
        elif elapsed >= limits.soft_time_limit_s:
            w.request_stop("soft limit", limits.time_limit_s - elapsed)
        if w.kill_at is not None and now >= w.kill_at:
            w.kill()
    code = proc.join()
    w.take_messages()
    if proc.start_error is not None:
        return Outcome("requeue", error=f"its process could not be started ({type(proc.start_error).__name__}: "
                                        f"{proc.start_error})")
    return _decide(job, limits, code, w.reported, w.stop_reason, w.killed)


def _decide(job: store.JobRecord, limits: Limits, code: int, reported: tuple | None, stop_reason: str | None,
            killed: bool) -> Outcome:
    soft_text = (f"time limit exceeded: the job ran longer than {limits.soft_time_limit_s:g} s "
                 f"(LOWRANK_JOB_SOFT_TIME_LIMIT_S) and was stopped")
    hard_text = (f"time limit exceeded: the job did not stop within {limits.time_limit_s:g} s "
                 f"(LOWRANK_JOB_TIME_LIMIT_S); its process was killed")
    if stop_reason == "lost":
        return Outcome("lost")
    if reported is not None:
        _, status, result, error = reported
        if stop_reason == "soft limit" and status == "cancelled":
            return Outcome("failed", error=soft_text)
        return Outcome(status, result, error)
    if stop_reason == "shutdown":
        return Outcome("requeue", error="its worker shut down (cold shutdown) while it ran")
    if stop_reason == "cancel":
        log.info("job %s: killed after %g s of stop grace (it did not stop by itself)", job.id, limits.stop_grace_s)
        return Outcome("cancelled")
    if stop_reason in ("soft limit", "hard limit"):
        return Outcome("failed", error=hard_text)
    return Outcome("requeue", error=describe_exit(code))
