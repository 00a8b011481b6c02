"""Speed (issue 17): measured latency of factored networks, the latency-aware option, NKP's cost next to spectral.

Writes docs/results/speed.md, speed.json and speed.png. Every number comes from the shipped code paths
with their defaults: `core.latency.compare_latency` (what `lowrank latency --latency-aware` runs),
`core.approx.approximate` and `core.factorize.factorize_model` (what `lowrank factorize` runs).

1. NKP / spectral time, side by side in one run (interleaved, the faster of two runs each):
   a 4096 x 4096 Gaussian matrix at r = 16 and 256, and whole ResNet-50 / EfficientNet-B0
   factorizations (ImageNet heads) at rank ratios 0.1 / 0.25 / 0.5. Goal: NKP <= 1.25x spectral.
   Beside each model row, NKP's error against the float64 path (`precision="float64"`, the
   algorithm as it was before issue 17 apart from its stopping rule): largest per-layer relative
   difference; goal: within 0.01 %.
2. Forward latency on the CPU (eval mode, one thread): ResNet-18, ResNet-50 and EfficientNet-B0 at
   32 px (the small-image stem), rank ratios 0.1 / 0.25 / 0.5, batch 1 and a training batch (16):
   dense, factored, and latency-aware factored (layers whose factored form is not faster at batch
   1 kept dense), end to end; how many factored layers are slower than their dense original.
3. Per layer, ResNet-18 at ratio 0.25, batch 1: dense vs factored time of each layer (speed.png).

Quick mode: ResNet-18 only, ratio 0.25, batches 1 and 4, a 1024 x 1024 matrix, EfficientNet-B0 at 0.25.
One intra-op thread throughout (`torch.set_num_threads(1)`, and LAPACK's through core.approx): on
this shared two-core machine more threads made timings several times noisier.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from bench.common import RESULTS, environment_header, write_result
from core.approx import approximate
from core.factorize import factorize_model
from core.latency import compare_latency
from core.models import build_model
from core.weights import gaussian_weights

GOAL = 1.25  # NKP's time at most this times spectral's (issue 17)
ERROR_GOAL = 1e-4  # NKP's error within 0.01 % of the float64 path
FULL = {
    "matrix_n": 4096, "matrix_ranks": [16, 256], "reps": 2,
    "fact_models": ["resnet50", "efficientnet_b0"], "fact_ratios": [0.1, 0.25, 0.5],
    "lat_models": [("resnet18", 32), ("resnet50", 32), ("efficientnet_b0", 32)], "lat_ratios": [0.1, 0.25, 0.5],
    "lat_batches": [1, 16], "repeats": 10, "layer_model": ("resnet18", 32, 0.25),
}
QUICK = {
    "matrix_n": 1024, "matrix_ranks": [16, 256], "reps": 1,
    "fact_models": ["efficientnet_b0"], "fact_ratios": [0.25],
    "lat_models": [("resnet18", 32)], "lat_ratios": [0.25], "lat_batches": [1, 4], "repeats": 5,
    "layer_model": ("resnet18", 32, 0.25),
}


# ----------------------------------------------------------------------------- 1. NKP vs spectral

def matrix_times(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    n = cfg["matrix_n"]
    W = gaussian_weights(n, n, seed=0)
    approximate(W[:64, :64], 4, "nkp")  # load LAPACK and scipy once, outside the timings
    approximate(W[:64, :64], 4, "spectral")
    rows = []
    for r in cfg["matrix_ranks"]:
        times: dict[str, list[float]] = {"spectral": [], "nkp": []}
        errors = {}
        for _ in range(cfg["reps"]):  # interleaved: both see the same machine load
            for method in ("spectral", "nkp"):
                t0 = time.perf_counter()
                a = approximate(W, r, method)
                times[method].append(time.perf_counter() - t0)
                errors[method] = a.error
        row = {"what": f"{n} x {n} Gaussian", "r": r, "spectral_s": min(times["spectral"]), "nkp_s": min(times["nkp"]),
               "spectral_runs": times["spectral"], "nkp_runs": times["nkp"],
               "spectral_error": errors["spectral"], "nkp_error": errors["nkp"]}
        row["ratio"] = row["nkp_s"] / row["spectral_s"]
        rows.append(row)
        print(f"  {n}x{n} r={r}: spectral {times['spectral']} nkp {times['nkp']} -> {row['ratio']:.2f}", flush=True)
    return rows


def _factorize(name: str, ratio: float, method: str, **options: Any) -> tuple[float, Any]:
    torch.manual_seed(0)
    model = build_model(name, num_classes=1000)
    t0 = time.perf_counter()
    rep = factorize_model(model, rank_ratio=ratio, method=method, compare_spectral=False,
                          approx_options=options or None)
    return time.perf_counter() - t0, rep


def model_times(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name in cfg["fact_models"]:
        for ratio in cfg["fact_ratios"]:
            times: dict[str, list[float]] = {"spectral": [], "nkp": []}
            reps: dict[str, Any] = {}
            for _ in range(cfg["reps"]):
                for method in ("spectral", "nkp"):
                    t, reps[method] = _factorize(name, ratio, method)
                    times[method].append(t)
            _, ref = _factorize(name, ratio, "nkp", precision="float64")  # the float64 path, for the error
            new = {r.layer: r.error for r in reps["nkp"].factored()}
            diffs = [(new[r.layer] - r.error) / r.error for r in ref.factored()]
            row = {"what": name, "ratio": ratio, "layers": reps["nkp"].totals["layers_factored"],
                   "spectral_s": min(times["spectral"]), "nkp_s": min(times["nkp"]),
                   "spectral_runs": times["spectral"], "nkp_runs": times["nkp"],
                   "spectral_error": reps["spectral"].totals["mean_error"], "nkp_error": reps["nkp"].totals["mean_error"],
                   "float64_error": ref.totals["mean_error"], "max_layer_diff": max(abs(x) for x in diffs),
                   "mean_layer_diff": statistics.mean(diffs)}
            row["ratio_time"] = row["nkp_s"] / row["spectral_s"]
            rows.append(row)
            print(f"  {name} @ {ratio}: spectral {times['spectral']} nkp {times['nkp']} -> {row['ratio_time']:.2f}; "
                  f"max layer error diff vs float64 {row['max_layer_diff']:.1e}", flush=True)
    return rows


# ----------------------------------------------------------------------------- 2-3. latency

def latencies(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    layer_name, layer_px, layer_ratio = cfg["layer_model"]
    for name, px in cfg["lat_models"]:
        for ratio in cfg["lat_ratios"]:
            t0 = time.perf_counter()
            with_layers = (name, px, ratio) == (layer_name, layer_px, layer_ratio)
            res = compare_latency(name, rank_ratio=ratio, image_size=px, batches=cfg["lat_batches"], threads=1,
                                  repeats=cfg["repeats"], latency_aware=True, latency_batch=1,
                                  per_layer=True, layer_batches=cfg["lat_batches"] if with_layers else [1])
            res["wall_s"] = time.perf_counter() - t0
            out.append(res)
            e2e = {(e["batch"], e["variant"]): e for e in res["latency"]["end_to_end"]}
            print(f"  {name} {px}px r={ratio}: " + "; ".join(
                f"b{b} factored {e2e[(b, 'factored')]['speedup']:.2f}x aware {e2e[(b, 'latency-aware')]['speedup']:.2f}x"
                for b in cfg["lat_batches"]) + f"; kept dense {len(res['kept_dense'])} ({res['wall_s']:.0f} s)", flush=True)
    return out


def _plot(layer_res: dict[str, Any], fact_rows: list[dict], mat_rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = layer_res["latency"]["layers"]["1"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [2, 1]})
    x = range(len(rows))
    dense = [r["dense"]["p50_ms"] for r in rows]
    fact = [r["factored"]["p50_ms"] for r in rows]
    ax1.bar([i - 0.2 for i in x], dense, width=0.4, label="dense", color="#888888")
    ax1.bar([i + 0.2 for i in x], fact, width=0.4, label="factored",
            color=["#d62728" if r["slower"] else "#1f77b4" for r in rows])
    ax1.set_xticks(list(x))
    ax1.set_xticklabels([r["layer"] for r in rows], rotation=75, fontsize=7)
    ax1.set_ylabel("forward time per call (ms, median)")
    ax1.set_title(f"{layer_res['model']} {layer_res['image_size']} px, ratio {layer_res['rank_ratio']}, batch 1, "
                  f"CPU 1 thread (red: factored slower)", fontsize=9)
    ax1.legend()
    labels = [f"{r['what'].split()[0]} r={r['r']}" for r in mat_rows] + [f"{r['what']} {r['ratio']}" for r in fact_rows]
    ratios = [r["ratio"] for r in mat_rows] + [r["ratio_time"] for r in fact_rows]
    ax2.barh(range(len(ratios)), ratios, color=["#1f77b4" if v <= GOAL else "#d62728" for v in ratios])
    ax2.axvline(GOAL, color="k", ls="--", lw=1, label=f"goal {GOAL}x")
    ax2.set_yticks(range(len(ratios)))
    ax2.set_yticklabels(labels, fontsize=8)
    ax2.set_xlabel("NKP time / spectral time (same run)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- report

def _fmt_s(xs: list[float]) -> str:
    return " / ".join(f"{x:.2f}" for x in xs)


def reading(mat_rows: list[dict], fact_rows: list[dict], lat: list[dict]) -> str:
    """What this run shows, written from its numbers."""
    out = []
    over = [r for r in mat_rows if r["ratio"] > GOAL] + [r for r in fact_rows if r["ratio_time"] > GOAL]
    n_all = len(mat_rows) + len(fact_rows)
    if not over:
        out.append(f"* NKP / spectral time is at most {GOAL}x in all {n_all} cases (goal met).")
    else:
        worst = max(over, key=lambda r: r.get("ratio_time", r.get("ratio")))
        out.append(f"* NKP / spectral time is at most {GOAL}x in {n_all - len(over)} of {n_all} cases; missed in "
                   + ", ".join(f"{r['what']} {('r = ' + str(r['r'])) if 'r' in r else ('@ ' + str(r['ratio']))} "
                               f"({r.get('ratio_time', r.get('ratio')):.2f}x, {r.get('ratio_time', r.get('ratio')) / GOAL - 1:+.0%} over the goal)"
                               for r in over)
                   + ". Where it is missed, NKP's ascent (each step a product with the layer's unit rows or their "
                     "Gram matrix, and two (r, r) orthonormalizations) is work spectral does not do at all: spectral "
                     "is one Gram matrix and one partial eigensolve per layer, and NKP starts with the same (in float32). "
                     "On EfficientNet-B0's many small layers per-call overhead is a large part of every step even in "
                     "padded batches; at ratio 0.5 the (r, r) algebra grows as r^2 m and a few steps cost as much as "
                     "the Gram matrix. "
                     f"Largest miss: {worst['what']} ({worst.get('ratio_time', worst.get('ratio')):.2f}x).")
    diffs = [r["max_layer_diff"] for r in fact_rows]
    if diffs:
        out.append(f"* NKP's per-layer error is within {max(diffs):.1e} (relative) of the float64 path on every layer "
                   f"of every model row (goal {ERROR_GOAL:.0e}: {'met' if max(diffs) <= ERROR_GOAL else '**not met**'}).")
    same = [abs(e2e_f["speedup"] / e2e_a["speedup"] - 1) for res in lat if not res["kept_dense"]
            for e2e_f in res["latency"]["end_to_end"] for e2e_a in res["latency"]["end_to_end"]
            if e2e_f["variant"] == "factored" and e2e_a["variant"] == "latency-aware" and e2e_f["batch"] == e2e_a["batch"]]
    if same:
        out.append(f"* Noise: where nothing was kept dense, factored and latency-aware are one network measured twice; "
                   f"their p50 speed-ups differ by up to {max(same):.0%} on this shared machine, so end-to-end "
                   "differences smaller than that are not measured effects.")
    for res in lat:
        e2e = {(e["batch"], e["variant"]): e for e in res["latency"]["end_to_end"]}
        slower = [r for r in res["latency"]["layers"].get("1", []) if r["slower"]]
        b1 = (1, "factored")
        if b1 in e2e:
            out.append(f"* {res['model']} {res['image_size']} px @ {res['rank_ratio']}: factored {e2e[b1]['speedup']:.2f}x "
                       f"dense at batch 1 ({len(slower)} of {len(res['latency']['layers'].get('1', []))} factored layers "
                       f"slower than dense); latency-aware kept {len(res['kept_dense'])} dense: "
                       f"{e2e[(1, 'latency-aware')]['speedup']:.2f}x.")
    return "\n".join(out)


def run(quick: bool) -> None:
    cfg = QUICK if quick else FULL
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        print("NKP vs spectral: matrices", flush=True)
        mat_rows = matrix_times(cfg)
        print("NKP vs spectral: whole models", flush=True)
        fact_rows = model_times(cfg)
        print("latency", flush=True)
        lat = latencies(cfg)
        total = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    data = {"matrix": mat_rows, "models": fact_rows, "latency": lat, "goal": GOAL, "error_goal": ERROR_GOAL,
            "header": environment_header(), "mode": "quick" if quick else "full", "total_s": total,
            "repeats": cfg["repeats"], "layer_model": list(cfg["layer_model"])}
    write(data)


def write(data: dict[str, Any]) -> None:
    """speed.md, speed.json and speed.png from a run's `data` (`python -m bench.speed --render` redoes them
    from speed.json's data, e.g. after the report's wording changed, without measuring again)."""
    mat_rows, fact_rows, lat = data["matrix"], data["models"], data["latency"]
    quick = data["mode"] == "quick"
    layer_res = next(r for r in lat if [r["model"], r["image_size"], r["rank_ratio"]] == list(data["layer_model"]))
    _plot(layer_res, fact_rows, mat_rows, RESULTS / "speed.png")

    t1 = ["| matrix | r | spectral (s) | NKP (s) | NKP / spectral time | spectral error | NKP error |",
          "|---|---|---|---|---|---|---|"]
    for r in mat_rows:
        t1.append(f"| {r['what']} | {r['r']} | {_fmt_s(r['spectral_runs'])} | {_fmt_s(r['nkp_runs'])} | "
                  f"{r['ratio']:.2f}x | {r['spectral_error']:.6f} | {r['nkp_error']:.6f} |")
    t2 = ["| model | ratio | layers | spectral (s) | NKP (s) | NKP / spectral time | spectral mean error | "
          "NKP mean error | float64 path mean error | max per-layer error difference |", "|---" * 10 + "|"]
    for r in fact_rows:
        t2.append(f"| {r['what']} | {r['ratio']} | {r['layers']} | {_fmt_s(r['spectral_runs'])} | "
                  f"{_fmt_s(r['nkp_runs'])} | {r['ratio_time']:.2f}x | {r['spectral_error']:.5f} | {r['nkp_error']:.6f} | "
                  f"{r['float64_error']:.6f} | {r['max_layer_diff']:.1e} |")
    t3 = ["| model | px | ratio | batch | dense ms (p50 / p90) | factored ms | latency-aware ms | factored speed-up | "
          "latency-aware speed-up | factored layers slower (batch 1) | kept dense |", "|---" * 11 + "|"]
    for res in lat:
        e2e = {(e["batch"], e["variant"]): e for e in res["latency"]["end_to_end"]}
        layers1 = res["latency"]["layers"].get("1", [])
        for b in res["batches"]:
            d, f, a = e2e[(b, "dense")], e2e[(b, "factored")], e2e[(b, "latency-aware")]
            t3.append(f"| {res['model']} | {res['image_size']} | {res['rank_ratio']} | {b} | "
                      f"{d['timing']['p50_ms']:.2f} / {d['timing']['p90_ms']:.2f} | {f['timing']['p50_ms']:.2f} | "
                      f"{a['timing']['p50_ms']:.2f} | {f['speedup']:.2f}x | {a['speedup']:.2f}x | "
                      f"{sum(r['slower'] for r in layers1)} of {len(layers1)} | {len(res['kept_dense'])} |")
    t4 = ["| layer | input | rank | dense ms | factored ms | speed-up | latency-aware |", "|---|---|---|---|---|---|---|"]
    kept = {k["layer"] for k in layer_res["kept_dense"]}
    for r in layer_res["latency"]["layers"]["1"]:
        t4.append(f"| {r['layer']} | {'x'.join(map(str, r['input_shape']))} | {r['rank']} | {r['dense']['p50_ms']:.4f} | "
                  f"{r['factored']['p50_ms']:.4f} | {r['speedup']:.2f}x{' (slower)' if r['slower'] else ''} | "
                  f"{'kept dense' if r['layer'] in kept else 'factored'} |")

    def kept_line(res: dict[str, Any]) -> str:
        ks = res["kept_dense"]
        shown = ", ".join(f"`{k['layer']}` ({k['factored_ms']:.3f} vs {k['dense_ms']:.3f} ms)" for k in ks[:6])
        more = f", and {len(ks) - 6} more (speed.json lists them)" if len(ks) > 6 else ""
        return f"* {res['model']} @ {res['rank_ratio']}: {len(ks)} kept dense" + (f": {shown}{more}" if ks else "")

    lname, lpx, lratio = data["layer_model"]
    md = f"""# Speed: factored latency, latency-aware factorization, NKP's cost next to spectral

