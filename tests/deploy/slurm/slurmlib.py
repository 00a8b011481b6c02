"""A private single-node Slurm cluster for the tests: munged, slurmctld and slurmd as root, fake GPUs.

Everything lives in one temp folder (config, munge key and socket, state, spool, logs, the fake GPU
device files); the daemons run in the foreground as children of the test process and are stopped
by pid. Ports are picked free, the cluster name and first job id are random, and every Slurm
command gets SLURM_CONF pointing at this cluster, so it never meets the host's own Slurm (if any)
or another test session's cluster.

Fake GPUs: `GresTypes=gpu`, the node's `Gres=gpu:N`, and a gres.conf whose `File=` entries are
character devices (`mknod PATH c 1 3`, i.e. copies of /dev/null: slurmd rejects plain files). A job
with `--gres=gpu:2` then gets CUDA_VISIBLE_DEVICES=0,1 from Slurm's gpu plugin, as on a real node.
No cgroups: ProctrackType=proctrack/linuxproc, TaskPlugin=task/none.

Timers: KillWait=5 (TERM to KILL when a job is cancelled or over its limit), OverTimeLimit=0.
Slurm checks time limits, and sends --signal warnings, every 30 s (PERIODIC_TIMEOUT, compiled in):
`last_time_limit_check` reads when it last did from slurmctld's log (debug2 level).
"""
from __future__ import annotations

import datetime as dt
import importlib.util
import math
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "scancel", "sinfo", "squeue")
# Debian 12 packages (Slurm 22.05); `make test` installs them when missing (the Makefile's TOOLS).
PACKAGES = "slurmctld slurmd slurm-client munge"
TIME_LIMIT_CHECK_S = 30  # slurmctld's PERIODIC_TIMEOUT


def load_test_module(name: str, relpath: str):
    """Another test folder's helper module, loaded once by path as `name` (tests/ is not a package)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / relpath)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def load_service_helpers():
    """tests/service/conftest.py: its fixtures and process helpers (the name tests/faults loads it under too)."""
    return load_test_module("lowrank_service_test_helpers", "tests/service/conftest.py")


def load_fault_helpers():
    """tests/faults/faultlib.py: TINY_TRAIN, submit, assert_complete_train_metrics."""
    return load_test_module("lowrank_fault_test_helpers", "tests/faults/faultlib.py")


def cannot_start(why: str) -> None:
    """FAIL, never skip: with LOWRANK_TEST_REQUIRE_SERVICES=1 (.ci/run) or without."""
    ci = " (required by LOWRANK_TEST_REQUIRE_SERVICES=1)" if os.environ.get("LOWRANK_TEST_REQUIRE_SERVICES") == "1" else ""
    pytest.fail(f"the Slurm tests cannot start their single-node cluster{ci}: {why}", pytrace=False)


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.25,
               on_timeout: Callable[[], str] = lambda: ""):
    """predicate()'s first truthy value; FAIL naming `what` (and on_timeout()'s text) after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{on_timeout()}", pytrace=False)
        time.sleep(interval)


