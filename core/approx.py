"""Low-rank approximation of a ReLU layer's *function* (docs/MATH.md, Sections 1-5).

A layer computes ``relu(W x)`` with ``W`` of shape ``(m, d)`` and inputs ``x ~ N(0, I_d)``.
For a rank-r ``W' = U V`` (``U`` is ``(m, r)``, ``V`` is ``(r, d)``) its function error is

    L(W') = E_x || relu(W x) - relu(W' x) ||^2,        reported as  L(W') / L(0),  L(0) = ||W||_F^2 / 2.

Public API
----------
* :func:`function_error` - the closed form of Section 2 (float64), per row or total, optionally for
  ``x ~ N(0, S)``.
* :func:`mc_function_error` - a Monte Carlo estimate of the same number, with its standard error.
* :func:`approximate_many` - the same for a list of matrices (a network's layers): nkp runs the
  matrices of one shape and rank as one batch.
* :func:`approximate` - rank-r factors by one of :data:`METHODS`:

  ``spectral``   truncated SVD, balanced factors ``A S^{1/2}``, ``S^{1/2} B^T`` (Khodak et al.). The top-r
                 right singular subspace comes from a partial eigensolver on the float64 Gram matrix
                 (``_top_subspace``), shared by spectral, rescale and nkp.
  ``rescale``    spectral subspace, each row the optimally rescaled projection (Section 3).
  ``nkp``        Nonlinear Kernel Projection: minorize-maximize subspace ascent from the spectral
                 subspace (Section 4), then the optimal rows of Section 3 (core/nkp.py; large
                 matrices take their steps in float32, the answer and its error are float64).
  ``random``     ``U``, ``V`` i.i.d. Gaussian with ``std = (s2 / r)^{1/4}`` each, where ``s2`` is the mean
                 square entry of ``W`` (the full-rank init being replaced), so every entry of ``U V``
                 has mean 0 and variance ``r * (s2/r)^{1/2} * (s2/r)^{1/2} = s2``: the variance of the
                 layer's own full-rank init (Kaiming, ``reset_parameters``' uniform, ...), split
                 evenly between the two factors.
  ``reference``  direct L-BFGS minimization (float64) of the closed form over ``U``, ``V``, started
                 from the better of ``nkp`` and ``spectral`` (a yardstick for tests/benchmarks).

General covariance: if ``x ~ N(0, S)`` and ``S = L L^T`` then ``x = L z`` with ``z ~ N(0, I)``, so the
error of ``W, W'`` under ``N(0, S)`` equals the ``N(0, I)`` error of ``W L, W' L`` (and
``L(0) = tr(W S W^T) / 2``). We use the symmetric square root ``L = S^{1/2}`` (eigh), which also
covers positive semi-definite ``S``.

Everything is PyTorch and runs on the device of the input (or ``device=``): CPU or CUDA give the
same numbers up to floating-point round-off. Reported numbers are float64.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "METHODS",
    "Approximation",
    "approximate",
    "approximate_many",
    "function_error",
    "function_error_grad",
    "mc_function_error",
    "relu_kernel_h",
]

METHODS = ("spectral", "rescale", "nkp", "random", "reference")

# Options each method accepts (besides `device`, which all accept). Unknown options are errors.
_NKP_DEFAULTS: dict[str, Any] = {
    "max_iter": 200,  # MM iterations per start
    "tol": None,  # stop when one iteration lowers the error 1 - F by at most tol times the error;
    # None: 1e-7 in float64 work, 1e-6 in float32 work (core/nkp.py)
    "restarts": 0,  # extra starts: random subspaces inside the top-min(2r, d) singular subspace
    "balanced": True,  # split the singular values of W' evenly between U and V (as spectral does)
    "accelerate": True,  # safeguarded extrapolation between MM steps (accepted only if F improves)
    "precision": "auto",  # "auto": float32 steps when m d r >= 2^16 (core/nkp.py), "float32", "float64"
}
_OPTIONS: dict[str, dict[str, Any]] = {
    "spectral": {"balanced": True},
    "rescale": {"balanced": True},
    "nkp": dict(_NKP_DEFAULTS),
    "random": {},
    "reference": {
        "max_iter": 500,  # L-BFGS iterations
        "tol": 1e-12,  # L-BFGS tolerance on the change of the normalized loss
        "history_size": 20,
        "nkp_options": None,  # dict of options for the nkp start (default: nkp's defaults)
    },
}

_SQRT_EPS_GUARD = 1e-150  # norms below this count as zero rows (float64 norms of real rows are far larger)


@dataclass
class Approximation:
    """Rank-``rank`` factors of ``W`` and how they were found.

    U: (m, r) tensor, dtype of the input W, on the compute device.
    V: (r, d) tensor, same dtype/device.  W' = U @ V.
    error: normalized closed-form function error L(UV)/L(0), computed in float64 (dimensionless).
    time_s: wall-clock seconds the method took (factor computation, not the final error evaluation).
    iterations: method iterations (MM steps for nkp summed over starts, L-BFGS steps for reference, 0 else).
    info: method-specific extras, JSON-able.
    """

    U: torch.Tensor
    V: torch.Tensor
    method: str
    rank: int
    error: float
    time_s: float
    iterations: int
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-able summary (no tensors)."""
        return {
            "method": self.method,
            "rank": self.rank,
            "error": self.error,
            "time_s": self.time_s,
            "iterations": self.iterations,
            "info": self.info,
        }