{data['header']}
Mode: {data['mode']}; one intra-op thread (`torch.set_num_threads(1)`; scipy's LAPACK follows it);
total {data['total_s']:.0f} s. Produced by `python -m bench {'--quick ' if quick else ''}speed` (bench/speed.py).

## 1. NKP versus spectral, time (goal: NKP at most {GOAL}x spectral; same run, interleaved)

Each cell lists every run; the ratio compares the fastest of each. NKP runs with its defaults (float32
products for matrices with m d r >= 2^16, float64 answer and error; core/nkp.py).

{chr(10).join(t1)}

Whole networks (ImageNet heads; every conv but the stem and depthwise ones, `factorize_model` as
`lowrank factorize` runs it, including each layer's fresh init and the layer surgery). The last two
columns compare NKP's errors with the float64 path (`precision="float64"`: float64 products from
exactly spectral's subspace, the algorithm before issue 17 apart from its stopping rule); goal: within
{ERROR_GOAL:.0e} relative on every layer.

{chr(10).join(t2)}

## 2. Forward latency on the CPU, end to end (eval mode, 1 thread, p50 of {data['repeats']} interleaved samples)

`compare_latency` (what `lowrank latency --latency-aware --threads 1` prints): dense, factored at the
ratio (every conv but the stem and depthwise ones), and latency-aware factored (a layer stays dense
unless its factored form is faster at batch 1, measured: each side's fastest sample). Speed-ups are
dense p50 / variant p50; the small-image stem (3x3, stride 1) at 32 px (CIFAR-sized inputs; 224 px
runs in bench/gpu_speed_check.py). Where nothing was kept dense the factored and latency-aware
networks are the same network: their difference is this machine's measurement noise.

{chr(10).join(t3)}

Layers the latency-aware option kept dense (factored vs dense ms at batch 1, fastest samples):

{chr(10).join(kept_line(res) for res in lat)}

## 3. Per layer: {lname} at {lpx} px, ratio {lratio}, batch 1

Each factored layer against its dense original, isolated, on its real input shape (forward hooks).

{chr(10).join(t4)}

![per-layer latency and NKP / spectral time](speed.png)

## What this run shows

{reading(mat_rows, fact_rows, lat)}
"""
    path = write_result("speed", md, data=data)
    print(f"wrote {path}")


if __name__ == "__main__":  # python -m bench.speed --render: rewrite speed.md / .png from speed.json
    import json
    import sys

    if sys.argv[1:] != ["--render"]:
        sys.exit("usage: python -m bench.speed --render   (measuring runs through `python -m bench speed`)")
    from bench import common

    saved = json.loads((RESULTS / "speed.json").read_text())["data"]
    common.MODE = saved["mode"]
    write(saved)
