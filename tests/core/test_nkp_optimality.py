"""NKP's subspace step against an independent global optimum (MATH.md Sections 3-5).

For a fixed subspace with orthonormal basis P (d, r) the best rank-r layer is known in closed
form (Section 3): row i keeps the direction of its projection and the norm ||w_i|| h(c_i), with
c_i = ||P^T w_i|| / ||w_i||, so the normalized error is

    e(P) = sum_i ||w_i||^2 (1 - h(c_i)^2) / ||W||_F^2,      h(c) = J(arccos c) / pi.

Minimizing e over the Grassmannian Gr(r, d) is the whole problem. For d <= 4 that manifold has
dimension r (d - r) <= 4, small enough to search without NKP: `global_min` scores thousands of
random subspaces and polishes the best few by random perturbations with a shrinking step (it
never starts from NKP's or spectral's subspace). Its answer is the yardstick here, instead of the
`reference` method, which starts from NKP and so cannot show NKP found a better subspace.

`h` and `e(P)` are re-implemented below from the formulas (not imported from core/approx.py);
`test_fixed_subspace_error_is_the_closed_form_error` ties them to core's closed form.
"""
from __future__ import annotations

import math

import pytest
import torch

from core.approx import approximate, function_error

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def h(c: torch.Tensor) -> torch.Tensor:
    """h(c) = J(t) / pi, t = arccos c, J(t) = sin t + (pi - t) cos t, for c in [0, 1] (MATH.md Section 2)."""
    t = torch.arccos(c.clamp(0.0, 1.0))
    return (torch.sin(t) + (math.pi - t) * torch.cos(t)) / math.pi


