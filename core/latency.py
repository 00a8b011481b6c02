"""Measured forward latency of dense and factored networks, per layer and end to end (issue 17).

Parameters and MACs do not say whether a factored network is faster: a factored layer is two
kernels with a thin activation between them, and small ones run far below the device's peak. So
this module measures, on the device that will run the network:

* `time_paired(fns, ...)`: p50 / p90 of each callable's wall time, the callables **interleaved**
  (round k times fn 0, fn 1, ..., the order reversed every other round), so a burst of load on a
  shared machine lands on all of them alike. CUDA: synchronize before and after each sample, after
  warm-up calls. A sample is the mean of `inner` back-to-back calls, `inner` chosen so that a sample
  lasts >= 0.2 ms (a 5 us layer is not timed at the clock's resolution).
* `measure_latency(dense, variants, ...)`: end to end (the whole forward pass at each batch size)
  and per factored layer (the dense layer and its factored replacement, isolated, on the layer's
  real input shape, found by forward hooks on the dense network), in eval mode under
  `torch.inference_mode()`, with CPU threads stated (`torch.get_num_threads()`, or `threads`) and
  channels-last memory format for 4-D inputs where asked (default: on CUDA).
* `LatencyPolicy`: `core.factorize.factorize_model(..., latency=policy)` keeps dense every layer
  whose factored form is not faster, measured as above at the policy's batch on its device (factors
  are not even computed for them; the fastest samples are compared); the report's rows say
  `kept_dense` with both times.

Nothing here is estimated from FLOPs: every number is a measurement of the module itself.
"""
from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from core.layers import FACTORED_TYPES, FactoredConv2d, FactoredLinear

MIN_SAMPLE_S = 2e-4  # a sample lasts at least this long (several calls of a tiny layer)
MAX_INNER = 256


class LatencyCancelled(Exception):
    """`LatencyCallbacks.should_stop()` said stop between two measurements."""


class LatencyCallbacks:
    """Hooks of `measure_latency` / `compare_latency` (a job's runner streams progress and honours
    cancellation through them): `on_progress(frac)` after each measurement (an end-to-end batch, a layer pair,
    a latency-aware verdict), `should_stop()` before each; True raises LatencyCancelled."""

    def on_progress(self, frac: float) -> None:
        pass

    def should_stop(self) -> bool:
        return False

    def check(self) -> None:
        if self.should_stop():
            raise LatencyCancelled("cancelled between latency measurements")


