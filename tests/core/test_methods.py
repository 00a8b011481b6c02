"""The approximation methods (MATH.md Sections 3-5): ordering, optimality, monotone NKP, contracts."""
from __future__ import annotations

import math

import pytest
import torch

from core.approx import METHODS, Approximation, approximate, function_error

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


SLACK = 1e-12  # float64 round-off allowed in the ordering nkp <= rescale <= spectral (relative)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_instance(seed: int) -> torch.Tensor:
    g = _gen(seed)
    m = int(torch.randint(4, 40, (1,), generator=g))
    d = int(torch.randint(3, 16, (1,), generator=g))
    return torch.randn(m, d, generator=g, dtype=torch.float64) / math.sqrt(d)


def _structured_instances() -> dict[str, torch.Tensor]:
    g = _gen(1234)
    low = torch.randn(40, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 12, generator=g, dtype=torch.float64)
    heavy = torch.randn(50, 10, generator=g, dtype=torch.float64)
    heavy = heavy * torch.exp(2.0 * torch.randn(50, 1, generator=g, dtype=torch.float64))  # log-normal row norms
    pareto = torch.randn(30, 8, generator=g, dtype=torch.float64)
    pareto = pareto * (torch.rand(30, 1, generator=g, dtype=torch.float64) ** (-1 / 1.5))  # Pareto(1.5) row norms
    with_zero = torch.randn(20, 7, generator=g, dtype=torch.float64)
    with_zero[::4] = 0.0  # zero rows
    with_zero[1] = -with_zero[2]  # anti-aligned pair
    rank_def = torch.randn(25, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 9, generator=g, dtype=torch.float64)
    return {
        "low_rank_plus_noise": low + 0.05 * torch.randn(40, 12, generator=g, dtype=torch.float64),
        "lognormal_row_norms": heavy,
        "pareto_row_norms": pareto,
        "zero_and_anti_aligned_rows": with_zero,
        "wide": torch.randn(6, 20, generator=g, dtype=torch.float64),
        "exactly_rank_4": rank_def,
    }


def _check_ordering(W: torch.Tensor, label: str) -> None:
    rank_w = int(torch.linalg.matrix_rank(W))
    for r in range(1, rank_w):
        e = {m: approximate(W, r, m).error for m in ("spectral", "rescale", "nkp")}
        assert e["rescale"] <= e["spectral"] * (1 + SLACK) + SLACK, (label, r, e)
        assert e["nkp"] <= e["rescale"] * (1 + SLACK) + SLACK, (label, r, e)


@pytest.mark.parametrize("seed", range(50))
def test_ordering_on_random_instances(seed):
    _check_ordering(_random_instance(seed), f"random seed {seed}")


@pytest.mark.parametrize("name", sorted(_structured_instances()))
def test_ordering_on_structured_instances(name):
    _check_ordering(_structured_instances()[name], name)


def test_rescale_strictly_beats_spectral_below_full_rank():
    W = _random_instance(7)
    for r in range(1, min(W.shape)):
        assert approximate(W, r, "rescale").error < approximate(W, r, "spectral").error


@pytest.mark.parametrize("method", [m for m in METHODS if m != "random"])
def test_full_rank_is_exact(method):
    for shape in ((12, 5), (5, 12), (7, 7)):
        W = torch.randn(*shape, generator=_gen(sum(shape)), dtype=torch.float64)
        a = approximate(W, min(shape), method)
        assert a.error < 1e-12, (method, shape, a.error)
        torch.testing.assert_close(a.U @ a.V, W, rtol=1e-9, atol=1e-9)


def test_random_full_rank_is_not_exact_and_has_the_variance_of_w():
    W = torch.randn(300, 200, generator=_gen(3), dtype=torch.float64) * 0.3
    a = approximate(W, 200, "random", seed=5)
    assert a.error > 0.5
    prod = a.U @ a.V
    assert prod.var().item() == pytest.approx(0.09, rel=0.05)  # Var((UV)_ij) = mean W_ij^2 = 0.3^2
    assert a.info["entry_variance"] == pytest.approx(W.pow(2).mean().item())
    # A uniform U(-1/sqrt(d), 1/sqrt(d)) init (nn.Linear's reset_parameters) has variance 1/(3d).
    lin = torch.nn.Linear(400, 100)
    u = approximate(lin.weight.detach(), 50, "random", seed=0)
    assert (u.U @ u.V).var().item() == pytest.approx(1 / 1200, rel=0.1)
    b = approximate(W, 200, "random", seed=5)
    assert torch.equal(a.U, b.U) and torch.equal(a.V, b.V)
    c = approximate(W, 200, "random", seed=6)
    assert not torch.equal(a.U, c.U)
    r4 = approximate(W, 4, "random", seed=0)
    assert (r4.U @ r4.V).var().item() == pytest.approx(0.09, rel=0.2)


