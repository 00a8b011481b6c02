"""Learning a low-rank ReLU layer from samples (docs/MATH.md, Section 6).

The learner never sees ``W`` (m x d). It queries a *teacher* ``teacher(n) -> (X (n, d), Y (n, m))``
with rows ``x_j ~ N(0, I_d)`` and ``y_j = relu(W x_j) + xi_j`` (``xi_j`` i.i.d., mean 0, variance
``noise**2`` per entry; ``noise=None`` or ``0`` means noiseless), estimates ``W`` and runs NKP on the
estimate. Its promise: with probability >= 1 - delta, the normalized error of its rank-r output on the
true ``W`` is at most NKP's error on the true ``W`` plus ``eps``.

How many samples: the rule
--------------------------
**Noiseless -> least squares on active samples.** Where output i is positive, ``y_ij = w_i . x_j``
exactly, so ``w_i`` is the least-squares solution on those samples once there are at least ``d`` of
them (Gaussian ``x`` are in general position). We ask for ``k = 2d`` active samples per row (the
2d x d Gaussian design then has condition number about 6, so round-off stays negligible). Each sample
is active for a nonzero row with probability 1/2, so by Hoeffding
``P(Bin(n, 1/2) < k) <= exp(-2 (n/2 - k)^2 / n)``; a union bound over the m rows makes this at most
``delta`` when ``sqrt(n) >= sqrt(t/2) + sqrt(t/2 + 2k)``, ``t = ln(m / delta)``:

    n = ceil( (sqrt(t/2) + sqrt(t/2 + 4d))^2 ),   t = ln(m/delta)        (about 4d + O(sqrt(d log(m/delta))))

The estimate is then exact up to float64 round-off, so ``n`` does not depend on ``eps``
(one extra probe sample reveals ``m``). Rows with fewer than ``d`` active samples (probability
< delta over all rows) fall back to Stein's estimate and are counted in ``info``; rows never active
are estimated as zero (a zero row is never active).

**Noisy -> Stein.** ``E[relu(w . x) x] = w / 2`` gives ``W_hat = (2/n) sum_j y_j x_j^T``, an average of
i.i.d. matrices with ``E||2 y x^T - W||_F^2 = V`` (for Gaussian noise ``V = (2d+3)||W||_F^2 + 4 noise^2 d m``).
(i) Error transfer: relu is 1-Lipschitz, so ``sqrt(L)`` obeys the triangle inequality with
``E||relu(A x) - relu(B x)||^2 <= ||A - B||_F^2``. If NKP on ``W_hat`` does at least as well on
``W_hat`` as NKP's output for ``W`` (the analysis treats NKP as the rank-r optimizer), then with
``eta = 2 sqrt(2) ||W_hat - W||_F / ||W||_F`` the normalized error obeys
``e <= (sqrt(e_nkp) + eta)^2 <= e_nkp + 2 eta + eta^2``, which is ``<= e_nkp + eps`` when
``||W_hat - W||_F <= tau ||W||_F``, ``tau = (sqrt(1 + eps) - 1) / (2 sqrt 2)``.
(ii) Concentration: by the central limit theorem ``W_hat - W`` is close to a Gaussian vector with
covariance ``Sigma/n``, ``tr Sigma = V``; Gaussian concentration of the norm
(``||G|| <= sqrt(tr) + sqrt(||Sigma||_op) sqrt(2 ln(1/delta))`` w.p. 1 - delta, and ``||Sigma||_op <= tr``)
gives ``||W_hat - W||_F <= sqrt(V/n) (1 + sqrt(2 ln(1/delta)))`` with probability >= 1 - delta. Hence

    n = ceil( 1.5 * rho * (1 + sqrt(2 ln(1/delta)))^2 / tau^2 ),   rho = V / ||W||_F^2,

where ``rho`` is estimated from a separate pilot sample (``||W||_F^2 = 2 (E||y||^2 - m noise^2)``,
``V = 4 E[||y||^2 ||x||^2] - ||W||_F^2``) and the factor 1.5 covers the pilot's own error.
The rule is conservative (``||Sigma||_op`` is far below ``tr Sigma`` and the triangle inequality is
loose): tests/core/test_learn.py checks the promise over 20+ seeds and docs/results/approx.md reports
the sample counts.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from core.approx import approximate, function_error

__all__ = ["LearnResult", "Teacher", "learn_low_rank", "evaluate_learner", "noiseless_samples", "stein_samples"]

TeacherFn = Callable[[int], tuple[torch.Tensor, torch.Tensor]]

PILOT_SAFETY = 1.5  # multiplies the Stein rule to cover the pilot estimate's error
LS_ACTIVE_PER_ROW = 2  # active samples per row asked for, in units of d


class Teacher:
    """A sample oracle for relu(W x) + noise, x ~ N(0, I_d): ``teacher(n) -> (X (n, d), Y (n, m))`` float64.

    W: (m, d) true weights (kept as ``.W`` so the learner's error can be measured);
    noise: std of i.i.d. Gaussian noise added to every output (0 = noiseless); seed: its CPU generator.
    Successive calls return fresh independent samples.
    """

    def __init__(self, W: torch.Tensor, noise: float = 0.0, seed: int = 0):
        if W.dim() != 2:
            raise ValueError(f"teacher W must be 2-D (m, d), got shape {tuple(W.shape)}")
        if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0):
            raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
        self.W = W.detach().to("cpu", torch.float64)
        self.noise = float(noise)
        self.m, self.d = self.W.shape
        self._gen = torch.Generator().manual_seed(int(seed))

    def __call__(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Drawn in float32 (several times faster on CPU), then exact float64 arithmetic from there on.
        X = torch.randn(n, self.d, generator=self._gen, dtype=torch.float32).to(torch.float64)
        Y = torch.relu(X @ self.W.T)
        if self.noise > 0:
            Y = Y + self.noise * torch.randn(n, self.m, generator=self._gen, dtype=torch.float32).to(torch.float64)
        return X, Y


@dataclass
class LearnResult:
    """What the learner produced and how.

    U: (m, r), V: (r, d) float64 factors of the learned layer (CPU).
    samples: total samples drawn from the teacher (probe/pilot included).
    rule: the sample-size rule with its numbers, one line.  estimator: "least_squares" | "stein".
    error: normalized function error of U V on the true W (None when the teacher does not expose W).
    nkp_error: NKP's normalized error on the true W, the yardstick of the promise (None likewise).
    time_s: wall-clock seconds.  info: JSON-able details (rule parameters, fallbacks).
    """

    U: torch.Tensor
    V: torch.Tensor
    samples: int
    rule: str
    estimator: str
    time_s: float
    error: float | None = None
    nkp_error: float | None = None
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "samples": self.samples, "rule": self.rule, "estimator": self.estimator, "time_s": self.time_s,
            "error": self.error, "nkp_error": self.nkp_error, "info": self.info,
        }


def noiseless_samples(m: int, d: int, delta: float) -> int:
    """Samples so that every one of m rows sees >= 2d active samples w.p. >= 1 - delta (Hoeffding + union bound)."""
    t = math.log(m / delta)
    k = LS_ACTIVE_PER_ROW * d
    return math.ceil((math.sqrt(t / 2) + math.sqrt(t / 2 + 2 * k)) ** 2)


def stein_samples(rho: float, eps: float, delta: float) -> int:
    """Samples for ||W_hat - W||_F <= tau ||W||_F w.p. >= 1 - delta, rho = E||2yx^T - W||_F^2 / ||W||_F^2."""
    tau = (math.sqrt(1.0 + eps) - 1.0) / (2.0 * math.sqrt(2.0))
    z = 1.0 + math.sqrt(2.0 * math.log(1.0 / delta))
    return math.ceil(PILOT_SAFETY * rho * z * z / (tau * tau))


def _draw(teacher: TeacherFn, n: int, d: int, m: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    X, Y = teacher(n)
    X, Y = torch.as_tensor(X), torch.as_tensor(Y)
    if X.dim() != 2 or X.shape != (n, d) or Y.dim() != 2 or Y.shape[0] != n or (m is not None and Y.shape[1] != m):
        raise ValueError(f"teacher({n}) must return X of shape ({n}, {d}) and Y of shape ({n}, m); got {tuple(X.shape)} and {tuple(Y.shape)}")
    return X.to(torch.float64), Y.to(torch.float64)


def _least_squares(X: torch.Tensor, Y: torch.Tensor, d: int, chunk_elems: int = 1 << 24) -> tuple[torch.Tensor, dict]:
    """Row-wise least squares on active samples: w_i = argmin sum_{j: y_ij > 0} (w . x_j - y_ij)^2."""
    n, m = Y.shape
    mask = (Y > 0).to(torch.float64)
    counts = mask.sum(dim=0)
    W_hat = torch.zeros(m, d, dtype=torch.float64, device=X.device)
    rhs = Y.T @ X  # y_ij = 0 on inactive samples, so X^T (mask_i * y_i) = X^T y_i
    rows = max(1, chunk_elems // max(1, n * d))
    solvable = counts >= d
    for s in range(0, m, rows):
        e = min(m, s + rows)
        G = torch.einsum("ni,nk,nl->ikl", mask[:, s:e], X, X)  # (rows, d, d) Gram of active samples
        sol = torch.linalg.solve(G + torch.where(solvable[s:e], 0.0, 1.0)[:, None, None] * torch.eye(d, dtype=G.dtype, device=G.device), rhs[s:e])
        W_hat[s:e] = sol
    stein = 2.0 * rhs / n
    fallback = (~solvable) & (counts > 0)
    W_hat = torch.where(solvable[:, None], W_hat, torch.where(fallback[:, None], stein, 0.0))
    return W_hat, {"rows_underdetermined": int(fallback.sum().item()), "rows_never_active": int((counts == 0).sum().item()),
                   "min_active_per_row": int(counts.min().item())}


def learn_low_rank(
    teacher: TeacherFn,
    d: int,
    rank: int,
    *,
    eps: float,
    delta: float,
    seed: int = 0,
    noise: float | None = None,
    nkp_options: dict[str, Any] | None = None,
    max_samples: int = 200_000_000,
    batch_size: int = 1 << 17,
    device: str | torch.device | None = None,
) -> LearnResult:
    """Learn a rank-`rank` approximation of the teacher's layer from samples (module docstring: the rule).

    teacher: callable n -> (X (n, d), Y (n, m)); d: input dimension; eps in (0, 1]: allowed excess
    normalized error; delta in (0, 1): allowed failure probability; noise: the teacher's output noise
    std (None or 0: noiseless, least squares; > 0: Stein). seed seeds NKP. max_samples caps the rule
    (ValueError beyond it). If the teacher exposes ``.W`` (like :class:`Teacher`), the result's error
    and nkp_error are filled in.
    """
    t0 = time.perf_counter()
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ValueError(f"d must be a positive integer, got {d!r}")
    if not (isinstance(eps, (int, float)) and 0 < eps <= 1):
        raise ValueError(f"eps must be in (0, 1], got {eps!r}")
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if noise is not None and not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be None or a finite number >= 0, got {noise!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    noisy = bool(noise)
    info: dict[str, Any] = {"eps": eps, "delta": delta, "noise": noise}

    if not noisy:
        X0, Y0 = _draw(teacher, 1, d, None)  # one probe sample reveals m
        m = Y0.shape[1]
        if rank > min(m, d):
            raise ValueError(f"rank must be in 1..min(m, d) = 1..{min(m, d)}, got {rank}")
        n = noiseless_samples(m, d, delta)
        if n > max_samples:
            raise ValueError(f"the rule asks for {n} samples, above max_samples={max_samples}")
        X, Y = _draw(teacher, n, d, m)
        X, Y = torch.cat([X0, X]).to(dev), torch.cat([Y0, Y]).to(dev)
        W_hat, ls_info = _least_squares(X, Y, d)
        info.update(ls_info, active_per_row=LS_ACTIVE_PER_ROW * d, t=math.log(m / delta))
        samples, estimator = n + 1, "least_squares"
        rule = (f"noiseless: n = ceil((sqrt(t/2) + sqrt(t/2 + 2k))^2) with k = 2d = {2 * d} active samples per row, "
                f"t = ln(m/delta) = {math.log(m / delta):.3f} (Hoeffding + union bound over m = {m} rows) -> n = {n} (+1 probe)")
    else:
        sigma2 = float(noise) ** 2
        n0 = max(4000, 50 * d)
        pilot_total = 0
        while True:
            X, Y = _draw(teacher, n0, d, None)
            pilot_total += n0
            m = Y.shape[1]
            y2 = Y.pow(2).sum(dim=1)
            norm2 = 2.0 * (float(y2.mean()) - m * sigma2)  # ||W||_F^2 estimate
            V = 4.0 * float((y2 * X.pow(2).sum(dim=1)).mean()) - norm2
            # Detectable signal: the estimate of ||W||^2 exceeds 5 of its standard errors.
            se = 2.0 * float(y2.std()) / math.sqrt(n0)
            if norm2 > 5.0 * se:
                break
            if 4 * n0 + pilot_total > max_samples:
                raise ValueError(f"signal too weak for the noise (||W||_F^2 estimate {norm2:.3g} +- {se:.2g}) within max_samples={max_samples}")
            n0 *= 4
        if rank > min(m, d):
            raise ValueError(f"rank must be in 1..min(m, d) = 1..{min(m, d)}, got {rank}")
        rho = V / norm2
        n = stein_samples(rho, eps, delta)
        if n + pilot_total > max_samples:
            raise ValueError(f"the rule asks for {n + pilot_total} samples, above max_samples={max_samples}")
        acc = torch.zeros(m, d, dtype=torch.float64, device=dev)
        done = 0
        while done < n:
            b = min(batch_size, n - done)
            X, Y = _draw(teacher, b, d, m)
            acc += Y.to(dev).T @ X.to(dev)
            done += b
        W_hat = 2.0 * acc / n
        tau = (math.sqrt(1.0 + eps) - 1.0) / (2.0 * math.sqrt(2.0))
        info.update(pilot_samples=pilot_total, rho=rho, tau=tau, norm2_estimate=norm2)
        samples, estimator = n + pilot_total, "stein"
        rule = (f"noisy: n = ceil({PILOT_SAFETY} rho (1 + sqrt(2 ln(1/delta)))^2 / tau^2) with rho = E||2yx^T - W||^2/||W||^2 "
                f"= {rho:.3g} (pilot of {pilot_total}), tau = (sqrt(1+eps) - 1)/(2 sqrt 2) = {tau:.4g} -> n = {n} (+{pilot_total} pilot)")

    if not bool(torch.isfinite(W_hat).all()):  # one check at the end instead of one per batch
        raise ValueError("teacher returned NaN/Inf samples")
    if not bool((W_hat != 0).any()):
        raise ValueError("the estimated W is zero: the teacher's outputs were never positive")
    approx = approximate(W_hat, rank, "nkp", seed=seed, device=dev, **(nkp_options or {}))
    U, V = approx.U.to("cpu", torch.float64), approx.V.to("cpu", torch.float64)
    result = LearnResult(U=U, V=V, samples=samples, rule=rule, estimator=estimator,
                         time_s=0.0, info=info)
    W_true = getattr(teacher, "W", None)
    if isinstance(W_true, torch.Tensor):
        result.error, result.nkp_error = evaluate_learner(result, W_true, rank, seed=seed, nkp_options=nkp_options)
        result.info["estimate_rel_error"] = float((W_hat.cpu() - W_true.to(torch.float64)).norm() / W_true.to(torch.float64).norm())
    result.time_s = time.perf_counter() - t0
    return result


def evaluate_learner(result: LearnResult, W: torch.Tensor, rank: int, *, seed: int = 0,
                     nkp_options: dict[str, Any] | None = None) -> tuple[float, float]:
    """(learner's normalized error on the true W, NKP's normalized error on the true W)."""
    err = function_error(W, (result.U, result.V))
    nkp = approximate(W.to(torch.float64), rank, "nkp", seed=seed, **(nkp_options or {})).error
    return err, nkp
