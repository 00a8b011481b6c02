"""Compress a trained network with calibration data (MATH.md Section 8): `compress_model`.

Stages (each reports through `CompressCallbacks`):

1. *select*: the layers to compress (as `factorize_model` chooses them: every Conv2d/Linear but the
   stem conv, the classifier and grouped convs, which are skipped with a reason) and their block
   context (BN folded to `D, c`, activation; core/blocks.py).
2. *allocate*: the rank per layer: `rank` / `rank_ratio` for all, or a `budget` split by an
   allocation strategy (core/allocation.py); energy and greedy read each layer's spectrum from a
   calibration pass.
3. *factor*: per layer the method's factors (core/layer_compress.py) from the calibration second
   moment, accumulated in groups of at most `max_group_mb` (core/calibration.py); the layer is
   replaced by a FactoredConv2d/FactoredLinear (core/layers.py), the dense one stays untouched.
4. *refine* (optional): Adam on each layer's block-output error over calibration patches, inputs
   from the dense network (`independent`) or from the compressed one (`sequential`).
5. *evaluate*: per layer, on *held-out* calibration images (never the fitted ones), the empirical
   normalized block error, the linear error and the Gaussian-surrogate prediction (with the
   held-out Sigma), inputs from the dense network.
6. *bn*: every BatchNorm's statistics re-estimated on the calibration images (every method gets it).

Statistics are recomputed, not stored, between stages (a calibration pass is cheap next to holding
every layer's Sigma), so peak memory stays at one group's second moments.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from core.allocation import LayerShape, allocate, budget_used, layer_cost
from core.blocks import block_contexts, block_output, fold_bn
from core.calibration import (
    CalibrationCancelled,
    MomentAccumulator,
    PatchAccumulator,
    moment_bytes,
    reestimate_bn,
    run_grouped_passes,
)
from core.layer_compress import (
    DATA_METHODS,
    ErrorAccumulator,
    LayerStats,
    factor_layer,
    output_energy,
    refine_factors,
    surrogate_error,
    target_spectrum,
)
from core.layers import FactoredConv2d, FactoredLinear
from core.names import REFINE_MODES
from core.surgery import get_module, replace_module

__all__ = ["REFINE_MODES", "CompressOptions", "CompressCallbacks", "CompressResult", "select_layers", "compress_model"]

STAGES = ("select", "allocate", "latency", "factor", "refine", "evaluate", "bn")  # core.compress_run adds "finetune"


@dataclass
class CompressOptions:
    """How to compress (the data and the source are the caller's). Unknown keys are errors (`from_dict`)."""

    method: str = "whiten"            # spectral | nkp | whiten | asvd | nkp-data
    budget: float | None = None       # fraction of the compressed layers' weights to keep, in (0, 1]
    rank: int | None = None           # or one rank for every layer
    rank_ratio: float | None = None   # or one ratio of min(m, d) for every layer, in (0, 1]
    allocation: str = "uniform"       # uniform | energy | stable-rank | greedy (with budget)
    rank_step: int = 1                # greedy's delta r
    refine: str = "off"               # off | independent | sequential
    refine_steps: int = 100           # Adam steps per layer
    refine_lr: float = 1e-2           # relative: step size lr * RMS(factor)
    refine_patches: int = 4096        # calibration patches per layer for refine
    eps: float = 1e-6                 # eigen-floor of Sigma, relative to its largest eigenvalue
    asvd_alpha: float = 0.5
    linear_blocks: str = "svd"        # nkp-data on affine blocks: svd (their exact minimizer) | nkp
    positions_per_image: int = 64     # output positions sampled per image and layer
    max_group_mb: int = 1024          # second moments held at once (MiB); layers are calibrated in groups
    include: list[str] | None = None  # dotted layer names to compress (default: all but stem, classifier)
    exclude: list[str] | None = None
    bn_reestimate: bool = True
    latency_aware: bool = False       # keep dense each layer whose factored form is not measured faster
    latency_batch: int = 1            # ... timed at this batch size on the compress device
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompressOptions:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown compress option(s): {', '.join(unknown)}; "
                             f"allowed: {', '.join(f.name for f in fields(cls))}")
        return cls(**d).validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> CompressOptions:
        """ValueError (core.train_fields.FieldError) naming the field and what is allowed. Returns self.
        The checks are core.compress_fields' table, which the service's compress job spec is built from."""
        from core import compress_fields

        compress_fields.validate(self.to_dict(), compress_fields.OPTION_FIELDS)
        return self


