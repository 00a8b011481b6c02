"""Compressing a trained network (issue 13): which method keeps the accuracy at a budget, with and without fine-tuning.

Writes docs/results/compress.md, compress.png and compress.json.

1. Source: a dense ResNet-18 trained on digits with the shipped `digits` recipe (what `lowrank train
   --model resnet18 --dataset digits --init dense` runs), trained once and cached under
   bench/_out/cache/ (keyed by its resolved config).
2. Grid: `core.compress_run.run_compress` with its defaults (256 calibration images, 64 held out,
   64 positions per image and layer, eps 1e-6, BN re-estimation) for every budget x method x
   allocation x calibration seed, refine off, then 1 fine-tuning epoch with the digits recipe (the
   default `finetune`): top-1 before fine-tuning (after BN re-estimation) and after it, mean ± std
   over seeds, and each method minus spectral paired by seed (same budget and allocation) with the
   95% Student t interval (core.paired). Per-layer held-out errors summarized; wall time and peak
   memory per job.
3. Refine: `sequential` (100 Adam steps per layer, the default) on one budget and allocation.
4. Whole-network compression of ResNet-50 and EfficientNet-B0 (random weights: the statistics'
   size, not the accuracy, is the point) on synthetic calibration images: time and peak memory.

Every job runs in a fresh process (spawned, one intra-op thread), so its peak resident memory
(`ru_maxrss`) is its own. The full grid of the issue (budgets 0.5/0.25/0.1, refine off and
sequential everywhere, 3 seeds) needs about 4 h of one core here; the run says what it cut.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, environment_header, write_result

CACHE = Path(__file__).resolve().parent / "_out" / "cache" / "compress"
METHODS = ("spectral", "nkp", "whiten", "asvd", "nkp-data")
DENSE_RUN = dict(model="resnet18", dataset="digits", init="dense", device="cpu")  # + the digits recipe
# The grid (budgets x methods x allocation x seeds) plus extra cells: greedy allocation and refine sequential for
# some methods. A job costs 2-5 minutes of one loaded core here (eigendecompositions of up to 4608 x 4608 second
# moments in every calibration pass), so the full run is a slice of the grid (CUT says what is left out).
FULL = {"dense_epochs": None, "budgets": [0.25, 0.1], "methods": list(METHODS), "allocations": ["uniform"],
        "seeds": [0, 1], "finetune_epochs": 1, "include": None, "finetune": {}, "calib": {},
        "greedy_methods": ["spectral", "whiten"], "refine_budget": 0.1, "refine_methods": ["spectral", "whiten"],
        "refine_steps": 100, "big_models": ["resnet50", "efficientnet_b0"], "big_image_size": 64, "big_calib": 128,
        "big_heldout": 32, "big_methods": ["whiten"]}
# A smoke run: two methods, one seed, layer1-2 only (small second moments), 64 calibration images, 2 fine-tuning
# steps, a short refine.
QUICK = {"dense_epochs": 1, "budgets": [0.25], "methods": ["spectral", "whiten"], "allocations": ["uniform"],
         "seeds": [0], "finetune_epochs": 1, "include": ["layer1", "layer2"], "finetune": {"max_train_batches": 2},
         "calib": {"calib_images": 64, "heldout_images": 16},
         "greedy_methods": ["whiten"], "refine_budget": 0.25, "refine_methods": ["spectral"], "refine_steps": 10,
         "big_models": ["efficientnet_b0"], "big_image_size": 32, "big_calib": 16, "big_heldout": 8,
         "big_methods": ["whiten"]}
CUT = ("budget 0.5; the third seed; greedy allocation for nkp, asvd and nkp-data; refine `independent`; refine "
       "`sequential` beyond spectral and whiten at budget 0.1 (uniform); nkp-data on the big networks")


# ----------------------------------------------------------------------------- one job, in a fresh process

def _job(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run in a spawned process: a compression (`run_compress(spec)`) or the dense training; peak RSS."""
    import resource

    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if kind == "train":
        from core.train import train

        summary = train(spec["config"], checkpoint_dir=spec["checkpoint_dir"])
        out = {"val_top1": summary["val_top1"], "config": summary["config"], "history": summary["history"]}
    else:
        from core.compress_run import run_compress

        report = run_compress(spec).report
        layers = [r for r in report["layers"] if r["status"] == "factored"]
        out = {"top1": report["top1"], "totals": report["totals"], "calibration": report["calibration"],
               "finetune": report["finetune"], "source": report["source"]["model"],
               "layers": [{"layer": r["layer"], "rank": r["rank"], "m": r["m"], "d": r["d"], **r["errors"]}
                          for r in layers]}
    out["wall_s"] = time.perf_counter() - t0
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return out