def subspace_error(W: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """e(P) for W (m, d) float64 without zero rows and a batch of orthonormal bases P (k, d, r): (k,)."""
    norms = W.norm(dim=1)
    c = torch.einsum("md,kdr->kmr", W / norms[:, None], P).norm(dim=2)
    return (norms.pow(2) * (1 - h(c).pow(2))).sum(dim=1) / norms.pow(2).sum()


def best_rows(W: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """The optimal W' (m, d) with rows in span(P) (d, r): ||w|| h(c) times the unit projection."""
    proj = W @ P @ P.T
    c = proj.norm(dim=1) / W.norm(dim=1)
    return proj / proj.norm(dim=1, keepdim=True) * (W.norm(dim=1) * h(c))[:, None]


def random_bases(k: int, d: int, r: int, g: torch.Generator) -> torch.Tensor:
    """k orthonormal bases (k, d, r), uniform on the Grassmannian (QR of Gaussian matrices)."""
    return torch.linalg.qr(torch.randn(k, d, r, generator=g, dtype=torch.float64)).Q


def global_min(W: torch.Tensor, r: int, *, seed: int = 0, samples: int = 10_000, keep: int = 4,
               rounds: int = 50, batch: int = 64) -> tuple[float, torch.Tensor]:
    """min over Gr(r, d) of e(P) and its argmin P (d, r), by search from random subspaces only.

    `samples` uniform subspaces; the best `keep` are each polished for `rounds` rounds: `batch`
    random perturbations of the current basis (re-orthonormalized), keep the best if it improves,
    else shrink the step by 0.6 (0.1 * 0.6^50 ~ 1e-12, so the error is resolved to ~1e-12).
    """
    g = _gen(seed)
    d = W.shape[1]
    P = random_bases(samples, d, r, g)
    err = subspace_error(W, P)
    best_e, best_P = math.inf, P[0]
    for i in err.argsort()[:keep].tolist():
        cur_P, cur_e, step = P[i], float(err[i]), 0.1
        for _ in range(rounds):
            cand = torch.linalg.qr(cur_P + step * torch.randn(batch, d, r, generator=g, dtype=torch.float64)).Q
            ce = subspace_error(W, cand)
            j = int(ce.argmin())
            if float(ce[j]) < cur_e:
                cur_P, cur_e = cand[j], float(ce[j])
            else:
                step *= 0.6
        if cur_e < best_e:
            best_e, best_P = cur_e, cur_P
    return best_e, best_P


def four_axes(noise: float = 0.005, seed: int = 0) -> torch.Tensor:
    """32 x 4: four clusters of 8 rows along the axes e1..e4, the e1 cluster 5% longer.

    PCA (spectral, and rescale, which keeps spectral's subspace) takes e1, the heaviest axis, and
    reaches the other 24 rows not at all (c = 0, each keeps 1 - 1/pi^2 of its error). The function
    error prefers a direction that reaches every cluster a little (g = h^2 has a linear term in c,
    Section 4): about (-0.79, 0.36, 0.35, 0.35). `noise` (std, relative to the unit rows) breaks
    the exact orthogonality of the clusters.
    """
    W = torch.zeros(32, 4, dtype=torch.float64)
    for k in range(4):
        W[8 * k : 8 * (k + 1), k] = 1.0
    W += noise * torch.randn(W.shape, generator=_gen(seed), dtype=torch.float64)
    W[:8] *= 1.05
    return W


def tiny_instance(family: str, seed: int) -> tuple[torch.Tensor, int]:
    """(W, r) with d in 2..4, r in 1..d-1. "gaussian": m in 3..12, i.i.d. N(0, 1) entries.
    "clustered": d..d+2 random directions, 3 rows on each (norms 0.7..1.3) plus 1% noise."""
    g = _gen(seed)
    d = int(torch.randint(2, 5, (1,), generator=g))
    r = int(torch.randint(1, d, (1,), generator=g))
    if family == "gaussian":
        m = int(torch.randint(r + 1, 13, (1,), generator=g))  # rank(W) = min(m, d) > r
        return torch.randn(m, d, generator=g, dtype=torch.float64), r
    k = int(torch.randint(d, d + 3, (1,), generator=g))
    dirs = torch.randn(k, d, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    W = (dirs * (0.7 + 0.6 * torch.rand(k, 1, generator=g, dtype=torch.float64))).repeat_interleave(3, dim=0)
    return W + 0.01 * torch.randn(W.shape, generator=g, dtype=torch.float64), r


# gaussian 1032, 1049 and clustered 2000 are instances where default NKP stops at a local optimum.
TINY = [("gaussian", s) for s in (*range(1000, 1012), 1032, 1049)] + [("clustered", s) for s in range(2000, 2012)]


def _row_space(V: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (d, r) of the row space of V (r, d)."""
    return torch.linalg.qr(V.to(torch.float64).T).Q


# --------------------------------------------------------------------------------------------


def test_fixed_subspace_error_is_the_closed_form_error():
    """e(P) (this file's formula) equals core's closed-form error of the best rows in span(P), and
    every method's answer is the best layer in its own row space (the rows are rescaled projections)."""
    W = torch.randn(15, 4, generator=_gen(1), dtype=torch.float64)
    P = random_bases(5, 4, 2, _gen(2))
    for k in range(5):
        assert float(subspace_error(W, P[k : k + 1])) == pytest.approx(function_error(W, best_rows(W, P[k])), rel=1e-10)
    for method in ("spectral", "rescale", "nkp"):
        a = approximate(W, 2, method)
        Q = _row_space(a.V)
        best = float(subspace_error(W, Q[None]))
        if method == "spectral":
            assert a.error > best * (1 + 1e-4)  # spectral keeps the projection's own (too short) norm
        else:
            assert a.error == pytest.approx(best, rel=1e-9)


def test_nkp_is_materially_below_rescale_when_the_subspace_matters():
    """four_axes: NKP must move off spectral's subspace. Measured: nkp / rescale = 0.958 (noise
    seeds 0-4: 0.953..0.958); asserted <= 0.97. Rescale is 4.4% above the global optimum, NKP within
    1e-6 of it. NKP reduced to rescale (zero MM iterations) fails every assertion below."""
    W = four_axes()
    rescale = approximate(W, 1, "rescale")
    nkp = approximate(W, 1, "nkp")
    opt, P_opt = global_min(W, 1)
    assert nkp.error <= 0.97 * rescale.error, (nkp.error, rescale.error)
    assert rescale.error >= 1.04 * opt, (rescale.error, opt)  # the instance is one where the subspace matters
    assert nkp.error <= opt * (1 + 1e-6), (nkp.error, opt)
    # The mechanism: spectral's subspace is the heavy axis e1; NKP's direction reaches all four clusters.
    spectral_dir = _row_space(approximate(W, 1, "spectral").V)[:, 0]
    nkp_dir = _row_space(nkp.V)[:, 0]
    assert abs(float(spectral_dir[0])) > 0.99
    assert abs(float(nkp_dir @ P_opt[:, 0])) > 1 - 1e-6  # the same line as the global optimum's
    assert (nkp_dir.abs() > 0.3).all(), nkp_dir
    for seed in range(1, 5):  # not one lucky noise draw
        Ws = four_axes(seed=seed)
        assert approximate(Ws, 1, "nkp").error <= 0.97 * approximate(Ws, 1, "rescale").error, seed


def test_nkp_below_rescale_at_rank_two():
    """Rank 2: four axes, two of them 5% heavier (spectral takes their plane). Measured nkp / rescale
    = 0.965, nkp within 1e-6 of the global optimum over Gr(2, 4); asserted <= 0.975."""
    W = four_axes()
    W[8:16] *= 1.05
    rescale, nkp = approximate(W, 2, "rescale"), approximate(W, 2, "nkp")
    opt, _ = global_min(W, 2)
    assert nkp.error <= 0.975 * rescale.error, (nkp.error, rescale.error)
    assert nkp.error <= opt * (1 + 1e-6), (nkp.error, opt)


@pytest.mark.parametrize("family, seed", TINY, ids=[f"{f}{s}" for f, s in TINY])
def test_nkp_against_the_global_optimum_on_tiny_instances(family, seed):
    """Default NKP (one start, from spectral's subspace) is within 2% of the global optimum: over
    100 such instances the worst were 1.3% (gaussian 1032, d = 2, r = 1) and 0.67% (clustered 2000),
    local optima, both included here. With 16 extra random starts (restarts=16) it reaches the
    optimum itself on every instance (measured <= 2e-8 relative; asserted 1e-6). Where the subspace
    matters (rescale >= 0.5% above the optimum) NKP is strictly below rescale."""
    W, r = tiny_instance(family, seed)
    opt, _ = global_min(W, r, seed=seed)
    rescale = approximate(W, r, "rescale").error
    nkp = approximate(W, r, "nkp").error
    multi = approximate(W, r, "nkp", restarts=16, seed=seed).error
    assert opt <= nkp * (1 + 1e-6), (opt, nkp)  # the search is at least as good as NKP
    assert nkp <= 1.02 * opt, (nkp, opt)
    assert multi <= opt * (1 + 1e-6), (multi, opt)
    assert nkp <= rescale * (1 + 1e-12)
    if rescale >= 1.005 * opt:
        assert nkp < rescale * (1 - 1e-4), (nkp, rescale, opt)


def test_nkp_leaves_a_subspace_that_some_rows_are_orthogonal_to():
    """Exactly orthogonal clusters (four_axes without noise): spectral's e1 has c = 0 for 24 rows.
    Moving toward them gains to first order (g'(0) = 1/pi > 0), so e1 is no local optimum and
    NKP must not stop there: it reaches the global optimum, 5% below rescale."""
    W = four_axes(noise=0.0)
    opt, _ = global_min(W, 1)
    rescale, nkp = approximate(W, 1, "rescale"), approximate(W, 1, "nkp")
    assert rescale.error >= 1.04 * opt
    assert nkp.error <= opt * (1 + 1e-6), (nkp.error, rescale.error, opt)
    # MATH.md's own example: a row orthogonal to the top singular direction pulls the subspace a little.
    W = torch.tensor([[10.0, 0, 0], [9.0, 0, 0], [11.0, 0, 0], [0, 2.0, 0]], dtype=torch.float64)
    opt, _ = global_min(W, 1)
    nkp, rescale = approximate(W, 1, "nkp"), approximate(W, 1, "rescale")
    assert nkp.error <= opt * (1 + 1e-6) and nkp.error < rescale.error, (nkp.error, rescale.error, opt)


def test_reference_cannot_improve_nkp_by_more_than_one_percent():
    """NKP's answer is (nearly) a local optimum of the closed form over U, V: L-BFGS started from it
    (the `reference` method) gains under 1%; and on four_axes the reference's better start is NKP's."""
    for seed in range(300, 304):
        W = torch.randn(24, 8, generator=_gen(seed), dtype=torch.float64)
        for r in (1, 2, 4):
            nkp = approximate(W, r, "nkp")
            ref = approximate(W, r, "reference", max_iter=200)
            assert ref.error <= nkp.error * (1 + 1e-12)
            assert nkp.error <= 1.01 * ref.error, (seed, r, nkp.error, ref.error)
    ref = approximate(four_axes(), 1, "reference", max_iter=50)
    assert ref.info["start"] == "nkp" and ref.info["start_errors"]["spectral"] > 1.1 * ref.error
