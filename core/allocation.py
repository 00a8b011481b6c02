"""Rank per layer under a parameter budget (MATH.md Section 8, "Rank allocation").

The budget `B` is a fraction of the weight entries of the layers being compressed,
`sum_l m_l d_l`. A layer at rank r costs `r (m + d)` weights, or `m d` when that is not smaller
(it then stays dense; biases are the same either way and not counted). Every strategy returns
`{layer: rank}` with `rank = None` for a layer left dense, and spends at most `B sum_l m_l d_l`:

* `uniform`: one ratio rho, `r_l = max(1, round(rho min(m_l, d_l)))`, the largest rho that fits.
* `energy`: the smallest `r_l` with `sum_{i<=r} s_i^2 >= tau sum_i s_i^2` (spectrum of the matrix
  the method truncates), the largest tau that fits.
* `stable-rank` (Cuttlefish): `r_l = round(kappa ||W_l||_F^2 / ||W_l||_2^2)`, the largest kappa that fits.
* `greedy`: every layer starts at rank 1; repeatedly the step (rank + `rank_step`, or to dense when
  that no longer saves parameters) with the largest weighted error decrease per added parameter is
  taken; a step that does not fit the remaining budget retires its layer. The error curve is
  `e_l(r) = sum_{i>r} s_i^2 / sum_i s_i^2` weighted by the layer's share `w_l` of output energy.
  When it stops no layer's next step fits: the budget is met to within one step per layer.

The three one-parameter strategies find their parameter by bisection; their ranks are monotone
in B layer by layer. A budget below rank 1 everywhere is a `BudgetError` naming the minimum.
"""
from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

import torch

from core.names import ALLOCATIONS

__all__ = ["STRATEGIES", "BudgetError", "LayerShape", "layer_cost", "allocate", "budget_used"]

STRATEGIES = ALLOCATIONS
_BISECT_STEPS = 60


class BudgetError(ValueError):
    """A budget no allocation can meet (or a bad strategy input); the message names the field."""


@dataclass
class LayerShape:
    """One layer to allocate: `m x d`, optionally its target spectrum (descending), its output-energy
    weight (greedy) and its stable rank `||W||_F^2 / ||W||_2^2` (stable-rank)."""

    name: str
    m: int
    d: int
    spectrum: torch.Tensor | None = None
    weight: float = 1.0
    stable_rank: float | None = None

    @property
    def full(self) -> int:
        return min(self.m, self.d)


def layer_cost(m: int, d: int, rank: int | None) -> int:
    """Weights of an `m x d` layer at `rank` (None: dense): `r (m + d)`, or `m d` when not smaller."""
    if rank is None:
        return m * d
    return min(rank * (m + d), m * d)


def _dense_or(m: int, d: int, r: int) -> int | None:
    return None if r * (m + d) >= m * d else r


def budget_used(layers: list[LayerShape], ranks: dict[str, int | None]) -> float:
    """Fraction of the layers' dense weights that `ranks` keeps."""
    return sum(layer_cost(s.m, s.d, ranks[s.name]) for s in layers) / sum(s.m * s.d for s in layers)


def _bisect(layers: list[LayerShape], ranks_at: Callable[[float], dict[str, int | None]], hi: float,
            limit: float) -> dict[str, int | None]:
    """Ranks at the largest parameter in [0, hi] whose cost fits `limit` (ranks non-decreasing in it)."""
    def cost(p: float) -> float:
        r = ranks_at(p)
        return sum(layer_cost(s.m, s.d, r[s.name]) for s in layers)

    if cost(hi) <= limit:
        return ranks_at(hi)
    lo = 0.0
    for _ in range(_BISECT_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) <= limit else (lo, mid)
    return ranks_at(lo)


def _energy_rank(s: torch.Tensor, tau: float) -> int:
    e = s.double().pow(2)
    total = float(e.sum())
    if total <= 0:
        return 1
    cum = torch.cumsum(e, 0) / total
    return max(1, int(torch.searchsorted(cum, torch.tensor([tau - 1e-15], dtype=cum.dtype))[0]) + 1)