class CompressCallbacks:
    """Hooks `compress_model` calls (override any; defaults do nothing), like core.train.TrainCallbacks.

    on_stage(stage): a stage of STAGES starts. on_progress(frac): overall fraction done, in [0, 1].
    on_layer(row): a layer's report row once its held-out errors are known (JSON-able dict).
    on_metrics(metrics): model-level numbers as they become known (core.compress_run: top-1s).
    on_epoch(epoch, metrics): after each fine-tuning epoch of core.compress_run (epoch from 1): train_loss,
    train_top1, val_loss, val_top1, val_top5, lr, epoch_time_s, images_per_s (core.train's epoch metrics).
    should_stop(): polled between calibration batches and layers, and between fine-tuning steps; True raises
    CalibrationCancelled (fine-tuning: core.compress_run.FinetuneCancelled, a subclass).
    """

    def on_stage(self, stage: str) -> None:
        pass

    def on_progress(self, frac: float) -> None:
        pass

    def on_layer(self, row: dict[str, Any]) -> None:
        pass

    def on_metrics(self, metrics: dict[str, float]) -> None:
        pass

    def on_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        pass

    def should_stop(self) -> bool:
        return False


@dataclass
class CompressResult:
    model: nn.Module                       # the compressed network (eval mode, on the device used)
    report: dict[str, Any] = field(default_factory=dict)  # JSON-able: options, layers, totals, calibration
    contexts: dict[str, dict[str, Any]] = field(default_factory=dict)  # layer -> {bn, activation, note}


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def select_layers(model: nn.Module, include: list[str] | None = None,
                  exclude: list[str] | None = None) -> tuple[list[tuple[str, nn.Module]], list[dict[str, Any]]]:
    """`(layers to compress, rows of every Conv2d/Linear)` by factorize_model's rules (stem, classifier
    and grouped convs stay dense unless `include` names them; grouped convs always do)."""
    from core.factorize import candidate_layers
    from core.model_layers import check_layer_names, matches

    cands = candidate_layers(model)
    names = [n for n, _ in cands]
    check_layer_names("include", include, names)  # ValueError naming the field
    check_layer_names("exclude", exclude, names)
    include, exclude = include or [], exclude or []
    convs = [n for n, m in cands if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in cands if isinstance(m, nn.Linear)]
    stem, classifier = (convs[0] if convs else None), (linears[-1] if linears else None)
    chosen, rows = [], []
    for name, module in cands:
        m, d = module.weight.shape[0], module.weight[0].numel()
        row = {"layer": name, "kind": "conv" if isinstance(module, nn.Conv2d) else "linear",
               "shape": list(module.weight.shape), "m": m, "d": d, "rank": None, "status": "skipped",
               "reason": None, "params_dense": _params(module), "params_compressed": _params(module)}
        rows.append(row)
        if include and not any(matches(name, p) for p in include):
            row["reason"] = "not included"
        elif any(matches(name, p) for p in exclude):
            row["reason"] = "excluded"
        elif isinstance(module, nn.Conv2d) and module.groups != 1:
            row["reason"] = f"grouped conv (groups={module.groups}): no low-rank form helps it"
        elif not include and name == stem:
            row["reason"] = "stem conv"
        elif not include and name == classifier:
            row["reason"] = "classifier"
        else:
            row["status"] = "pending"
            chosen.append((name, module))
    return chosen, rows


