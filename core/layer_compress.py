"""Rank-r factors of one *trained* layer from its calibration statistics (MATH.md Section 8, "Methods").

The layer is `W` `(m, d)` (a conv viewed as `out x (in*kh*kw)`), its block `a(D W x + c)`
(core/blocks.py), its input second moment `Sigma` `(d, d)` and `E|x|` (core/calibration.py).
Every method returns `U (m, r)`, `V (r, d)`, `W' = U V`, split *balanced* (the singular values of
`W'` shared evenly, as spectral init does), in float64:

* `spectral`, `nkp`: data-free, `core.approx.approximate` on `W`.
* `whiten`: `W' = [W L]_r L^+`, the minimizer of the linear error `||(W - W') L||_F`.
* `asvd`: `W' = [W S]_r S^{-1}`, `S = diag(E|x_j|)^alpha`, entries floored at `eps * max`.
* `nkp-data`: NKP (core.approx) on `A = D W L`, mapped back `W' = D^{-1} NKP_r(A) L^+`; entries of
  `D` below `1e-6 max|D|` in magnitude are raised to it (sign kept), in both directions. On a block
  with no activation (`none`: the block is affine, e.g. before a residual add) the function error
  *is* the linear error of `D W`, whose minimizer `D^{-1} [D W L]_r L^+` is used instead of NKP
  (option `linear_blocks="svd"`, the default; `"nkp"` runs NKP there too).

`W L` is never formed at `d x d` cost when `d > m`: `whitened` works in the `min(m, d)`-dimensional
coordinates of its rows (the root of Sigma when d < m, else the eigendecomposition of the `m x m`
output Gram `W Sigma W^T`), with the eigen-floor `eps * lam_max` in that decomposition (never a
Cholesky). A layer whose Sigma is zero (it never sees a nonzero input) gets the data-free
`L = I`, and an all-zero `W` gets zero factors; both are said in the returned info, never raised.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from core.blocks import block_output
from core.calibration import safe_root
from core.names import COMPRESS_DATA_METHODS, COMPRESS_METHODS

__all__ = ["METHODS", "DATA_METHODS", "LayerStats", "LayerFactors", "Whitened", "whitened", "balanced_factors", "factor_layer",
           "target_spectrum", "output_energy", "refine_factors", "surrogate_error", "ErrorAccumulator"]

METHODS = COMPRESS_METHODS
DATA_METHODS = COMPRESS_DATA_METHODS  # methods that need the calibration second moment
D_FLOOR = 1e-6  # |D_i| is raised to at least D_FLOOR * max|D| before D^{-1} is taken


@dataclass
class LayerStats:
    """Calibration facts of one layer. sigma `(d, d)` and mean_abs `(d,)` float64 (None when not
    collected); D, c `(m,)` float64 from core.blocks.fold_bn; activation a key of core.blocks.ACTIVATIONS."""

    D: torch.Tensor
    c: torch.Tensor
    activation: str = "none"
    sigma: torch.Tensor | None = None
    mean_abs: torch.Tensor | None = None
    n: int = 0


@dataclass
class LayerFactors:
    U: torch.Tensor  # (m, r) float64
    V: torch.Tensor  # (r, d) float64
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def weight(self) -> torch.Tensor:
        return self.U @ self.V


def balanced_factors(M: torch.Tensor, N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(U, V)` with `U V = M N` (M `(m, r)`, N `(r, d)`) and `U = X S^1/2`, `V = S^1/2 Y^T`, `X S Y^T`
    the thin SVD of `M N` (computed from two QRs and an `r x r` SVD)."""
    Q1, R1 = torch.linalg.qr(M)
    Q2, R2 = torch.linalg.qr(N.T)
    a, s, bh = torch.linalg.svd(R1 @ R2.T)
    root = s.sqrt()
    return (Q1 @ a) * root, (root[:, None] * bh) @ Q2.T


def _floored_D(D: torch.Tensor) -> torch.Tensor:
    mag = D.abs()
    low = D_FLOOR * float(mag.max()) if float(mag.max()) > 0 else 1.0
    return torch.where(D < 0, -1.0, 1.0).to(D) * mag.clamp_min(low)


