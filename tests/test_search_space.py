"""The search configuration without a service: dimensions to Optuna distributions and back, the size of
a discrete space, the random unseen point that replaces a sampler's repeat, and a rebuilt study asking
the same point for the same trial rows."""
from __future__ import annotations

import itertools

import pytest
from pydantic import ValidationError

from jobs import models as m
from jobs.search import _study
from jobs.searchspace import SearchConfig, canonical, distributions, space_size, to_params, to_point, unseen_point

OBJ = [{"metric": "error", "direction": "minimize"}]


def config(space: dict, n: int = 4, **extra) -> SearchConfig:
    return SearchConfig.model_validate({"space": space, "objectives": OBJ, "n_trials": n, **extra})


def test_points_round_trip_through_optuna_params():
    space = {"rank": {"type": "int", "low": 1, "high": 64, "log": True},
             "lr": {"type": "float", "low": 1e-3, "high": 0.3, "log": True},
             "include": {"type": "categorical", "choices": [["layer1"], ["layer1", "layer2"], None, {"a": 1}]}}
    cfg = config(space)
    dumped = cfg.model_dump(mode="json")["space"]
    dists = distributions(dumped)
    point = {"include": {"a": 1}, "lr": 0.01, "rank": 8}
    params = to_params(dumped, point)
    assert params["include"] == 3  # the choice's index: Optuna's categorical parameters are scalars
    assert all(dists[k]._contains(dists[k].to_internal_repr(v)) for k, v in params.items())
    assert to_point(dumped, params) == point and list(to_point(dumped, params)) == sorted(point)


def test_parallelism_defaults_to_at_most_four_and_the_budget_is_checked():
    assert config({"rank": {"type": "int", "low": 1, "high": 8}}, n=2).parallelism == 2
    assert config({"rank": {"type": "int", "low": 1, "high": 8}}, n=40).parallelism == 4
    with pytest.raises(ValidationError, match="parallelism"):
        config({"rank": {"type": "int", "low": 1, "high": 8}}, n=2, parallelism=3)
    with pytest.raises(ValidationError, match="NaN"):
        config({"x": {"type": "categorical", "choices": [1.0, float("nan")]}})
    with pytest.raises(ValidationError, match="whole multiple"):  # a step too small to count is refused, not a 500
        config({"x": {"type": "float", "low": -1e300, "high": 1e300, "step": 1e-300}})


@pytest.mark.parametrize("space, size", [
    ({"r": {"type": "int", "low": 1, "high": 10, "step": 3}}, 4),
    ({"r": {"type": "int", "low": 1, "high": 64, "log": True}, "m": {"type": "categorical", "choices": [1, 2, 3]}}, 192),
    ({"x": {"type": "float", "low": 0.0, "high": 1.0, "step": 0.25}}, 5),
    ({"x": {"type": "float", "low": 0.0, "high": 1.0}}, None),
])
def test_space_size(space, size):
    assert space_size(config(space, n=1)) == size


def test_unseen_point_is_the_last_one_left_and_none_when_all_are_taken():
    space = {"r": {"type": "int", "low": 1, "high": 10, "step": 3}, "m": {"type": "categorical", "choices": ["a", "b"]}}
    cfg = config(space, n=8)
    dumped = cfg.model_dump(mode="json")["space"]
    every = [{"m": mm, "r": r} for mm, r in itertools.product(["a", "b"], [1, 4, 7, 10])]
    seen = {canonical(p) for p in every if p != {"m": "b", "r": 7}}
    assert unseen_point(cfg, dumped, seen, number=5) == {"m": "b", "r": 7}
    assert unseen_point(cfg, dumped, {canonical(p) for p in every}, number=5) is None
    # Continuous: rejection sampling, inside the bounds.
    cont = config({"x": {"type": "float", "low": 0.5, "high": 2.0, "log": True}})
    p = unseen_point(cont, cont.model_dump(mode="json")["space"], set(), number=0)
    assert 0.5 <= p["x"] <= 2.0


def test_the_same_rows_give_the_same_ask():
    """The study is rebuilt from the trial rows and its sampler seeded by (seed, next number): the same
    rows ask the same point on any process; another seed asks another."""
    space = {"rank": {"type": "int", "low": 1, "high": 1000}, "m": {"type": "categorical", "choices": ["a", "b", "c"]}}
    cfg = config(space, n=50, parallelism=2, startup_trials=3)
    dumped = cfg.model_dump(mode="json")["space"]
    rows = [m.SearchTrial(number=i, point={"m": "abc"[i % 3], "rank": 10 * i + 1}, state="complete",
                          values=[1.0 / (i + 1)]) for i in range(6)]
    rows.append(m.SearchTrial(number=6, point={"m": "a", "rank": 500}, state="running"))

    def ask(seed: int) -> dict:
        c = cfg.model_copy(update={"seed": seed})
        return to_point(dumped, _study(c, dumped, rows, 7).ask(distributions(dumped)).params)

    assert ask(0) == ask(0)
    assert any(ask(s) != ask(0) for s in (1, 2, 3))
