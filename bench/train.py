"""Factored networks (issue 3): factorize time, CPU training throughput, digits accuracy per init, BN caveat.

Writes docs/results/train.md and train_digits.png.

1. Whole-network factorize time: ResNet-50 and EfficientNet-B0, NKP versus spectral at rank
   ratios 0.1 / 0.25 / 0.5 (quick: 0.25), interleaved in one run; mean per-layer error of each.
2. Training throughput on CPU (images/s of forward + backward + SGD step on a fixed batch),
   dense versus factored at ratios 0.1 / 0.25 / 0.5, with the MAC and parameter ratios beside it.
3. Digits (scikit-learn, 1437 train / 360 val): ResNet-18 trained with the shipped `digits` recipe
   (core/recipes.py, resolved by TrainConfig exactly as `lowrank train` and a job resolve it) at
   rank ratios 0.1 / 0.25 / 0.5 from random / spectral / rescale / nkp inits over seeds 0, 1, 2:
   validation accuracy per epoch, and nkp - spectral paired by seed with its 95% Student t
   interval per ratio (core.paired). Quick: ratio 0.25, spectral and nkp, seeds 0 and 1, 1 epoch.
4. The BatchNorm caveat (MATH.md Section 7): per-layer function error of each init on the
   layer's real input activations (digits images through the dense network at init), without
   and with the per-channel batch standardization that the following BatchNorm applies; how much
   of NKP's gain over spectral survives it.

CPU benchmarks run with one intra-op thread (stated in the table): on this shared two-core
machine two OpenMP threads per process oversubscribe the cores and make timings 3-10x noisier.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import RESULTS, environment_header, write_result
from core.factorize import candidate_layers, factorize_model, fresh_init_layer
from core.models import build_model, count_macs, count_params
from core.paired import paired_difference
from core.recipes import RECIPE_FIELDS
from core.surgery import get_module
from core.train import TrainConfig, train

# What the digits comparison chooses; everything else is the shipped digits recipe (core/recipes.py).
DIGITS_RUN = dict(model="resnet18", dataset="digits", device="cpu")
FULL = {"fact_ratios": [0.1, 0.25, 0.5], "fact_models": ["resnet50", "efficientnet_b0"],
        "tp_models": [("resnet18", 32, 64), ("resnet50", 64, 32), ("efficientnet_b0", 64, 32)],
        "tp_steps": 6, "digits_ratios": [0.1, 0.25, 0.5], "digits_inits": ["random", "spectral", "rescale", "nkp"],
        "digits_seeds": [0, 1, 2], "digits_epochs": None, "bn_images": 256, "bn_ratios": [0.1, 0.25]}
QUICK = {"fact_ratios": [0.25], "fact_models": ["efficientnet_b0"],  # a smoke run: about two minutes when idle
         "tp_models": [("resnet18", 32, 32)], "tp_steps": 2, "digits_ratios": [0.25], "digits_inits": ["spectral", "nkp"],
         "digits_seeds": [0, 1], "digits_epochs": 1, "bn_images": 64, "bn_ratios": [0.25]}


def _mean_std(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


# ----------------------------------------------------------------------------- 1. factorize time

def factorize_times(cfg: dict[str, Any]) -> tuple[str, list[str]]:
    lines = ["| model | ratio | layers factored | spectral time (s) | NKP time (s) | NKP / spectral time | "
             "spectral mean error | NKP mean error |", "|---|---|---|---|---|---|---|---|"]
    notes = []
    for name in cfg["fact_models"]:
        for ratio in cfg["fact_ratios"]:
            res = {}
            for method in ("spectral", "nkp"):
                torch.manual_seed(0)
                model = build_model(name, num_classes=1000)
                t0 = time.perf_counter()
                rep = factorize_model(model, rank_ratio=ratio, method=method, compare_spectral=False)
                res[method] = (time.perf_counter() - t0, rep.totals)
            (ts, s), (tn, n) = res["spectral"], res["nkp"]
            lines.append(f"| {name} | {ratio} | {s['layers_factored']} | {ts:.2f} | {tn:.2f} | {tn / ts:.2f} | "
                         f"{s['mean_error']:.4f} | {n['mean_error']:.4f} |")
            notes.append(f"{name} r={ratio}: NKP/spectral time {tn / ts:.2f}, error {n['mean_error'] / s['mean_error']:.3f}")
    return "\n".join(lines), notes


# ----------------------------------------------------------------------------- 2. throughput

def _images_per_s(model: nn.Module, size: int, batch: int, steps: int) -> float:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    step()  # warm-up (allocations, oneDNN kernel choice)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t0)


def throughput(cfg: dict[str, Any]) -> tuple[str, list[str]]:
    lines = ["| model | input | batch | variant | params | MACs / image | images/s | speed-up vs dense |",
             "|---|---|---|---|---|---|---|---|"]
    notes = []
    for name, size, batch in cfg["tp_models"]:
        variants = [("dense", None)] + [(f"factored {r}", r) for r in (0.1, 0.25, 0.5)]
        dense_ips = None
        for label, ratio in variants:
            torch.manual_seed(0)
            model = build_model(name, num_classes=10)
            if ratio is not None:
                factorize_model(model, rank_ratio=ratio, method="random", compare_spectral=False)
            macs, params = count_macs(model, (3, size, size)), count_params(model)
            ips = _images_per_s(model, size, batch, cfg["tp_steps"])
            dense_ips = dense_ips or ips
            lines.append(f"| {name} | {size} px | {batch} | {label} | {params / 1e6:.2f} M | {macs / 1e6:.0f} M | "
                         f"{ips:.0f} | {ips / dense_ips:.2f}x |")
            if ratio is not None:
                notes.append(f"{name} {label}: {ips / dense_ips:.2f}x dense images/s")
    return "\n".join(lines), notes


# ----------------------------------------------------------------------------- 3. digits accuracy

def digits_config(cfg: dict[str, Any], ratio: float, init: str, seed: int) -> TrainConfig:
    """The run `lowrank train --dataset digits --rank-ratio R --init I --seed S` makes (recipe resolved)."""
    epochs = {} if cfg["digits_epochs"] is None else {"epochs": cfg["digits_epochs"]}
    return TrainConfig.from_dict(dict(DIGITS_RUN, rank_ratio=ratio, init=init, seed=seed, **epochs))


def digits(cfg: dict[str, Any]) -> tuple[str, str, dict[str, Any], list[str]]:
    """Per (ratio, init, seed): val top-1 per epoch, mean per-layer init error, run time; nkp - spectral paired."""
    runs = []
    for ratio in cfg["digits_ratios"]:
        for seed in cfg["digits_seeds"]:
            for init in cfg["digits_inits"]:  # interleaved: a slow spell of the shared machine hits every init
                t0 = time.perf_counter()
                s = train(digits_config(cfg, ratio, init, seed))
                runs.append({"ratio": ratio, "init": init, "seed": seed, "curve": [h["val_top1"] for h in s["history"]],
                             "init_error": s["init_totals"]["mean_error"], "time_s": time.perf_counter() - t0,
                             "warnings": s["warnings"]})
                print(f"digits ratio {ratio} {init} seed {seed}: val top-1 {runs[-1]['curve'][-1]:.4f}", flush=True)
    epochs = len(runs[0]["curve"])
    lines = ["| ratio | init | mean per-layer init error | "
             + " | ".join(f"val top-1 after epoch {e + 1}" for e in range(epochs)) + " | run time (s) |",
             "|---" * (epochs + 4) + "|"]
    for ratio in cfg["digits_ratios"]:
        for init in cfg["digits_inits"]:
            mine = [r for r in runs if r["ratio"] == ratio and r["init"] == init]
            cols = [_mean_std([r["curve"][e] for r in mine]) for e in range(epochs)]
            lines.append(f"| {ratio} | {init} | {statistics.mean(r['init_error'] for r in mine):.4f} | "
                         + " | ".join(cols) + f" | {statistics.mean(r['time_s'] for r in mine):.1f} |")
    paired = []
    if {"nkp", "spectral"} <= set(cfg["digits_inits"]):
        for ratio in cfg["digits_ratios"]:
            final = {init: {r["seed"]: r["curve"][-1] for r in runs if r["ratio"] == ratio and r["init"] == init}
                     for init in ("nkp", "spectral")}
            d = paired_difference(final["nkp"], final["spectral"])
            paired.append({"ratio": ratio, "mean": d.mean, "std": d.std, "n": d.n, "ci_low": d.ci_low,
                           "ci_high": d.ci_high, "significant": d.significant})
    plines = ["| ratio | nkp - spectral, mean | std | n | 95% CI (Student t) | significant |", "|---|---|---|---|---|---|"]
    for p in paired:
        ci = "-" if p["ci_low"] is None else f"[{p['ci_low']:+.4f}, {p['ci_high']:+.4f}]"
        std = "-" if p["std"] is None else f"{p['std']:.4f}"
        plines.append(f"| {p['ratio']} | {p['mean']:+.4f} | {std} | {p['n']} | {ci} | "
                      f"{'yes' if p['significant'] else 'no'} |")
    notes = [f"digits ratio {ratio} {init}: final val top-1 "
             f"{_mean_std([r['curve'][-1] for r in runs if r['ratio'] == ratio and r['init'] == init])}"
             for ratio in cfg["digits_ratios"] for init in cfg["digits_inits"]]
    data = {"recipe": {k: getattr(digits_config(cfg, 0.25, "nkp", 0), k) for k in (*RECIPE_FIELDS, "recipe",
                                                                                  "image_size", "small_input")},
            "runs": runs, "paired_nkp_minus_spectral": paired}
    return "\n".join(lines), "\n".join(plines), data, notes


def plot_digits(runs: list[dict[str, Any]], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted({r["ratio"] for r in runs})
    fig, axes = plt.subplots(1, len(ratios), figsize=(max(6.0, 4.2 * len(ratios)), 3.6), sharey=True, squeeze=False)
    for ax, ratio in zip(axes[0], ratios):
        for init in dict.fromkeys(r["init"] for r in runs):
            curves = torch.tensor([r["curve"] for r in runs if r["ratio"] == ratio and r["init"] == init])
            mean, std = curves.mean(0), (curves.std(0) if len(curves) > 1 else torch.zeros(curves.shape[1]))
            x = list(range(1, curves.shape[1] + 1))
            ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=init)
        ax.set_title(f"rank ratio {ratio}", fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_xticks(x)
    axes[0][0].set_ylabel("validation top-1")
    axes[0][-1].legend()
    fig.suptitle("ResNet-18 on digits, shipped digits recipe (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- 4. BN caveat

@torch.no_grad()
def bn_caveat(cfg: dict[str, Any]) -> tuple[str, list[str], dict[float, dict[str, float]]]:
    """Per-layer errors of spectral / rescale / nkp on real activations, without and with BN's standardization."""
    from core.data import build_datasets

    train_ds, _, _ = build_datasets("digits")
    x = torch.stack([train_ds.images[i] for i in range(cfg["bn_images"])])
    torch.manual_seed(0)
    dense = build_model("resnet18")
    names = [n for n, _ in candidate_layers(dense)][1:-1]  # the layers factorize_model factors (no stem, no fc)
    for n in names:  # the dense network holds exactly the fresh inits the factors approximate
        get_module(dense, n).weight.copy_(fresh_init_layer(get_module(dense, n), n, 0).weight)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [get_module(dense, n).register_forward_hook(lambda m, i, o, n=n: inputs.__setitem__(n, i[0]))
             for n in names]
    dense.train()(x)  # BN with batch statistics: the network as training starts
    for h in hooks:
        h.remove()

    def errors(conv: nn.Conv2d, w_approx: torch.Tensor, inp: torch.Tensor) -> tuple[float, float]:
        kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
        y = F.conv2d(inp, conv.weight, **kw).double()
        y2 = F.conv2d(inp, w_approx, **kw).double()
        plain = (F.relu(y) - F.relu(y2)).pow(2).sum() / F.relu(y).pow(2).sum()

        def standardize(t: torch.Tensor) -> torch.Tensor:  # BN at init: gamma 1, beta 0, batch statistics
            return (t - t.mean((0, 2, 3), keepdim=True)) / (t.var((0, 2, 3), keepdim=True, unbiased=False) + 1e-5).sqrt()

        yb, y2b = standardize(y), standardize(y2)
        bn = (F.relu(yb) - F.relu(y2b)).pow(2).sum() / F.relu(yb).pow(2).sum()
        return float(plain), float(bn)

    methods = ("spectral", "rescale", "nkp")
    lines = ["| ratio | init | Gaussian inputs (closed form) | real activations, no BN | "
             "real activations, after BN standardization |", "|---|---|---|---|---|"]
    notes: list[str] = []
    gains_by_ratio: dict[float, dict[str, float]] = {}
    for ratio in cfg["bn_ratios"]:
        table: dict[str, dict[str, list[float]]] = {m: {"gauss": [], "plain": [], "bn": []} for m in methods}
        for method in methods:
            torch.manual_seed(0)
            fact = build_model("resnet18")
            rep = factorize_model(fact, rank_ratio=ratio, method=method, seed=0, compare_spectral=False)
            rows = {r.layer: r for r in rep.factored()}
            for n in names:
                if n not in rows:
                    continue
                plain, bn = errors(get_module(dense, n), get_module(fact, n).dense_weight(), inputs[n])
                table[method]["gauss"].append(rows[n].error)
                table[method]["plain"].append(plain)
                table[method]["bn"].append(bn)

        def mean(m: str, k: str) -> float:
            return statistics.mean(table[m][k])

        for m in methods:
            lines.append(f"| {ratio} | {m} | {mean(m, 'gauss'):.5f} | {mean(m, 'plain'):.5f} | {mean(m, 'bn'):.5f} |")
        gains = {k: 1 - mean("nkp", k) / mean("spectral", k) for k in ("gauss", "plain", "bn")}
        resc = {k: 1 - mean("rescale", k) / mean("spectral", k) for k in ("gauss", "plain", "bn")}
        lines.append(f"| {ratio} | NKP gain over spectral | {gains['gauss']:+.2%} | {gains['plain']:+.2%} | "
                     f"{gains['bn']:+.2%} |")
        lines.append(f"| {ratio} | rescale-only gain over spectral | {resc['gauss']:+.2%} | {resc['plain']:+.2%} | "
                     f"{resc['bn']:+.2%} |")
        survive = gains["bn"] / gains["plain"] if gains["plain"] > 0 else float("nan")
        gains_by_ratio[ratio] = {"nkp_" + k: v for k, v in gains.items()} | {"rescale_" + k: v for k, v in resc.items()}
        gains_by_ratio[ratio]["survive"] = survive
        notes.append(f"ratio {ratio}: NKP gain over spectral: Gaussian {gains['gauss']:+.2%}, activations "
                     f"{gains['plain']:+.2%}, after BN {gains['bn']:+.2%} ({survive:.0%} of the activation gain "
                     f"survives BN); rescale-only after BN {resc['bn']:+.2%}")
    return "\n".join(lines), notes, gains_by_ratio