@dataclass
class Whitened:
    """The rows of `M L` (`M` `(m, d)`, `L = Sigma^{1/2}` eigen-floored) in coordinates: `C` `(m, k)` with
    `C C^T = M L L^T M^T`, and `back` `(k, d)` with `(Y @ back) L = Y Q^T` for the orthonormal basis
    `Q` `(d, k)` of the coordinates; so `Y @ back` is the weight whose whitened rows are `Y`.

    Two routes to the same thing, each needing an eigendecomposition of size `min(m, d)` only:
    `root` (d < m): `C = M L`, `back = L^+` with L from core.calibration.safe_root (floor eps * lam_max);
    `gram` (m <= d): `M Sigma M^T = U diag(lam) U^T`, the directions with `lam > eps * lam_max` kept,
    `C = U sqrt(lam)`, `back = lam^{-1/2} U^T M` (as `L^+ L = I` for the floored L). A zero Sigma
    gives the data-free `identity` route (`C = M`, `back = I`) and a note.
    """

    C: torch.Tensor
    back: torch.Tensor
    route: str
    info: dict[str, Any]

    def to_weight(self, Y: torch.Tensor) -> torch.Tensor:
        return Y @ self.back


def whitened(M: torch.Tensor, sigma: torch.Tensor, eps: float = 1e-6) -> Whitened:
    """`M` `(m, d)` float64 whitened by the second moment `sigma` `(d, d)` (see Whitened)."""
    m, d = M.shape
    S = sigma.to(M.device, torch.float64)
    if not bool(torch.isfinite(S).all()):
        raise ValueError("the second moment has NaN/Inf entries (non-finite activations reached the layer)")
    if float(S.diagonal().max()) <= 0:
        eye = torch.eye(d, dtype=torch.float64, device=M.device)
        return Whitened(M, eye, "identity", {"note": "zero second moment (no input energy): data-free L = I used"})
    if d < m:
        root = safe_root(S, eps)
        return Whitened(M @ root.L, root.L_pinv, "root", {"sigma": root.info()})
    G = M @ S @ M.T
    lam, U = torch.linalg.eigh((G + G.T) / 2)
    lam, U = lam.flip(0), U.flip(1)
    top = float(lam[0])
    if top <= 0:  # M maps every input to zero: nothing to whiten
        eye = torch.eye(d, dtype=torch.float64, device=M.device)
        return Whitened(M, eye, "identity", {"note": "the layer's output is zero on the calibration data"})
    keep = lam > eps * top
    lam_k, U_k = lam[keep], U[:, keep]
    C = U_k * lam_k.sqrt()
    back = (U_k / lam_k.sqrt()).T @ M
    return Whitened(C, back, "gram", {"gram": {"lambda_max": top, "kept": int(keep.sum()), "m": m,
                                               "floor": eps * top}})


def _tail(s: torch.Tensor, r: int) -> float:
    total = float(s.pow(2).sum())
    return float(s[r:].pow(2).sum()) / total if total > 0 else 0.0