@dataclass
class Timing:
    """Wall-clock milliseconds of one forward call: median, 90th percentile, fastest sample, number of samples."""

    p50_ms: float
    p90_ms: float
    samples: int
    min_ms: float

    def throughput(self, batch: int) -> float:
        """Items (images) per second at the median latency."""
        return batch / (self.p50_ms / 1000.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[int]:
    """torch's intra-op thread count set to `n` (None: left as it is) inside; yields the count in force."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def time_paired(fns: list[Callable[[], Any]], *, device: torch.device | str = "cpu", repeats: int = 30,
                warmup: int = 3) -> list[Timing]:
    """Median and 90th-percentile milliseconds per call of each of `fns`, measured interleaved.

    Each function is first called `warmup` times (allocations, kernel selection, CUDA lazy init),
    then `repeats` rounds each take one sample of every function (a sample: `inner` calls between
    two clock reads, synchronized on CUDA, divided by `inner`).
    """
    device = torch.device(device)
    for fn in fns:
        for _ in range(max(1, warmup)):
            fn()
    _sync(device)
    inner = []
    for fn in fns:  # calls per sample: enough for MIN_SAMPLE_S, from one timed call
        t0 = time.perf_counter()
        fn()
        _sync(device)
        once = time.perf_counter() - t0
        inner.append(int(min(MAX_INNER, max(1, math.ceil(MIN_SAMPLE_S / max(once, 1e-9))))))
    samples: list[list[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    for k in range(repeats):
        for i in (order if k % 2 == 0 else order[::-1]):
            fn, n = fns[i], inner[i]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            _sync(device)
            samples[i].append((time.perf_counter() - t0) / n * 1000.0)
    return [Timing(p50_ms=statistics.median(s), p90_ms=_percentile(s, 0.9), samples=len(s), min_ms=min(s))
            for s in samples]


def resolve_channels_last(channels_last: bool | None, device: torch.device) -> bool:
    """None means: channels-last on CUDA (where cuDNN's NHWC kernels are the fast ones), not on the CPU."""
    return device.type == "cuda" if channels_last is None else bool(channels_last)


def _prepare(module: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    module = module.to(device).eval()
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module


def _input(shape: tuple[int, ...], device: torch.device, channels_last: bool, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=dtype).to(device)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def layer_input_shapes(model: nn.Module, names: list[str], *, image_size: int, batch: int,
                       in_channels: int = 3) -> dict[str, tuple[int, ...]]:
    """The input shape of each named module of `model` in a forward pass of `batch` images of
    `image_size` px (found with forward hooks on one image, the batch dimension then set to `batch`).
    Layers the forward pass never calls are absent. Training flags are restored afterwards."""
    modules = dict(model.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name: str) -> Callable:
        def record(mod: nn.Module, inp: tuple, out: Any) -> None:  # returns None: the output is kept
            shapes.setdefault(name, tuple(inp[0].shape))
        return record

    hooks = [modules[n].register_forward_hook(hook(n)) for n in names]
    flags = {n: m.training for n, m in model.named_modules()}
    p = next(model.parameters(), None)
    x = torch.zeros(1, in_channels, image_size, image_size, device=p.device if p is not None else "cpu",
                    dtype=p.dtype if p is not None else torch.float32)
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
        for n, m in model.named_modules():
            m.training = flags[n]
    return {n: (batch, *s[1:]) for n, s in shapes.items()}


def time_layers(dense: nn.Module, factored: nn.Module, shape: tuple[int, ...], *, device: torch.device | str = "cpu",
                channels_last: bool | None = None, repeats: int = 30, warmup: int = 3) -> tuple[Timing, Timing]:
    """(dense, factored) timings of two modules on one random input of `shape`, interleaved.
    The modules are copied to `device` (the originals are not touched)."""
    device = torch.device(device)
    cl = resolve_channels_last(channels_last, device)
    a = _prepare(copy.deepcopy(dense), device, cl)
    b = _prepare(copy.deepcopy(factored), device, cl)
    dtype = next(a.parameters()).dtype
    x = _input(shape, device, cl, dtype)
    with torch.inference_mode():
        ta, tb = time_paired([lambda: a(x), lambda: b(x)], device=device, repeats=repeats, warmup=warmup)
    return ta, tb


def factored_like(module: nn.Conv2d | nn.Linear, rank: int) -> FactoredConv2d | FactoredLinear:
    """A factored layer of `module`'s configuration at `rank` with random weights (the global RNG kept):
    what a factorization would put in its place, for timing only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if isinstance(module, nn.Conv2d):
            layer = FactoredConv2d(module.in_channels, module.out_channels, module.kernel_size, rank,
                                   stride=module.stride, padding=module.padding, dilation=module.dilation,
                                   bias=module.bias is not None, padding_mode=module.padding_mode)
        else:
            layer = FactoredLinear(module.in_features, module.out_features, rank, bias=module.bias is not None)
    return layer.to(dtype=module.weight.dtype)


@dataclass
class LayerVerdict:
    """A latency-aware decision for one layer: both medians (ms) and whether the factored form is faster."""

    dense_ms: float | None
    factored_ms: float | None
    faster: bool
    reason: str | None


@dataclass
class LatencyPolicy:
    """Keep dense every layer whose factored form is not measured faster (factorize_model(latency=...)).

    image_size, in_channels: the input the layer shapes are found with; batch: the batch size the
    layers are timed at; device: where ("cpu", "cuda", "cuda:N"); threads: CPU intra-op threads while
    timing (None: as set); channels_last: None = on CUDA only; repeats, warmup: per layer pair;
    min_speedup: the factored form is kept only if dense_ms / factored_ms > min_speedup (1.0: faster
    at all). The times compared are each side's fastest sample: other work on the machine only ever
    adds time, so the minimum is the least disturbed estimate (medians of a few samples flipped
    decisions under load). Layers of identical configuration, rank and input shape are timed once.
    decided: layer name -> an earlier verdict ({"dense_ms", "factored_ms", "faster", "reason"}, e.g. from
    `decisions(report rows)`): such a layer is not timed again, so a resumed run, or every process of a
    distributed one, rebuilds exactly the structure that was measured once.
    """

    image_size: int = 224
    batch: int = 1
    device: str = "cpu"
    threads: int | None = None
    channels_last: bool | None = None
    repeats: int = 30
    warmup: int = 3
    min_speedup: float = 1.0
    in_channels: int = 3
    decided: dict[str, dict[str, Any]] | None = None
    callbacks: LatencyCallbacks | None = field(default=None, repr=False, compare=False)  # check() before a timing
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, low in (("image_size", 1), ("batch", 1), ("repeats", 3), ("warmup", 0), ("in_channels", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"latency {name} must be an integer >= {low}, got {v!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f"latency threads must be an integer >= 1, got {self.threads!r}")
        if not isinstance(self.min_speedup, (int, float)) or not 0 < self.min_speedup < 100:
            raise ValueError(f"latency min_speedup must be a number in (0, 100), got {self.min_speedup!r}")
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"latency device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}") from None
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"latency device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("latency device is 'cuda' but CUDA is not available on this machine")

    def describe(self) -> dict[str, Any]:
        """The settings, as the report stores them (threads: the count in force while timing)."""
        dev = torch.device(self.device)
        return {"image_size": self.image_size, "batch": self.batch, "device": str(dev),
                "threads": self.threads or torch.get_num_threads(), "channels_last": resolve_channels_last(self.channels_last, dev),
                "repeats": self.repeats, "min_speedup": self.min_speedup}

    def input_shapes(self, model: nn.Module, names: list[str]) -> dict[str, tuple[int, ...]]:
        return layer_input_shapes(model, names, image_size=self.image_size, batch=self.batch,
                                  in_channels=self.in_channels)

    def judge(self, module: nn.Conv2d | nn.Linear, rank: int, shape: tuple[int, ...] | None,
              name: str | None = None) -> LayerVerdict:
        """Time `module` against its factored form at `rank` on input `shape`; None shape: never called in
        the forward pass, so its speed cannot matter: factored, with no times. A layer `name` in
        `decided` gets that verdict without timing."""
        if name is not None and self.decided and name in self.decided:
            d = self.decided[name]
            return LayerVerdict(d["dense_ms"], d["factored_ms"], bool(d["faster"]), d.get("reason"))
        if shape is None:
            return LayerVerdict(None, None, True, None)
        key = (type(module), tuple(module.weight.shape), getattr(module, "stride", None), getattr(module, "padding", None),
               getattr(module, "dilation", None), module.bias is not None, rank, shape)
        if key not in self._cache:
            if self.callbacks is not None:
                self.callbacks.check()
            with cpu_threads(self.threads):
                dense_t, fact_t = time_layers(module, factored_like(module, rank), shape, device=self.device,
                                              channels_last=self.channels_last, repeats=self.repeats, warmup=self.warmup)
            self._cache[key] = (dense_t.min_ms, fact_t.min_ms)
        dense_ms, fact_ms = self._cache[key]
        faster = dense_ms / fact_ms > self.min_speedup
        reason = None if faster else (
            f"factored not faster on {torch.device(self.device)}: {fact_ms:.4f} ms vs dense {dense_ms:.4f} ms "
            f"(batch {self.batch}" + (f", needs {self.min_speedup:g}x" if self.min_speedup != 1.0 else "") + ")")
        return LayerVerdict(dense_ms, fact_ms, faster, reason)


# ----------------------------------------------------------------------------- whole networks

def decisions(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The verdicts a latency-aware factorization made, from its report rows (dicts with layer, status,
    dense_ms, factored_ms, reason): the `decided` of a LatencyPolicy that must rebuild that structure."""
    return {r["layer"]: {"dense_ms": r["dense_ms"], "factored_ms": r["factored_ms"],
                         "faster": r["status"] != "kept_dense", "reason": r.get("reason")}
            for r in rows if r.get("dense_ms") is not None}


@dataclass
class LayerLatency:
    """One factored layer against its dense original at one batch size."""

    layer: str
    kind: str
    input_shape: list[int]
    rank: int
    dense: Timing
    factored: Timing

    @property
    def speedup(self) -> float:
        return self.dense.p50_ms / self.factored.p50_ms

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "kind": self.kind, "input_shape": self.input_shape, "rank": self.rank,
                "dense": self.dense.to_dict(), "factored": self.factored.to_dict(), "speedup": self.speedup,
                "slower": self.speedup < 1.0}


@dataclass
class LatencyReport:
    """Latency of a dense network and its factored variants: end to end and per factored layer."""

    device: str
    threads: int
    channels_last: bool
    image_size: int
    batches: list[int]
    end_to_end: list[dict[str, Any]] = field(default_factory=list)  # {batch, variant, timing, throughput, speedup}
    layers: dict[int, list[LayerLatency]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "threads": self.threads, "channels_last": self.channels_last,
                "image_size": self.image_size, "batches": self.batches,
                "end_to_end": [{**e, "timing": e["timing"].to_dict()} for e in self.end_to_end],
                "layers": {str(b): [row.to_dict() for row in rows] for b, rows in self.layers.items()}}


def factored_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FACTORED_TYPES)}


