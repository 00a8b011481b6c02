"""Search sweeps versus the full grid (issue 15): the hypervolume of the Pareto front a search finds with
30% of the grid's trials, as a fraction of the grid's, over 3 sampler seeds; TPE (the default) and
random search on the same budget.

Writes docs/results/search.md (+ search.json, search.png).

Everything runs through the product: a scratch Postgres database and Redis queue prefix (bench/scratch.py,
the service tests' helpers), one uvicorn API process and two Celery worker processes; the grid is a grid
sweep (POST /api/v1/sweeps), each search a search sweep with the shipped defaults (TPE, multivariate,
constant liar, its default startup trials), asked and told by the workers; numbers are read from
GET /api/v1/sweeps/{id}/results.

The problem: approximate one Gaussian matrix (m x d, seed 0: every trial and grid point approximates the
same matrix) at rank r in 1..R with method in METHODS; objectives: error (normalized function error)
and params = r (m + d), both minimized. The grid is every (r, method). Hypervolume (2-D, exact) with the
reference point (error 1.0 = no better than W' = 0, params (R + 1)(m + d) = one rank past the largest).
The issue's example space (compress budget x method x allocation on the digits ResNet-18) needs the
`compress` job kind, which does not exist yet; to switch, change `problem()`: a compress base spec, the
space over its budget / method / allocation fields, objectives val_top1 (maximize; negate it for the
hypervolume) and params, and the reference point (accuracy 0, params of the dense model).
"""
from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import common, scratch

FULL = {"m": 256, "d": 128, "ranks": 48, "methods": ["spectral", "rescale", "nkp", "random"], "seeds": [0, 1, 2],
        "parallelism": 4, "workers": 2}
QUICK = {"m": 64, "d": 32, "ranks": 12, "methods": ["spectral", "nkp", "random"], "seeds": [0, 1],
         "parallelism": 2, "workers": 2}
BUDGET = 0.3  # of the grid's trials
SAMPLERS = ("tpe", "random")
TIMEOUT_S = 900


def problem(cfg: dict[str, Any]) -> dict[str, Any]:
    """Base spec, grid, search space, objectives and hypervolume reference point of the benchmark."""
    m, d, ranks = cfg["m"], cfg["d"], cfg["ranks"]
    base = {"kind": "approx", "weights": {"source": "gaussian", "m": m, "d": d}, "rank": 1, "tags": ["bench-search"]}
    return {"base": base,
            "grid": {"rank": list(range(1, ranks + 1)), "method": list(cfg["methods"])},
            "space": {"rank": {"type": "int", "low": 1, "high": ranks},
                      "method": {"type": "categorical", "choices": list(cfg["methods"])}},
            "objectives": [{"metric": "error", "direction": "minimize"}, {"metric": "params", "direction": "minimize"}],
            "ref": (1.0, (ranks + 1) * (m + d))}


@contextlib.contextmanager
def stack(workers: int) -> Iterator[dict[str, Any]]:
    """A scratch service: API + `workers` Celery workers on the cpu queues (the tests' helpers)."""
    home = Path(tempfile.mkdtemp(prefix="lowrank_bench_search_"))
    with scratch.service(home, "search") as s:
        cf = s["cf"]
        env = {**s["env"], "LOWRANK_REAP_INTERVAL_S": "5"}
        api = scratch.call(cf.start_api, home, env)
        procs = [api]
        try:
            for _ in range(workers):
                procs.append(scratch.call(cf.start_worker, home, env=env))
            yield {"url": api.url}
        finally:
            for p in reversed(procs):
                p.stop()