def reading(gains: dict[float, dict[str, float]], digits_data: dict[str, Any]) -> str:
    """The conclusions, written from the numbers of this run (nothing here is typed in by hand)."""
    out = []
    for ratio, g in gains.items():
        out.append(f"* Ratio {ratio}: relative to spectral, NKP reduces the mean per-layer error by "
                   f"{g['nkp_gauss']:.2%} on Gaussian inputs and {g['nkp_plain']:.2%} on real activations; the "
                   f"row rescaling alone (`rescale`) accounts for {g['rescale_gauss']:.2%} / "
                   f"{g['rescale_plain']:.2%}. After BN's standardization `rescale` is at {g['rescale_bn']:+.2%} "
                   + ("(BN cancels the rescaling, as MATH.md Section 7 predicts)"
                      if abs(g["rescale_bn"]) <= 0.2 * abs(g["rescale_plain"])
                      else "(BN does not cancel the rescaling here, against MATH.md Section 7's prediction)")
                   + f" and NKP at {g['nkp_bn']:+.2%}: "
                   f"{g['survive']:.0%} of NKP's gain on activations survives BN, the part its subspace brings.")
    paired = digits_data["paired_nkp_minus_spectral"]
    if paired:
        sig = [p for p in paired if p["significant"]]
        parts = [f"ratio {p['ratio']}: {p['mean']:+.4f}" + (f", 95% CI [{p['ci_low']:+.4f}, {p['ci_high']:+.4f}]"
                                                             if p["ci_low"] is not None else " (one seed: no interval)")
                 for p in paired]
        verdict = ("**No difference is significant**: every 95% interval contains 0, so on digits this run cannot "
                   "tell NKP's final accuracy from spectral's." if not sig else
                   "**Significant** (the 95% interval excludes 0) at ratio "
                   + ", ".join(f"{p['ratio']} ({'NKP better' if p['mean'] > 0 else 'spectral better'})" for p in sig)
                   + "; not significant at the other ratios.")
        out.append(f"* Digits, nkp - spectral final val top-1, paired by seed (n = {paired[0]['n']}): "
                   + "; ".join(parts) + ". " + verdict)
    runs = digits_data["runs"]
    finals = [f"ratio {ratio} " + ", ".join(
        f"{init} {_mean_std([r['curve'][-1] for r in runs if r['ratio'] == ratio and r['init'] == init])}"
        for init in dict.fromkeys(r["init"] for r in runs)) for ratio in dict.fromkeys(r["ratio"] for r in runs)]
    warned = [r for r in runs if r["warnings"]]
    out.append("* Final accuracies (mean ± std over seeds): " + "; ".join(finals) + "."
               + (f" {len(warned)} run(s) ended at chance level." if warned else " No run ended at chance level.")
               + ("" if not any(r["init"] == "random" for r in runs) else
                  " The `random` init draws U, V so that U V has the entry variance of the layer's own full-rank "
                  "init (core/approx.py); its function error is that of an independent draw, not of an approximation."))
    return "\n".join(out)