def _set_factors(layer: FactoredConv2d | FactoredLinear, U: torch.Tensor, V: torch.Tensor) -> None:
    with torch.no_grad():
        layer.v.weight.copy_(V.reshape(layer.v.weight.shape).to(layer.v.weight))
        layer.u.weight.copy_(U.reshape(layer.u.weight.shape).to(layer.u.weight))


def _matrix(module: nn.Module) -> torch.Tensor:
    return module.weight.detach().reshape(module.weight.shape[0], -1)


class _Progress:
    def __init__(self, cb: CompressCallbacks, stages: list[str]) -> None:
        self.cb, self.stages, self.i = cb, stages, -1

    def stage(self, name: str) -> None:
        self.i = self.stages.index(name)
        self.cb.on_stage(name)
        self.cb.on_progress(self.i / len(self.stages))

    def within(self, frac: float) -> None:
        self.cb.on_progress(min(1.0, (self.i + frac) / len(self.stages)))


def compress_model(model: nn.Module, fit_loader: Any, heldout_loader: Any, options: CompressOptions, *,
                   device: torch.device | str = "cpu", callbacks: CompressCallbacks | None = None,
                   input_size: tuple[int, int, int] | None = None) -> CompressResult:
    """Compress the trained `model` (its weights left unchanged; it is moved to `device`); returns the copy.

    fit_loader / heldout_loader: unshuffled loaders of disjoint calibration images (`(images, labels)`
    or images; labels unused) to fit and to report on (core.calibration.calibration_subsets).
    input_size `(3, H, W)`: counts MACs in the report when given.
    """
    options.validate()
    return _Compression(model, fit_loader, heldout_loader, options, torch.device(device),
                        callbacks or CompressCallbacks(), input_size).run()