def measure_latency(dense: nn.Module, variants: dict[str, nn.Module], *, image_size: int, batches: list[int],
                    device: torch.device | str = "cpu", threads: int | None = None, channels_last: bool | None = None,
                    repeats: int = 20, warmup: int = 3, per_layer: bool = True, layers_of: str | None = None,
                    layer_batches: list[int] | None = None, in_channels: int = 3,
                    callbacks: LatencyCallbacks | None = None) -> LatencyReport:
    """Forward latency of `dense` and of each network in `variants` (e.g. {"factored": net}) on `device`.

    End to end: every network at every batch size (random images of `image_size` px), interleaved.
    Per layer (per_layer=True): every factored layer of `variants[layers_of]` (default: the first
    variant) against the same-named layer of `dense`, isolated, on its real input shape at each batch
    of `layer_batches` (default: every batch).
    The networks are copied to the device; the originals are not touched. `callbacks`: progress after each
    measurement, and a cancellation check before each (LatencyCancelled).
    """
    device = torch.device(device)
    cl = resolve_channels_last(channels_last, device)
    cb = callbacks or LatencyCallbacks()
    fact = factored_layers(variants[layers_of or next(iter(variants))]) if per_layer and variants else {}
    lbatches = batches if layer_batches is None else layer_batches
    total, done = len(batches) + len(fact) * len(lbatches), 0
    with cpu_threads(threads) as n_threads:
        report = LatencyReport(device=str(device), threads=n_threads, channels_last=cl, image_size=image_size,
                               batches=list(batches))
        nets = {"dense": _prepare(copy.deepcopy(dense), device, cl)}
        nets.update({k: _prepare(copy.deepcopy(v), device, cl) for k, v in variants.items()})
        dtype = next(nets["dense"].parameters()).dtype
        for batch in batches:
            cb.check()
            x = _input((batch, in_channels, image_size, image_size), device, cl, dtype)
            with torch.inference_mode():
                times = time_paired([lambda net=net: net(x) for net in nets.values()], device=device,
                                    repeats=repeats, warmup=warmup)
            base = times[0].p50_ms
            for name, t in zip(nets, times):
                report.end_to_end.append({"batch": batch, "variant": name, "timing": t,
                                          "throughput": t.throughput(batch), "speedup": base / t.p50_ms})
            done += 1
            cb.on_progress(done / total)
        if fact:
            dense_mods = dict(dense.named_modules())
            for batch in lbatches:
                shapes = layer_input_shapes(dense, list(fact), image_size=image_size, batch=batch, in_channels=in_channels)
                rows = []
                for name, module in fact.items():
                    done += 1
                    if name not in shapes:
                        continue
                    cb.check()
                    td, tf = time_layers(dense_mods[name], module, shapes[name], device=device, channels_last=cl,
                                         repeats=repeats, warmup=warmup)
                    rows.append(LayerLatency(layer=name, kind="conv" if isinstance(module, FactoredConv2d) else "linear",
                                             input_shape=list(shapes[name]), rank=module.rank, dense=td, factored=tf))
                    cb.on_progress(done / total)
                report.layers[batch] = rows
    return report


