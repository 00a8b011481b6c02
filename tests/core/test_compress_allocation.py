"""Rank allocation under a parameter budget (MATH.md Section 8): every strategy meets the budget,
greedy to within one rank step per layer, the one-parameter strategies are monotone in the budget."""
from __future__ import annotations

import pytest
import torch

from core.allocation import STRATEGIES, BudgetError, LayerShape, allocate, budget_used, layer_cost

BUDGETS = (0.08, 0.15, 0.25, 0.4, 0.6, 0.85, 1.0)


def _layers(seed: int = 0) -> list[LayerShape]:
    """Layers of mixed shapes (conv-like and square) with spectra of different decay and energy."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 576), (128, 576), (128, 1152), (256, 128), (256, 2304), (48, 48), (512, 256)]
    out = []
    for i, (m, d) in enumerate(shapes):
        k = min(m, d)
        decay = 0.85 + 0.14 * torch.rand(1, generator=g).item()
        spectrum = decay ** torch.arange(k, dtype=torch.float64) * (1 + torch.rand(1, generator=g).item())
        out.append(LayerShape(f"layer{i}", m, d, spectrum=spectrum, weight=float(torch.rand(1, generator=g)) + 0.1,
                              stable_rank=float(spectrum.pow(2).sum() / spectrum[0] ** 2)))
    total = sum(s.weight for s in out)
    for s in out:
        s.weight /= total
    return out


def _step_cost(s: LayerShape, r: int, step: int) -> int:
    nxt = min(r + step, s.full)
    return layer_cost(s.m, s.d, None if nxt * (s.m + s.d) >= s.m * s.d else nxt) - layer_cost(s.m, s.d, r)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_meets_the_budget_and_grows_with_it(strategy):
    layers = _layers()
    previous = None
    for budget in BUDGETS:
        ranks = allocate(layers, budget, strategy)
        assert set(ranks) == {s.name for s in layers}
        used = budget_used(layers, ranks)
        assert used <= budget + 1e-12, (budget, used)
        for s in layers:
            r = ranks[s.name]
            assert r is None or (1 <= r <= s.full and r * (s.m + s.d) < s.m * s.d)  # factored only where it saves
        if previous is not None:
            assert used >= previous[0] - 1e-12  # more budget never means fewer parameters
            if strategy != "greedy":  # one monotone parameter: every layer's rank is monotone too
                for s in layers:
                    before, now = previous[1][s.name], ranks[s.name]
                    assert now is None or (before is not None and now >= before), (s.name, before, now)
        previous = (used, ranks)
    if strategy != "energy":  # (energy at tau = 1 stops at each spectrum's numerical rank)
        assert all(r is None for r in allocate(layers, 1.0, strategy).values())  # the whole budget: all dense


@pytest.mark.parametrize("step", [1, 4])
def test_greedy_fills_the_budget_to_within_one_rank_step_per_layer(step):
    layers = _layers(seed=1)
    dense = sum(s.m * s.d for s in layers)
    for budget in (0.1, 0.2, 0.3, 0.5):
        ranks = allocate(layers, budget, "greedy", rank_step=step)
        left = budget * dense - sum(layer_cost(s.m, s.d, ranks[s.name]) for s in layers)
        assert left >= 0
        for s in layers:
            if ranks[s.name] is not None:  # its next step must not fit what is left
                assert _step_cost(s, ranks[s.name], step) > left, (budget, s.name, ranks[s.name], left)
        # and what is left is less than the largest single step of any layer
        assert left < max(_step_cost(s, ranks[s.name], step) for s in layers if ranks[s.name] is not None)


def test_greedy_gives_rank_where_the_error_falls_slowly():
    flat = torch.ones(64, dtype=torch.float64)                         # every direction matters
    steep = 0.5 ** torch.arange(64, dtype=torch.float64)               # one direction carries it all
    layers = [LayerShape("flat", 64, 256, spectrum=flat, weight=0.5), LayerShape("steep", 64, 256, spectrum=steep, weight=0.5)]
    ranks = allocate(layers, 0.3, "greedy")
    assert ranks["flat"] > 4 * ranks["steep"]
    # the output-energy weights move rank toward the layer that matters more
    a = allocate([LayerShape("a", 64, 256, spectrum=flat, weight=0.9), LayerShape("b", 64, 256, spectrum=flat, weight=0.1)], 0.3, "greedy")
    assert a["a"] > a["b"]


def test_energy_keeps_the_asked_fraction_of_each_spectrum():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.5] + [0.01] * 59, dtype=torch.float64)
    ranks = allocate([LayerShape("x", 64, 512, spectrum=s)], 0.3, "energy")
    r = ranks["x"]
    energy = s.pow(2)
    assert r is not None and layer_cost(64, 512, r) <= 0.3 * 64 * 512
    # the largest budget-fitting tau gives the largest rank that fits: one more would not
    assert layer_cost(64, 512, r + 1) > 0.3 * 64 * 512
    assert float(energy[:r].sum() / energy.sum()) > 0.99


def test_stable_rank_is_proportional():
    layers = [LayerShape("lo", 128, 512, stable_rank=2.0), LayerShape("hi", 128, 512, stable_rank=20.0)]
    ranks = allocate(layers, 0.25, "stable-rank")
    assert ranks["hi"] == pytest.approx(10 * ranks["lo"], rel=0.1)


def test_bad_budgets_and_inputs_name_the_field():
    layers = _layers()
    with pytest.raises(BudgetError, match="smallest possible: rank 1 in every layer keeps"):
        allocate(layers, 0.001, "uniform")
    for bad in (0, 1.5, -0.1, True):
        with pytest.raises(BudgetError, match="budget must be a fraction in"):
            allocate(layers, bad, "uniform")
    with pytest.raises(BudgetError, match="allocation must be one of"):
        allocate(layers, 0.3, "best")
    with pytest.raises(BudgetError, match="needs each layer's spectrum"):
        allocate([LayerShape("x", 8, 8)], 0.9, "greedy")
    with pytest.raises(BudgetError, match="rank_step"):
        allocate(layers, 0.3, "greedy", rank_step=0)