class _Compression:
    """One compress_model call: the stages of the module docstring as methods, sharing their state."""

    def __init__(self, model: nn.Module, fit_loader: Any, heldout_loader: Any, options: CompressOptions,
                 device: torch.device, cb: CompressCallbacks, input_size: tuple[int, int, int] | None) -> None:
        self.dense = model.to(device).eval()
        self.fit_loader, self.heldout_loader, self.options = fit_loader, heldout_loader, options
        self.device, self.cb, self.input_size = device, cb, input_size
        self.pass_kw = dict(max_group_bytes=options.max_group_mb << 20, positions_per_image=options.positions_per_image,
                            seed=options.seed, device=device, should_stop=cb.should_stop)
        stages = ["select", "allocate"] + (["latency"] if options.latency_aware else []) + ["factor"] \
            + (["refine"] if options.refine != "off" else []) + ["evaluate"] + (["bn"] if options.bn_reestimate else [])
        self.prog = _Progress(cb, stages)
        self.calib_facts: dict[str, Any] = {}

    def run(self) -> CompressResult:
        t0 = time.perf_counter()
        self.select()
        self.allocate()
        self.latency_policy = None
        if self.options.latency_aware:
            self.keep_slower_dense()
        self.factor()
        if self.options.refine != "off":
            self.prog.stage("refine")
            self.refine()
        self.evaluate()
        bn_images = None
        if self.options.bn_reestimate:
            self.prog.stage("bn")
            bn_images = reestimate_bn(self.compressed, self.fit_loader, self.device)
        self.compressed.eval()
        self.cb.on_progress(1.0)
        report = _report(self.dense, self.compressed, self.rows, self.ranks, self.shapes, self.options,
                         self.calib_facts, bn_images, self.input_size, time.perf_counter() - t0)
        report["latency"] = self.latency_policy
        return CompressResult(model=self.compressed, report=report,
                              contexts={n: self.contexts[n].to_dict() for n, _ in self.layers})

    def select(self) -> None:
        """The layers to compress, their report rows and block contexts (BN folded to D, c)."""
        self.prog.stage("select")
        self.layers, self.rows = select_layers(self.dense, self.options.include, self.options.exclude)
        self.by_name = {r["layer"]: r for r in self.rows}
        self.contexts = block_contexts(self.dense, [n for n, _ in self.layers])
        self.stats: dict[str, LayerStats] = {}
        for name, module in self.layers:
            ctx = self.contexts[name]
            D, c = fold_bn(module, get_module(self.dense, ctx.bn) if ctx.bn else None)
            self.stats[name] = LayerStats(D=D, c=c, activation=ctx.activation)
            self.by_name[name].update(bn=ctx.bn, activation=ctx.activation, context_note=ctx.note)

    def _with_moments(self, name: str, acc: MomentAccumulator) -> LayerStats:
        return dataclasses.replace(self.stats[name], sigma=acc.sigma(), mean_abs=acc.mean_abs(), n=acc.n)

    def _moments(self, second: bool = True):
        return lambda n, m: MomentAccumulator(m.weight[0].numel(), self.device, second)

    def allocate(self) -> None:
        """`self.ranks`: one rank (or ratio) for all, or the budget split by the allocation strategy."""
        self.prog.stage("allocate")
        opts = self.options
        self.shapes = [LayerShape(n, self.by_name[n]["m"], self.by_name[n]["d"]) for n, _ in self.layers]
        if opts.budget is None:
            from core.factorize import resolve_rank

            self.ranks = {}
            for s in self.shapes:
                r = resolve_rank(s.m, s.d, rank=opts.rank, rank_ratio=opts.rank_ratio)
                self.ranks[s.name] = None if r * (s.m + s.d) >= s.m * s.d else r  # dense when factoring does not shrink it
            return
        mods = dict(self.layers)
        if opts.allocation == "stable-rank":
            for s in self.shapes:
                sv = torch.linalg.svdvals(_matrix(mods[s.name]).double())
                s.stable_rank = float(sv.pow(2).sum() / sv[0].pow(2)) if float(sv[0]) > 0 else 1.0
        if opts.allocation in ("energy", "greedy"):
            shape_of = {s.name: s for s in self.shapes}

            def spectrum(name: str, acc: MomentAccumulator) -> None:
                st = self._with_moments(name, acc)
                W = _matrix(mods[name]).to(self.device)
                shape_of[name].spectrum = target_spectrum(W, opts.method, st, alpha=opts.asvd_alpha, eps=opts.eps).cpu()
                shape_of[name].weight = output_energy(W, st)

            self.calib_facts["allocate"] = run_grouped_passes(self.dense, self.layers, self.fit_loader, self._moments(),
                                                              spectrum, progress=self.prog.within, **self.pass_kw)
            total = sum(s.weight for s in self.shapes) or 1.0
            for s in self.shapes:
                s.weight /= total  # greedy's weights: each layer's share of the output energy
        self.ranks = allocate(self.shapes, opts.budget, opts.allocation, rank_step=opts.rank_step)

    def keep_slower_dense(self) -> None:
        """latency_aware: time each layer against its factored form at its allocated rank on the device
        (core.latency.LatencyPolicy, at latency_batch on the calibration image size); a layer whose factored
        form is not faster keeps its dense weights (rank None, status kept_dense, both times in its row).
        The budget's allocation is not redone: the kept layers' weights stay, so budget_used says what was kept."""
        from core.latency import LatencyPolicy

        self.prog.stage("latency")
        if self.input_size is not None:
            channels, size = self.input_size[0], self.input_size[1]
        else:
            first = next(iter(self.fit_loader))
            images = first[0] if isinstance(first, (list, tuple)) else first
            channels, size = images.shape[1], images.shape[-1]
        policy = LatencyPolicy(image_size=size, in_channels=channels, batch=self.options.latency_batch,
                               device=str(self.device))
        todo = [(n, m) for n, m in self.layers if self.ranks[n] is not None]
        shapes = policy.input_shapes(self.dense, [n for n, _ in todo])
        for i, (name, module) in enumerate(todo):
            if self.cb.should_stop():
                raise CalibrationCancelled(f"cancelled while timing {name}")
            verdict = policy.judge(module, self.ranks[name], shapes.get(name), name=name)
            self.by_name[name].update(dense_ms=verdict.dense_ms, factored_ms=verdict.factored_ms)
            if not verdict.faster:
                self.ranks[name] = None
                self.by_name[name].update(status="kept_dense", reason=verdict.reason)
            self.prog.within((i + 1) / len(todo))
        self.latency_policy = policy.describe()

    def factor(self) -> None:
        """Factor every layer with a rank into `self.compressed` (a copy of the dense model)."""
        self.prog.stage("factor")
        self.compressed = copy.deepcopy(self.dense)
        self.todo = [(n, m) for n, m in self.layers if self.ranks[n] is not None]
        for n, _ in self.layers:
            if self.ranks[n] is None and self.by_name[n]["status"] != "kept_dense":
                self.by_name[n].update(status="dense", reason="factoring at the allocated rank would not reduce parameters")
        mods, done = dict(self.todo), [0]

        def factor_one(name: str, st: LayerStats | None) -> None:
            t0, module, opts = time.perf_counter(), mods[name], self.options
            f = factor_layer(_matrix(module).to(self.device), self.ranks[name], opts.method, st, eps=opts.eps,
                             alpha=opts.asvd_alpha, seed=opts.seed, linear_blocks=opts.linear_blocks)
            with torch.random.fork_rng(devices=[]):  # building the halves draws a throw-away init
                make = FactoredConv2d.from_conv if isinstance(module, nn.Conv2d) else FactoredLinear.from_linear
                new = make(module, f.U.float(), f.V.float())
            replace_module(self.compressed, name, new.eval())
            self.by_name[name].update(status="factored", rank=self.ranks[name], params_compressed=_params(new),
                                      method_info=f.info, time_s=time.perf_counter() - t0)
            done[0] += 1
            self.prog.within(done[0] / max(1, len(self.todo)))

        if self.options.method in DATA_METHODS:
            second = self.options.method != "asvd"  # asvd needs E|x| only, not the d x d Sigma
            self.calib_facts["factor"] = run_grouped_passes(
                self.dense, self.todo, self.fit_loader, self._moments(second),
                lambda n, acc: factor_one(n, self._with_moments(n, acc)),
                acc_bytes=moment_bytes if second else (lambda m: 8 * m.weight[0].numel()), **self.pass_kw)
            return
        for name, _ in self.todo:
            if self.cb.should_stop():
                raise CalibrationCancelled(f"cancelled while factoring {name}")
            factor_one(name, None)

    def refine(self) -> None:
        """Adam on each factored layer, in forward order, on its block-output error over fit patches."""
        opts = self.options
        n_images = len(self.fit_loader.dataset) if hasattr(self.fit_loader, "dataset") else None
        per_image = max(1, math.ceil(opts.refine_patches / n_images)) if n_images else opts.positions_per_image
        kw = dict(acc_bytes=lambda m: 0, positions_per_image=per_image, seed=opts.seed, device=self.device,
                  should_stop=self.cb.should_stop)

        def patches(name: str, module: nn.Module) -> PatchAccumulator:
            return PatchAccumulator(opts.refine_patches)

        for i, (name, module) in enumerate(self.todo):
            got: dict[str, torch.Tensor] = {}
            run_grouped_passes(self.dense, [(name, module)], self.fit_loader, patches,
                               lambda n, acc: got.__setitem__("dense", acc.patches()), **kw)
            layer = get_module(self.compressed, name)
            if opts.refine == "sequential":  # the factored layer's first half sees the layer's input
                run_grouped_passes(self.compressed, [(name, layer.v)], self.fit_loader, patches,
                                   lambda n, acc: got.__setitem__("input", acc.patches()), **kw)
            st = self.stats[name]
            X_dense = got["dense"]
            Y = block_output(X_dense @ _matrix(module).float().T, st.D, st.c, st.activation)
            U, V = layer.factors()
            U2, V2, info = refine_factors(U.detach().double(), V.detach().double(), got.get("input", X_dense), Y,
                                          st.D, st.c, st.activation, steps=opts.refine_steps, lr=opts.refine_lr,
                                          seed=opts.seed + i)
            _set_factors(layer, U2, V2)
            self.by_name[name]["refine"] = {**info, "mode": opts.refine}
            self.prog.within((i + 1) / len(self.todo))

    def evaluate(self) -> None:
        """Per layer, on held-out images with dense-network inputs: block, linear and surrogate errors."""
        self.prog.stage("evaluate")
        outer = self

        class Acc:
            def __init__(self, name: str, module: nn.Module) -> None:
                self.W = _matrix(module)
                self.W_new = get_module(outer.compressed, name).dense_weight().detach().reshape(self.W.shape)
                self.errors = ErrorAccumulator(self.W, self.W_new, outer.stats[name])
                self.moment = MomentAccumulator(module.weight[0].numel(), outer.device)  # held-out Sigma

            def update(self, X: torch.Tensor) -> None:
                self.errors.update(X)
                self.moment.update(X)

        def finish(name: str, acc: Acc) -> None:
            errs, st = acc.errors.errors(), self.stats[name]
            value, kind = surrogate_error(acc.W, acc.W_new, st.D, acc.moment.sigma(), st.activation)
            row = self.by_name[name]
            row["errors"] = {"block": errs["block"], "linear": errs["linear"], "surrogate": value,
                             "surrogate_kind": kind}
            row["heldout_patches"] = errs["patches"]
            self.cb.on_layer(dict(row))

        self.calib_facts["evaluate"] = run_grouped_passes(self.dense, self.todo, self.heldout_loader, Acc, finish,
                                                          progress=self.prog.within, **self.pass_kw)


