"""What the worker's job-process server imports once (multiprocessing forkserver preload, see
worker/supervisor.py): the job process's code, and with it torch and core/.

The server lives exactly as long as its worker's process (it exits when that process's end of its
liveness pipe closes), so it ignores the signals that stop a worker: a SIGTERM or SIGQUIT sent to the
worker's whole process group (a terminal, a test harness, `kill -- -PGID`) is the worker's to handle, and
must not take the server, and with it every running job, down. Job processes set their own handlers.
"""
import signal

from worker import jobproc  # noqa: F401 - the point of the preload

for _sig in (signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP):
    signal.signal(_sig, signal.SIG_IGN)