def _wait(client, sweep_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        sweep = client.get(f"/api/v1/sweeps/{sweep_id}").json()
        if sweep["status"] not in ("queued", "running"):
            return sweep
        time.sleep(0.2)
    raise RuntimeError(f"sweep {sweep_id} unfinished after {TIMEOUT_S} s")


def run_grid(client, prob: dict[str, Any]) -> dict[str, Any]:
    """The full grid as a grid sweep: every point's (error, params) and the wall time to the last job."""
    t0 = time.perf_counter()
    r = client.post("/api/v1/sweeps", json={"name": "bench grid", "base": prob["base"], "grid": prob["grid"]})
    r.raise_for_status()
    sweep = _wait(client, r.json()["id"])
    wall = time.perf_counter() - t0
    if sweep["status"] != "succeeded":
        raise RuntimeError(f"grid sweep {sweep['id']}: {sweep['status']} {sweep['counts']}")
    rows = client.get(f"/api/v1/sweeps/{sweep['id']}/results").json()["rows"]
    points = [{"point": row["point"], "error": row["mean"], "params": row["params"]} for row in rows]
    return {"points": points, "wall_s": wall, "n": len(points)}


def run_search(client, prob: dict[str, Any], sampler: str, seed: int, n_trials: int,
               parallelism: int) -> dict[str, Any]:
    """One search sweep: its trials in the order asked (point, error, params) and the wall time."""
    search = {"space": prob["space"], "objectives": prob["objectives"], "n_trials": n_trials,
              "parallelism": parallelism, "sampler": sampler, "seed": seed}
    t0 = time.perf_counter()
    r = client.post("/api/v1/sweeps", json={"name": f"bench {sampler} {seed}", "base": prob["base"],
                                            "strategy": "search", "search": search})
    r.raise_for_status()
    sweep = _wait(client, r.json()["id"])
    wall = time.perf_counter() - t0
    doc = client.get(f"/api/v1/sweeps/{sweep['id']}/results").json()
    if sweep["trials"]["told"] != n_trials or doc["counts"]["complete"] != n_trials:
        raise RuntimeError(f"search {sweep['id']}: {sweep['trials']}")
    trials = [{"number": t["number"], "point": t["point"], "error": t["values"]["error"],
               "params": t["values"]["params"], "on_front": t["on_front"]} for t in doc["rows"]]
    return {"sampler": sampler, "seed": seed, "trials": trials, "wall_s": wall, "front": doc["front"]}


def hypervolume(points: list[dict[str, Any]], ref: tuple[float, float]) -> float:
    from jobs.pareto import hypervolume_2d

    return hypervolume_2d([(p["params"], p["error"]) for p in points], (ref[1], ref[0]))


def front_keys(points: list[dict[str, Any]]) -> set[tuple]:
    from jobs.pareto import non_dominated

    idx = non_dominated([(p["params"], p["error"]) for p in points])
    return {tuple(sorted(points[i]["point"].items())) for i in idx}


def curve(trials: list[dict[str, Any]], ref: tuple[float, float], grid_hv: float) -> list[float]:
    """Hypervolume fraction of the front of the first k trials, k = 1..n (in the order asked)."""
    return [hypervolume(trials[:k], ref) / grid_hv for k in range(1, len(trials) + 1)]


def _mean_range(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):.4f} ({min(xs):.4f} to {max(xs):.4f})"