def run_fresh(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_job, kind, spec).result()


def _code_key() -> str:
    """A hash of core/'s sources: a cached job result is reused only while the code that made it is unchanged."""
    digest = hashlib.sha256()
    for f in sorted((Path(__file__).resolve().parent.parent / "core").glob("*.py")):
        digest.update(f.name.encode() + f.read_bytes())
    return digest.hexdigest()[:12]


def run_cached(spec: dict[str, Any]) -> dict[str, Any]:
    """run_fresh("compress", spec), its result kept under CACHE/jobs (an interrupted run resumes where it stopped)."""
    key = hashlib.sha256(json.dumps([spec, _code_key()], sort_keys=True).encode()).hexdigest()[:16]
    path = CACHE / "jobs" / f"{key}.json"
    if path.exists():
        return {**json.loads(path.read_text()), "cached": True}
    res = run_fresh("compress", spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res))
    return {**res, "cached": False}


# ----------------------------------------------------------------------------- 1. the dense source

def dense_source(cfg: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The cached dense checkpoint (trained here when missing) and its training facts."""
    from core.train import TrainConfig

    extra = {} if cfg["dense_epochs"] is None else {"epochs": cfg["dense_epochs"]}
    config = TrainConfig.from_dict(dict(DENSE_RUN, **extra)).to_dict()
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    folder = CACHE / f"resnet18-digits-dense-{key}"
    facts_path = folder / "facts.json"
    if not facts_path.exists():
        print(f"training the dense source into {folder}", flush=True)
        res = run_fresh("train", {"config": config, "checkpoint_dir": str(folder)})
        facts_path.write_text(json.dumps({"val_top1": res["val_top1"], "config": res["config"],
                                          "train_s": res["wall_s"]}))
    facts = json.loads(facts_path.read_text())
    facts["cached"] = folder.name
    return folder / "last.pt", facts


# ----------------------------------------------------------------------------- 2./3. the grid

def grid(cfg: dict[str, Any], source: Path) -> list[dict[str, Any]]:
    jobs = []
    for s in cfg["seeds"]:  # methods interleaved: a slow spell of the shared machine hits all of them
        for b in cfg["budgets"]:
            jobs += [dict(budget=b, method=m, allocation=a, seed=s, refine="off")
                     for a in cfg["allocations"] for m in cfg["methods"]]
            jobs += [dict(budget=b, method=m, allocation="greedy", seed=s, refine="off")
                     for m in cfg["greedy_methods"] if "greedy" not in cfg["allocations"]]
        jobs += [dict(budget=cfg["refine_budget"], method=m, allocation="uniform", seed=s, refine="sequential",
                      refine_steps=cfg["refine_steps"]) for m in cfg["refine_methods"]]
    runs = []
    for i, job in enumerate(jobs):
        spec = dict(job, source=str(source), dataset="digits", device="cpu", finetune_epochs=cfg["finetune_epochs"])
        if cfg["include"]:
            spec["include"] = cfg["include"]
        if cfg["finetune"]:
            spec["finetune"] = cfg["finetune"]
        spec.update(cfg["calib"])
        res = run_cached(spec)
        run = {**job, "top1_dense": res["top1"]["dense"], "top1_before_bn": res["top1"]["compressed_before_bn"],
               "top1": res["top1"]["compressed"], "top1_ft": res["top1"]["finetuned"][-1],
               "budget_used": res["totals"]["budget_used"], "param_ratio": res["totals"]["param_ratio"],
               "mean_block": res["totals"]["mean_block_error"], "mean_linear": res["totals"]["mean_linear_error"],
               "mean_surrogate": res["totals"]["mean_surrogate_error"],
               "max_block": max(row["block"] for row in res["layers"]),
               "worst_layer": max(res["layers"], key=lambda row: row["block"])["layer"],
               "compress_s": res["totals"]["time_s"], "finetune_s": res["finetune"]["time_s"],
               "wall_s": res["wall_s"], "peak_rss_mb": res["peak_rss_mb"], "cached": res["cached"],
               "stats_peak_mb": max((c["peak_group_bytes"] for c in res["calibration"].values()
                                     if isinstance(c, dict)), default=0) / 2**20,
               "ranks": {row["layer"]: row["rank"] for row in res["layers"]},
               "layer_errors": {row["layer"]: [row["block"], row["linear"], row["surrogate"]] for row in res["layers"]}}
        runs.append(run)
        print(f"[{i + 1}/{len(jobs)}] budget {run['budget']} {run['allocation']} {run['method']} refine {run['refine']} "
              f"seed {run['seed']}: top-1 {run['top1']:.4f} -> fine-tuned {run['top1_ft']:.4f}; mean block error "
              f"{run['mean_block']:.4f}; {run['wall_s']:.0f} s, {run['peak_rss_mb']:.0f} MB", flush=True)
    return runs


def _ms(xs: list[float], digits: int = 4) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def _cells(runs: list[dict[str, Any]], **where: Any) -> list[dict[str, Any]]:
    return [r for r in runs if all(r[k] == v for k, v in where.items())]


def accuracy_table(runs: list[dict[str, Any]], refine: str) -> str:
    lines = ["| budget | allocation | method | n | top-1 before fine-tuning | top-1 after fine-tuning | "
             "mean block error | mean linear error | mean surrogate | worst layer (block error) | "
             "params / dense | wall s | peak MB |", "|---" * 13 + "|"]
    keys = dict.fromkeys((r["budget"], r["allocation"], r["method"]) for r in runs if r["refine"] == refine)
    for b, a, m in keys:
        rs = _cells(runs, budget=b, allocation=a, method=m, refine=refine)
        worst = max(rs, key=lambda r: r["max_block"])
        lines.append(f"| {b} | {a} | {m} | {len(rs)} | {_ms([r['top1'] for r in rs])} | "
                     f"{_ms([r['top1_ft'] for r in rs])} | {_ms([r['mean_block'] for r in rs])} | "
                     f"{_ms([r['mean_linear'] for r in rs])} | {_ms([r['mean_surrogate'] for r in rs])} | "
                     f"{worst['worst_layer']} ({worst['max_block']:.3f}) | {statistics.mean(r['param_ratio'] for r in rs):.3f} | "
                     f"{statistics.mean(r['wall_s'] for r in rs):.0f} | {max(r['peak_rss_mb'] for r in rs):.0f} |")
    return "\n".join(lines)


def stage_table(runs: list[dict[str, Any]]) -> str:
    """Mean held-out block error per ResNet stage (layer1..layer4) per budget, allocation and method (refine off)."""
    off = [r for r in runs if r["refine"] == "off"]
    stages = sorted({name.split(".")[0] for r in off for name in r["layer_errors"]})
    lines = ["| budget | allocation | method | " + " | ".join(f"{s} block error" for s in stages) + " |",
             "|---" * (3 + len(stages)) + "|"]
    for b, a, m in dict.fromkeys((r["budget"], r["allocation"], r["method"]) for r in off):
        rs = _cells(off, budget=b, allocation=a, method=m)
        cols = []
        for st in stages:
            xs = [e[0] for r in rs for name, e in r["layer_errors"].items() if name.split(".")[0] == st]
            cols.append(f"{statistics.mean(xs):.3f}" if xs else "-")
        lines.append(f"| {b} | {a} | {m} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def paired_rows(runs: list[dict[str, Any]], refine: str = "off") -> list[dict[str, Any]]:
    """Each method minus spectral (same budget, allocation, refine), paired by seed, before and after fine-tuning."""
    from core.paired import paired_difference

    rows = []
    keys = dict.fromkeys((r["budget"], r["allocation"]) for r in runs if r["refine"] == refine)
    for b, a in keys:
        base = _cells(runs, budget=b, allocation=a, method="spectral", refine=refine)
        for m in dict.fromkeys(r["method"] for r in runs if r["method"] != "spectral"):
            mine = _cells(runs, budget=b, allocation=a, method=m, refine=refine)
            if not mine or not base:
                continue
            row = {"budget": b, "allocation": a, "method": m, "refine": refine}
            for stage, key in (("before", "top1"), ("after", "top1_ft")):
                d = paired_difference({r["seed"]: r[key] for r in mine}, {r["seed"]: r[key] for r in base})
                row[stage] = {"mean": d.mean, "std": d.std, "n": d.n, "ci_low": d.ci_low, "ci_high": d.ci_high,
                              "significant": d.significant}
            rows.append(row)
    return rows


def _diff(d: dict[str, Any]) -> str:
    ci = "" if d["ci_low"] is None else f" [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"
    return f"{d['mean']:+.4f}{ci}{' *' if d['significant'] else ''}"


def paired_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| budget | allocation | refine | method | n | minus spectral, before fine-tuning (95% CI) | "
             "minus spectral, after fine-tuning (95% CI) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['budget']} | {r['allocation']} | {r['refine']} | {r['method']} | {r['before']['n']} | "
                     f"{_diff(r['before'])} | {_diff(r['after'])} |")
    return "\n".join(lines)


def allocation_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """greedy minus uniform (same budget and method), paired by seed, before fine-tuning."""
    from core.paired import paired_difference

    rows = []
    for b in dict.fromkeys(r["budget"] for r in runs if r["refine"] == "off"):
        for m in dict.fromkeys(r["method"] for r in runs):
            g = {r["seed"]: r["top1"] for r in _cells(runs, budget=b, method=m, allocation="greedy", refine="off")}
            u = {r["seed"]: r["top1"] for r in _cells(runs, budget=b, method=m, allocation="uniform", refine="off")}
            if g and u:
                d = paired_difference(g, u)
                rows.append({"budget": b, "method": m, "mean": d.mean, "std": d.std, "n": d.n, "ci_low": d.ci_low,
                             "ci_high": d.ci_high, "significant": d.significant})
    return rows


def refine_rows(runs: list[dict[str, Any]], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """sequential minus off (same budget, allocation, method), paired by seed."""
    from core.paired import paired_difference

    rows = []
    b, a = cfg["refine_budget"], "uniform"
    for m in cfg["refine_methods"]:
        on = {r["seed"]: r for r in _cells(runs, budget=b, allocation=a, method=m, refine="sequential")}
        off = {r["seed"]: r for r in _cells(runs, budget=b, allocation=a, method=m, refine="off")}
        if not on or not off:
            continue
        row = {"budget": b, "allocation": a, "method": m}
        for stage, key in (("before", "top1"), ("after", "top1_ft"), ("block", "mean_block")):
            d = paired_difference({s: r[key] for s, r in on.items()}, {s: r[key] for s, r in off.items()})
            row[stage] = {"mean": d.mean, "std": d.std, "n": d.n, "ci_low": d.ci_low, "ci_high": d.ci_high,
                          "significant": d.significant}
        row["extra_s"] = statistics.mean(r["compress_s"] for r in on.values()) - statistics.mean(
            r["compress_s"] for s, r in off.items() if s in on)
        rows.append(row)
    return rows


def surrogate_agreement(runs: list[dict[str, Any]]) -> tuple[int, int]:
    """In how many (budget, allocation, seed) cells the methods' order by the Gaussian-surrogate error is their
    order by the empirical block error (both held-out means); and how many cells."""
    agree = total = 0
    for key in dict.fromkeys((r["budget"], r["allocation"], r["seed"]) for r in runs if r["refine"] == "off"):
        rs = _cells(runs, budget=key[0], allocation=key[1], seed=key[2], refine="off")
        if len(rs) < 2:
            continue
        total += 1
        by_block = [r["method"] for r in sorted(rs, key=lambda r: r["mean_block"])]
        by_surr = [r["method"] for r in sorted(rs, key=lambda r: r["mean_surrogate"])]
        agree += by_block == by_surr
    return agree, total


# ----------------------------------------------------------------------------- 4. big networks

def big_models(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Whole ResNet-50 / EfficientNet-B0 compression, random ImageNet-head weights, synthetic images."""
    import torch

    from core.models import build_model

    CACHE.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in cfg["big_models"]:
        path = CACHE / f"{name}-random.pt"
        if not path.exists():
            torch.manual_seed(0)
            torch.save(build_model(name, num_classes=1000).state_dict(), path)
        for method in cfg["big_methods"]:
            spec = dict(source=str(path), model=name, dataset="synthetic", image_size=cfg["big_image_size"],
                        synthetic_train_size=cfg["big_calib"] + cfg["big_heldout"], synthetic_val_size=32,
                        calib_images=cfg["big_calib"], heldout_images=cfg["big_heldout"], calib_batch_size=16,
                        max_val_batches=1, method=method, budget=0.25, device="cpu")
            res = run_cached(spec)
            cal = res["calibration"]
            row = {"model": name, "method": method, "layers": res["totals"]["layers_factored"],
                   "max_d": max(row["d"] for row in res["layers"]), "wall_s": res["wall_s"],
                   "compress_s": res["totals"]["time_s"], "peak_rss_mb": res["peak_rss_mb"], "cached": res["cached"],
                   "stats_peak_mb": max(c["peak_group_bytes"] for c in cal.values() if isinstance(c, dict)) / 2**20,
                   "passes": {k: c["passes"] for k, c in cal.items() if isinstance(c, dict)},
                   "stage_s": {k: c["time_s"] for k, c in cal.items() if isinstance(c, dict)},
                   "params_ratio": res["totals"]["param_ratio"], "budget_used": res["totals"]["budget_used"],
                   "mean_block": res["totals"]["mean_block_error"]}
            rows.append(row)
            print(f"{name} {method}: {row['wall_s']:.0f} s, peak RSS {row['peak_rss_mb']:.0f} MB, statistics "
                  f"{row['stats_peak_mb']:.0f} MB", flush=True)
    return rows


def big_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | method | layers factored | largest in*kh*kw | compress time (s) | job wall (s) | "
             "calibration passes (allocate / factor / evaluate) | second moments held at once (MB) | "
             "peak RSS of the job (MB) | params / dense |", "|---" * 10 + "|"]
    for r in rows:
        passes = " / ".join(str(r["passes"].get(k, "-")) for k in ("allocate", "factor", "evaluate"))
        lines.append(f"| {r['model']} | {r['method']} | {r['layers']} | {r['max_d']} | {r['compress_s']:.0f} | "
                     f"{r['wall_s']:.0f} | {passes} | {r['stats_peak_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['params_ratio']:.3f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plot and reading

def plot(runs: list[dict[str, Any]], dense_top1: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    off = [r for r in runs if r["refine"] == "off"]
    budgets = list(dict.fromkeys(r["budget"] for r in off))
    methods = list(dict.fromkeys(r["method"] for r in off))
    allocs = list(dict.fromkeys(r["allocation"] for r in off))
    fig, axes = plt.subplots(len(budgets), 2, figsize=(11, 3.2 * len(budgets)), sharey="row", squeeze=False)
    width = 0.8 / len(allocs)
    for i, b in enumerate(budgets):
        for j, (key, title) in enumerate((("top1", "before fine-tuning"), ("top1_ft", "after 1 fine-tuning epoch"))):
            ax = axes[i][j]
            for k, a in enumerate(allocs):
                means, stds = [], []
                for m in methods:
                    xs = [r[key] for r in _cells(off, budget=b, method=m, allocation=a)]
                    means.append(statistics.mean(xs) if xs else float("nan"))  # no bar: not run
                    stds.append(statistics.stdev(xs) if len(xs) > 1 else 0.0)
                ax.bar([x + k * width for x in range(len(methods))], means, width, yerr=stds, capsize=3, label=a)
            ax.axhline(dense_top1, color="k", ls="--", lw=1, label="dense")
            ax.set_xticks([x + width * (len(allocs) - 1) / 2 for x in range(len(methods))], methods)
            ax.set_title(f"budget {b}: {title}", fontsize=10)
            ax.set_ylim(0, 1.02)
        axes[i][0].set_ylabel("val top-1")
    axes[0][1].legend(fontsize=8, loc="lower right")
    fig.suptitle("ResNet-18 on digits compressed (mean ± std over calibration seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reading(runs: list[dict[str, Any]], paired: list[dict[str, Any]], alloc: list[dict[str, Any]],
            refine: list[dict[str, Any]], agree: tuple[int, int], dense_top1: float) -> str:
    """The conclusions, written from this run's numbers (nothing typed in by hand)."""
    out = []
    off = [r for r in runs if r["refine"] == "off"]
    for b in dict.fromkeys(r["budget"] for r in off):
        for stage, key in (("before fine-tuning", "top1"), ("after 1 fine-tuning epoch", "top1_ft")):
            cells = {(a, m): statistics.mean(r[key] for r in rs)
                     for a in dict.fromkeys(r["allocation"] for r in off) for m in dict.fromkeys(r["method"] for r in off)
                     if (rs := _cells(off, budget=b, allocation=a, method=m))}
            (a, m), best = max(cells.items(), key=lambda kv: kv[1])
            worst = min(cells.items(), key=lambda kv: kv[1])
            nkp = {k: v for k, v in cells.items() if k[1] in ("nkp", "nkp-data")}
            nkp_best = max(nkp.items(), key=lambda kv: kv[1]) if nkp else None
            line = (f"* Budget {b}, {stage}: best {m} + {a} ({best:.4f}; dense {dense_top1:.4f}), worst "
                    f"{worst[0][1]} + {worst[0][0]} ({worst[1]:.4f}).")
            if nkp_best and nkp_best[0][1] != m:
                line += (f" NKP does not win here: its best cell, {nkp_best[0][1]} + {nkp_best[0][0]}, is at "
                         f"{nkp_best[1]:.4f} ({nkp_best[1] - best:+.4f}).")
            elif nkp_best:
                line += " An NKP method wins this cell."
            out.append(line)
    for b in dict.fromkeys(r["budget"] for r in off):
        err = {m: statistics.mean(r["mean_block"] for r in rs) for m in dict.fromkeys(r["method"] for r in off)
               if (rs := _cells(off, budget=b, allocation="uniform", method=m))}
        pairs = [(x, y) for x, y in (("nkp", "spectral"), ("nkp-data", "whiten")) if x in err and y in err]
        if pairs:
            out.append(f"* Budget {b}, uniform, mean held-out block error, NKP against the method it refines: " + "; ".join(
                f"{x} {err[x]:.4f} vs {y} {err[y]:.4f} ({err[x] / err[y]:.3f}x, "
                f"{'lower' if err[x] < err[y] else 'higher'})" for x, y in pairs) + ".")
    sig = [p for p in paired if p["before"]["significant"] or p["after"]["significant"]]
    if paired:
        n = paired[0]["before"]["n"]
        parts = [f"{p['method']} at {p['budget']}/{p['allocation']} ({_diff(p['before'])} before, "
                 f"{_diff(p['after'])} after)" for p in sig]
        out.append(f"* Paired by seed against spectral (n = {n}; `*` = the 95% interval excludes 0): "
                   + ("; ".join(parts) if parts else "no difference is significant") + "."
                   + {1: " One seed: no interval.", 2: " With n = 2 an interval is wide (t = 12.7): only large, "
                                                        "consistent differences show."}.get(n, ""))
    if alloc:
        parts = [f"{a['method']} at {a['budget']}: {a['mean']:+.4f}" + (" *" if a["significant"] else "")
                 for a in alloc]
        out.append("* greedy minus uniform allocation, top-1 before fine-tuning, paired by seed: " + "; ".join(parts)
                   + ".")
    for r in refine:
        out.append(f"* Refine sequential on {r['method']} (budget {r['budget']}, {r['allocation']}): top-1 "
                   f"{_diff(r['before'])} before and {_diff(r['after'])} after fine-tuning, mean block error "
                   f"{_diff(r['block'])}, {r['extra_s']:+.0f} s per job.")
    if agree[1]:
        out.append(f"* The Gaussian surrogate orders the methods as the held-out block error does in {agree[0]} of "
                   f"{agree[1]} (budget, allocation, seed) cells.")
    return "\n".join(out)


# ----------------------------------------------------------------------------- report

def run(quick: bool) -> None:
    cfg = QUICK if quick else FULL
    t0 = time.perf_counter()
    source, facts = dense_source(cfg)
    runs = grid(cfg, source)
    big = big_models(cfg)
    total = time.perf_counter() - t0
    dense_top1 = runs[0]["top1_dense"]
    paired = paired_rows(runs, "off")
    alloc = allocation_rows(runs)
    refine = refine_rows(runs, cfg)
    agree = surrogate_agreement(runs)
    plot(runs, dense_top1, RESULTS / "compress.png")
    recipe = facts["config"]
    ft = ", ".join(f"{k}={recipe[k]}" for k in ("batch_size", "lr", "momentum", "nesterov", "weight_decay", "schedule",
                                                 "warmup_epochs"))
    rlines = ["| budget | allocation | method | n | sequential minus off: top-1 before FT | after FT | mean block error "
              "| extra compress time (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in refine:
        rlines.append(f"| {r['budget']} | {r['allocation']} | {r['method']} | {r['before']['n']} | {_diff(r['before'])} | "
                      f"{_diff(r['after'])} | {_diff(r['block'])} | {r['extra_s']:+.0f} |")
    alines = ["| budget | method | n | greedy minus uniform, top-1 before FT (95% CI) |", "|---|---|---|---|"]
    for a in alloc:
        ci = "" if a["ci_low"] is None else f" [{a['ci_low']:+.4f}, {a['ci_high']:+.4f}]"
        alines.append(f"| {a['budget']} | {a['method']} | {a['n']} | {a['mean']:+.4f}{ci}"
                      f"{' *' if a['significant'] else ''} |")
    md = f"""# Compressing a trained network: methods, budgets, allocation, refine, fine-tuning

{environment_header()}
Mode: {'quick' if quick else 'full'}; every job in a fresh process with one intra-op thread. {len(runs) + len(big)} jobs,
their wall times summed {sum(r['wall_s'] for r in runs + big):.0f} s ({len(runs)} digits jobs
{sum(r['wall_s'] for r in runs):.0f} s); this report's run took {total:.0f} s and reused
{sum(r['cached'] for r in runs + big)} job results cached by an earlier, interrupted or identical run (same
spec, same core/ sources). Produced by `python -m bench {'--quick ' if quick else ''}compress` (bench/compress.py).

Source: ResNet-18 trained dense on digits with the shipped recipe ({recipe['epochs']} epoch(s), recipe
{recipe['recipe']}, {recipe['image_size']} px), val top-1 {facts['val_top1']:.4f}; cached as
`bench/_out/cache/compress/{facts['cached']}`. Each job is `core.compress_run.run_compress` with its
defaults (256 calibration images, 64 held out, 64 positions per image and layer, eps 1e-6, BN
re-estimated on the calibration images) and the row's budget, method, allocation, refine and
calibration seed, then {cfg['finetune_epochs']} fine-tuning epoch(s) with the digits recipe ({ft}; BN
re-estimated before each evaluation). Top-1 is on the 360 validation images (one image = 0.0028).
Budget = fraction of the factorable layers' weights kept (stem and classifier stay dense).
{'' if quick else f"Cut from the issue's grid to fit the shared two-core machine: {CUT}."}

## 1. Accuracy and errors per method (refine off; mean ± std over seeds {cfg['seeds']})
{'' if not quick else f"Quick run: only the layers {cfg['include']} are compressed, with {cfg['calib']}, and fine-tuning is cut to {cfg['finetune']}."}

Errors: held-out normalized block-output / linear errors and the Gaussian-surrogate prediction,
averaged over the factored layers (MATH.md Section 8); the worst layer is the largest block error
over the seeds. Wall s: the whole job (loading, dense top-1, compression, BN, fine-tuning); peak MB:
the job process's peak resident memory.

{accuracy_table(runs, 'off')}

![top-1 per method](compress.png)

Per-layer held-out block errors by stage (mean over the stage's factored layers and the seeds):

{stage_table(runs)}

## 2. Paired differences to spectral (same budget, allocation and seed; 95% Student t interval; * excludes 0)

{paired_table(paired)}

## 3. Allocation: greedy minus uniform

{chr(10).join(alines)}

## 4. Refine sequential (budget {cfg['refine_budget']}, uniform, {cfg['refine_steps']} Adam steps per layer; seeds {cfg['seeds']})

{accuracy_table(runs, 'sequential')}

{chr(10).join(rlines)}

## 5. Whole ResNet-50 and EfficientNet-B0: time and memory

Random ImageNet-head weights (1000 classes), {cfg['big_calib']} synthetic calibration images and
{cfg['big_heldout']} held out at {cfg['big_image_size']} px (the second moments' size depends on the layers, not the
image size; the time does), budget 0.25, uniform allocation, default `max_group_mb` 1024: layers
are calibrated in groups whose second moments (float64, `d x d` per layer) fit it.

{big_table(big)}

## What this run shows

{reading(runs, paired, alloc, refine, agree, dense_top1)}
"""
    data = {"dense": facts, "runs": runs, "paired_vs_spectral": paired, "greedy_minus_uniform": alloc,
            "refine": refine, "surrogate_agreement": list(agree), "big": big, "cut": None if quick else CUT,
            "config": cfg}
    path = write_result("compress", md, data=data)
    print(f"wrote {path}")
