"""Factorize a whole network: every chosen Conv2d/Linear becomes a low-rank pair (MATH.md Section 7).

For each chosen layer:
1. draw the layer's usual full-rank init (its own `reset_parameters`, seeded from `seed` and the
   layer's dotted name, so the same layer always gets the same init: `fresh_init_weight`);
2. view the weight as the matrix `out x (in*kh*kw)`;
3. compute rank-r factors with `core.approx.approximate` (`spectral`, `rescale`, `nkp`, `random`);
4. replace the layer by `FactoredConv2d` / `FactoredLinear` (core/layers.py).

Defaults follow the paper: the stem conv (first Conv2d) and the classifier (last Linear) stay
dense, grouped and depthwise convs stay dense, and a layer stays full rank when factoring would
not shrink it (`r (m + d) >= m d`). With `latency=LatencyPolicy(...)` (core/latency.py) a layer also
stays dense (`kept_dense`) when its factored form is not measured faster on the policy's device.

Step 3 runs for all chosen layers at once (`core.approx.approximate_many`: nkp batches the layers
of one shape), so a layer's `time_s` holds its share of a batch.
"""
from __future__ import annotations

import copy
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from core.latency import LatencyPolicy
from core.layers import FACTORED_TYPES, FactoredConv2d, FactoredLinear

# torch-free: the API plans factorizations with the same rules (core/model_layers.py)
from core.model_layers import check_layer_names, matches, resolve_rank, shrinks
from core.surgery import replace_module

INIT_METHODS = ("spectral", "rescale", "nkp", "random")


class FactorizeError(ValueError):
    """A bad request to `factorize_model` (rank, method, layer names); the message names the field."""


@dataclass
class LayerRow:
    """One Conv2d/Linear layer in a `FactorizeReport`.

    shape: the weight's shape (`[out, in, kh, kw]` or `[out, in]`); m, d: the matrix view
    `m x d`; rank: the rank used (`min(m, d)` when not factored); status: `factored`,
    `full_rank` (factoring would not shrink it) or `skipped` (see `reason`); error and
    spectral_error: normalized function error `L(UV)/L(0)` (MATH.md Section 2) of the chosen
    init and of spectral init at the same rank (0.0 for layers left unchanged, None when
    factors were not computed); time_s: seconds spent on this layer's fresh init, factors (its
    share of a batch) and replacement; dense_ms, factored_ms: with a latency policy, the measured
    forward time (fastest sample, core/latency.py) of the dense layer and of its factored form (status
    `kept_dense` when the factored form is not faster; None without a policy or for a layer the
    forward pass never calls).
    """

    layer: str
    kind: str
    shape: list[int]
    m: int
    d: int
    rank: int
    status: str
    reason: str | None
    params_dense: int
    params_factored: int
    error: float | None
    spectral_error: float | None
    time_s: float = 0.0
    dense_ms: float | None = None
    factored_ms: float | None = None


@dataclass
class FactorizeReport:
    method: str
    rank: int | None
    rank_ratio: float | None
    seed: int
    layers: list[LayerRow] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, Any] | None = None  # the latency policy's settings, when one was given

    def factored(self) -> list[LayerRow]:
        return [row for row in self.layers if row.status == "factored"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: method, rank, rank_ratio, seed, layers (list of row dicts), totals, latency."""
        return {
            "method": self.method,
            "rank": self.rank,
            "rank_ratio": self.rank_ratio,
            "seed": self.seed,
            "layers": [asdict(row) for row in self.layers],
            "totals": dict(self.totals),
            "latency": self.latency,
        }


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed derived from the run's seed and the layer's dotted name (stable across runs)."""
    return zlib.crc32(f"{int(seed)}:{name}".encode()) & 0x7FFFFFFF


def fresh_init_layer(module: nn.Conv2d | nn.Linear, name: str, seed: int) -> nn.Conv2d | nn.Linear:
    """A CPU copy of `module` re-drawn with its own `reset_parameters()` under `layer_seed(seed, name)`.

    The global RNG is left untouched. Drawn on CPU so the same seed gives the same weights on any device.
    """
    fresh = copy.deepcopy(module).to("cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(layer_seed(seed, name))
        fresh.reset_parameters()
    return fresh


def fresh_init_weight(module: nn.Conv2d | nn.Linear, name: str, seed: int) -> torch.Tensor:
    """The matrix view `(out, in*kh*kw)` (float32, CPU) of `fresh_init_layer(module, name, seed)`."""
    return fresh_init_layer(module, name, seed).weight.detach().reshape(module.weight.shape[0], -1).float()


def _matrix_shape(module: nn.Conv2d | nn.Linear) -> tuple[int, int]:
    w = module.weight
    return w.shape[0], w[0].numel()


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def candidate_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d | nn.Linear]]:
    """Every plain Conv2d/Linear of `model` in registration order (not the halves of factored layers)."""
    inside_factored: set[str] = set()
    out = []
    for name, module in model.named_modules():
        if isinstance(module, FACTORED_TYPES):
            inside_factored.update(f"{name}.{child}" for child in ("u", "v"))
            continue
        if name in inside_factored:
            continue
        if type(module) in (nn.Conv2d, nn.Linear):
            out.append((name, module))
    return out