class _Scaled(LatencyCallbacks):
    """`inner`'s progress mapped from [0, 1] onto [lo, hi] (one phase of a longer run)."""

    def __init__(self, inner: LatencyCallbacks, lo: float, hi: float) -> None:
        self.inner, self.lo, self.hi = inner, lo, hi

    def on_progress(self, frac: float) -> None:
        self.inner.on_progress(self.lo + (self.hi - self.lo) * frac)

    def should_stop(self) -> bool:
        return self.inner.should_stop()


def factorize_with_ranks(model: nn.Module, ranks: dict[str, int], *,
                         latency: LatencyPolicy | None = None) -> dict[str, Any]:
    """Replace each layer named in `ranks` (in place) by a factored layer of that rank with random weights
    (`factored_like`: speed does not depend on the values); every other layer stays as it is. With `latency`,
    a layer whose factored form is not measured faster stays dense (as `factorize_model(latency=...)`).

    ValueError naming the layer for a name that is no ungrouped Conv2d/Linear of `model`, or a rank outside
    1..min(out, in*kh*kw). Returns totals (layers_factored, layers_kept_dense, params_dense, params_factored)
    and `kept` rows ({layer, rank, dense_ms, factored_ms, reason})."""
    from core.surgery import replace_module

    modules = dict(model.named_modules())
    params_dense = sum(p.numel() for p in model.parameters())
    for name, rank in ranks.items():
        module = modules.get(name)
        if not isinstance(module, (nn.Conv2d, nn.Linear)) or isinstance(module, FACTORED_TYPES):
            raise ValueError(f"ranks: {name!r} is not a Conv2d/Linear layer of this model")
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise ValueError(f"ranks: {name} is a grouped conv (groups={module.groups}); it cannot be factored")
        full = min(module.weight.shape[0], module.weight[0].numel())
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
            raise ValueError(f"ranks: {name} needs a rank in 1..{full}, got {rank!r}")
    shapes = latency.input_shapes(model, list(ranks)) if latency is not None else {}
    kept = []
    for name, rank in ranks.items():
        module = modules[name]
        if latency is not None:
            verdict = latency.judge(module, rank, shapes.get(name), name)
            if not verdict.faster:
                kept.append({"layer": name, "rank": rank, "dense_ms": verdict.dense_ms,
                             "factored_ms": verdict.factored_ms, "reason": verdict.reason})
                continue
        new = factored_like(module, rank).to(device=module.weight.device)
        new.train(module.training)
        replace_module(model, name, new)
    return {"totals": {"layers_factored": len(ranks) - len(kept), "layers_kept_dense": len(kept),
                       "params_dense": params_dense, "params_factored": sum(p.numel() for p in model.parameters())},
            "kept": kept}