class SlurmCluster:
    """One node (this host, its real CPUs and memory) with `gpus` fake GPUs, in partition `test`."""

    def __init__(self, gpus: int = 2) -> None:
        for tool in DAEMONS + CLIENTS:
            if shutil.which(tool) is None:
                cannot_start(f"{tool} is not installed (apt-get install {PACKAGES}; `make test` does it)")
        if os.geteuid() != 0:
            cannot_start("the daemons run as root here (SlurmUser=root), and this is not root")
        # munged insists that every folder above its socket is world-executable: not pytest's 0700 tmp.
        self.root = Path(tempfile.mkdtemp(prefix="lowrank-slurm-"))
        self.root.chmod(0o755)
        self.gpus = gpus
        self.name = f"lrt{secrets.token_hex(3)}"
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.log_dir = self.root / "log"
        self.procs: dict[str, subprocess.Popen] = {}
        self.started_at = 0.0  # wall clock (time.time()) when slurmctld started

    # ---------------------------------------------------------------------------------- set-up

    def _write_files(self) -> None:
        r = self.root
        for d in ("munge", "run", "state", "spool", "log", "dev"):
            (r / d).mkdir()
        (r / "munge").chmod(0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        devices = []
        for i in range(self.gpus):
            dev = r / "dev" / f"nvidia{i}"
            os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
            devices.append(dev)
        # The node line as slurmd itself detects this machine (CPUs, sockets, cores, memory), so the
        # node registers as configured instead of being drained for a mismatch.
        detected = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30)
        line = next((ln for ln in detected.stdout.splitlines() if ln.startswith("NodeName=")), "")
        if not line:
            cannot_start(f"`slurmd -C` printed no node line: {detected.stdout}{detected.stderr}")
        hw = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        self.cpus, self.memory_mb = int(hw["CPUs"]), int(hw["RealMemory"])
        node_hw = " ".join(f"{k}={v}" for k, v in hw.items() if k != "NodeName")
        free_port = load_service_helpers().free_port
        self.ctld_port, self.slurmd_port = free_port(), free_port()
        (r / "plugstack.conf").write_text("")  # no SPANK plugins from the host's /etc/slurm
        (r / "gres.conf").write_text("".join(f"Name=gpu File={d}\n" for d in devices))
        self.conf.write_text(f"""\
ClusterName={self.name}
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/run/munge.socket
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={self.log_dir}/slurmctld.log
SlurmdLogFile={self.log_dir}/slurmd.log
# debug2: the controller logs each time-limit check ("Testing job time limits")
SlurmctldDebug=debug2
SlurmdDebug=info
PlugStackConfig={r}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
FirstJobId={secrets.randbelow(900_000) + 100_000}
ReturnToService=2
MessageTimeout=10
KillWait=5
OverTimeLimit=0
InactiveLimit=0
MinJobAge=3600
DefMemPerCPU={self.memory_mb // self.cpus}
NodeName={self.node} NodeAddr=127.0.0.1 {node_hw} Gres=gpu:{self.gpus} State=UNKNOWN
PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")

    def environ(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """`base` (default os.environ) with SLURM_CONF naming this cluster and no other SLURM_*/SBATCH_*
        variables (a host's own Slurm settings must not leak into these commands)."""
        env = {k: v for k, v in (os.environ if base is None else base).items()
               if not k.startswith(("SLURM_", "SBATCH_", "SQUEUE_"))}
        return {**env, "SLURM_CONF": str(self.conf)}

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.log_dir / f"{name}.stdout", "ab")  # noqa: SIM115 - the child owns it
        try:
            self.procs[name] = subprocess.Popen(argv, env=self.environ(), stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, process_group=0)
        finally:
            log.close()

    def start(self, timeout: float = 60.0) -> None:
        self._write_files()
        r = self.root
        self._spawn("munged", ["munged", "--foreground", f"--socket={r}/run/munge.socket",
                               f"--key-file={r}/munge/munge.key", f"--pid-file={r}/run/munged.pid",
                               f"--seed-file={r}/munge/munged.seed", f"--log-file={self.log_dir}/munged.log"])
        wait_until(lambda: (r / "run" / "munge.socket").exists() or self._died(), timeout, "munged's socket",
                   on_timeout=self.logs)
        self._check_alive()
        self.started_at = time.time()
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])  # -i: no saved state
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        wait_until(lambda: self._died() or self.node_state() == "idle", timeout,
                   f"node {self.node} to be idle in `sinfo`", on_timeout=self.logs)
        self._check_alive()

    def _died(self) -> str | None:
        return next((n for n, p in self.procs.items() if p.poll() is not None), None)

    def _check_alive(self) -> None:
        dead = self._died()
        if dead:
            cannot_start(f"{dead} exited with code {self.procs[dead].returncode}\n{self.logs()}")

    def node_state(self) -> str:
        r = self.run("sinfo", "--noheader", "--Node", "--format=%T", check=False)
        return r.stdout.strip() if r.returncode == 0 else ""

    # ---------------------------------------------------------------------------------- tear-down

    def stop(self) -> None:
        """Cancel every job of this cluster, wait for them to end, then stop the daemons by pid."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--partition=test", check=False)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.run("squeue", "--noheader", check=False).stdout.strip():
                time.sleep(0.5)
        for name in reversed(list(self.procs)):  # slurmd, slurmctld, munged
            p = self.procs[name]
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)

    # ---------------------------------------------------------------------------------- commands

    def run(self, *argv: str, check: bool = True, env: dict[str, str] | None = None,
            cwd: Path | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """A Slurm client command against this cluster, in environment `env` (default os.environ);
        check=True FAILS the test on a non-zero exit."""
        res = subprocess.run(list(argv), env=self.environ(env), cwd=cwd, capture_output=True,
                             text=True, timeout=timeout)
        if check and res.returncode != 0:
            pytest.fail(f"{' '.join(argv)} exited with {res.returncode}: {res.stderr.strip()}", pytrace=False)
        return res

    def sbatch(self, script: Path, *options: str, env: dict[str, str], cwd: Path) -> int:
        """Submit `script` with `options` (they override its #SBATCH lines); returns the job id.

        `env` is the submitting shell's environment: sbatch's default --export=ALL hands it to the job."""
        res = self.run("sbatch", "--parsable", *options, str(script), env=env, cwd=cwd)
        return int(res.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, RunTime, TimeLimit, ...)."""
        out = self.run("scontrol", "--oneliner", "show", "job", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_state(self, job_id: int, states: tuple[str, ...], timeout: float,
                   output: Path | None = None) -> dict[str, str]:
        """Wait for the job to reach one of `states` (RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT...)."""
        def tail() -> str:
            text = output.read_text(errors="replace")[-4000:] if output and output.exists() else ""
            return f"job {job_id}: {self.job(job_id)}\n--- output:\n{text}\n{self.logs()}"

        return wait_until(lambda: (j := self.job(job_id))["JobState"] in states and j, timeout,
                          f"Slurm job {job_id} to be {'/'.join(states)}", on_timeout=tail)

    def last_time_limit_check(self) -> float:
        """Wall-clock time of slurmctld's latest time-limit check (its start, before the first one)."""
        text = (self.log_dir / "slurmctld.log").read_text(errors="replace")
        stamps = re.findall(r"^\[([0-9T:.-]+)\] debug2: Testing job time limits", text, flags=re.M)
        return dt.datetime.fromisoformat(stamps[-1]).timestamp() if stamps else self.started_at

    def next_time_limit_check(self, not_before: float) -> float:
        """The first time-limit check at or after `not_before` (wall clock), predicted from the last one
        (each comes 30 to 31 s after the one before)."""
        check = self.last_time_limit_check() + TIME_LIMIT_CHECK_S
        while check < not_before:
            check += TIME_LIMIT_CHECK_S
        return check

    def end_allocation_at(self, job_id: int, check: float, warn_s: int) -> int:
        """Cut the running job's time limit so that its `--signal=...@warn_s` warning is due at the
        time-limit check `check` (the first one after this call must be that one), and the limit itself
        comes at least 30 s later. Returns the new limit in minutes.

        Slurm sends the warning at the first check where end - (warn_s + 30) <= now."""
        start = dt.datetime.fromisoformat(self.job(job_id)["StartTime"]).timestamp()
        minutes = math.ceil((check + 31 - start) / 60)
        end = start + 60 * minutes
        assert end - (warn_s + TIME_LIMIT_CHECK_S) <= check - 2, (end, check, warn_s)
        self.run("scontrol", "update", f"JobId={job_id}", f"TimeLimit={minutes}")
        return minutes

    def logs(self, chars: int = 3000) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("*")):
            text = path.read_text(errors="replace")
            parts.append(f"--- {path.name}:\n{text[-chars:]}")
        return "\n".join(parts)
