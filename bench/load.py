"""Load: concurrent clients submitting jobs to a real API; every job stored once and enqueued once.

    python -m bench load            # 50 clients, 5,000 jobs (closed loop) + a paced run at 300 jobs/s
    python -m bench --quick load    # 20 clients, 600 jobs

Processes: Postgres (a scratch database, migrated to head), Redis (a unique queue prefix), and
`lowrank api`'s uvicorn (`--workers`, as production runs it). No worker: the messages stay in
Redis, where they are counted. The clients are a minimal asyncio HTTP/1.1 keep-alive client (one
connection each), so the load generator takes as little of the 2 CPUs as possible.

Two runs, each on fresh rows:
  * closed loop: every client submits its next job as soon as the last one answered (max throughput;
    by Little's law mean latency = clients / throughput);
  * paced: the same clients submit at a fixed total rate (open loop; the goal's 300/s), the latency
    a user sees at that load.
Checks after each: POST answered 201 for every job, Postgres holds exactly N rows with the run's
tag and distinct ids, the Redis queues hold exactly N messages, one per job id.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import common, scratch

REPO = Path(__file__).resolve().parent.parent
FULL = {"clients": 50, "jobs": 5000, "paced_rate": 300.0, "paced_jobs": 3000, "api_workers": 2}
QUICK = {"clients": 20, "jobs": 600, "paced_rate": 150.0, "paced_jobs": 300, "api_workers": 2}
GOAL_RPS, GOAL_P99_MS = 300.0, 100.0


@contextlib.contextmanager
def api_stack(workdir: Path, workers: int, server: str = "lowrank") -> Iterator[dict[str, Any]]:
    """Scratch database + unique queue prefix + uvicorn (`workers` processes); all removed at the end.

    server: "lowrank" runs `lowrank api` as shipped (uvicorn picks uvloop and httptools; handler
    threads per process: the api_threads setting's default); "threads-40" the same with
    LOWRANK_API_THREADS=40 (anyio's default, what ran before the setting existed); "asyncio-h11" the
    same app under uvicorn's pure-Python event loop and HTTP parser with 40 threads (the set-up before
    uvloop/httptools were dependencies). Same run, so the ratios compare like with like."""
    with scratch.service(workdir / "home", "load", in_process=False) as stack:
        cf = stack["cf"]
        port = cf.free_port()
        env = {**os.environ, **stack["env"]}
        if server != "lowrank":
            env["LOWRANK_API_THREADS"] = "40"
        if server in ("lowrank", "threads-40"):
            argv = [sys.executable, "-m", "lowrank", "api", "--host", "127.0.0.1", "--port", str(port),
                    "--workers", str(workers), "--log-level", "warning"]
        else:
            argv = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port),
                    "--workers", str(workers), "--log-level", "warning", "--proxy-headers", "--loop", "asyncio",
                    "--http", "h11"]
        with open(workdir / "api.log", "ab") as log:
            proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, process_group=0)
        api = cf.ServiceProcess("api", proc, workdir / "api.log")
        try:
            import httpx

            deadline = time.monotonic() + 90
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"API exited: {(workdir / 'api.log').read_text()[-2000:]}")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("API not ready after 90 s")
                time.sleep(0.3)
            yield {"port": port, "url": stack["url"], "prefix": stack["prefix"], "db": stack["db"], "cf": cf,
                   "pgid": proc.pid}
        finally:
            api.stop(timeout=20)


# ------------------------------------------------------------------------------------------------
# A minimal keep-alive HTTP/1.1 client (httpx costs several times more CPU per request).

class Conn:
    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post_json(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        assert self.reader is not None
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _spec(tag: str, i: int) -> bytes:
    return json.dumps({"kind": "approx", "weights": {"source": "gaussian", "m": 32, "d": 32}, "rank": 2,
                       "method": "spectral", "seed": i, "tags": ["load", tag]}).encode()


async def _drive(port: int, clients: int, n: int, tag: str, rate: float | None) -> dict[str, Any]:
    """n submissions from `clients` connections; closed loop, or paced at `rate`/s in total."""
    latencies: list[float] = []
    ids: list[str] = []
    errors: list[str] = []
    counter = iter(range(n))
    t_start = time.perf_counter()

    async def client() -> None:
        conn = Conn(port)
        try:
            for i in counter:
                if rate is not None:  # open loop: job i is due at t_start + i/rate
                    delay = t_start + i / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                t0 = time.perf_counter()
                status, body = await conn.post_json("/api/v1/jobs", _spec(tag, i))
                latencies.append(time.perf_counter() - t0)
                if status == 201:
                    ids.append(json.loads(body)["id"])
                else:
                    errors.append(f"{status} {body[:200]!r}")
        finally:
            conn.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - t_start
    lat = sorted(latencies)

    def pct(q: float) -> float:
        return 1000 * lat[min(len(lat) - 1, int(q * len(lat)))]

    return {"n": n, "clients": clients, "rate_target": rate, "wall_s": wall, "rps": n / wall,
            "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99), "max_ms": 1000 * lat[-1],
            "ids": ids, "errors": errors}


def _verify(stack: dict[str, Any], tag: str, ids: list[str]) -> dict[str, Any]:
    """Rows in Postgres with this tag, and messages for them in Redis: each exactly once."""
    import psycopg
    import redis
    from sqlalchemy.engine import make_url

    url = make_url(stack["url"]).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url) as conn:
        rows = [str(r[0]) for r in conn.execute(
            "SELECT j.id FROM jobs j JOIN job_tags t ON t.job_id = j.id WHERE t.tag = %s", (tag,))]
    r = redis.Redis.from_url(stack["cf"].REDIS_URL)
    queued: list[str] = []
    for key in r.scan_iter(match=f"{stack['prefix']}*", count=1000):
        if r.type(key) != b"list":
            continue
        for raw in r.lrange(key, 0, -1):
            msg = json.loads(raw)
            args = json.loads(base64.b64decode(msg["body"]))[0]
            queued.append(args[0])
    mine = set(ids)
    queued_mine = [q for q in queued if q in mine]
    return {"rows": len(rows), "distinct_rows": len(set(rows)), "messages": len(queued_mine),
            "distinct_messages": len(set(queued_mine)), "rows_match": set(rows) == mine,
            "messages_match": set(queued_mine) == mine}


SERVERS = {"asyncio-h11": "asyncio + h11, 40 threads (before uvloop)",
           "threads-40": "uvloop + httptools, 40 threads (before LOWRANK_API_THREADS)",
           "lowrank": "`lowrank api` as shipped: uvloop + httptools, 4 threads"}


def _measure(cfg: dict[str, Any], workdir: Path, server: str) -> dict[str, Any]:
    with api_stack(workdir, cfg["api_workers"], server) as stack:
        # Warm-up (connections, imports, caches): not measured.
        asyncio.run(_drive(stack["port"], 4, 100, f"warm-{secrets.token_hex(3)}", None))
        results = {}
        for label, n, rate in (("closed loop", cfg["jobs"], None), ("paced", cfg["paced_jobs"], cfg["paced_rate"])):
            tag = f"load-{secrets.token_hex(4)}"
            load = os.getloadavg()[0]
            cpu0 = common.process_group_cpu_s(stack["pgid"])
            res = asyncio.run(_drive(stack["port"], cfg["clients"], n, tag, rate))
            res["api_cpu_ms_per_request"] = 1000 * (common.process_group_cpu_s(stack["pgid"]) - cpu0) / n
            res["loadavg"] = [load, os.getloadavg()[0]]
            res["check"] = _verify(stack, tag, res["ids"])
            results[label] = res
            print(f"load {server} {label}: {res['rps']:.0f} req/s, p50 {res['p50_ms']:.1f} ms, p99 {res['p99_ms']:.1f} "
                  f"ms, API CPU {res['api_cpu_ms_per_request']:.2f} ms/request, errors {len(res['errors'])}, "
                  f"load {res['loadavg']}, check {res['check']}", flush=True)
    return results


def _exactly_once(r: dict[str, Any]) -> bool:
    c = r["check"]
    return (len(r["errors"]) == 0 and c["rows"] == r["n"] == c["distinct_rows"] and c["messages"] == r["n"]
            == c["distinct_messages"] and c["rows_match"] and c["messages_match"])


def run(quick: bool) -> None:
    cfg = QUICK if quick else FULL
    import tempfile

    busy_before = common.cpu_busy_fraction()
    loop_s = common.python_loop_seconds()
    load_before = os.getloadavg()
    by_server: dict[str, dict[str, Any]] = {}
    # Before first, then after: alternate order would not help on a machine whose load drifts by minutes.
    for server in SERVERS:
        with tempfile.TemporaryDirectory(prefix="lowrank-load-") as tmp:
            by_server[server] = _measure(cfg, Path(tmp), server)
    load_after = os.getloadavg()
    ok = all(_exactly_once(r) for results in by_server.values() for r in results.values())
    results = by_server["lowrank"]
    closed, paced = results["closed loop"], results["paced"]

    def offered(r: dict[str, Any]) -> str:
        return "max" if r["rate_target"] is None else f"{r['rate_target']:.0f}/s"

    rows = "\n".join(
        f"| {SERVERS[server]} | {label} | {r['clients']} | {r['n']} | {offered(r)} "
        f"| {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.0f} "
        f"| {r['api_cpu_ms_per_request']:.2f} "
        f"| {r['check']['rows']} / {r['check']['messages']} | {len(r['errors'])} "
        f"| {r['loadavg'][0]:.1f} -> {r['loadavg'][1]:.1f} |"
        for server, res in by_server.items() for label, r in res.items())
    base = by_server["asyncio-h11"]["closed loop"]
    ratio = closed["rps"] / base["rps"]
    threads40 = by_server["threads-40"]["closed loop"]
    ratio_threads = closed["rps"] / threads40["rps"]
    met_closed = closed["rps"] >= GOAL_RPS and closed["p99_ms"] < GOAL_P99_MS
    met_paced = paced["rps"] >= 0.97 * (paced["rate_target"] or 0) and paced["p99_ms"] < GOAL_P99_MS
    spread = closed["p99_ms"] * closed["rps"] / (1000 * cfg["clients"])  # p99 / mean latency
    closed_note = (
        f"  With {cfg['clients']} clients always waiting on an answer, Little's law ties the two: mean latency =\n"
        f"  clients / throughput = {1000 * cfg['clients'] / closed['rps']:.0f} ms here, p99 {spread:.1f}x the mean"
        + ("." if met_closed else
           f"; with that spread p99 < {GOAL_P99_MS:.0f} ms would need about "
           f"{spread * cfg['clients'] * 1000 / GOAL_P99_MS:,.0f} req/s."))
    md = f"""# Load: concurrent job submissions (POST /api/v1/jobs)

{common.environment_header()}

Setup: {cfg['api_workers']} uvicorn worker processes on a scratch Postgres database and Redis (unique
queue prefix), no Celery worker; {cfg['clients']} clients, each one keep-alive HTTP/1.1 connection (a
minimal asyncio client, so the load generator competes for the same 2 CPUs as little as possible).
Each submission is a tiny approx spec with a distinct seed. Latency is measured by the client from
sending the request to reading the whole response. The same runs three times in this process, each
on a fresh database: the app under uvicorn's pure-Python event loop and HTTP parser with anyio's
default 40 handler threads per process (asyncio + h11: before uvloop and httptools became
dependencies); the same with uvloop + httptools (before the `api_threads` setting); and `lowrank api`
as shipped, whose sync handlers run on LOWRANK_API_THREADS (default 4) threads per process: fewer
threads contending for the GIL. Load average (1 min, 2 CPUs) is given per run. API CPU ms / request:
user + system CPU of the API's processes during the run over the jobs, the API's own cost per
submission whatever else shares the machine (Postgres, Redis and the clients take more on top).
Machine speed: one pure-Python loop of 10^7 integer additions took {loop_s:.2f} s here before the run
(best of 3; an idle modern x86 core takes about 0.4-0.6 s), so runs on different days compare.

| server | run | clients | jobs | offered rate | req/s | p50 ms | p90 ms | p99 ms | max ms | API CPU ms / request | rows / messages | errors | load avg |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
{rows}

Closed-loop throughput in this run, `lowrank api` as shipped / 40 threads: {ratio_threads:.2f}x (p99 {closed['p99_ms']:.0f} ms vs
{threads40['p99_ms']:.0f} ms); / asyncio + h11 with 40 threads: {ratio:.2f}x.
Machine load (1-min load average, 2 CPUs) at start {load_before[0]:.1f}, at end {load_after[0]:.1f}; CPUs busy
{100 * busy_before:.0f}% in the 2 s before the run:
{"the machine was busy with other work when this run started, so these numbers understate what the API does on an idle 2-core machine." if busy_before > 0.25 else "the machine was otherwise idle when the run started (the load during it is the API, Postgres, Redis and the clients themselves)."}

Exactly once: {"every run stored each job once (Postgres rows with the run's tag = jobs answered 201, ids distinct) and enqueued it once (Redis messages for those ids = jobs, one per id)" if ok else "**FAILED**: see the table (rows / messages must both equal jobs)"}.

Goal (>= {GOAL_RPS:.0f} submissions/s with p99 < {GOAL_P99_MS:.0f} ms, {"quick mode: smaller numbers" if quick else "full run"}), `lowrank api`:
* closed loop, {cfg['clients']} clients flat out: {closed['rps']:.0f} req/s, p99 {closed['p99_ms']:.0f} ms: {"met" if met_closed else "NOT met"}.
{closed_note}
* paced at {paced['rate_target']:.0f} submissions/s (open loop, {cfg['clients']} clients): {paced['rps']:.0f} req/s achieved,
  p50 {paced['p50_ms']:.1f} ms, p99 {paced['p99_ms']:.1f} ms: {"met" if met_paced else "NOT met"}.
* capacity: at {closed['api_cpu_ms_per_request']:.2f} ms of API CPU per submission (closed loop), the {os.cpu_count()} CPUs
  allow at most {1000 * (os.cpu_count() or 1) / closed['api_cpu_ms_per_request']:.0f} submissions/s for the API alone, before Postgres, Redis and the clients
  take their share; the goal's rate needs {GOAL_RPS * closed['api_cpu_ms_per_request'] / 1000:.2f} of the {os.cpu_count()} CPUs for the API alone.

Per request the API validates the spec, writes the job and its tags in one autocommit statement
(store.create_job on Postgres) and sends one Celery message to Redis; the request handler runs in
the threadpool of each of the {cfg['api_workers']} processes.
"""
    def strip(res: dict[str, Any]) -> dict[str, Any]:
        return {k: {kk: vv for kk, vv in v.items() if kk not in ("ids", "errors")} | {"errors": len(v["errors"])}
                for k, v in res.items()}

    data: dict[str, Any] = strip(results)
    data["servers"] = {server: strip(res) for server, res in by_server.items()}
    data["ratio_closed_rps"] = ratio
    data["ratio_closed_rps_vs_40_threads"] = ratio_threads
    data["exactly_once"] = ok
    data["python_loop_s"] = loop_s
    data["loadavg"] = {"start": load_before[0], "end": load_after[0]}
    data["cpu_busy_before"] = busy_before
    path = common.write_result("load", md, data)
    print(f"wrote {path}")
    if not ok:
        raise RuntimeError("load: a job was not stored or not enqueued exactly once; see " + str(path))
