"""Process commands: `lowrank db upgrade`, `lowrank api`, `lowrank worker`, `lowrank up`, `lowrank demo`.

`lowrank up` is the embedded default: with no configuration, a SQLite file and Celery's
filesystem transport under ./.lowrank/ (nothing to install); with LOWRANK_DATABASE_URL and
LOWRANK_BROKER_URL set it uses those. Either way it migrates the database, then runs the API
(`lowrank api`) and one local worker (`lowrank worker`) as two child processes of itself:
the same commands compose and clusters run, so the code path is the same.

Nothing here imports torch: the worker's Celery process does, in its own process.
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from typing import Any

from lowrank.cli._common import CliError

DEMO_RANKS = (1, 4, 16, 64)
DEMO_METHODS = ("spectral", "rescale", "nkp")
DEMO_SHAPE = (1024, 256)  # m x d of the gaussian weight matrix the demo approximates


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("db", help="database schema (Alembic migrations)")
    dbsub = p.add_subparsers(dest="db_command", metavar="DB_COMMAND")
    dbsub.required = True
    up = dbsub.add_parser("upgrade", help="migrate the database (LOWRANK_DATABASE_URL) to the head revision")
    up.set_defaults(handler=cmd_db_upgrade)

    p = sub.add_parser("api", help="run the REST API alone (refuses a database not at the head revision)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--workers", type=int, default=None,
                   help="uvicorn worker processes (default: LOWRANK_API_PROCESSES, else 1; one per core is a "
                        "good start)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(handler=cmd_api)

    p = sub.add_parser("worker", help="run Celery worker(s): one process, or one per GPU with --gpus")
    _add_worker_args(p)
    p.set_defaults(handler=cmd_worker)

    p = sub.add_parser("up", help="migrate, then run the API and one local worker together (Ctrl-C stops both)")
    p.add_argument("--host", default="127.0.0.1", help="API address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="API port (default 8000)")
    p.add_argument("--concurrency", type=int, default=1, help="jobs the local worker runs at once (default 1)")
    p.set_defaults(handler=cmd_up)

    p = sub.add_parser("demo", help="`lowrank up`, submit a small rank sweep, print its table, keep serving")
    p.add_argument("--host", default="127.0.0.1", help="API address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="API port (default 8000)")
    p.add_argument("--no-serve", action="store_true", help="stop after printing the table (for scripts)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the sweep (default 600)")
    p.set_defaults(handler=cmd_demo)


def _add_worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--queues", default=None,
                   help="queue families to consume: cpu, gpu, gpu2..gpu8, comma-separated "
                        "(default: gpu with --gpus, gpuN with --gpus-per-worker N, else cpu,gpu)")
    p.add_argument("--gpus", default=None,
                   help="'all' or GPU ids (0,1 or GPU-uuids): one worker process per GPU with "
                        "CUDA_VISIBLE_DEVICES set to it")
    p.add_argument("--gpus-per-worker", type=int, default=1, metavar="N",
                   help="GPUs per worker process (default 1); N > 1 serves multi-GPU train jobs "
                        "(spec devices: N, queues gpuN)")
    p.add_argument("--concurrency", type=int, default=1, help="jobs each worker process runs at once (default 1)")
    p.add_argument("--loglevel", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--hostname", default=None, help="host part of the node names (default: this host)")
    p.add_argument("--dry-run", action="store_true", help="print the planned processes and exit")


# --------------------------------------------------------------------------- db / api


def _migrate() -> None:
    from jobs import migrate

    migrate.upgrade()


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from jobs import migrate
    from jobs.settings import get_settings

    url = get_settings().database_url
    migrate.upgrade()
    print(f"database at head revision {migrate.head_revision()} ({_redact(url)})")
    return 0


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def check_database_at_head() -> None:
    """Raise CliError naming both revisions unless the database is at the Alembic head."""
    from jobs import migrate
    from jobs.settings import get_settings

    url = get_settings().database_url
    try:
        current, head = migrate.current_revision(), migrate.head_revision()
    except Exception as exc:  # noqa: BLE001 - a down server is the user's to fix: say which URL
        raise CliError(f"cannot read the schema revision of {_redact(url)}: {type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if current != head:
        raise CliError(f"database {_redact(url)} is at revision {current or 'none (empty)'}, "
                       f"head is {head}: run `lowrank db upgrade` first")


def check_auth_for_bind(host: str, label: str) -> str | None:
    """Auth off is allowed on a loopback bind only (announced); a non-loopback bind with auth off is
    refused rather than silently switched on, so nobody ends up with a server they cannot reach.

    Returns the announcement to print once every other start-up check has passed (so a refused start
    prints its one error line and nothing else), or None when auth is on."""
    from jobs.auth import is_loopback_host
    from jobs.settings import get_settings

    if get_settings().auth != "off":
        return None
    if not is_loopback_host(host):
        raise CliError(f"--host {host} is not a loopback address and LOWRANK_AUTH is off: set "
                       f"LOWRANK_AUTH=required (and create a token: lowrank token create NAME) to serve "
                       f"other machines, or bind 127.0.0.1")
    return (f"{label}: authentication is OFF (LOWRANK_AUTH=off): every request from this machine acts as "
            f"an admin; listening on loopback {host} only")


def _announce(notice: str | None) -> None:
    if notice:
        print(notice, file=sys.stderr, flush=True)


def cmd_api(args: argparse.Namespace) -> int:
    if not (0 < args.port < 65536):
        raise CliError(f"--port must be in 1..65535, got {args.port}")
    from jobs.settings import get_settings

    workers = args.workers if args.workers is not None else get_settings().api_processes
    if workers < 1:
        raise CliError(f"--workers must be >= 1, got {workers}")
    notice = check_auth_for_bind(args.host, "lowrank api")
    check_database_at_head()
    _announce(notice)
    import uvicorn

    uvicorn.run("api.main:app", host=args.host, port=args.port, workers=workers,
                log_level=args.log_level, proxy_headers=True)
    return 0


# --------------------------------------------------------------------------- worker


def plan_from_args(args: argparse.Namespace) -> list:
    from worker.launcher import LaunchError, celery_queue_names, parse_gpu_option, parse_queues, plan_workers

    try:
        gpus = parse_gpu_option(args.gpus) if args.gpus is not None else None
        k = args.gpus_per_worker
        if k != 1 and gpus is None:
            raise LaunchError("--gpus-per-worker needs --gpus (the GPUs to group)")
        default = ("gpu" if k == 1 else f"gpu{k}") if gpus is not None else "cpu,gpu"
        devices = parse_queues(args.queues or default)
        return plan_workers(queues=celery_queue_names(devices), gpus=gpus, gpus_per_worker=k,
                            concurrency=args.concurrency, loglevel=args.loglevel, hostname=args.hostname)
    except LaunchError as exc:
        raise CliError(str(exc)) from None


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.launcher import run_processes

    plan = plan_from_args(args)
    if args.dry_run:
        for proc in plan:
            env = " ".join(f"{k}={v}" for k, v in proc.env.items())
            print(f"{proc.name}: {env + ' ' if env else ''}{' '.join(proc.argv)}")
        return 0
    return run_processes(plan, label="lowrank worker")


# --------------------------------------------------------------------------- up


def cmd_up(args: argparse.Namespace) -> int:
    from jobs.settings import get_settings
    from worker.launcher import PlannedProcess, run_processes

    if not (0 < args.port < 65536):
        raise CliError(f"--port must be in 1..65535, got {args.port}")
    notice = check_auth_for_bind(args.host, "lowrank up")
    _check_port_free(args.host, args.port)
    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    _migrate()
    _announce(notice)
    where = (f"SQLite + filesystem broker under {settings.home}" if settings.is_sqlite and settings.is_embedded_broker
             else f"database {_redact(settings.database_url)}, broker {_redact(settings.broker_url)}")
    print(f"lowrank up: {where}; API on http://{_url_host(args.host)}:{args.port} "
          f"(auth {settings.auth}); Ctrl-C stops both", file=sys.stderr, flush=True)
    py = sys.executable
    plan = [
        PlannedProcess("api", [py, "-m", "lowrank", "api", "--host", args.host, "--port", str(args.port)]),
        PlannedProcess("worker", [py, "-m", "lowrank", "worker", "--queues", "cpu,gpu",
                                  "--concurrency", str(args.concurrency)]),
    ]
    # The two belong together: if one dies, stop the other and report it (nothing restarts silently).
    return run_processes(plan, label="lowrank up", stop_all_on_exit=True)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _check_port_free(host: str, port: int) -> None:
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise CliError(f"--port {port} on {host} is not available ({exc.strerror}); "
                           f"pick another with --port") from None


# --------------------------------------------------------------------------- demo


def demo_sweep(tag: str) -> dict[str, Any]:
    """The demo's grid, ranks x methods on one gaussian matrix, as one POST /api/v1/sweeps body (base spec x
    grid of dotted paths x seeds)."""
    m, d = DEMO_SHAPE
    return {"name": "demo rank sweep",
            "base": {"kind": "approx", "weights": {"source": "gaussian", "m": m, "d": d},
                     "rank": DEMO_RANKS[0], "method": DEMO_METHODS[0], "tags": ["demo", tag]},
            "grid": {"rank": list(DEMO_RANKS), "method": list(DEMO_METHODS)}, "seeds": [0]}


def submit_demo(client, tag: str) -> str:
    """Submit the demo grid as one sweep; returns its id."""
    r = client.post("/api/v1/sweeps", json=demo_sweep(tag))
    _raise_for(r, "POST /api/v1/sweeps")
    return str(r.json()["id"])


def _raise_for(r, what: str) -> None:
    if r.status_code >= 400:
        raise CliError(f"{what} answered {r.status_code}: {r.text[:300]}")


def wait_for_jobs(client, query: dict[str, Any], expected: int, timeout: float,
                  on_update=None) -> list[dict[str, Any]]:
    """Poll GET /api/v1/jobs?<query> until `expected` jobs exist and all are finished."""
    deadline = time.monotonic() + timeout
    while True:
        r = client.get("/api/v1/jobs", params={**query, "limit": 1000})
        _raise_for(r, "GET /api/v1/jobs")
        jobs = r.json()["items"]
        done = sum(j["status"] in ("succeeded", "failed", "cancelled") for j in jobs)
        if on_update is not None:
            on_update(done, expected)
        if len(jobs) >= expected and done == len(jobs):
            return jobs
        if time.monotonic() > deadline:
            raise CliError(f"--timeout: {expected - done} of {expected} jobs not finished after {timeout:.0f} s")
        time.sleep(0.5)


def results_table(jobs: list[dict[str, Any]]):
    """A rich Table: one row per method, one column per rank, cells = normalized function error."""
    from rich.table import Table

    m, d = DEMO_SHAPE
    table = Table(title=f"gaussian {m}x{d} weights, seed 0",
                  caption="normalized function error L(UV)/L(0); lower is better")
    ranks = sorted({j["spec"]["rank"] for j in jobs})
    methods = [meth for meth in DEMO_METHODS if any(j["spec"]["method"] == meth for j in jobs)]
    table.add_column("method")
    for r in ranks:
        table.add_column(f"rank {r}", justify="right")
    table.add_column("compute (s)", justify="right")
    for meth in methods:
        cells, total = [], 0.0
        for r in ranks:
            job = next(j for j in jobs if j["spec"]["method"] == meth and j["spec"]["rank"] == r)
            if job["status"] == "succeeded":
                cells.append(f"{job['result']['error']:.4f}")
                total += float(job["result"].get("time_s", 0.0))
            else:
                cells.append(f"[red]{job['status']}[/red]")
        table.add_row(meth, *cells, f"{total:.2f}")
    return table


def cmd_demo(args: argparse.Namespace) -> int:
    import secrets

    import httpx
    from rich.console import Console

    from jobs.settings import get_settings

    console = Console()
    base = f"http://{_url_host(args.host)}:{args.port}"
    _check_port_free(args.host, args.port)
    home = get_settings().home
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / "demo.log"
    with open(log_path, "ab") as log:
        # The service's own logs go to a file, so the table stays readable.
        up = subprocess.Popen([sys.executable, "-m", "lowrank", "up", "--host", args.host, "--port", str(args.port)],
                              stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, process_group=0)
    console.print(f"starting the service (`lowrank up`; logs in {log_path})")

    def stop_up() -> int:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            try:
                return up.wait(timeout=60)
            except subprocess.TimeoutExpired:
                up.send_signal(signal.SIGINT)  # a second one: cold shutdown
                return up.wait()
        return up.returncode

    try:
        import os

        token = os.environ.get("LOWRANK_TOKEN")  # needed with LOWRANK_AUTH=required
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        with httpx.Client(base_url=base, timeout=30.0, headers=headers) as client:
            _wait_ready(client, up, timeout=120.0, log_path=log_path)
            tag = f"demo-{secrets.token_hex(3)}"
            t0 = time.monotonic()
            sweep_id = submit_demo(client, tag)
            n = len(DEMO_RANKS) * len(DEMO_METHODS)
            console.print(f"submitted {n} approximation jobs: ranks {', '.join(map(str, DEMO_RANKS))} x "
                          f"{', '.join(DEMO_METHODS)} (sweep {sweep_id})")
            with console.status("running") as status:
                jobs = wait_for_jobs(client, {"sweep": sweep_id}, n, args.timeout,
                                     on_update=lambda k, t: status.update(f"{k}/{t} jobs finished"))
            console.print(results_table(jobs))
            console.print(f"{len(jobs)} jobs finished in {time.monotonic() - t0:.1f} s")
            console.print(f"dashboard: {base}/  (this sweep: {base}/sweeps/{sweep_id})")
            console.print(f"API docs:  {base}/docs")
        if args.no_serve:
            return stop_up()
        console.print("serving until Ctrl-C")
        return up.wait()
    except KeyboardInterrupt:
        stop_up()
        return 0
    except BaseException:
        stop_up()
        raise


def _wait_ready(client, proc: subprocess.Popen, timeout: float, log_path) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CliError(f"`lowrank up` exited with code {proc.returncode} before the API was ready "
                           f"(see {log_path})")
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise CliError(f"the API was not ready after {timeout:.0f} s (see {log_path})")