# ----------------------------------------------------------------------------- report

def run(quick: bool) -> None:
    cfg = QUICK if quick else FULL
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        fact_table, n1 = factorize_times(cfg)
        print("\n".join(n1), flush=True)
        tp_table, n2 = throughput(cfg)
        print("\n".join(n2), flush=True)
        bn_table, n4, gains = bn_caveat(cfg)
        print("\n".join(n4), flush=True)
        t3 = time.perf_counter()
        dig_table, paired_table, digits_data, n3 = digits(cfg)
        digits_s = time.perf_counter() - t3
        print("\n".join(n3), flush=True)
        plot_digits(digits_data["runs"], RESULTS / "train_digits.png")
        total = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)

    recipe = ", ".join(f"{k}={v}" for k, v in digits_data["recipe"].items())
    epochs = len(digits_data["runs"][0]["curve"])
    cut = "" if cfg["digits_epochs"] is None else f" (cut to {epochs} for the quick run)"
    md = f"""# Factored networks: factorize time, throughput, digits accuracy, the BatchNorm caveat

{environment_header()}
Mode: {'quick' if quick else 'full'}; one intra-op thread (`torch.set_num_threads(1)`); total {total:.0f} s.
Produced by `python -m bench {'--quick ' if quick else ''}train` (bench/train.py).

## 1. Time to factorize a whole network (ImageNet heads, every conv but the stem and depthwise ones)

Per-layer init is each layer's seeded `reset_parameters()` draw; "mean error" is the mean over
factored layers of the normalized function error `L(UV)/L(0)` on Gaussian inputs (MATH.md Section 2).
NKP's cost next to spectral, with repeated runs and its error against the float64 path, is measured in
[speed.md](speed.md) (bench/speed.py).

{fact_table}

## 2. Training throughput on CPU (forward + backward + SGD step, fixed random batch)

Factored layers: every conv but the stem (and depthwise ones) at the rank ratio given (random init: speed does not depend on the init).
A lower MAC count does not turn into the same speed-up on CPU: the factored pair is two
convolutions with a thin (r-channel) activation between them, and small convs run far below
the machine's peak.

{tp_table}

## 3. Digits accuracy by init (ResNet-18, rank ratios {cfg['digits_ratios']}, {epochs} epoch(s), seeds {cfg['digits_seeds']})

The shipped `digits` recipe (core/recipes.py), resolved by `TrainConfig` as `lowrank train` and a
job resolve it, nothing else set but model, rank ratio, init and seed: {recipe}{cut}. The small-image
stem on the digits' native 8 px (layer1 sees 8x8 maps). Mean ± standard deviation over seeds;
{len(digits_data['runs'])} runs in {digits_s:.0f} s.

{dig_table}

![digits accuracy per epoch](train_digits.png)

nkp minus spectral, final validation top-1, paired by seed (the same seed draws the same data
order and the same fresh layer inits for both), with the 95% Student t interval of the mean
difference (core.paired.paired_difference): "significant" when the interval excludes 0.

{paired_table}

## 4. The BatchNorm caveat, measured

In ResNet-18 every factored conv feeds a BatchNorm. At the start of training BN standardizes
each output channel with its batch mean and standard deviation, which undoes any per-row
(per-output-channel) rescaling — the whole of the `rescale` method and the rescaling part of
NKP (MATH.md Section 3) — so only NKP's choice of subspace (Section 4) can still matter.
Below: mean per-layer errors (over the factored layers) of each init on the layer's *real* input activations
({cfg['bn_images']} digits images through the dense network at init, BN in training mode),
`E||relu(y) - relu(y')||^2 / E||relu(y)||^2` for the raw conv outputs y (dense) and y'
(factored), and the same after standardizing each channel of y and y' by its own batch
statistics (BN's effect at init, gamma = 1, beta = 0). Each layer is measured on the dense
network's input, one layer at a time (errors do not compound; the residual add before the
block's last ReLU is ignored).

{bn_table}

## What this run shows

{reading(gains, digits_data)}
"""
    path = write_result("train", md, data={"digits": digits_data})
    print(f"wrote {path}")