def _greedy(layers: list[LayerShape], limit: float, step: int) -> dict[str, int | None]:
    ranks: dict[str, int | None] = {s.name: _dense_or(s.m, s.d, 1) for s in layers}
    used = sum(layer_cost(s.m, s.d, ranks[s.name]) for s in layers)
    curves = {}
    for s in layers:
        e = s.spectrum.double().pow(2)
        total = float(e.sum())
        tail = (total - torch.cumsum(e, 0)) / total if total > 0 else torch.zeros_like(e)
        curves[s.name] = torch.cat([torch.ones(1, dtype=e.dtype), tail.clamp_min(0)]).tolist()  # e(r), r = 0..k

    def next_step(s: LayerShape, r: int) -> tuple[float, int, int | None]:
        nxt = _dense_or(s.m, s.d, min(r + step, s.full))
        gain = s.weight * (curves[s.name][min(r, s.full)] - (0.0 if nxt is None else curves[s.name][nxt]))
        added = layer_cost(s.m, s.d, nxt) - layer_cost(s.m, s.d, r)
        return gain / added, added, nxt

    heap = []
    for i, s in enumerate(layers):
        if ranks[s.name] is not None:
            score, added, nxt = next_step(s, ranks[s.name])
            heap.append((-score, added, i, nxt))
    heapq.heapify(heap)
    while heap:
        _, added, i, nxt = heapq.heappop(heap)
        s = layers[i]
        if used + added > limit:
            continue  # this layer's next step does not fit: it keeps its rank
        used += added
        ranks[s.name] = nxt
        if nxt is not None:
            score, added2, nxt2 = next_step(s, nxt)
            heapq.heappush(heap, (-score, added2, i, nxt2))
    return ranks


def allocate(layers: list[LayerShape], budget: float, strategy: str = "uniform", *, rank_step: int = 1) -> dict[str, int | None]:
    """`{layer name: rank or None (dense)}` spending at most `budget` of the layers' dense weights.

    budget in (0, 1]; strategy one of STRATEGIES; energy and greedy need every `spectrum`,
    greedy its `weight`s, stable-rank every `stable_rank`. rank_step: greedy's delta r (>= 1).
    """
    if strategy not in STRATEGIES:
        raise BudgetError(f"allocation must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise BudgetError(f"budget must be a fraction in (0, 1] of the compressed layers' parameters, got {budget!r}")
    if isinstance(rank_step, bool) or not isinstance(rank_step, int) or rank_step < 1:
        raise BudgetError(f"rank_step must be an integer >= 1, got {rank_step!r}")
    if not layers:
        return {}
    dense = sum(s.m * s.d for s in layers)
    limit = budget * dense
    floor = sum(layer_cost(s.m, s.d, 1) for s in layers)
    if floor > limit:
        raise BudgetError(f"budget {budget} is below the smallest possible: rank 1 in every layer keeps "
                          f"{floor / dense:.4g} of the parameters")
    need = {"energy": "spectrum", "greedy": "spectrum", "stable-rank": "stable_rank"}.get(strategy)
    if need and any(getattr(s, need) is None for s in layers):
        raise BudgetError(f"allocation {strategy} needs each layer's {need.replace('_', ' ')}")
    if strategy == "uniform":
        return _bisect(layers, lambda rho: {s.name: _dense_or(s.m, s.d, max(1, min(s.full, round(rho * s.full))))
                                            for s in layers}, 1.0, limit)
    if strategy == "energy":
        return _bisect(layers, lambda tau: {s.name: _dense_or(s.m, s.d, min(s.full, _energy_rank(s.spectrum, tau)))
                                            for s in layers}, 1.0, limit)
    if strategy == "stable-rank":
        hi = max(s.full / max(s.stable_rank, 1e-12) for s in layers)
        return _bisect(layers, lambda k: {s.name: _dense_or(s.m, s.d, max(1, min(s.full, round(k * s.stable_rank))))
                                          for s in layers}, hi, limit)
    return _greedy(layers, limit, rank_step)