def _truncated(C: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(U_r, s)`: the top-r left singular vectors `(m, r)` of C and all its singular values."""
    Us, s, _ = torch.linalg.svd(C, full_matrices=False)
    return Us[:, :r], s


def _need_sigma(stats: LayerStats | None, method: str) -> torch.Tensor:
    if stats is None or stats.sigma is None:
        raise ValueError(f"{method} needs the layer's calibration second moment (stats.sigma)")
    return stats.sigma


def factor_layer(W: torch.Tensor, rank: int, method: str, stats: LayerStats | None = None, *, eps: float = 1e-6,
                 alpha: float = 0.5, seed: int = 0, nkp_options: dict[str, Any] | None = None,
                 linear_blocks: str = "svd") -> LayerFactors:
    """Rank-`rank` balanced factors of the trained `W` `(m, d)` by `method` (one of METHODS).

    stats: the layer's LayerStats (Sigma needed by whiten and nkp-data, mean_abs by asvd, D and
    the activation by nkp-data). info: method facts (tail energy, floors, notes, time_s).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if linear_blocks not in ("svd", "nkp"):
        raise ValueError(f"linear_blocks must be 'svd' or 'nkp', got {linear_blocks!r}")
    t0 = time.perf_counter()
    W64 = W.detach().to(torch.float64)
    m, d = W64.shape
    if not 1 <= rank <= min(m, d):
        raise ValueError(f"rank must be in 1..{min(m, d)} for a {m} x {d} layer, got {rank}")
    info: dict[str, Any] = {"method": method}
    if not bool((W64 != 0).any()):
        info["note"] = "all-zero weight: zero factors"
        return LayerFactors(W64.new_zeros(m, rank), W64.new_zeros(rank, d), info)
    if method in ("spectral", "nkp"):
        from core.approx import approximate

        opts = dict(nkp_options or {}) if method == "nkp" else {}
        approx = approximate(W64, rank, method, seed=seed, **opts)
        U, V = approx.U.to(torch.float64), approx.V.to(torch.float64)
    elif method == "whiten":
        wh = whitened(W64, _need_sigma(stats, method), eps)
        info.update(route=wh.route, **wh.info)
        Ur, s = _truncated(wh.C, rank)
        info["tail_energy"] = _tail(s, rank)  # the linear error on the fit patches (up to the floor)
        U, V = balanced_factors(Ur, wh.to_weight(Ur.T @ wh.C))  # [W L]_r L^+
    elif method == "asvd":
        scale = _asvd_scale(stats, alpha, eps, d, W64.device)
        Us, s, Vh = torch.linalg.svd(W64 * scale, full_matrices=False)
        info["tail_energy"] = _tail(s, rank)
        U, V = balanced_factors(Us[:, :rank] * s[:rank], Vh[:rank] / scale)
    else:  # nkp-data
        if stats is None:
            raise ValueError("nkp-data needs the layer's LayerStats (D, c, activation, sigma)")
        Df = _floored_D(stats.D.to(W64.device, torch.float64))
        info["floored_D"] = int((Df != stats.D.to(Df.device)).sum())
        wh = whitened(Df[:, None] * W64, _need_sigma(stats, method), eps)  # coordinates of A = D W L
        info.update(route=wh.route, **wh.info)
        if stats.activation == "none" and linear_blocks == "svd":
            Ur, s = _truncated(wh.C, min(rank, wh.C.shape[1]))
            info["solver"] = "weighted svd (affine block: the function error is the linear error)"
            info["tail_energy"] = _tail(s, rank)
            M, N = Ur, wh.to_weight(Ur.T @ wh.C)
        else:
            from core.approx import approximate

            k = wh.C.shape[1]
            approx = approximate(wh.C, min(rank, k), "nkp", seed=seed, **dict(nkp_options or {}))
            info["solver"] = "nkp"
            info["surrogate_fit"] = float(approx.error)  # relu closed form under N(0, Sigma_fit)
            M, N = approx.U.to(torch.float64), wh.to_weight(approx.V.to(torch.float64))
        U, V = balanced_factors(M / Df[:, None], N)  # W' = D^{-1} NKP_r(D W L) L^+
    if U.shape[1] < rank:
        info["live_rank"] = U.shape[1]
        info["rank_note"] = (f"the data have {U.shape[1]} output directions above the floor; the other "
                             f"{rank - U.shape[1]} rank directions start with V = 0 (no effect until fine-tuned)")
        U, V = _pad_rank(U, V, rank, seed)
    info["time_s"] = time.perf_counter() - t0
    return LayerFactors(U, V, info)


def _pad_rank(U: torch.Tensor, V: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of the allocated `rank` from fewer: the new U columns are random (U's RMS), the new V
    rows zero, so `U V` is unchanged and fine-tuning can still use them (two zero halves would get
    no gradient)."""
    k = U.shape[1]
    g = torch.Generator().manual_seed(int(seed))
    rms = float(U.pow(2).mean().sqrt()) if U.numel() else 1.0
    extra = torch.randn(U.shape[0], rank - k, generator=g, dtype=torch.float64).to(U.device) * rms
    return torch.cat([U, extra], 1), torch.cat([V, V.new_zeros(rank - k, V.shape[1])], 0)


def _asvd_scale(stats: LayerStats | None, alpha: float, eps: float, d: int, device: torch.device) -> torch.Tensor:
    """`diag(S)` `(d,)` = E|x_j|^alpha, floored at eps * max (a dead input channel would make S singular)."""
    if stats is None or stats.mean_abs is None:
        raise ValueError("asvd needs the layer's calibration E|x| (stats.mean_abs)")
    scale = stats.mean_abs.to(device, torch.float64).pow(alpha)
    top = float(scale.max())
    return scale.clamp_min(eps * top) if top > 0 else torch.ones(d, dtype=torch.float64, device=device)


def target_spectrum(W: torch.Tensor, method: str, stats: LayerStats | None, *, alpha: float = 0.5,
                    eps: float = 1e-6) -> torch.Tensor:
    """Singular values (descending, float64) of the matrix `method` truncates: `W` (spectral, nkp),
    `W L` (whiten), `W S` (asvd), `D W L` (nkp-data), L the floored root as the method uses it."""
    W64 = W.detach().to(torch.float64)
    if method in ("spectral", "nkp"):
        return torch.linalg.svdvals(W64)
    if method == "asvd":
        return torch.linalg.svdvals(W64 * _asvd_scale(stats, alpha, eps, W64.shape[1], W64.device))
    if method == "nkp-data":
        W64 = _floored_D(stats.D.to(W64.device, torch.float64))[:, None] * W64
    C = whitened(W64, _need_sigma(stats, method), eps).C
    s = torch.linalg.svdvals(C)
    return torch.cat([s, s.new_zeros(max(0, min(W64.shape) - s.numel()))])


def output_energy(W: torch.Tensor, stats: LayerStats) -> float:
    """`E ||D W x||^2 = tr(D W Sigma W^T D)` over the calibration patches (the block's output energy, shift aside)."""
    DW = stats.D.to(W.device, torch.float64)[:, None] * W.detach().to(torch.float64)
    return float(((DW @ stats.sigma.to(DW.device, torch.float64)) * DW).sum())


def refine_factors(U: torch.Tensor, V: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, D: torch.Tensor,
                   c: torch.Tensor, activation: str, *, steps: int, lr: float = 1e-2, batch_size: int = 1024,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Adam on `U, V` for `steps` minibatch steps of `mean ||a(D U V x + c) - y||^2 / mean ||y||^2`.

    X `(n, d)` input patches, Y `(n, m)` the dense block's outputs on the matching patches (float32,
    same device). lr is relative: each factor's step size is `lr * RMS(factor)`, cosine-decayed to 0.
    The loss over all n patches is measured before and after; if refining did not lower it, the
    starting factors are returned (info["kept"] = "start"). Returns float64 U, V and info.
    """
    t0 = time.perf_counter()
    device = X.device
    Df, cf = D.to(device, torch.float32), c.to(device, torch.float32)
    scale = float(Y.pow(2).sum(1).mean())
    if scale <= 0 or steps < 1:
        return U, V, {"steps": 0, "note": "nothing to refine (zero block output)" if scale <= 0 else "steps = 0"}

    def loss_of(Uf: torch.Tensor, Vf: torch.Tensor, Xb: torch.Tensor, Yb: torch.Tensor) -> torch.Tensor:
        out = block_output((Xb @ Vf.T) @ Uf.T, Df, cf, activation)
        return (out - Yb).pow(2).sum(1).mean() / scale

    @torch.no_grad()
    def full_loss(Uf: torch.Tensor, Vf: torch.Tensor) -> float:
        total = sum(float(loss_of(Uf, Vf, X[s:s + 8192], Y[s:s + 8192])) * X[s:s + 8192].shape[0]
                    for s in range(0, X.shape[0], 8192))
        return total / X.shape[0]

    Up = U.detach().to(device, torch.float32).clone().requires_grad_(True)
    Vp = V.detach().to(device, torch.float32).clone().requires_grad_(True)
    before = full_loss(Up, Vp)
    rms = [max(float(t.detach().pow(2).mean().sqrt()), 1e-12) for t in (Up, Vp)]
    opt = torch.optim.Adam([{"params": [Up], "lr": lr * rms[0]}, {"params": [Vp], "lr": lr * rms[1]}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(int(seed))
    n = X.shape[0]
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen).to(device)
        loss = loss_of(Up, Vp, X[idx], Y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    after = full_loss(Up, Vp)
    info = {"steps": steps, "loss_before": before, "loss_after": after, "patches": n,
            "time_s": time.perf_counter() - t0}
    if not after < before:
        info["kept"] = "start"
        return U, V, info
    info["kept"] = "refined"
    return Up.detach().to(torch.float64), Vp.detach().to(torch.float64), info


SURROGATE_KINDS = {"relu": "relu", "relu6": "relu", "silu": "relu", "gelu": "relu", "hardswish": "relu",
                   "none": "linear"}


def surrogate_error(W: torch.Tensor, W_new: torch.Tensor, D: torch.Tensor, sigma: torch.Tensor,
                    activation: str) -> tuple[float | None, str | None]:
    """Gaussian-surrogate prediction of the normalized block error, `x ~ N(0, Sigma)`, shift `c` ignored.

    relu-like blocks: MATH.md Section 2's closed form for `relu(D W x)` vs `relu(D W' x)`, summed over
    rows `a = D w L`, `b = D w' L`: `l = ||a - b||^2 / 2 - |a| |b| (h(cos t) - cos t)` (h of core.approx),
    normalized by `sum |a|^2 / 2`. Only the Gram quantities `w Sigma w'^T` enter, so no root of Sigma
    is formed (core.approx.function_error with `cov=` gives the same numbers via an eigh of Sigma).
    Affine blocks (`none`): `tr(D dW Sigma dW^T D) / tr(D W Sigma W^T D)`. Returns `(value, kind)`,
    `(None, None)` for activations without a surrogate (sigmoid) or a block with no output energy.
    """
    from core.approx import relu_kernel_h

    kind = SURROGATE_KINDS.get(activation)
    if kind is None:
        return None, None
    D64 = D.to(W.device, torch.float64)[:, None]
    A, B = D64 * W.to(torch.float64), D64 * W_new.to(W.device, torch.float64)
    S = sigma.to(A.device, torch.float64)
    dA = A - B
    diff2 = ((dA @ S) * dA).sum(1)
    na2 = ((A @ S) * A).sum(1)
    den = float(na2.sum())
    if den <= 0:
        return None, None
    if kind == "linear":
        return float(diff2.sum()) / den, kind
    nb2 = ((B @ S) * B).sum(1)
    ab = ((A @ S) * B).sum(1)
    norms = (na2.clamp_min(0) * nb2.clamp_min(0)).sqrt()
    cos = torch.where(norms > 0, ab / torch.where(norms > 0, norms, 1.0), 0.0).clamp(-1, 1)
    rows = diff2 / 2 - norms * (relu_kernel_h(cos) - cos)
    return float(rows.clamp_min(0).sum()) / (den / 2), kind


class ErrorAccumulator:
    """Sums, over held-out patches x, of the two empirical errors of MATH.md Section 8 for one layer:
    block `||a(D W' x + c) - a(D W x + c)||^2` against `||a(D W x + c)||^2`, and linear
    `||(W - W') x||^2` against `||W x||^2` (float64 sums; W, W' float32 on the patches' device)."""

    def __init__(self, W: torch.Tensor, W_new: torch.Tensor, stats: LayerStats) -> None:
        self.W, self.W_new, self.stats = W.float(), W_new.float(), stats
        self.sums = torch.zeros(4, dtype=torch.float64)
        self.n = 0

    def update(self, X: torch.Tensor) -> None:
        X = X.float()
        z, z_new = X @ self.W.to(X.device).T, X @ self.W_new.to(X.device).T
        D, c, act = self.stats.D, self.stats.c, self.stats.activation
        y, y_new = block_output(z, D, c, act), block_output(z_new, D, c, act)
        parts = torch.stack([(y_new - y).double().pow(2).sum(), y.double().pow(2).sum(),
                             (z_new - z).double().pow(2).sum(), z.double().pow(2).sum()])
        self.sums += parts.cpu()
        self.n += X.shape[0]

    def errors(self) -> dict[str, float | None]:
        """`{"block": ..., "linear": ..., "patches": n}` (None where the denominator is 0)."""
        b_num, b_den, l_num, l_den = self.sums.tolist()
        return {"block": b_num / b_den if b_den > 0 else None, "linear": l_num / l_den if l_den > 0 else None,
                "patches": self.n}