@pytest.mark.parametrize("seed", range(6))
def test_nkp_objective_never_decreases(seed):
    W = _random_instance(100 + seed)
    W = torch.cat([W, 5 * W[:3]])  # uneven row norms
    for r in range(1, min(W.shape)):
        a = approximate(W, r, "nkp", restarts=2, seed=seed, tol=0.0, max_iter=30)
        assert len(a.info["histories"]) == 3
        for hist in a.info["histories"]:
            assert all(b >= a_ for a_, b in zip(hist, hist[1:])), hist
        # the reported error is 1 - F at the final subspace (Section 3: row error |w|^2/2 (1 - h^2))
        assert a.error == pytest.approx(1 - a.info["objective_history"][-1], rel=1e-9, abs=1e-12)


def test_nkp_without_acceleration_is_monotone_and_agrees():
    W = torch.randn(60, 12, generator=_gen(8), dtype=torch.float64)
    plain = approximate(W, 3, "nkp", accelerate=False, tol=1e-12, max_iter=2000)
    fast = approximate(W, 3, "nkp", tol=1e-12, max_iter=2000)
    h = plain.info["objective_history"]
    assert all(b >= a for a, b in zip(h, h[1:]))
    assert fast.iterations < plain.iterations
    assert fast.error == pytest.approx(plain.error, rel=1e-4)


def test_restarts_never_hurt():
    for seed in range(5):
        W = _random_instance(200 + seed)
        base = approximate(W, 1, "nkp")
        multi = approximate(W, 1, "nkp", restarts=3, seed=seed)
        assert multi.error <= base.error * (1 + SLACK)
        assert multi.info["starts"] == ["spectral", "random1", "random2", "random3"]


def test_spectral_is_truncated_svd_with_balanced_factors():
    W = torch.randn(15, 9, generator=_gen(9), dtype=torch.float64)
    A, S, Vh = torch.linalg.svd(W, full_matrices=False)
    a = approximate(W, 3, "spectral")
    torch.testing.assert_close(a.U @ a.V, A[:, :3] * S[:3] @ Vh[:3])
    torch.testing.assert_close(a.U.T @ a.U, a.V @ a.V.T)  # balanced: both equal diag(S_r)
    ub = approximate(W, 3, "spectral", balanced=False)
    torch.testing.assert_close(ub.V @ ub.V.T, torch.eye(3, dtype=torch.float64))
    assert ub.error == pytest.approx(a.error, rel=1e-12)


