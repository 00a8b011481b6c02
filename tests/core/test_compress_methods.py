"""Per-layer compression methods against MATH.md Section 8: whiten's optimality, the eigen-floor,
nkp-data vs whiten on the Gaussian surrogate, asvd's formula, balanced factors, refine, the surrogate."""
from __future__ import annotations

import pytest
import torch

from core.approx import function_error
from core.calibration import safe_root
from core.layer_compress import (
    ErrorAccumulator,
    LayerStats,
    balanced_factors,
    factor_layer,
    refine_factors,
    surrogate_error,
    target_spectrum,
    whitened,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _anisotropic_sigma(d: int, seed: int, decay: float = 0.8) -> torch.Tensor:
    """A full-rank (d, d) second moment with eigenvalues decay^i in a random basis."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q
    return (Q * decay ** torch.arange(d, dtype=torch.float64)) @ Q.T


def _stats(m: int, sigma: torch.Tensor, seed: int = 0, activation: str = "relu", bn: bool = True) -> LayerStats:
    g = torch.Generator().manual_seed(seed + 100)
    D = torch.rand(m, generator=g, dtype=torch.float64) * 2.5 + 0.2 if bn else torch.ones(m, dtype=torch.float64)
    c = torch.randn(m, generator=g, dtype=torch.float64) * 0.1
    mean_abs = sigma.diagonal().sqrt() * (2 / torch.pi) ** 0.5  # E|x| of N(0, Sigma)
    return LayerStats(D=D, c=c, activation=activation, sigma=sigma, mean_abs=mean_abs, n=10_000)


def _linear_error(W: torch.Tensor, W_new: torch.Tensor, sigma: torch.Tensor) -> float:
    """E||(W - W') x||^2 / E||W x||^2 for E[x x^T] = sigma."""
    dW = W - W_new
    return float(((dW @ sigma) * dW).sum() / ((W @ sigma) * W).sum())


@pytest.mark.parametrize("m,d", [(24, 40), (40, 24)])  # the gram route (m <= d) and the root route (d < m)
def test_whiten_is_optimal_for_the_linear_error(m, d):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(m, d, generator=g, dtype=torch.float64)
    sigma = _anisotropic_sigma(d, seed=2)
    stats = _stats(m, sigma)
    r = 5
    best = factor_layer(W, r, "whiten", stats).weight
    err = _linear_error(W, best, sigma)
    # The optimum's value: the tail energy of W L beyond rank r (Eckart-Young on W L).
    s = torch.linalg.svdvals(W @ safe_root(sigma).L)
    assert err == pytest.approx(float(s[r:].pow(2).sum() / s.pow(2).sum()), rel=1e-9)
    candidates = {name: factor_layer(W, r, name, stats).weight for name in ("spectral", "nkp", "asvd", "nkp-data")}
    for i in range(10):  # random rank-r factorizations
        candidates[f"random{i}"] = torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(
            r, d, generator=g, dtype=torch.float64) * W.std()
    U, V = factor_layer(W, r, "whiten", stats).U, factor_layer(W, r, "whiten", stats).V
    for i in range(10):  # both signs of small random moves of whiten's own factors: a local minimum too
        dU = torch.randn(U.shape, generator=g, dtype=torch.float64) * 1e-3
        dV = torch.randn(V.shape, generator=g, dtype=torch.float64) * 1e-3
        candidates[f"+move{i}"] = (U + dU) @ (V + dV)
        candidates[f"-move{i}"] = (U - dU) @ (V - dV)
    for name, W_new in candidates.items():
        assert torch.linalg.matrix_rank(W_new) <= r
        assert _linear_error(W, W_new, sigma) > err + 1e-12, name


def test_whiten_equals_the_formula_and_is_exact_at_full_rank():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(12, 30, generator=g, dtype=torch.float64)
    sigma = _anisotropic_sigma(30, seed=4, decay=0.9)
    root = safe_root(sigma)
    Us, s, Vh = torch.linalg.svd(W @ root.L, full_matrices=False)
    formula = (Us[:, :4] * s[:4]) @ Vh[:4] @ root.L_pinv  # [W L]_r L^+
    assert torch.allclose(factor_layer(W, 4, "whiten", _stats(12, sigma)).weight, formula, atol=1e-9)
    assert torch.allclose(factor_layer(W, 12, "whiten", _stats(12, sigma)).weight, W, atol=1e-9)


def test_balanced_factors_split_the_singular_values_evenly():
    g = torch.Generator().manual_seed(5)
    M, N = torch.randn(20, 4, generator=g, dtype=torch.float64), torch.randn(4, 30, generator=g, dtype=torch.float64) * 7
    U, V = balanced_factors(M, N)
    assert torch.allclose(U @ V, M @ N, atol=1e-10)
    assert torch.allclose(U.T @ U, V @ V.T, atol=1e-9)  # both diag(S): the split is balanced
    assert torch.allclose(U.T @ U, torch.diag(torch.linalg.svdvals(M @ N)[:4]), atol=1e-9)


def test_asvd_is_the_scaled_truncation():
    g = torch.Generator().manual_seed(6)
    W = torch.randn(16, 24, generator=g, dtype=torch.float64)
    sigma = _anisotropic_sigma(24, seed=7)
    stats = _stats(16, sigma)
    stats.mean_abs[3] = 0.0  # a dead input channel: S would be singular without the floor
    got = factor_layer(W, 5, "asvd", stats, alpha=0.5).weight
    S = stats.mean_abs.pow(0.5).clamp_min(1e-6 * stats.mean_abs.pow(0.5).max())
    Us, s, Vh = torch.linalg.svd(W * S, full_matrices=False)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, ((Us[:, :5] * s[:5]) @ Vh[:5]) / S, atol=1e-8)


def _singular_sigma(d: int) -> torch.Tensor:
    """Rank-deficient and badly scaled: 6 samples in d dims, two dead channels, scales 1e-6 .. 1e4."""
    g = torch.Generator().manual_seed(8)
    X = torch.randn(6, d, generator=g, dtype=torch.float64) * torch.logspace(-6, 4, d, dtype=torch.float64)
    X[:, :2] = 0.0  # dead channels (and what zero padding does to a border patch)
    return X.T @ X / 6


def test_eigen_floor_handles_a_singular_sigma():
    d = 20
    sigma = _singular_sigma(d)
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(sigma)  # the input is what breaks a plain Cholesky
    root = safe_root(sigma, eps=1e-6)
    assert root.floored >= d - 6 and torch.isfinite(root.L_pinv).all()
    assert torch.allclose(root.L @ root.L_pinv, torch.eye(d, dtype=torch.float64), atol=1e-6)
    g = torch.Generator().manual_seed(9)
    for m in (8, 30):  # both routes of `whitened`
        W = torch.randn(m, d, generator=g, dtype=torch.float64)
        stats = _stats(m, sigma)
        for method in ("whiten", "asvd", "nkp-data"):
            f = factor_layer(W, 3, method, stats)
            assert torch.isfinite(f.U).all() and torch.isfinite(f.V).all(), (m, method)
            assert f.weight.abs().max() < 1e3 * W.abs().max(), (m, method)  # no blow-up through L^+
        # whiten still reaches the optimum of the linear error on the data it saw (up to the floor)
        err = _linear_error(W, factor_layer(W, 3, "whiten", stats).weight, sigma)
        lam, Q = torch.linalg.eigh(sigma)
        s = torch.linalg.svdvals(W @ (Q * lam.clamp_min(0).sqrt()) @ Q.T)  # the unfloored root
        assert err == pytest.approx(float(s[3:].pow(2).sum() / s.pow(2).sum()), rel=1e-5)


def test_the_floor_drops_output_directions_below_eps():
    """The m <= d route floors the output Gram W Sigma W^T: directions with eigenvalue below
    eps * lam_max carry no data and would be divided by their tiny root."""
    sigma = _singular_sigma(20) + 1e-22 * torch.eye(20, dtype=torch.float64)  # rank 6, plus a tiny positive floor
    g = torch.Generator().manual_seed(19)
    W = torch.randn(8, 20, generator=g, dtype=torch.float64)
    wh = whitened(W, sigma, eps=1e-6)
    assert wh.route == "gram" and wh.info["gram"]["kept"] <= 6
    assert torch.isfinite(wh.back).all() and wh.back.abs().max() < 1e6 * W.abs().max()
    f = factor_layer(W, 3, "nkp-data", _stats(8, sigma))
    assert f.weight.abs().max() < 1e3 * W.abs().max()


def test_fewer_live_directions_than_the_rank_keep_the_allocated_rank():
    """Data with 3 directions (e.g. a 1x1 feature map: few patches) and rank 5: the factors still have
    rank 5 (the allocation's parameters); the 2 extra directions have V = 0, U != 0 (trainable)."""
    g = torch.Generator().manual_seed(20)
    X = torch.randn(3, 30, generator=g, dtype=torch.float64)
    sigma = X.T @ X / 3
    W = torch.randn(10, 30, generator=g, dtype=torch.float64)
    for method in ("whiten", "nkp-data"):
        f = factor_layer(W, 5, method, _stats(10, sigma))
        assert f.U.shape == (10, 5) and f.V.shape == (5, 30) and f.info["live_rank"] == 3, method
        assert f.V[3:].abs().max() == 0 and f.U[:, 3:].abs().min() > 0
        assert torch.allclose(f.weight @ X.T, factor_layer(W, 3, method, _stats(10, sigma)).weight @ X.T, atol=1e-8)


def test_zero_sigma_and_zero_weight_never_fail_a_layer():
    W = torch.randn(10, 12, dtype=torch.float64)
    stats = _stats(10, torch.zeros(12, 12, dtype=torch.float64))
    for method in ("whiten", "asvd", "nkp-data"):
        f = factor_layer(W, 3, method, stats)
        assert torch.isfinite(f.weight).all()
    assert "zero second moment" in factor_layer(W, 3, "whiten", stats).info["note"]
    zero = factor_layer(torch.zeros(10, 12), 3, "nkp-data", _stats(10, _anisotropic_sigma(12, 1)))
    assert zero.weight.abs().max() == 0 and "all-zero" in zero.info["note"]


def test_nkp_data_beats_whiten_on_the_surrogate_for_relu_blocks():
    """When: a relu block at a small rank. Without BN (D = I) it is guaranteed: whiten is the spectral
    truncation of W L and nkp-data runs NKP on the same W L (never worse, strictly better below full
    rank, MATH.md Section 3). With a BN scale D (rows of unequal weight) whiten ignores D, and nkp-data
    wins by more. On an affine block (no activation) the ordering is not NKP's business: nkp-data's
    weighted SVD is then the exact minimizer of the block's own (D-weighted) error."""
    g = torch.Generator().manual_seed(10)
    m, d, r = 96, 32, 2  # m superlinear in d, small r: the paper's regime
    W = torch.randn(m, d, generator=g, dtype=torch.float64)
    sigma = _anisotropic_sigma(d, seed=11, decay=0.93)
    gaps = {}
    for bn in (False, True):
        stats = _stats(m, sigma, bn=bn)
        errs = {meth: surrogate_error(W, factor_layer(W, r, meth, stats).weight, stats.D, sigma, "relu")[0]
                for meth in ("whiten", "nkp-data")}
        assert errs["nkp-data"] < errs["whiten"] - 1e-3, (bn, errs)
        gaps[bn] = errs["whiten"] - errs["nkp-data"]
    assert gaps[True] > gaps[False]
    stats = _stats(m, sigma, activation="none")
    errs = {meth: surrogate_error(W, factor_layer(W, r, meth, stats).weight, stats.D, sigma, "none")[0]
            for meth in ("whiten", "nkp-data")}
    assert errs["nkp-data"] < errs["whiten"]


def test_surrogate_matches_core_approx_and_monte_carlo():
    g = torch.Generator().manual_seed(12)
    m, d = 20, 14
    W = torch.randn(m, d, generator=g, dtype=torch.float64)
    sigma = _anisotropic_sigma(d, seed=13, decay=0.85)
    stats = _stats(m, sigma, activation="relu")
    stats.c.zero_()  # the surrogate ignores the shift
    W_new = factor_layer(W, 3, "spectral", stats).weight
    value, kind = surrogate_error(W, W_new, stats.D, sigma, "relu")
    assert kind == "relu"
    DW, DW_new = stats.D[:, None] * W, stats.D[:, None] * W_new
    assert value == pytest.approx(function_error(DW, DW_new, cov=sigma), rel=1e-9)
    # The empirical block error (ErrorAccumulator) on Gaussian patches agrees within sampling error.
    L = safe_root(sigma).L
    acc = ErrorAccumulator(W.float(), W_new.float(), stats)
    for _ in range(10):
        acc.update((torch.randn(20_000, d, generator=g, dtype=torch.float64) @ L).float())
    assert acc.errors()["block"] == pytest.approx(value, rel=0.03)


def test_refine_lowers_the_block_error():
    g = torch.Generator().manual_seed(14)
    m, d = 24, 36
    W = torch.randn(m, d, generator=g, dtype=torch.float64)
    sigma = _anisotropic_sigma(d, seed=15)
    stats = _stats(m, sigma)
    X = (torch.randn(4096, d, generator=g, dtype=torch.float64) @ safe_root(sigma).L).float()
    from core.blocks import block_output

    Y = block_output(X @ W.float().T, stats.D, stats.c, "relu")
    f = factor_layer(W, 3, "spectral", stats)
    U, V, info = refine_factors(f.U, f.V, X, Y, stats.D, stats.c, "relu", steps=150, lr=2e-2)
    assert info["kept"] == "refined"
    assert info["loss_after"] < 0.8 * info["loss_before"]
    assert not torch.allclose(U, f.U, atol=1e-4) and not torch.allclose(V, f.V, atol=1e-4)  # both factors train
    acc_before, acc_after = ErrorAccumulator(W, f.weight, stats), ErrorAccumulator(W, U @ V, stats)
    X_held = (torch.randn(4096, d, generator=g, dtype=torch.float64) @ safe_root(sigma).L).float()
    acc_before.update(X_held)
    acc_after.update(X_held)
    assert acc_after.errors()["block"] < acc_before.errors()["block"]  # it generalizes to held-out patches


def test_target_spectra_are_the_truncated_matrices():
    g = torch.Generator().manual_seed(16)
    W = torch.randn(10, 18, generator=g, dtype=torch.float64)
    sigma = _anisotropic_sigma(18, seed=17)
    stats = _stats(10, sigma)
    L = safe_root(sigma).L
    assert torch.allclose(target_spectrum(W, "whiten", stats), torch.linalg.svdvals(W @ L), atol=1e-9)
    assert torch.allclose(target_spectrum(W, "nkp-data", stats), torch.linalg.svdvals(stats.D[:, None] * W @ L), atol=1e-9)
    assert torch.allclose(target_spectrum(W, "spectral", stats), torch.linalg.svdvals(W), atol=1e-9)
    wh = whitened(W, sigma)
    assert torch.allclose(wh.C @ wh.C.T, W @ sigma @ W.T, atol=1e-9)
