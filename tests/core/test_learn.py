"""The sample learner (MATH.md Section 6) keeps its promise over many seeds."""
from __future__ import annotations

import math

import pytest
import torch

from core.learn import Teacher, learn_low_rank, noiseless_samples, stein_samples
from core.weights import gaussian_weights

SEEDS = range(20)


pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


def _promise_rate(noise, eps, delta, m=16, d=8, rank=2):
    ok, results = 0, []
    for seed in SEEDS:
        W = gaussian_weights(m, d, seed=seed).double()
        if seed % 5 == 0:
            W[seed % m] = 0.0  # a zero row: never active, must be learned as zero
        if seed % 7 == 0:
            W = W * torch.exp(torch.randn(m, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
        res = learn_low_rank(Teacher(W, noise=noise or 0.0, seed=1000 + seed), d, rank,
                             eps=eps, delta=delta, seed=seed, noise=noise)
        assert res.error is not None and res.nkp_error is not None
        ok += res.error <= res.nkp_error + eps
        results.append(res)
    return ok / len(SEEDS), results


def test_noiseless_promise_over_seeds():
    eps, delta = 0.01, 0.1
    rate, results = _promise_rate(None, eps, delta)
    assert rate >= 1 - delta
    for res in results:
        assert res.estimator == "least_squares"
        assert res.samples == noiseless_samples(16, 8, delta) + 1
        assert res.error == pytest.approx(res.nkp_error, abs=1e-9)  # exact recovery
        assert res.info["rows_underdetermined"] == 0
        assert "ln(m/delta)" in res.rule


def test_noisy_promise_over_seeds():
    eps, delta = 0.25, 0.1
    rate, results = _promise_rate(0.1, eps, delta)
    assert rate >= 1 - delta
    for res in results:
        assert res.estimator == "stein"
        assert res.samples == res.info["pilot_samples"] + stein_samples(res.info["rho"], eps, delta)
        # rho = E||2yx^T - W||^2 / ||W||^2 is about 2d + 3 + 4 noise^2 d m / ||W||^2 for Gaussian inputs
        assert 15 < res.info["rho"] < 30
        assert "tau" in res.rule
    # the rule is conservative: the realized excess error is far below eps
    assert max(r.error - r.nkp_error for r in results) < eps / 10


def test_rules_grow_as_eps_and_delta_shrink():
    assert noiseless_samples(16, 8, 0.01) > noiseless_samples(16, 8, 0.1)
    assert noiseless_samples(1000, 8, 0.1) > noiseless_samples(16, 8, 0.1)
    # at least 2d active samples per row need about 4d samples
    assert 4 * 8 <= noiseless_samples(16, 8, 0.1) <= 4 * 8 + 40
    assert stein_samples(20.0, 0.1, 0.1) > stein_samples(20.0, 0.2, 0.1) > 0
    assert stein_samples(20.0, 0.1, 0.01) > stein_samples(20.0, 0.1, 0.1)
    # n ~ 1 / eps^2 for small eps (tau is about eps / (4 sqrt 2))
    ratio = stein_samples(20.0, 0.01, 0.1) / stein_samples(20.0, 0.02, 0.1)
    assert ratio == pytest.approx(4.0, rel=0.02)


def test_noiseless_hoeffding_rule_holds_by_simulation():
    # P(some row has < 2d active samples) <= delta, checked on Bin(n, 1/2) draws.
    m, d, delta = 16, 8, 0.1
    n = noiseless_samples(m, d, delta)
    g = torch.Generator().manual_seed(0)
    active = (torch.rand(2000, n, m, generator=g) < 0.5).sum(dim=1)
    fail = (active < 2 * d).any(dim=1).double().mean().item()
    assert fail <= delta


def test_teacher_without_known_w_reports_no_error():
    W = gaussian_weights(10, 6, seed=1).double()
    teacher = Teacher(W, seed=2)

    def plain(n):  # only the samples, no `.W`
        return teacher(n)

    res = learn_low_rank(plain, 6, 2, eps=0.1, delta=0.1)
    assert res.error is None and res.nkp_error is None
    assert res.U.shape == (10, 2) and res.V.shape == (2, 6)
    assert res.to_dict()["samples"] == res.samples


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"eps": 0.0}, "eps must be in"),
        ({"eps": 1.5}, "eps must be in"),
        ({"delta": 1.0}, "delta must be in"),
        ({"delta": 0}, "delta must be in"),
        ({"noise": -1.0}, "noise must be"),
        ({"rank": 7}, r"1\.\.min\(m, d\) = 1\.\.6"),
        ({"rank": 0}, "rank must be a positive integer"),
    ],
)
def test_bad_arguments(kwargs, pattern):
    W = gaussian_weights(10, 6, seed=1).double()
    args = {"eps": 0.1, "delta": 0.1, "rank": 2, **kwargs}
    rank = args.pop("rank")
    with pytest.raises(ValueError, match=pattern):
        learn_low_rank(Teacher(W), 6, rank, **args)


def test_teacher_with_wrong_shapes_is_an_error():
    with pytest.raises(ValueError, match=r"teacher\(1\) must return X of shape \(1, 5\)"):
        learn_low_rank(lambda n: (torch.zeros(n, 4), torch.zeros(n, 3)), 5, 1, eps=0.1, delta=0.1)


def test_sample_budget_is_enforced():
    W = gaussian_weights(10, 6, seed=1).double()
    with pytest.raises(ValueError, match="max_samples"):
        learn_low_rank(Teacher(W, noise=0.1), 6, 2, eps=0.01, delta=0.1, noise=0.1, max_samples=100_000)
    assert math.isfinite(stein_samples(20.0, 1.0, 0.5))