def compare_latency(model: str, *, rank: int | None = None, rank_ratio: float | None = None,
                    ranks: dict[str, int] | None = None, image_size: int = 224,
                    batches: list[int] = (1, 32), device: str = "cpu", threads: int | None = None,
                    channels_last: bool | None = None, repeats: int = 20, warmup: int = 3, per_layer: bool = True,
                    latency_aware: bool = False, latency_batch: int | None = None, num_classes: int = 10,
                    small_input: bool | None = None, seed: int = 0, layer_batches: list[int] | None = None,
                    callbacks: LatencyCallbacks | None = None) -> dict[str, Any]:
    """`lowrank latency`: a registered model, dense against factored (and latency-aware factored), measured.

    The factored network is `factorize_model(rank or rank_ratio, method="random")` (speed does not
    depend on the factors' values; random factors cost nothing to draw), or, with `ranks` ({layer: rank},
    e.g. a compress job's per-layer ranks; exactly one of rank, rank_ratio, ranks), exactly those layers
    factored at those ranks and every other layer dense (`factorize_with_ranks`). latency_aware adds the
    variant that keeps dense every layer whose factored form is not faster, timed at
    `LatencyPolicy(batch=latency_batch or batches[0], ...)`, and lists the layers it kept dense. small_input
    None: the small-image stem for images of 64 px or less (as `lowrank train` does). `callbacks`:
    progress and cancellation between measurements (LatencyCancelled). Returns a JSON-able dict: settings,
    the factorizations' parameter counts, `LatencyReport.to_dict()` and the kept layers.
    """
    from core.factorize import factorize_model
    from core.models import build_model

    if sum(x is not None for x in (rank, rank_ratio, ranks)) != 1:
        raise ValueError("give exactly one of rank, rank_ratio or ranks")
    cb = callbacks or LatencyCallbacks()
    small = image_size <= 64 if small_input is None else small_input
    torch.manual_seed(seed)
    dense = build_model(model, num_classes=num_classes, small_input=small).eval()
    factored = copy.deepcopy(dense)
    keys = ("layers_factored", "params_dense", "params_factored")
    if ranks is not None:
        ranks = {str(k): v for k, v in ranks.items()}
        totals = factorize_with_ranks(factored, ranks)["totals"]
    else:
        totals = factorize_model(factored, rank=rank, rank_ratio=rank_ratio, method="random", seed=seed,
                                 compare_spectral=False).totals
    variants = {"factored": factored}
    out: dict[str, Any] = {"model": model, "rank": rank, "rank_ratio": rank_ratio, "image_size": image_size,
                           "small_input": small, "num_classes": num_classes, "batches": list(batches),
                           "factorize": {"factored": {k: totals[k] for k in keys}}}
    if ranks is not None:
        out["ranks"] = dict(ranks)
    split = 0.0
    if latency_aware:
        split = 0.3
        policy = LatencyPolicy(image_size=image_size, batch=latency_batch or batches[0], device=device, threads=threads,
                               channels_last=channels_last, repeats=repeats, warmup=warmup,
                               callbacks=_Scaled(cb, 0.0, split))
        aware = copy.deepcopy(dense)
        if ranks is not None:
            rep = factorize_with_ranks(aware, ranks, latency=policy)
            aware_totals, kept = rep["totals"], rep["kept"]
            out["latency_policy"] = policy.describe()
        else:
            rep_aware = factorize_model(aware, rank=rank, rank_ratio=rank_ratio, method="random", seed=seed,
                                        compare_spectral=False, latency=policy)
            aware_totals = rep_aware.totals
            out["latency_policy"] = rep_aware.latency
            kept = [{"layer": r.layer, "rank": r.rank if r.status == "factored" else None,
                     "dense_ms": r.dense_ms, "factored_ms": r.factored_ms, "reason": r.reason}
                    for r in rep_aware.layers if r.status == "kept_dense"]
        variants["latency-aware"] = aware
        out["factorize"]["latency-aware"] = {k: aware_totals[k] for k in
                                             ("layers_factored", "layers_kept_dense", "params_dense", "params_factored")}
        out["kept_dense"] = kept
        cb.on_progress(split)
    report = measure_latency(dense, variants, image_size=image_size, batches=list(batches), device=device,
                             threads=threads, channels_last=channels_last, repeats=repeats, warmup=warmup,
                             per_layer=per_layer, layers_of="factored", layer_batches=layer_batches,
                             callbacks=_Scaled(cb, split, 1.0))
    out["latency"] = report.to_dict()
    return out