def plot(path: Path, grid: dict[str, Any], runs: list[dict[str, Any]], ref: tuple[float, float],
         budget: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = {"tpe": "tab:red", "random": "tab:blue"}
    for run in runs:
        ks = list(range(1, len(run["curve"]) + 1))
        ax1.plot(ks, [max(1 - f, 1e-5) for f in run["curve"]], color=colors[run["sampler"]], alpha=0.8,
                 label=f"{run['sampler']}" if run["seed"] == runs[0]["seed"] else None)
    ax1.axvline(budget, color="grey", lw=1, ls=":", label=f"budget: {budget} trials (30% of {grid['n']})")
    ax1.set(xlabel="trials (in the order asked)", ylabel="hypervolume missed: 1 - found / grid's", yscale="log",
            title="Front found so far (one line per sampler seed)")
    ax1.legend(loc="upper right")
    ax2.scatter([p["params"] for p in grid["points"]], [p["error"] for p in grid["points"]], s=10, color="0.75",
                label="grid points")
    from jobs.pareto import non_dominated

    on_front = non_dominated([(p["params"], p["error"]) for p in grid["points"]])
    gf = sorted((grid["points"][i] for i in on_front), key=lambda p: p["params"])
    ax2.step([p["params"] for p in gf], [p["error"] for p in gf], where="post", color="black", lw=1.2,
             label="grid's front")
    tpe = next(r for r in runs if r["sampler"] == "tpe")
    ax2.scatter([t["params"] for t in tpe["trials"]], [t["error"] for t in tpe["trials"]], s=18,
                color=colors["tpe"], marker="x", label=f"TPE trials (seed {tpe['seed']})")
    ax2.set(xlabel="params = r (m + d)", ylabel="error (normalized function error)", yscale="log",
            title="Objectives: grid versus one TPE search")
    ax2.set_xlim(0, ref[1])
    ax2.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reading(by: dict[str, list[dict[str, Any]]], grid: dict[str, Any], budget: int) -> str:
    """What the numbers say, from the numbers."""
    tpe = statistics.fmean(1 - r["hv_fraction"] for r in by["tpe"])
    rnd = statistics.fmean(1 - r["hv_fraction"] for r in by["random"])
    speed = statistics.fmean(r["wall_s"] for r in by["tpe"]) / grid["wall_s"]
    return (f"With {budget} of the grid's {grid['n']} trials, TPE misses {100 * tpe:.2f}% of the grid's hypervolume "
            f"on average and random search {100 * rnd:.2f}%"
            + (f" ({rnd / tpe:.1f}x as much)" if tpe > 0 else "") + f", in {100 * speed:.0f}% of the grid's wall time. "
            "Both fractions are high because the front is a smooth curve in rank (each rank is on it with its best "
            "method) and most of the hypervolume lies between the front and the reference point: a point near "
            "the front already covers most of its share; what is left is how close each trial comes to the best "
            "method at its rank. " + ("There TPE's model of the space does better than uniform sampling."
                                      if tpe < rnd else "Here TPE does no better than uniform sampling.")
            + " With several trials at once, which trials are running when one is asked depends on the order "
            "jobs finish in, so a rerun asks different points.")


def run(quick: bool = False) -> Path:
    import httpx

    cfg = QUICK if quick else FULL
    prob = problem(cfg)
    t_all = time.perf_counter()
    with stack(cfg["workers"]) as st, httpx.Client(base_url=st["url"], timeout=60) as client:
        grid = run_grid(client, prob)
        print(f"  grid: {grid['n']} points in {grid['wall_s']:.1f} s", flush=True)
        budget = round(BUDGET * grid["n"])
        runs = []
        for sampler in SAMPLERS:
            for seed in cfg["seeds"]:
                r = run_search(client, prob, sampler, seed, budget, cfg["parallelism"])
                runs.append(r)
                print(f"  {sampler} seed {seed}: {budget} trials in {r['wall_s']:.1f} s", flush=True)
    total = time.perf_counter() - t_all
    ref = prob["ref"]
    grid_hv = hypervolume(grid["points"], ref)
    grid_front = front_keys(grid["points"])
    for r in runs:
        r["curve"] = curve(r["trials"], ref, grid_hv)
        r["hv_fraction"] = r["curve"][-1]
        found = {tuple(sorted(t["point"].items())) for t in r["trials"]}
        r["grid_front_found"] = len(found & grid_front)
        r["distinct"] = len(found)
    plot(common.RESULTS / "search.png", grid, runs, ref, budget)

    rows = ["| sampler | seed | trials | hypervolume / grid's | grid-front points found | front size | wall time (s) |",
            "|---|---|---|---|---|---|---|"]
    for r in runs:
        rows.append(f"| {r['sampler']} | {r['seed']} | {len(r['trials'])} | {r['hv_fraction']:.4f} | "
                    f"{r['grid_front_found']} of {len(grid_front)} | {len(r['front'])} | {r['wall_s']:.1f} |")
    by = {s: [r for r in runs if r["sampler"] == s] for s in SAMPLERS}
    summary = ["| sampler | hypervolume / grid's: mean (min to max) over seeds | missed: 1 - that (mean) | "
               "trials for 95% (mean) | wall time (s, mean) |", "|---|---|---|---|---|"]
    for s, rs in by.items():
        reach = [next((k + 1 for k, v in enumerate(r["curve"]) if v >= 0.95), None) for r in rs]
        reach_txt = (f"{statistics.fmean(x for x in reach if x):.1f}" if all(reach)
                     else f"{sum(1 for x in reach if x)} of {len(reach)} seeds reach it")
        missed = statistics.fmean(1 - r["hv_fraction"] for r in rs)
        summary.append(f"| {s} | {_mean_range([r['hv_fraction'] for r in rs])} | {missed:.4f} | {reach_txt} | "
                       f"{statistics.fmean(r['wall_s'] for r in rs):.1f} |")
    summary.append(f"| full grid | 1 (by definition), {grid['n']} trials | 0 | - | {grid['wall_s']:.1f} |")
    data = {"grid_points": grid["n"], "budget_trials": budget, "budget_fraction": BUDGET, "grid_hv": grid_hv,
            "grid_front_size": len(grid_front), "grid_wall_s": grid["wall_s"], "ref": list(ref),
            "seeds": cfg["seeds"], "total_s": total,
            **{f"hv_fraction_{s}": [r["hv_fraction"] for r in rs] for s, rs in by.items()},
            **{f"hv_fraction_{s}_mean": statistics.fmean(r["hv_fraction"] for r in rs) for s, rs in by.items()},
            **{f"search_wall_s_{s}": [r["wall_s"] for r in rs] for s, rs in by.items()},
            "grid_front_found": {s: [r["grid_front_found"] for r in rs] for s, rs in by.items()}}
    methods = ", ".join(cfg["methods"])
    md = f"""# Search sweeps versus the full grid

{common.environment_header()}
Mode: {'quick' if quick else 'full'}; total {total:.0f} s. Produced by `python -m bench {'--quick ' if quick else ''}search`
(bench/search.py): one API and {cfg['workers']} Celery workers on a scratch Postgres database and Redis
prefix; the grid is a grid sweep, each search a search sweep (`strategy: search`, shipped defaults,
{cfg['parallelism']} trials at once), every trial asked and told by the workers.

The problem: approximate one {cfg['m']} x {cfg['d']} Gaussian matrix (seed 0, the same for every trial) at
rank r in 1..{cfg['ranks']} with method in {{{methods}}}: {grid['n']} grid points. Objectives: `error`
(normalized function error L(W')/L(0)) and `params` = r (m + d), both minimized. Hypervolume: exact 2-D,
reference point (error {ref[0]:g}, params {ref[1]:g}): no better than W' = 0, and one rank past the
largest. The full grid's front has {len(grid_front)} points and hypervolume {grid_hv:.6g}.

## 1. Hypervolume with {budget} trials ({100 * BUDGET:.0f}% of the grid's), per sampler seed

{chr(10).join(rows)}

## 2. Summary over seeds {cfg['seeds']}

{chr(10).join(summary)}

"Trials for 95%": trials (in the order asked) until the front found so far reaches 95% of the grid's
hypervolume. Wall times include the sampler's asks (each ask rebuilds the study from the trial rows).

{reading(by, grid, budget)}

![hypervolume versus trials, and the objectives](search.png)

## Switching to the compress space

The issue's example (compress budget x method x allocation on the digits ResNet-18) needs the `compress`
job kind (a later issue). `problem()` is the only place to change: a compress base spec, the grid and
space over its budget / method / allocation fields, objectives `val_top1` (maximize) and `params`, and a
reference point (accuracy 0, the dense model's params; negate accuracy for the 2-D hypervolume).
"""
    path = common.write_result("search", md, data)
    print(f"wrote {path}", flush=True)
    return path