def _report(dense: nn.Module, compressed: nn.Module, rows: list[dict], ranks: dict[str, int | None], shapes: list[LayerShape], options: CompressOptions,
            calib_facts: dict[str, Any], bn_images: int | None, input_size: tuple[int, int, int] | None,
            elapsed: float) -> dict[str, Any]:
    from core.models import count_macs, count_params

    chosen = shapes  # the compressible layers
    weights_dense = sum(s.m * s.d for s in chosen)
    weights_kept = sum(layer_cost(s.m, s.d, ranks[s.name]) for s in chosen)
    totals = {
        "params_dense": count_params(dense), "params_compressed": count_params(compressed),
        "layers": len(rows), "layers_compressible": len(chosen),
        "layers_factored": sum(1 for r in rows if r["status"] == "factored"),
        "layers_kept_dense": sum(1 for r in rows if r["status"] == "kept_dense"),
        "weights_compressible_dense": weights_dense, "weights_compressible_kept": weights_kept,
        "budget_requested": options.budget,
        "budget_used": budget_used(chosen, ranks) if chosen else None,
        "time_s": elapsed,
    }
    totals["param_ratio"] = totals["params_compressed"] / totals["params_dense"]
    if input_size is not None:
        totals["macs_dense"] = count_macs(dense, input_size)
        totals["macs_compressed"] = count_macs(compressed, input_size)
    for key in ("block", "linear", "surrogate"):
        vals = [r["errors"][key] for r in rows if r.get("errors") and r["errors"][key] is not None]
        totals[f"mean_{key}_error"] = sum(vals) / len(vals) if vals else None
    calibration = {stage: {"passes": f["passes"], "peak_group_bytes": f["peak_group_bytes"], "time_s": f["time_s"],
                           "positions": f["positions"]} for stage, f in calib_facts.items()}
    calibration["bn_reestimate_images"] = bn_images
    for row in rows:
        if row["status"] == "pending":
            row["status"] = "dense"
    return {"options": options.to_dict(), "layers": rows, "totals": totals, "calibration": calibration}
