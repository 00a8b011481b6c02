"""Service benchmarks (issue 9): metric ingestion and submit-to-running, against real processes.

Writes docs/results/service.md (+ service.json, service_latency.png).

Everything runs against the real stack, as tests/service/conftest.py sets it up (its helpers are
imported from there): a scratch Postgres database `lowrank_bench_<hex>` migrated to head, Redis
with a unique Celery queue prefix, a uvicorn API process and a Celery worker process. The
database, the Redis keys and the processes are removed at the end, also on failure.

1. Metric ingestion (points/s): `jobs.store.record_metrics`, the worker's write path, in bulk
   (batches of 200 rows, the worker's MetricsBuffer size, and larger) versus one row per call
   (one transaction each), interleaved in the same run; the ratio bulk / single. Also several
   writers at once (threads, one job each: several workers flushing together).
2. Metric read: GET /api/v1/jobs/{id}/metrics (server-side downsampling to 1000 points) of the
   job holding the most points.
3. Submit to running on an idle worker: POST /api/v1/jobs with a tiny approx job, then the job's
   `started_at` (set when the worker claims it) minus the client's clock just before the POST
   (one host, one clock); the next job is sent only after the previous one finished and the
   worker sat idle for a moment. p50 / p99 / max over the jobs, plus POST latency and
   submit-to-finished for the same jobs.

Sweep creation and results queries: bench/service_sweeps.py (SWEEPS); 50-client submission
throughput: bench/load.py (SECURITY). Not duplicated here.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import common, scratch

FULL = {"bulk_points": 40_000, "batches": [200, 1000, 5000], "single_points": 1500, "rounds": 3,
        "writers": 4, "writer_points": 20_000, "reads": 20, "jobs": 30, "warmup_jobs": 3, "idle_s": 0.5}
QUICK = {"bulk_points": 6_000, "batches": [200, 1000], "single_points": 150, "rounds": 1,
         "writers": 2, "writer_points": 3_000, "reads": 5, "jobs": 10, "warmup_jobs": 1, "idle_s": 0.2}
TINY_JOB = {"kind": "approx", "weights": {"source": "gaussian", "m": 32, "d": 32}, "rank": 2,
            "method": "spectral", "tags": ["bench-service"]}


@contextlib.contextmanager
def service_stack(workdir: Path) -> Iterator[dict[str, Any]]:
    """A scratch database + queue prefix in os.environ (jobs.settings reset), removed at the end;
    the processes appended to "procs" are stopped first."""
    with scratch.service(workdir / "home", "bench") as s:
        procs: list[Any] = []
        try:
            yield {"env": s["env"], "procs": procs, "cf": s["cf"], "db": s["db"]}
        finally:
            for sp in procs:
                sp.stop(timeout=20)


def _pct(xs: list[float], q: float) -> float:
    """Percentile with linear interpolation between order statistics (numpy's default)."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# ----------------------------------------------------------------------------- 1. ingestion

def _new_job() -> str:
    from jobs import store

    job, _ = store.create_job(dict(TINY_JOB, name="bench-metrics"))
    # A holder for metric rows, never sent: cancelled at once, so no worker's slot message (which claims the
    # oldest queued job, jobs/claims.py) runs it in place of a job the benchmark submits later.
    store.request_cancel(job.id)
    return job.id


def _rows(n: int, offset: int = 0) -> list[tuple[str, int, float]]:
    """n points of two series, as a training loop reports them (loss and lr per step)."""
    return [("train_loss" if i % 2 == 0 else "lr", offset + i // 2, 1.0 / (1 + i)) for i in range(n)]


def _ingest(job_id: str, rows: list[tuple[str, int, float]], batch: int) -> float:
    from jobs import store

    t0 = time.perf_counter()
    for i in range(0, len(rows), batch):
        store.record_metrics(job_id, rows[i:i + batch])
    return len(rows) / (time.perf_counter() - t0)


def ingestion(cfg: dict[str, Any]) -> dict[str, Any]:
    from jobs import store

    store.record_metrics(_new_job(), _rows(100))  # connection pool, statement cache
    single: list[float] = []
    bulk: dict[int, list[float]] = {b: [] for b in cfg["batches"]}
    biggest = (0, "")
    for rnd in range(cfg["rounds"]):  # interleaved: each round measures every variant under the same load
        single.append(_ingest(_new_job(), _rows(cfg["single_points"]), 1))
        for b in cfg["batches"]:
            job = _new_job()
            bulk[b].append(_ingest(job, _rows(cfg["bulk_points"]), b))
            biggest = max(biggest, (cfg["bulk_points"], job))
        print(f"  round {rnd + 1}: single {single[-1]:.0f} points/s, "
              + ", ".join(f"batch {b} {bulk[b][-1]:.0f}" for b in cfg["batches"]), flush=True)
    # Several writers at once (threads; psycopg releases the GIL while Postgres works).
    jobs = [_new_job() for _ in range(cfg["writers"])]
    rates: list[float] = [0.0] * cfg["writers"]
    barrier = threading.Barrier(cfg["writers"] + 1)

    def writer(k: int) -> None:
        rows = _rows(cfg["writer_points"])
        barrier.wait()
        rates[k] = _ingest(jobs[k], rows, 200)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(cfg["writers"])]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    concurrent = cfg["writers"] * cfg["writer_points"] / (time.perf_counter() - t0)
    print(f"  {cfg['writers']} writers at once (batch 200): {concurrent:.0f} points/s in total", flush=True)
    med = {b: statistics.median(v) for b, v in bulk.items()}
    single_med = statistics.median(single)
    worker_batch = 200 if 200 in med else min(med)
    return {"single": single, "bulk": bulk, "single_median": single_med, "bulk_median": med,
            "worker_batch": worker_batch, "ratio_worker_batch": med[worker_batch] / single_med,
            "best_batch": max(med, key=med.get), "best_rate": max(med.values()),
            "concurrent": concurrent, "writers": cfg["writers"], "writer_points": cfg["writer_points"],
            "biggest_job": biggest[1], "biggest_points": biggest[0]}


# ----------------------------------------------------------------------------- 2. metric read

def metric_reads(client: Any, job_id: str, n: int) -> dict[str, Any]:
    times, total = [], 0
    for _ in range(n + 1):
        t0 = time.perf_counter()
        r = client.get(f"/api/v1/jobs/{job_id}/metrics", params={"max_points": 1000})
        dt_ms = (time.perf_counter() - t0) * 1000
        r.raise_for_status()
        times.append(dt_ms)
        body = r.json()
        total = sum(s["total"] for s in body["series"])
        returned = sum(len(s["steps"]) for s in body["series"])
    times = times[1:]  # the first read warms the API's connection pool
    return {"p50_ms": _pct(times, 50), "p99_ms": _pct(times, 99), "stored": total, "returned": returned, "n": n}


# ----------------------------------------------------------------------------- 3. submit to running

def _ts(value: str) -> float:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def submit_to_running(client: Any, n: int, warmup: int, idle_s: float) -> dict[str, Any]:
    to_running, to_done, post_ms, queue_ms = [], [], [], []
    for i in range(warmup + n):
        time.sleep(idle_s)  # the worker sits idle, waiting on Redis
        t_submit = time.time()
        t0 = time.perf_counter()
        r = client.post("/api/v1/jobs", json=dict(TINY_JOB, name=f"bench-submit-{i}"))
        post = (time.perf_counter() - t0) * 1000
        if r.status_code != 201:
            raise RuntimeError(f"POST /api/v1/jobs answered {r.status_code}: {r.text[:300]}")
        job_id = r.json()["id"]
        deadline = time.monotonic() + 120
        while True:
            job = client.get(f"/api/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job_id} still {job['status']} after 120 s")
            time.sleep(0.01)
        if job["status"] != "succeeded":
            raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}")
        if i < warmup:  # the worker's child imports torch on its first job
            continue
        to_running.append((_ts(job["started_at"]) - t_submit) * 1000)
        queue_ms.append((_ts(job["started_at"]) - _ts(job["created_at"])) * 1000)
        to_done.append((_ts(job["finished_at"]) - t_submit) * 1000)
        post_ms.append(post)
    print(f"  submit->running over {n} jobs: p50 {_pct(to_running, 50):.1f} ms, p99 {_pct(to_running, 99):.1f} ms",
          flush=True)
    return {"n": n, "warmup": warmup, "idle_s": idle_s, "to_running": to_running, "queue": queue_ms,
            "to_done": to_done, "post": post_ms,
            "p50_ms": _pct(to_running, 50), "p99_ms": _pct(to_running, 99), "max_ms": max(to_running)}


# ----------------------------------------------------------------------------- report

def _plot(lat: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs = range(1, lat["n"] + 1)
    ax.plot(xs, lat["to_running"], "o-", label="submit -> running (claimed)")
    ax.plot(xs, lat["post"], "s-", label="POST /api/v1/jobs")
    ax.set_xlabel("job (sent one at a time to an idle worker)")
    ax.set_ylabel("ms")
    ax.set_yscale("log")
    ax.set_title("Submit to running on an idle Celery worker", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(quick: bool) -> None:
    cfg = QUICK if quick else FULL
    t_start = time.perf_counter()
    import httpx

    with tempfile.TemporaryDirectory(prefix="lowrank-bench-") as tmp, service_stack(Path(tmp)) as stack:
        cf = stack["cf"]
        print("metric ingestion (record_metrics)", flush=True)
        ing = ingestion(cfg)
        print("starting the API and a worker", flush=True)
        t0 = time.perf_counter()
        api = scratch.call(cf.start_api, Path(tmp))
        stack["procs"].append(api)
        worker = scratch.call(cf.start_worker, Path(tmp), queues=("cpu",), concurrency=1)
        stack["procs"].append(worker)
        startup = time.perf_counter() - t0
        with httpx.Client(base_url=api.url, timeout=30) as client:
            print("metric read", flush=True)
            reads = metric_reads(client, ing["biggest_job"], cfg["reads"])
            print(f"  GET metrics of {reads['stored']} points -> {reads['returned']}: p50 {reads['p50_ms']:.1f} ms",
                  flush=True)
            print("submit to running", flush=True)
            lat = submit_to_running(client, cfg["jobs"], cfg["warmup_jobs"], cfg["idle_s"])
        _plot(lat, common.RESULTS / "service_latency.png")

    total = time.perf_counter() - t_start
    b_rows = "\n".join(
        f"| {b} rows per call{' (the worker MetricsBuffer size)' if b == 200 else ''} | {ing['bulk_median'][b]:,.0f} | "
        f"{ing['bulk_median'][b] / ing['single_median']:.1f}x | "
        + ", ".join(f"{x:,.0f}" for x in ing["bulk"][b]) + " |" for b in cfg["batches"])
    md = f"""# Service: metric ingestion, metric reads, submit to running ({'quick' if quick else 'full'} run)

{common.environment_header()}
Produced by `python -m bench {'--quick ' if quick else ''}service` (bench/service.py) in {total:.0f} s, against real
processes: Postgres (scratch database, migrated to head), Redis (unique queue prefix), a uvicorn
API process and a Celery worker process (concurrency 1: one job process at a time) started the way the service tests
start them (API + worker ready in {startup:.1f} s). The machine is shared; the database is the shared
local Postgres server.

## 1. Metric ingestion through `jobs.store.record_metrics`

{cfg['bulk_points']:,} points per bulk run, {cfg['single_points']:,} points one row per call (each call one
transaction: what a worker without batching would do); two series (`train_loss`, `lr`) per job;
{cfg['rounds']} interleaved round(s), median shown.

| writes | points/s (median) | vs one row per call | each round |
|---|---|---|---|
| 1 row per call | {ing['single_median']:,.0f} | 1.0x | {', '.join(f'{x:,.0f}' for x in ing['single'])} |
{b_rows}

Bulk at the worker's batch size ({ing['worker_batch']} rows) ingests **{ing['bulk_median'][ing['worker_batch']]:,.0f} points/s**,
**{ing['ratio_worker_batch']:.0f}x** one row per call; the best batch size here ({ing['best_batch']}) reaches
{ing['best_rate']:,.0f} points/s. {ing['writers']} writers at once (threads, {ing['writer_points']:,} points each,
batches of 200, one job each): **{ing['concurrent']:,.0f} points/s** in total.

## 2. Reading a long series: GET /api/v1/jobs/{{id}}/metrics

| stored points | returned (max_points=1000 per series) | p50 (ms) | p99 (ms) | reads |
|---|---|---|---|---|
| {reads['stored']:,} | {reads['returned']:,} | {reads['p50_ms']:.1f} | {reads['p99_ms']:.1f} | {reads['n']} |

## 3. Submit to running on an idle worker

A tiny approx job (Gaussian 32 x 32, rank 2, spectral) sent with POST /api/v1/jobs, one at a time:
the next is sent {cfg['idle_s']} s after the previous one finished, so the worker is idle and blocked
on Redis. Submit to running = the job's `started_at` (written when the worker claims it) minus the
client's clock just before the POST (same host, same clock). {lat['warmup']} warm-up jobs first
(the worker's child process imports torch on its first job); then {lat['n']} measured jobs.

| quantity (ms) | p50 | p99 | max |
|---|---|---|---|
| submit -> running (claimed by the worker) | {lat['p50_ms']:.1f} | {lat['p99_ms']:.1f} | {lat['max_ms']:.1f} |
| created_at -> started_at (server clocks: broker + worker only) | {_pct(lat['queue'], 50):.1f} | {_pct(lat['queue'], 99):.1f} | {max(lat['queue']):.1f} |
| POST /api/v1/jobs (201 received) | {_pct(lat['post'], 50):.1f} | {_pct(lat['post'], 99):.1f} | {max(lat['post']):.1f} |
| submit -> succeeded (tiny job) | {_pct(lat['to_done'], 50):.1f} | {_pct(lat['to_done'], 99):.1f} | {max(lat['to_done']):.1f} |

With {lat['n']} samples p99 is interpolated between the two largest values.

![submit to running per job](service_latency.png)
"""
    data = {
        "ingest_single_points_per_s": ing["single_median"],
        "ingest_bulk_points_per_s": ing["bulk_median"][ing["worker_batch"]],
        "ingest_bulk_batch": ing["worker_batch"],
        "ingest_bulk_ratio": ing["ratio_worker_batch"],
        "ingest_best_points_per_s": ing["best_rate"], "ingest_best_batch": ing["best_batch"],
        "ingest_concurrent_points_per_s": ing["concurrent"], "ingest_writers": ing["writers"],
        "ingest_bulk_by_batch": {str(k): v for k, v in ing["bulk_median"].items()},
        "metrics_read_p50_ms": reads["p50_ms"], "metrics_read_p99_ms": reads["p99_ms"],
        "metrics_read_points": reads["stored"],
        "submit_to_running_p50_ms": lat["p50_ms"], "submit_to_running_p99_ms": lat["p99_ms"],
        "submit_to_running_max_ms": lat["max_ms"], "submit_to_running_n": lat["n"],
        "post_p50_ms": _pct(lat["post"], 50), "post_p99_ms": _pct(lat["post"], 99),
        "startup_s": startup, "total_s": total,
    }
    path = common.write_result("service", md, data)
    print(f"ingestion {data['ingest_bulk_points_per_s']:.0f} points/s bulk vs {data['ingest_single_points_per_s']:.0f} "
          f"single ({data['ingest_bulk_ratio']:.0f}x); submit->running p50 {lat['p50_ms']:.1f} ms p99 {lat['p99_ms']:.1f} ms;"
          f" wrote {path}", flush=True)
