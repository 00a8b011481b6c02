"""The closed-form function error (MATH.md Section 2) against its definition and Monte Carlo."""
from __future__ import annotations

import math

import pytest
import torch

from core.approx import function_error, function_error_grad, mc_function_error, relu_kernel_h

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _textbook_rows(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """l(a, b) = |a|^2/2 + |b|^2/2 - |a||b| J(theta)/pi with theta = arccos(clamped cos) (nonzero rows)."""
    na, nb = A.norm(dim=1), B.norm(dim=1)
    cos = ((A * B).sum(dim=1) / (na * nb)).clamp(-1, 1)
    t = torch.arccos(cos)
    J = torch.sin(t) + (math.pi - t) * torch.cos(t)
    return na**2 / 2 + nb**2 / 2 - na * nb * J / math.pi


def _mc_check(W, Wa, cov=None, n=100_000, seed=1):
    exact = function_error(W, Wa, cov=cov)
    mean, se = mc_function_error(W, Wa, n, seed=seed, cov=cov)
    assert se > 0
    assert abs(mean - exact) <= 4 * se, (exact, mean, se)
    return exact, mean, se


def test_self_error_is_exactly_zero():
    W = torch.randn(50, 13, generator=_gen(0), dtype=torch.float64)
    rows = function_error(W, W.clone(), per_row=True, normalized=False)
    assert torch.all(rows == 0)
    assert function_error(W, W) == 0.0
    # float32 input, same story (computed in float64)
    W32 = W.float()
    assert function_error(W32, W32.clone()) == 0.0


def test_matches_textbook_formula_on_random_pairs():
    A = torch.randn(200, 7, generator=_gen(1), dtype=torch.float64)
    B = torch.randn(200, 7, generator=_gen(2), dtype=torch.float64) * torch.rand(200, 1, generator=_gen(3), dtype=torch.float64) * 3
    rows = function_error(A, B, per_row=True, normalized=False)
    torch.testing.assert_close(rows, _textbook_rows(A, B), rtol=1e-10, atol=1e-12)


def test_special_rows_zero_anti_aligned_orthogonal_scaled():
    a = torch.tensor([[3.0, 4.0, 0.0]], dtype=torch.float64)  # |a| = 5
    b_orth = torch.tensor([[0.0, 0.0, 2.0]], dtype=torch.float64)
    zero = torch.zeros(1, 3, dtype=torch.float64)
    f = lambda x, y: function_error(x, y, per_row=True, normalized=False).item()  # noqa: E731 - a one-line alias reads best here
    assert f(a, zero) == pytest.approx(25 / 2, rel=1e-15)  # l(a, 0) = |a|^2/2
    assert f(zero, a) == pytest.approx(25 / 2, rel=1e-15)
    assert f(zero, zero) == 0.0
    assert f(a, -a) == pytest.approx(25.0, rel=1e-14)  # disjoint supports: |a|^2/2 + |a|^2/2
    assert f(a, 2 * a) == pytest.approx(25 / 2, rel=1e-14)  # same direction: relu(2t) - relu(t) = relu(t)
    assert f(a, b_orth) == pytest.approx(25 / 2 + 4 / 2 - 5 * 2 / math.pi, rel=1e-14)  # J(pi/2) = 1
    # nearly aligned rows: no cancellation, error ~ |a-b|^2/2 to leading order
    b = a + torch.tensor([[0.0, 0.0, 1e-7]], dtype=torch.float64)
    assert f(a, b) == pytest.approx(1e-14 / 2, rel=1e-6)


def test_normalization_and_per_row_sum():
    W = torch.randn(30, 9, generator=_gen(4), dtype=torch.float64)
    Wa = torch.randn(30, 9, generator=_gen(5), dtype=torch.float64)
    raw = function_error(W, Wa, normalized=False)
    rows = function_error(W, Wa, per_row=True)
    assert rows.shape == (30,) and rows.dtype == torch.float64
    assert rows.sum().item() == pytest.approx(raw / (W.pow(2).sum().item() / 2), rel=1e-12)
    assert function_error(W, torch.zeros_like(W)) == pytest.approx(1.0, rel=1e-14)
    # (U, V) factors are accepted in place of the product
    U, V = torch.randn(30, 2, dtype=torch.float64), torch.randn(2, 9, dtype=torch.float64)
    assert function_error(W, (U, V)) == pytest.approx(function_error(W, U @ V), rel=1e-12)


def test_monte_carlo_random_pairs():
    W = torch.randn(8, 5, generator=_gen(6), dtype=torch.float64)
    Wa = W + 0.7 * torch.randn(8, 5, generator=_gen(7), dtype=torch.float64)
    _mc_check(W, Wa)


def test_monte_carlo_zero_and_anti_aligned_rows():
    W = torch.randn(6, 4, generator=_gen(8), dtype=torch.float64)
    Wa = torch.randn(6, 4, generator=_gen(9), dtype=torch.float64)
    W[0] = 0.0  # zero row of W
    Wa[1] = 0.0  # zero row of W'
    Wa[2] = -1.5 * W[2]  # anti-aligned
    Wa[3] = 0.5 * W[3]  # aligned, shorter
    exact, _, _ = _mc_check(W, Wa, seed=2)
    assert exact > 0


def test_monte_carlo_low_rank_approximation():
    from core.approx import approximate

    W = torch.randn(20, 10, generator=_gen(10), dtype=torch.float64)
    a = approximate(W, 3, "nkp")
    _mc_check(W, a.U @ a.V, seed=3)


def test_general_covariance_equals_whitened_identity_case():
    d = 6
    W = torch.randn(10, d, generator=_gen(11), dtype=torch.float64)
    Wa = torch.randn(10, d, generator=_gen(12), dtype=torch.float64)
    L = torch.randn(d, d, generator=_gen(13), dtype=torch.float64)
    S = L @ L.T + 0.1 * torch.eye(d, dtype=torch.float64)
    C = torch.linalg.cholesky(S)  # any factor with C C^T = S gives the same error
    assert function_error(W, Wa, cov=S) == pytest.approx(function_error(W @ C, Wa @ C), rel=1e-10)
    assert function_error(W, Wa, cov=S, normalized=False) == pytest.approx(function_error(W @ C, Wa @ C, normalized=False), rel=1e-10)
    # and Monte Carlo with x ~ N(0, S) agrees
    _mc_check(W, Wa, cov=S, seed=4)


def test_general_covariance_monte_carlo_singular_psd():
    d = 5
    B = torch.randn(d, 2, generator=_gen(14), dtype=torch.float64)
    S = B @ B.T  # rank 2, positive semi-definite
    W = torch.randn(7, d, generator=_gen(15), dtype=torch.float64)
    Wa = W + torch.randn(7, d, generator=_gen(16), dtype=torch.float64)
    _mc_check(W, Wa, cov=S, seed=5)


def test_identity_covariance_is_default():
    W = torch.randn(5, 4, generator=_gen(17), dtype=torch.float64)
    Wa = torch.randn(5, 4, generator=_gen(18), dtype=torch.float64)
    assert function_error(W, Wa, cov=torch.eye(4)) == pytest.approx(function_error(W, Wa), rel=1e-13)


def test_bad_inputs_raise():
    W = torch.randn(5, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="shape"):
        function_error(W, torch.zeros(5, 3))
    with pytest.raises(ValueError, match="2-D"):
        function_error(torch.zeros(5), torch.zeros(5))
    with pytest.raises(ValueError, match="zero"):
        function_error(torch.zeros(5, 4), W)
    with pytest.raises(ValueError, match="semi-definite"):
        function_error(W, W, cov=-torch.eye(4))
    with pytest.raises(ValueError, match="symmetric"):
        function_error(W, W, cov=torch.triu(torch.ones(4, 4)))
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        function_error(W, W, cov=torch.eye(3))
    with pytest.raises(ValueError, match="n_samples"):
        mc_function_error(W, W, 1)


def test_gradient_matches_finite_differences():
    W = torch.randn(9, 6, generator=_gen(19), dtype=torch.float64)
    B = torch.randn(9, 6, generator=_gen(20), dtype=torch.float64)
    B[0] = -W[0]  # anti-aligned row (angle pi)
    loss, G = function_error_grad(W, B)
    assert loss == pytest.approx(function_error(W, B), rel=1e-13)
    for k in range(5):
        E = torch.randn(9, 6, generator=_gen(100 + k), dtype=torch.float64)
        E[0] = 0.0  # the anti-aligned row is a kink of the angle's derivative direction; test it separately below
        h = 1e-6
        fd = (function_error(W, B + h * E) - function_error(W, B - h * E)) / (2 * h)
        assert fd == pytest.approx((G * E).sum().item(), rel=1e-6, abs=1e-10)
    # the gradient vanishes at the optimum W' = W
    _, G0 = function_error_grad(W, W.clone())
    assert G0.abs().max().item() < 1e-12


def test_h_kernel_values_and_series():
    c = torch.linspace(0, 0.3, 31, dtype=torch.float64)
    series = 1 / math.pi + c / 2 + c**2 / (2 * math.pi) + c**4 / (24 * math.pi) + c**6 / (80 * math.pi)
    torch.testing.assert_close(relu_kernel_h(c), series, rtol=0, atol=1e-6)
    full = torch.linspace(0, 1, 101, dtype=torch.float64)
    h = relu_kernel_h(full)
    assert h[0].item() == pytest.approx(1 / math.pi) and h[-1].item() == pytest.approx(1.0)
    assert torch.all(h >= full - 1e-15)  # rescaling never shortens the projection
    assert torch.all(h[1:] >= h[:-1])  # increasing
    # clamping: arguments slightly outside [-1, 1] from round-off are safe
    assert torch.isfinite(relu_kernel_h(torch.tensor([1 + 1e-12, -1 - 1e-12], dtype=torch.float64))).all()