# --------------------------------------------------------------------------------------------
# Section 2: closed form
# --------------------------------------------------------------------------------------------


def relu_kernel_h(c: torch.Tensor) -> torch.Tensor:
    """h(c) = J(arccos c) / pi with J(t) = sin t + (pi - t) cos t; c is clamped to [-1, 1].

    Elementwise, any shape; h(1) = 1, h(0) = 1/pi, h(-1) = 0.
    """
    c = c.clamp(-1.0, 1.0)
    return (torch.sqrt((1.0 - c * c).clamp_min(0.0)) + (math.pi - torch.arccos(c)) * c) / math.pi


def _sqrt_psd(cov: torch.Tensor, d: int) -> torch.Tensor:
    """Symmetric square root of a (d, d) positive semi-definite covariance, float64."""
    if not isinstance(cov, torch.Tensor):
        cov = torch.as_tensor(cov)
    if cov.shape != (d, d):
        raise ValueError(f"cov must have shape ({d}, {d}) to match W's {d} columns, got {tuple(cov.shape)}")
    cov = cov.to(torch.float64)
    if not torch.isfinite(cov).all():
        raise ValueError("cov contains NaN or Inf")
    scale = cov.abs().max().clamp_min(1e-300)
    if (cov - cov.T).abs().max() > 1e-10 * scale:
        raise ValueError("cov must be symmetric")
    evals, evecs = torch.linalg.eigh((cov + cov.T) / 2)
    if evals.min() < -1e-10 * scale:
        raise ValueError(f"cov must be positive semi-definite, its smallest eigenvalue is {evals.min().item():.3g}")
    return (evecs * evals.clamp_min(0.0).sqrt()) @ evecs.T


def _as_matrix(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, (tuple, list)) and len(x) == 2:  # (U, V) factors
        U, V = (torch.as_tensor(t) for t in x)
        return U.to(torch.float64) @ V.to(device=U.device, dtype=torch.float64)
    x = torch.as_tensor(x)
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(x.shape)}")
    return x