@pytest.mark.parametrize("method", ["rescale", "nkp"])
def test_balanced_option(method):
    W = torch.randn(15, 9, generator=_gen(10), dtype=torch.float64)
    bal = approximate(W, 4, method)
    unb = approximate(W, 4, method, balanced=False)
    torch.testing.assert_close(bal.U.T @ bal.U, bal.V @ bal.V.T)
    torch.testing.assert_close(unb.V @ unb.V.T, torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(bal.U @ bal.V, unb.U @ unb.V)


def test_rescale_rows_are_optimally_scaled_projections():
    W = torch.randn(10, 6, generator=_gen(11), dtype=torch.float64)
    a = approximate(W, 2, "rescale")
    _, _, Vh = torch.linalg.svd(W, full_matrices=False)
    P = Vh[:2].T
    proj = W @ P @ P.T
    c = proj.norm(dim=1) / W.norm(dim=1)
    t = W.norm(dim=1) * (torch.sqrt(1 - c**2) + (math.pi - torch.arccos(c)) * c) / math.pi
    torch.testing.assert_close(a.U @ a.V, proj / proj.norm(dim=1, keepdim=True) * t[:, None])
    # and the per-row error is |w|^2/2 (1 - h(c)^2)
    h = t / W.norm(dim=1)
    expected = (W.norm(dim=1) ** 2 / 2 * (1 - h**2)).sum() / (W.pow(2).sum() / 2)
    assert a.error == pytest.approx(expected.item(), rel=1e-10)


def test_row_orthogonal_to_subspace_keeps_norm_over_pi():
    # Row 3 is orthogonal to the top singular direction, so c = 0 and its best norm is |w|/pi.
    W = torch.tensor([[10.0, 0, 0], [9.0, 0, 0], [11.0, 0, 0], [0, 2.0, 0]], dtype=torch.float64)
    a = approximate(W, 1, "rescale")
    row = (a.U @ a.V)[3]
    assert row.norm().item() == pytest.approx(2.0 / math.pi, rel=1e-12)
    assert a.error == pytest.approx(function_error(W, a.U @ a.V), rel=1e-14)


def test_result_contract_and_dtypes():
    W = torch.randn(20, 8, generator=_gen(12))  # float32
    for method in METHODS:
        a = approximate(W, 3, method, seed=1)
        assert isinstance(a, Approximation)
        assert a.U.shape == (20, 3) and a.V.shape == (3, 8)
        assert a.U.dtype == torch.float32 and a.V.dtype == torch.float32
        assert a.method == method and a.rank == 3 and a.time_s > 0
        assert (a.iterations >= 1) if method in ("nkp", "reference") else (a.iterations == 0), (method, a.iterations)
        assert a.error == pytest.approx(function_error(W, (a.U, a.V)), rel=1e-12)
        import json

        json.dumps(a.to_dict())  # info is JSON-able


def test_integer_weights_become_float32():
    W = torch.randint(-5, 6, (10, 6), generator=_gen(13))
    a = approximate(W, 2, "nkp")
    assert a.U.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"rank": 0}, r"1\.\.min\(m, d\) = 1\.\.4"),
        ({"rank": 5}, r"1\.\.min\(m, d\) = 1\.\.4"),
        ({"rank": True}, "integer"),
        ({"rank": 2.0}, "integer"),
        ({"method": "svd"}, "method must be one of spectral, rescale, nkp, random, reference"),
        ({"max_iters": 3}, "unknown option.*max_iters"),
        ({"method": "spectral", "restarts": 2}, "unknown option.*restarts"),
        ({"max_iter": 0}, "max_iter must be an integer >= 1"),
        ({"tol": -1.0}, "tol must be"),
        ({"balanced": "yes"}, "balanced must be true or false"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, pattern):
    W = torch.randn(6, 4, dtype=torch.float64)
    args = {"rank": 2, "method": "nkp", **kwargs}
    rank, method = args.pop("rank"), args.pop("method")
    with pytest.raises(ValueError, match=pattern):
        approximate(W, rank, method, **args)


def test_bad_weights_raise_clear_errors():
    W = torch.randn(6, 4, dtype=torch.float64)
    W[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        approximate(W, 2, "nkp")
    W[1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        approximate(W, 2, "spectral")
    with pytest.raises(ValueError, match=r"2-D.*\(2, 3, 4\)"):
        approximate(torch.zeros(2, 3, 4), 1, "nkp")
    with pytest.raises(ValueError, match="all zeros"):
        approximate(torch.zeros(5, 3), 1, "nkp")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is absent")
def test_cuda_device_without_cuda_is_an_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        approximate(torch.randn(5, 3), 1, "nkp", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_matches_cpu(method):
    W = torch.randn(200, 64, generator=_gen(14)) / 8
    for r in (1, 8, 32):
        cpu = approximate(W, r, method, seed=3, device="cpu")
        gpu = approximate(W, r, method, seed=3, device="cuda")
        assert gpu.U.device.type == "cuda"
        assert gpu.error == pytest.approx(cpu.error, abs=1e-6), (method, r)


def test_parameter_input_and_seed_type():
    layer = torch.nn.Linear(8, 12)
    a = approximate(layer.weight, 3, "nkp")  # an nn.Parameter: no autograd graph, plain factors
    assert not a.U.requires_grad and a.U.shape == (12, 3)
    with pytest.raises(ValueError, match="seed must be an integer"):
        approximate(layer.weight, 3, "random", seed="1")