def _check_names(field_name: str, patterns: list[str] | None, names: list[str]) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        raise FactorizeError(f"{field_name} must be a list of dotted layer names, got the string {patterns!r}")
    try:
        check_layer_names(field_name, patterns, names)
    except ValueError as exc:
        raise FactorizeError(str(exc)) from None
    return list(patterns)


def factorize_model(
    model: nn.Module,
    *,
    rank: int | None = None,
    rank_ratio: float | None = None,
    method: str = "nkp",
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    seed: int = 0,
    compare_spectral: bool = True,
    weights: str = "init",
    always_factor: bool = False,
    compute_init: bool = True,
    approx_options: dict[str, Any] | None = None,
    latency: LatencyPolicy | None = None,
) -> FactorizeReport:
    """Replace the chosen Conv2d/Linear layers of `model` (in place) by low-rank factored layers.

    rank (int >= 1) or rank_ratio (in (0, 1], of `min(out, in*kh*kw)`): exactly one is given.
    method: one of INIT_METHODS, passed to `core.approx.approximate` per layer.
    include / exclude: dotted names (a name also covers the layers under it); with `include` only
    those layers are considered (the stem and classifier too, if named). Unknown names are errors.
    seed: seeds each layer's fresh init (`fresh_init_weight`) and the approximation; the global
    RNG is not used (its state is the same after the call).
    compare_spectral: also compute spectral's error per layer (`spectral_error`).
    weights: "init" approximates each layer's seeded fresh init (the paper's setting);
    "current" approximates the weights the model holds now (e.g. trained ones).
    always_factor: factor even where it does not shrink the layer (tests, analysis).
    compute_init: False builds the factored structure with placeholder weights only (used when a
    checkpoint's state is loaded right after); errors are then None.
    latency: a `core.latency.LatencyPolicy`: a layer that would be factored stays dense (status
    `kept_dense`, both measured times in its row) unless its factored form is faster on the
    policy's device, at the policy's batch and image size.
    Returns a FactorizeReport (rows for every Conv2d/Linear; totals over the whole model).
    """
    if method not in INIT_METHODS:
        raise FactorizeError(f"method must be one of {', '.join(INIT_METHODS)}, got {method!r}")
    if (rank is None) == (rank_ratio is None):
        raise FactorizeError("give exactly one of rank (int >= 1) or rank_ratio (in (0, 1])")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise FactorizeError(f"rank must be an integer >= 1, got {rank!r}")
    if rank_ratio is not None and not (0.0 < float(rank_ratio) <= 1.0):
        raise FactorizeError(f"rank_ratio must be in (0, 1], got {rank_ratio!r}")
    if weights not in ("init", "current"):
        raise FactorizeError(f"weights must be 'init' or 'current', got {weights!r}")
    if latency is not None and not isinstance(latency, LatencyPolicy):
        raise FactorizeError(f"latency must be a core.latency.LatencyPolicy, got {type(latency).__name__}")

    from core.approx import approximate_many  # the per-layer algorithms (owned by core/approx.py)

    t_start = time.perf_counter()
    params_before = _params(model)
    layers = candidate_layers(model)
    names = [n for n, _ in layers]
    include = _check_names("include", include, names)
    exclude = _check_names("exclude", exclude, names)
    convs = [n for n, mod in layers if isinstance(mod, nn.Conv2d)]
    linears = [n for n, mod in layers if isinstance(mod, nn.Linear)]
    stem = convs[0] if convs else None
    classifier = linears[-1] if linears else None

    report = FactorizeReport(method=method, rank=rank, rank_ratio=rank_ratio, seed=int(seed),
                             latency=latency.describe() if latency is not None else None)
    chosen: list[tuple[LayerRow, str, nn.Module, int]] = []  # the layers to factor, with their rank
    shapes: dict[str, tuple[int, ...]] | None = None
    for name, module in layers:
        m, d = _matrix_shape(module)
        kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
        dense = _params(module)
        row = LayerRow(layer=name, kind=kind, shape=list(module.weight.shape), m=m, d=d, rank=min(m, d),
                       status="skipped", reason=None, params_dense=dense, params_factored=dense,
                       error=0.0, spectral_error=0.0)
        report.layers.append(row)

        explicitly = include and name in include
        if include and not any(matches(name, p) for p in include):
            row.reason = "not included"
            continue
        if any(matches(name, p) for p in exclude):
            row.reason = "excluded"
            continue
        if kind == "conv" and module.groups != 1:
            if explicitly:
                raise FactorizeError(f"include: {name} is a grouped conv (groups={module.groups}); "
                                     "grouped and depthwise convs cannot be factored")
            row.reason = f"grouped conv (groups={module.groups})"
            continue
        if not include and name == stem:
            row.reason = "stem conv"
            continue
        if not include and name == classifier:
            row.reason = "classifier"
            continue

        r = resolve_rank(m, d, rank=rank, rank_ratio=rank_ratio)
        if not shrinks(m, d, r) and not always_factor:
            row.status, row.reason = "full_rank", f"rank {r} would not reduce parameters"
            continue
        if latency is not None:
            if shapes is None:  # one forward pass of the dense network, before anything is replaced
                shapes = latency.input_shapes(model, names)
            verdict = latency.judge(module, r, shapes.get(name), name=name)
            row.dense_ms, row.factored_ms = verdict.dense_ms, verdict.factored_ms
            if not verdict.faster:
                row.status, row.reason = "kept_dense", verdict.reason
                continue
        chosen.append((row, name, module, r))

    sources = []
    for row, name, module, _ in chosen:
        t0 = time.perf_counter()
        sources.append(fresh_init_layer(module, name, seed) if weights == "init" else module)
        row.time_s = time.perf_counter() - t0
    if compute_init and chosen:
        Ws = [src.weight.detach().reshape(row.m, row.d).float().cpu() for (row, *_), src in zip(chosen, sources)]
        ranks = [r for *_, r in chosen]
        seeds = [layer_seed(seed, name) for _, name, _, _ in chosen]
        approxs = approximate_many(Ws, ranks, method, seeds=seeds, **(approx_options or {}))
        spectral = (approximate_many(Ws, ranks, "spectral", seeds=seeds)
                    if compare_spectral and method != "spectral" else None)
    for i, ((row, name, module, r), source) in enumerate(zip(chosen, sources)):
        t0 = time.perf_counter()
        m, d = row.m, row.d
        if compute_init:
            approx = approxs[i]
            U, V = approx.U, approx.V
            row.error = float(approx.error)
            row.spectral_error = (None if not compare_spectral else row.error if spectral is None
                                  else float(spectral[i].error))
            row.time_s += approx.time_s
        else:
            U, V = torch.zeros(m, r), torch.zeros(r, d)
            row.error = row.spectral_error = None
        dtype, device = module.weight.dtype, module.weight.device
        # `source` carries the bias the factored layer keeps (the fresh one in "init" mode).
        # Building the two halves draws their (overwritten) default init: keep the global RNG as it was.
        with torch.random.fork_rng(devices=[]):
            if isinstance(module, nn.Conv2d):
                new = FactoredConv2d.from_conv(source, U.float(), V.float())
            else:
                new = FactoredLinear.from_linear(source, U.float(), V.float())
        new.to(device=device, dtype=dtype)
        new.train(module.training)
        replace_module(model, name, new)
        row.rank, row.status, row.reason = r, "factored", None
        row.params_factored = _params(new)
        row.time_s += time.perf_counter() - t0

    factored = report.factored()
    errors = [r.error for r in factored if r.error is not None]
    spectral = [r.spectral_error for r in factored if r.spectral_error is not None]
    params_after = _params(model)
    report.totals = {
        "layers": len(layers),
        "layers_factored": len(factored),
        "layers_kept_dense": sum(row.status == "kept_dense" for row in report.layers),
        "params_dense": params_before,
        "params_factored": params_after,
        "param_ratio": params_after / params_before if params_before else 1.0,
        "mean_error": sum(errors) / len(errors) if errors else None,
        "mean_spectral_error": sum(spectral) / len(spectral) if spectral else None,
        "time_s": time.perf_counter() - t_start,
    }
    return report