def _row_losses(A: torch.Tensor, B: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Per-row l(a_i, b_i) (Section 2) for float64 (m, d) matrices A, B; returns (m,) float64.

    Uses the algebraically equal, cancellation-free form
        l(a, b) = ||a - b||^2 / 2 - ||a|| ||b|| (sin t - t cos t) / pi,
    with the angle t = 2 atan2(||a^ - b^||, ||a^ + b^||) (a^ = a/||a||), which is accurate even for
    nearly (anti-)aligned rows and gives l(a, a) = 0 exactly. cos t is then automatically in [-1, 1].
    Zero rows: the second term vanishes, so l(a, 0) = ||a||^2 / 2.
    """
    out = []
    for s in range(0, A.shape[0], chunk):
        a, b = A[s : s + chunk], B[s : s + chunk]
        na, nb = a.norm(dim=1), b.norm(dim=1)
        diff2 = (a - b).pow(2).sum(dim=1)
        both = (na > _SQRT_EPS_GUARD) & (nb > _SQRT_EPS_GUARD)
        ua = a / torch.where(both, na, 1.0)[:, None]
        ub = b / torch.where(both, nb, 1.0)[:, None]
        t = 2.0 * torch.atan2((ua - ub).norm(dim=1), (ua + ub).norm(dim=1))
        corr = torch.where(both, na * nb * (torch.sin(t) - t * torch.cos(t)) / math.pi, 0.0)
        out.append((diff2 / 2.0 - corr).clamp_min(0.0))  # l >= 0; clamp round-off below zero
    return torch.cat(out) if out else A.new_zeros(0)


def function_error(
    W: torch.Tensor,
    W_approx: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    *,
    cov: torch.Tensor | None = None,
    per_row: bool = False,
    normalized: bool = True,
) -> float | torch.Tensor:
    """Closed-form function error E||relu(W x) - relu(W' x)||^2 for x ~ N(0, I) (or N(0, cov)).

    W: (m, d); W_approx: (m, d) or a pair (U (m, r), V (r, d)); cov: optional (d, d) PSD covariance.
    Computed in float64 on W's device. Returns a float (sum over the m outputs), or with
    per_row=True a float64 tensor (m,) of per-output errors (summing to the total).
    normalized=True divides by L(0) = ||W||_F^2 / 2 (= tr(W cov W^T)/2 with cov), so 0 is exact and
    1 is as bad as the zero layer; raises ValueError if L(0) = 0 (W is zero), where it is undefined.
    """
    W = _as_matrix(W, "W")
    Wa = _as_matrix(W_approx, "W_approx").to(W.device)
    if Wa.shape != W.shape:
        raise ValueError(f"W_approx must have W's shape {tuple(W.shape)}, got {tuple(Wa.shape)}")
    A = W.to(torch.float64)
    B = Wa.to(torch.float64)
    if cov is not None:
        root = _sqrt_psd(torch.as_tensor(cov), A.shape[1]).to(A.device)
        A, B = A @ root, B @ root
    rows = _row_losses(A, B)
    if normalized:
        L0 = A.pow(2).sum() / 2.0
        if L0.item() <= 0.0:
            raise ValueError("W is zero (under this covariance): the normalized error L(W')/L(0) is undefined")
        rows = rows / L0
    return rows if per_row else float(rows.sum().item())


class _ClosedFormObjective:
    """Normalized closed-form error of W' against a fixed W, with its gradient (float64).

    Quantities of W (row norms, unit rows, L(0)) are computed once; each call costs a few passes
    over an (m, d) matrix. Row gradient (Section 2): d l / d b = b - (|a| sin t b^ + (pi - t) a) / pi.
    At a zero row b the subgradient with t = pi/2, b^ = 0 is used (-a/2).
    """

    def __init__(self, W: torch.Tensor):
        self.A = W.to(torch.float64)
        self.na = self.A.norm(dim=1)
        self.a_nz = self.na > _SQRT_EPS_GUARD
        self.ua = self.A / torch.where(self.a_nz, self.na, 1.0)[:, None]
        self.L0 = float(self.A.pow(2).sum().item()) / 2.0

    def __call__(self, B: torch.Tensor) -> tuple[float, torch.Tensor]:
        B = B.to(torch.float64)
        nb = B.norm(dim=1)
        b_nz = nb > _SQRT_EPS_GUARD
        both = self.a_nz & b_nz
        ub = B / torch.where(b_nz, nb, 1.0)[:, None]
        dm = (self.ua - ub).norm(dim=1)  # |a^ - b^|; |a^ + b^| = sqrt(4 - dm^2) for unit rows
        t = torch.where(both, 2.0 * torch.atan2(dm, (4.0 - dm * dm).clamp_min(0.0).sqrt()), math.pi / 2)
        sin_t = torch.sin(t)
        diff2 = (self.A - B).pow(2).sum(dim=1)
        corr = torch.where(both, self.na * nb * (sin_t - t * torch.cos(t)) / math.pi, 0.0)
        loss = float((diff2 / 2.0 - corr).clamp_min(0.0).sum().item()) / self.L0
        grad = B - ((self.na * sin_t)[:, None] * ub + (math.pi - t)[:, None] * self.A) / math.pi
        return loss, grad / self.L0


def function_error_grad(W: torch.Tensor, W_approx: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Normalized closed-form error of W_approx (m, d) against W (m, d) and its gradient (m, d), float64.

    Row gradient (Section 2): d l / d b = b - (|a| sin t b^ + (pi - t) a) / pi, divided by L(0).
    At a zero row b the subgradient with t = pi/2, b^ = 0 is used (-a/2).
    """
    return _ClosedFormObjective(W)(W_approx)


def mc_function_error(
    W: torch.Tensor,
    W_approx: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    n_samples: int,
    *,
    seed: int = 0,
    cov: torch.Tensor | None = None,
    batch_size: int = 8192,
) -> tuple[float, float]:
    """Monte Carlo estimate of the normalized function error: (mean, standard error).

    Draws n_samples inputs x ~ N(0, I_d) (or N(0, cov)) in float64 from a CPU generator seeded with
    `seed` (so every device sees the same samples), averages ||relu(W x) - relu(W' x)||^2 and divides
    by the exact L(0) = ||W||_F^2/2 (tr(W cov W^T)/2). stderr = sample std / sqrt(n) / L(0).
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 2:
        raise ValueError(f"n_samples must be an integer >= 2, got {n_samples!r}")
    W = _as_matrix(W, "W")
    Wa = _as_matrix(W_approx, "W_approx").to(W.device)
    if Wa.shape != W.shape:
        raise ValueError(f"W_approx must have W's shape {tuple(W.shape)}, got {tuple(Wa.shape)}")
    A, B = W.to(torch.float64), Wa.to(torch.float64)
    if cov is not None:
        root = _sqrt_psd(torch.as_tensor(cov), A.shape[1]).to(A.device)
        A, B = A @ root, B @ root  # x = root z, so W x = (W root) z
    L0 = float(A.pow(2).sum().item()) / 2.0
    if L0 <= 0.0:
        raise ValueError("W is zero (under this covariance): the normalized error L(W')/L(0) is undefined")
    gen = torch.Generator().manual_seed(int(seed))
    total, total_sq, done = 0.0, 0.0, 0
    while done < n_samples:
        b = min(batch_size, n_samples - done)
        z = torch.randn(b, A.shape[1], generator=gen, dtype=torch.float64).to(A.device)
        loss = (torch.relu(z @ A.T) - torch.relu(z @ B.T)).pow(2).sum(dim=1)
        total += float(loss.sum().item())
        total_sq += float(loss.pow(2).sum().item())
        done += b
    mean = total / n_samples
    var = max(total_sq / n_samples - mean * mean, 0.0) * n_samples / (n_samples - 1)
    return mean / L0, math.sqrt(var / n_samples) / L0


# --------------------------------------------------------------------------------------------
# Sections 3-5: methods
# --------------------------------------------------------------------------------------------


def _check_inputs(W: Any, rank: Any, method: Any) -> torch.Tensor:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if not isinstance(W, torch.Tensor):
        try:
            W = torch.as_tensor(W)
        except Exception as exc:  # e.g. a list of ragged rows
            raise ValueError(f"W must be a 2-D real matrix: {exc}") from None
    W = W.detach()  # e.g. an nn.Parameter: no autograd graph through the SVD
    if W.dim() != 2:
        raise ValueError(f"W must be a 2-D matrix (m, d), got a tensor of shape {tuple(W.shape)}")
    if W.is_complex() or not (W.is_floating_point() or W.dtype in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)):
        raise ValueError(f"W must be a real matrix, got dtype {W.dtype}")
    if W.numel() == 0:
        raise ValueError(f"W must be non-empty, got shape {tuple(W.shape)}")
    if not torch.isfinite(W).all():
        bad = int((~torch.isfinite(W)).sum().item())
        raise ValueError(f"W contains {bad} NaN/Inf entries; weights must be finite")
    m, d = W.shape
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"rank must be an integer in 1..min(m, d) = 1..{min(m, d)}, got {rank!r}")
    if not 1 <= rank <= min(m, d):
        raise ValueError(f"rank must be in 1..min(m, d) = 1..{min(m, d)} for W of shape ({m}, {d}), got {rank}")
    if not W.is_floating_point() or W.dtype in (torch.float16, torch.bfloat16):
        W = W.to(torch.float32)  # low-precision/integer weights are approximated in float32
    if not bool((W != 0).any()):
        raise ValueError("W is all zeros: the normalized error L(W')/L(0) is undefined")
    return W


def _resolve_options(method: str, options: dict[str, Any]) -> tuple[dict[str, Any], torch.device | None]:
    options = dict(options)
    device = options.pop("device", None)
    allowed = _OPTIONS[method]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) for method {method!r}: {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(allowed) + ['device']) }"
        )
    merged = {**allowed, **options}
    for key in ("max_iter", "restarts", "history_size"):
        if key in merged:
            v = merged[key]
            low = 0 if key == "restarts" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"option {key} must be an integer >= {low}, got {v!r}")
    if merged.get("tol") is not None:
        v = merged["tol"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and math.isfinite(v)):
            raise ValueError(f"option tol must be a finite number >= 0, got {v!r}")
    if "precision" in merged and merged["precision"] not in ("auto", "float32", "float64"):
        raise ValueError(f"option precision must be 'auto', 'float32' or 'float64', got {merged['precision']!r}")
    for key in ("balanced", "accelerate"):
        if key in merged and not isinstance(merged[key], bool):
            raise ValueError(f"option {key} must be true or false, got {merged[key]!r}")
    if merged.get("nkp_options") is not None and not isinstance(merged["nkp_options"], dict):
        raise ValueError("option nkp_options must be a dict of nkp options")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"option device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("option device='cuda' but CUDA is not available on this machine")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"option device must be 'cpu' or 'cuda', got {device!r}")
    return merged, device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_BLAS_CONTROLLER: Any = None


@contextlib.contextmanager
def lapack_threads() -> Iterator[None]:
    """Run scipy's LAPACK (OpenBLAS) with torch's intra-op thread count, `torch.get_num_threads()`.

    OpenBLAS otherwise starts one thread per core whatever torch was told: a process limited to one
    thread (a benchmark, a worker sharing a machine) would run its eigensolver on every core, and on
    a busy machine oversubscribed threads made syevr 3-20x slower (measured on 2 shared cores).
    """
    global _BLAS_CONTROLLER
    import scipy.linalg  # noqa: F401 - loads the OpenBLAS that the controller must see
    from threadpoolctl import ThreadpoolController

    if _BLAS_CONTROLLER is None:
        _BLAS_CONTROLLER = ThreadpoolController()
    with _BLAS_CONTROLLER.limit(limits=torch.get_num_threads(), user_api="blas"):
        yield


def top_eigh(G: torch.Tensor, k: int, *, overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest eigenvalues (k,) and their eigenvectors (s, k) of a symmetric G (s, s), largest first.

    On the CPU only the k wanted eigenpairs are computed (LAPACK syevr / ssyevr via scipy, with
    torch's thread count), several times cheaper than a full SVD; on CUDA a full torch.linalg.eigh.
    overwrite=True lets LAPACK use G's memory (G is then garbage).
    """
    s = G.shape[0]
    if G.device.type == "cpu":
        import scipy.linalg

        with lapack_threads():
            vals, vecs = scipy.linalg.eigh(G.numpy(), subset_by_index=[s - k, s - 1], driver="evr",
                                           overwrite_a=overwrite, check_finite=False)
        return torch.from_numpy(vals).flip(0), torch.from_numpy(vecs).flip(1)
    vals, vecs = torch.linalg.eigh(G)
    return vals[-k:].flip(0), vecs[:, -k:].flip(1)


def _top_subspace(W: torch.Tensor, k: int) -> torch.Tensor:
    """Orthonormal basis P (d, k), float64, of the top-k right singular subspace of W (m, d).

    Computed from the float64 Gram matrix of the smaller side: W^T W (d <= m) or W W^T (m < d, then
    P = orth(W^T Q)), with `top_eigh`. spectral, rescale and nkp all use this one basis, so
    rescale <= spectral and nkp <= rescale hold exactly (up to float64 round-off) and the spectral
    factors are W P P^T, the truncated SVD.
    """
    m, d = W.shape
    W64 = W.to(torch.float64)
    G = W64.T @ W64 if d <= m else W64 @ W64.T
    Q = top_eigh(G, k, overwrite=True)[1]
    if d <= m:
        return torch.linalg.qr(Q.contiguous()).Q  # already orthonormal; QR cleans up round-off
    return torch.linalg.qr(W64.T @ Q).Q  # columns sigma_i v_i: orthonormalize


def _balanced_split(M: torch.Tensor, P: torch.Tensor, balanced: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of W' = M P^T (M (m, r), P (d, r) orthonormal): balanced (X S^1/2, S^1/2 Y^T P^T) or (M, P^T)."""
    if not balanced:
        return M, P.T.contiguous()
    X, S, Yh = torch.linalg.svd(M, full_matrices=False)
    root = S.sqrt()
    return X * root, (root[:, None] * Yh) @ P.T


def _spectral(W: torch.Tensor, rank: int, opts: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int, dict]:
    P = _top_subspace(W, rank)
    U, V = _balanced_split(W.to(torch.float64) @ P, P, opts["balanced"])  # W' = (W P) P^T
    return U, V, 0, {}


def _rescale(W: torch.Tensor, rank: int, opts: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int, dict]:
    from core.nkp import subspace_answer

    P = _top_subspace(W, rank)
    F, M = subspace_answer(W, P)
    U, V = _balanced_split(M, P, opts["balanced"])
    return U, V, 0, {"objective": F}


def _nkp(W: torch.Tensor, rank: int, opts: dict[str, Any], seed: int) -> tuple[torch.Tensor, torch.Tensor, int, dict]:
    from core.nkp import nkp_many

    return nkp_many([(W[None], rank, [seed])], opts)[0][0]


def _random(W: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, int, dict]:
    m, d = W.shape
    # Var((UV)_ij) = r std^4 = s2: the entry variance of the full-rank init W stands for.
    s2 = float(W.to(torch.float64).pow(2).mean().item())  # > 0: an all-zero W is refused before this
    std = (s2 / rank) ** 0.25
    gen = torch.Generator().manual_seed(int(seed))  # CPU generator: same factors on every device
    U = torch.randn(m, rank, generator=gen, dtype=torch.float64) * std
    V = torch.randn(rank, d, generator=gen, dtype=torch.float64) * std
    return U.to(W.device), V.to(W.device), 0, {"std_U": std, "std_V": std, "entry_variance": s2}


def _reference(W: torch.Tensor, rank: int, opts: dict[str, Any], seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int, dict]:
    nkp_opts = dict(opts["nkp_options"] or {})
    starts = {
        "nkp": approximate(W, rank, "nkp", seed=seed, device=device, **nkp_opts),
        "spectral": approximate(W, rank, "spectral", seed=seed, device=device),
    }
    start_name = min(starts, key=lambda k: starts[k].error)
    start = starts[start_name]
    objective = _ClosedFormObjective(W)
    U = start.U.detach().to(torch.float64).clone().requires_grad_(True)
    V = start.V.detach().to(torch.float64).clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [U, V], lr=1.0, max_iter=opts["max_iter"], max_eval=opts["max_iter"] * 2,
        tolerance_grad=1e-14, tolerance_change=opts["tol"], history_size=opts["history_size"],
        line_search_fn="strong_wolfe",
    )
    best = {"loss": start.error, "U": U.detach().clone(), "V": V.detach().clone()}

    def closure() -> torch.Tensor:
        with torch.no_grad():
            loss, G = objective(U @ V)
            U.grad = G @ V.T
            V.grad = U.T @ G
            if loss < best["loss"]:
                best.update(loss=loss, U=U.detach().clone(), V=V.detach().clone())
        return torch.tensor(loss, dtype=torch.float64)

    opt.step(closure)
    n_iter = int(opt.state[opt._params[0]].get("n_iter", 0))
    info = {"start": start_name, "start_error": start.error, "start_errors": {k: v.error for k, v in starts.items()}}
    return best["U"], best["V"], n_iter, info


def approximate(W: torch.Tensor, rank: int, method: str = "nkp", *, seed: int = 0, **options: Any) -> Approximation:
    """Rank-`rank` factors U (m, r), V (r, d) of the (m, d) weight matrix W by `method`.

    method: one of METHODS ("spectral", "rescale", "nkp", "random", "reference").
    seed: seeds the random parts (random factors, nkp restarts); results are deterministic.
    options (unknown ones raise ValueError):
      device: "cpu" | "cuda" | torch.device, default W's device; factors are returned there.
      spectral, rescale: balanced (bool, default True).
      nkp: max_iter (200), tol (stop when an iteration lowers the error by at most tol times the
           error; default 1e-7 in float64 work, 1e-6 in float32 work), restarts (0), balanced (True), accelerate (True), precision ("auto": float32
           steps when m d r >= 2^16, else float64; "float32"; "float64"). info["objective_history"]
           holds F(P)/||W||_F^2 per iteration in the work precision, info["objective"] the final F
           in float64 (error = 1 - objective).
      reference: max_iter (500 L-BFGS iterations), tol (1e-12), history_size (20), nkp_options (dict).
    Returns an Approximation with U, V in W's dtype (float32 for integer/half input) and the
    normalized closed-form error of U @ V computed in float64.
    Raises ValueError for an unknown method, a rank outside 1..min(m, d), a non-2-D, empty,
    all-zero or non-finite W, or a bad option.
    """
    W = _check_inputs(W, rank, method)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    opts, device = _resolve_options(method, options)
    if device is not None:
        W = W.to(device)
    device = W.device
    _sync(device)
    t0 = time.perf_counter()
    if method == "spectral":
        U, V, iters, info = _spectral(W, rank, opts)
    elif method == "rescale":
        U, V, iters, info = _rescale(W, rank, opts)
    elif method == "nkp":
        U, V, iters, info = _nkp(W, rank, opts, seed)
    elif method == "random":
        U, V, iters, info = _random(W, rank, seed)
    else:
        U, V, iters, info = _reference(W, rank, opts, seed, device)
    U, V = U.to(W.dtype).contiguous(), V.to(W.dtype).contiguous()
    _sync(device)
    elapsed = time.perf_counter() - t0
    error = function_error(W, (U, V))
    return Approximation(U=U, V=V, method=method, rank=rank, error=error, time_s=elapsed, iterations=iters, info=info)


def approximate_many(Ws: list[torch.Tensor], rank: int | list[int], method: str = "nkp", *,
                     seeds: list[int] | None = None, **options: Any) -> list[Approximation]:
    """`approximate` for each matrix of `Ws` (a network's layers): the same answers, computed faster.

    rank: one int for all, or one per matrix; seeds: one per matrix (default 0 each); options as
    `approximate`'s for `method`. nkp runs its ascent in batches of matrices, padded across shapes
    and ranks where that is cheaper than the per-call overhead it saves (core/nkp.py: each matrix
    still stops on its own, and its answer is what `approximate` gives up to round-off); every other
    method runs matrix by matrix. For nkp an Approximation's time_s is the call's time apportioned by
    m d r (the work of an MM step). Raises ValueError as `approximate` does, naming the matrix's index.
    """
    ranks = [rank] * len(Ws) if isinstance(rank, int) and not isinstance(rank, bool) else list(rank)
    seeds = [0] * len(Ws) if seeds is None else list(seeds)
    if len(ranks) != len(Ws) or len(seeds) != len(Ws):
        raise ValueError(f"give one rank and one seed per matrix: {len(Ws)} matrices, "
                         f"{len(ranks)} ranks, {len(seeds)} seeds")
    if method != "nkp":
        return [approximate(W, r, method, seed=s, **options) for W, r, s in zip(Ws, ranks, seeds)]
    checked = []
    for i, (W, r, s) in enumerate(zip(Ws, ranks, seeds)):
        try:
            checked.append(_check_inputs(W, r, method))
            if isinstance(s, bool) or not isinstance(s, int):
                raise ValueError(f"seed must be an integer, got {s!r}")
        except ValueError as exc:
            raise ValueError(f"matrix {i}: {exc}") from None
    opts, device = _resolve_options(method, options)
    if device is not None:
        checked = [W.to(device) for W in checked]
    from core.nkp import group_size, nkp_many

    groups: dict[tuple, list[int]] = {}
    for i, W in enumerate(checked):
        groups.setdefault((tuple(W.shape), ranks[i], W.dtype, W.device), []).append(i)
    parts = []
    for (shape, r, _, _), members in groups.items():
        step = group_size(*shape)
        parts += [(members[lo:lo + step], r) for lo in range(0, len(members), step)]
    devices = {W.device for W in checked}
    for dev in devices:
        _sync(dev)
    t0 = time.perf_counter()
    results = nkp_many([(torch.stack([checked[i] for i in part]), r, [seeds[i] for i in part]) for part, r in parts], opts)
    for dev in devices:
        _sync(dev)
    elapsed = time.perf_counter() - t0
    work = {i: checked[i].shape[0] * checked[i].shape[1] * ranks[i] for i in range(len(checked))}
    total_work = sum(work.values()) or 1
    out: list[Approximation | None] = [None] * len(Ws)
    for (part, r), part_results in zip(parts, results):
        for i, (U, V, iters, info) in zip(part, part_results):
            U, V = U.to(checked[i].dtype).contiguous(), V.to(checked[i].dtype).contiguous()
            out[i] = Approximation(U=U, V=V, method=method, rank=r, error=function_error(checked[i], (U, V)),
                                   time_s=elapsed * work[i] / total_work, iterations=iters, info=info)
    return out  # type: ignore[return-value]
