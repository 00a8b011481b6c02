"""NKP's subspace ascent (MATH.md Section 4), batched over many weight matrices (a network's layers).

`nkp_many(jobs, opts)` takes groups of matrices of one shape and rank (``W`` (B, m, d) each) and
runs, for all of them at once (batched matmul and linalg, in padded batches across groups), the
minorize-maximize ascent of

    F(P) = sum_i ||w_i||^2 h(c_i)^2 / ||W||_F^2,    c_i = ||P^T u_i||,  u_i = w_i / ||w_i||,

over orthonormal P (d, r), each matrix stopping on its own; then per matrix the optimal rows of
Section 3 in its final subspace, as balanced factors. `core.approx.approximate` (one matrix) and
`core.approx.approximate_many` (a network's layers, grouped by shape) both call it, so there is one
NKP implementation.

Where the time goes, and what is done about it (each measured with one thread):

* Two representations of a basis. For a wide W (m < d, most conv layers: m = out, d = in*kh*kw)
  P lies in the row space of the unit rows U, P^T = T U, and with the normalized Gram matrix
  K = U U^T (m, m; the start computes W W^T anyway) every quantity of a step is an (r, m) x (m, m)
  product: one m^2 r product per MM step instead of two of m d r (`_RowSpace`; 9-18x fewer flops on
  ResNet's 3x3 convs). Otherwise P^T (r, d) itself (`_ColumnSpace`).
* Z = P^T U^T is linear in the basis, so the extrapolated point's Z is a combination of the last
  two, and an orthonormalization X -> M X (M (r, r)) maps Z -> M Z: no product with U for either
  (where Z is float64; float32 products are recomputed, see `ascent`).
* Batching: per-call overhead, not arithmetic, is most of a small layer's MM step. Matrices of one
  shape and rank share a batch; different shapes and ranks share a zero-padded one (`_bucket`:
  block-diagonal, exact) while the padding's extra arithmetic costs less than the overhead saved.
* Precision. With ``precision="auto"`` a matrix with ``m d r >= FLOAT32_MIN_WORK`` computes its
  start (the top-r subspace of the float32 Gram matrix of its smaller side, LAPACK ssyevr) and the
  products with U in float32, unless that Gram matrix's r-th eigenvalue is below
  ``FLOAT32_MIN_EIG_RATIO`` of its largest (steep spectra, as trained layers have: float32 cannot
  resolve that subspace, and answers were measured 30 % off; such matrices work in float64). The
  (r, r) algebra, per-row scalars, F and the stopping rule stay float64. The final subspace is re-orthonormalized and F, the rows, the factors and the reported
  error are float64. Smaller matrices, and ``precision="float64"``, work in float64 throughout
  from exactly the subspace spectral and rescale use, so nkp <= rescale <= spectral holds to
  float64 round-off. tests/core/test_nkp_speed.py holds the float32 answers within 1e-4 (0.01 %)
  of a float64 run converged to tol 1e-10.

Stopping rule: an item stops when one iteration lowers its error ``1 - F`` (MATH.md Section 3: the
normalized error in the current subspace) by at most ``tol`` times that error, or after ``max_iter``
iterations. Relative to the error, not to F, because the error is what is reported: at low rank F
is small, and a rule on F's relative increase ran on long after the error had stopped moving.
Default tol: 1e-7 in float64 work, 1e-6 in float32 work (F's float32 products resolve ~1e-7).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

FLOAT32_MIN_WORK = 1 << 16  # m * d * r from which precision "auto" works in float32
FLOAT32_MIN_EIG_RATIO = 1e-3  # ... if its Gram matrix's r-th eigenvalue is at least this fraction of the largest
PRECISIONS = ("auto", "float32", "float64")
DEFAULT_TOL = {torch.float64: 1e-7, torch.float32: 1e-6}
_ZERO_ROW = 1e-150  # row norms below this count as zero rows (as core.approx does)
_COND_FLOOR = 1e-10  # a basis Gram matrix whose eigenvalue ratio is below this is not trusted
_MAX_GROUP_ELEMENTS = 1 << 24  # B * m * d per batched call (a float64 copy is 128 MiB)
F64 = torch.float64


def work_dtype(m: int, d: int, r: int, precision: str) -> torch.dtype:
    """The dtype of NKP's products with the unit rows for an (m, d) matrix at rank r."""
    if precision == "float64" or (precision == "auto" and m * d * r < FLOAT32_MIN_WORK):
        return F64
    return torch.float32


def group_size(m: int, d: int) -> int:
    """How many (m, d) matrices one batched call takes at most."""
    return max(1, _MAX_GROUP_ELEMENTS // max(1, m * d))


def _T(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


@dataclass
class _State:
    """Quantities at a basis: ZT = P^T U^T (B, r, m), c_i = ||P^T u_i||, t = arccos c, h = pi h(c), F (B,); float64."""

    ZT: torch.Tensor
    c: torch.Tensor
    t: torch.Tensor
    h: torch.Tensor
    F: torch.Tensor

    def where(self, mask: torch.Tensor, other: _State) -> _State:
        """Per item: self where mask (B,) else other."""
        m3, m2 = mask[:, None, None], mask[:, None]
        return _State(torch.where(m3, self.ZT, other.ZT), torch.where(m2, self.c, other.c),
                      torch.where(m2, self.t, other.t), torch.where(m2, self.h, other.h),
                      torch.where(mask, self.F, other.F))

    def take(self, idx: torch.Tensor) -> _State:
        return _State(self.ZT[idx], self.c[idx], self.t[idx], self.h[idx], self.F[idx])


class _Rows:
    """What F needs of B matrices: row norms n_i, weights w_i = n_i^2 / ||W||_F^2, signs s_i, and (for the
    final answer) the unit rows u_i (float64). Padded rows (bucketed batches) have n_i = 0."""

    def __init__(self, W: torch.Tensor | None, *, parts: tuple | None = None) -> None:
        if parts is not None:
            self.norms, self.sign, self.units64 = parts
        else:
            W64 = W.to(F64)
            self.norms = W64.norm(dim=2)
            self.units64 = W64 / torch.where(self.norms > _ZERO_ROW, self.norms, 1.0)[..., None]
            u = self.units64
            self.sign = torch.sign(u.gather(2, u.abs().argmax(dim=2, keepdim=True)))[..., 0]  # u and -u pull alike
        self.nz = self.norms > _ZERO_ROW
        n2 = self.norms.pow(2)
        self.w = n2 / n2.sum(dim=1, keepdim=True)
        self.w_f = self.w / math.pi ** 2  # F = sum w_f (pi h)^2
        self.w_a = 2.0 * self.w / math.pi ** 2  # a_i = w_a (pi h) (pi - t) / c

    def take(self, idx: torch.Tensor) -> _Rows:
        return _Rows(None, parts=(self.norms[idx], self.sign[idx], None if self.units64 is None else self.units64[idx]))

    def state(self, ZT: torch.Tensor) -> _State:
        """F = sum_i w_i h(c_i)^2 at the basis whose ZT (B, r, m) is given."""
        # (ZT * ZT).sum(1), not ZT.norm(dim=1): a norm over a non-last dim ran 20-30x slower (torch 2.14, CPU)
        c = (ZT * ZT).sum(dim=1).sqrt().clamp(max=1.0)
        t = torch.arccos(c)
        h = torch.sin(t) + (math.pi - t) * c  # pi h(c): J(t) = sin t + (pi - t) cos t
        return _State(ZT, c, t, h, (self.w_f * h * h).sum(dim=1))

    def weights(self, s: _State) -> tuple[torch.Tensor, torch.Tensor]:
        """MM weights a_i = w_i g'(c_i) / c_i (g'(c) = 2 h(c) h'(c), h'(c) = (pi - arccos c) / pi), and the
        nonzero rows orthogonal to the subspace (c_i = 0), which pull through the tangent instead."""
        ok = s.c > 1e-12
        return torch.where(ok, self.w_a * s.h * (math.pi - s.t) / torch.where(ok, s.c, 1.0), 0.0), self.nz & ~ok

    def answer(self, PT: torch.Tensor) -> tuple[_State, torch.Tensor]:
        """At orthonormal bases PT (B, r, d), float64: the state and the optimal rows M (B, m, r), W' = M P^T.

        Row i of M is t*_i P^T u_i / c_i, t*_i = ||w_i|| h(c_i) (Section 3); a nonzero row orthogonal to the
        subspace gets norm ||w_i|| / pi along P's first axis (every direction in it is equally good).
        """
        s = self.state(PT @ _T(self.units64))
        Z = _T(s.ZT)
        ok = s.c > 1e-300
        direction = Z / torch.where(ok, s.c, 1.0)[..., None]
        first = torch.zeros_like(Z)
        first[..., 0] = 1.0
        direction = torch.where(ok[..., None], direction, first)
        return s, torch.where(self.nz[..., None], (self.norms * s.h / math.pi)[..., None] * direction, 0.0)


class _ColumnSpace:
    """Bases as P^T (B, r, d), float64; products with the unit rows `units` (B, m, d) in their dtype, two per
    MM step. E (B, r, d) or None: the fixed dummy rows of padded items (see `_bucket`)."""

    rescue_by_svd = True

    def __init__(self, rows: _Rows, units: torch.Tensor, pad: tuple | None = None,
                 unitsT: torch.Tensor | None = None) -> None:
        self.rows, self.units, self.pad, self.dtype = rows, units, pad, units.dtype
        # P^T U^T with the long dim last ran 4-5x faster than U P (MKL, one thread): keep both layouts
        self.unitsT = _T(units).contiguous() if unitsT is None else unitsT
        self.exact_z = self.dtype == F64

    def take(self, idx: torch.Tensor, rows: _Rows) -> _ColumnSpace:
        return _ColumnSpace(rows, self.units[idx], _take_pad(self.pad, idx), self.unitsT[idx])

    def z(self, X: torch.Tensor) -> torch.Tensor:
        return (X.to(self.dtype) @ self.unitsT).to(F64)

    def mm(self, s: _State, coef: torch.Tensor, flat: torch.Tensor) -> tuple[torch.Tensor, None]:
        """(B P)^T = sum_i a_i (P^T u_i) u_i^T, plus the tangent w_i / pi s_i u_i on the first axis for each
        row orthogonal to P: c(P') >= s_i u_i^T P' e_1 (any unit vector works in place of e_1; without it
        such rows never pull P, and a subspace some rows are orthogonal to is a fixed point though not
        a maximum)."""
        A = ((s.ZT * coef[:, None, :]).to(self.dtype) @ self.units).to(F64)
        if bool(flat.any()):
            pull = (flat * self.rows.w * self.rows.sign / math.pi).to(self.dtype)
            A[:, 0, :] += (pull[:, None, :] @ self.units)[:, 0, :].to(F64)
        return _with_dummies(A, self.pad), None

    @staticmethod
    def gram(X: torch.Tensor, ZX: torch.Tensor | None) -> torch.Tensor:
        return X @ _T(X)


class _RowSpace:
    """Bases as coefficients T (B, r, m), P^T = T U, for wide W (m < d); K = U U^T (B, m, m) float64.

    Z = T K, and the Gram matrix of a basis is Z T^T: one (r, m) x (m, m) product per MM step. K comes
    from the start's Gram matrix W W^T (float32 in float32 work: then the ascent runs exactly, in
    float64, on unit rows perturbed by float32 round-off; the final answer is evaluated on W itself).
    """

    rescue_by_svd = False
    exact_z = True  # float64 products (with K)

    def __init__(self, rows: _Rows, K: torch.Tensor, pad: tuple | None = None) -> None:
        self.rows, self.K, self.pad = rows, K, pad

    def take(self, idx: torch.Tensor, rows: _Rows) -> _RowSpace:
        return _RowSpace(rows, self.K[idx], _take_pad(self.pad, idx))

    def z(self, X: torch.Tensor) -> torch.Tensor:
        return X @ self.K

    def mm(self, s: _State, coef: torch.Tensor, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B P)^T = sum_i a_i (P^T u_i) u_i^T in coefficients, with the tangent of `_ColumnSpace.mm`."""
        A = s.ZT * coef[:, None, :]
        if bool(flat.any()):
            A[:, 0, :] += flat * self.rows.w * self.rows.sign / math.pi
        A = _with_dummies(A, self.pad)
        return A, A @ self.K

    @staticmethod
    def gram(X: torch.Tensor, ZX: torch.Tensor) -> torch.Tensor:
        return ZX @ _T(X)


def _with_dummies(A: torch.Tensor, pad: tuple | None) -> torch.Tensor:
    """A padded item's MM product has zero dummy rows; put the fixed unit dummy rows E back, with A's real
    rows scaled to unit RMS norm first (a positive factor, which orthonormalization ignores), so that
    the two blocks of A A^T are of one scale. pad: (E (B, R, n), real rank per item (B,) float64)."""
    if pad is None:
        return A
    E, n_real = pad
    scale = ((A * A).sum(dim=(1, 2)) / n_real).sqrt().clamp_min(1e-300)
    return A / scale[:, None, None] + E


def _take_pad(pad: tuple | None, idx: torch.Tensor) -> tuple | None:
    return None if pad is None else (pad[0][idx], pad[1][idx])


def _orthonormalize(space, A: torch.Tensor, ZA: torch.Tensor | None, fallback: tuple[torch.Tensor, torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases Q (and their ZT) spanning each A's rows: Q = (A A^T)^{-1/2} A, the polar factor,
    i.e. the Procrustes maximizer of tr(P^T A); then one Newton-Schulz step Q <- 1.5 Q - 0.5 (Q Q^T) Q,
    which squares the orthonormality error. All (r, r) algebra is float64, and ZQ = M ZA follows
    from Z's linearity in the basis. Where A's Gram matrix is ill-conditioned: the SVD's polar factor
    (column space), or the `fallback` basis (row space, and A zero or not finite).
    """
    G = space.gram(A, ZA)
    lam, vecs = torch.linalg.eigh(G)
    ratio = lam[:, 0] / lam[:, -1]
    worst = float(ratio.min())  # NaN for NaN input
    M = (vecs * lam.clamp_min(1e-300).rsqrt()[:, None, :]) @ _T(vecs)
    Q = M @ A
    ZQ = None if ZA is None else M @ ZA
    if not worst > 1e-6:  # (A A^T)^{-1/2} A is orthonormal to ~eps cond(A A^T): polish where that is coarse
        S = space.gram(Q, ZQ)
        Q = 1.5 * Q - 0.5 * (S @ Q)
        ZQ = None if ZQ is None else 1.5 * ZQ - 0.5 * (S @ ZQ)
    good = ratio > _COND_FLOOR  # False for NaN and for A = 0
    if not worst > _COND_FLOOR:
        recompute = False
        for b in (~good).nonzero().flatten().tolist():
            if space.rescue_by_svd and bool(torch.isfinite(A[b]).all()) and float(A[b].abs().max()) > 0.0:
                X, _, Yh = torch.linalg.svd(A[b].T, full_matrices=False)
                Q[b] = (X @ Yh).T
                recompute = True
            else:
                Q[b] = fallback[0][b]
                if ZQ is not None:
                    ZQ[b] = fallback[1][b]
        if recompute:
            ZQ = None
    return Q, (space.z(Q) if ZQ is None else ZQ)


def ascent(space, rows: _Rows, X: torch.Tensor, max_iter: int, tol: float, accelerate: bool) -> dict[str, Any]:
    """Monotone MM ascent of F from orthonormal bases X (B, r, .), each item stopping on its own.

    With accelerate=True, after each MM step X1 (from X0) the extrapolated point orth(X1 + beta (X1 - X0))
    is also tried; it is kept only if F is higher than at X1, so F never decreases. Items that stop
    leave the batch. Returns per item: X (B, r, .), F (B,), histories (F per iteration), iterations,
    accepted_extrapolations, converged.
    """
    B = X.shape[0]
    s = rows.state(space.z(X))
    histories = [[f] for f in s.F.tolist()]
    iterations, accepted, converged = [0] * B, [0] * B, [False] * B
    out_X, out_F = X.clone(), s.F.clone()
    active = list(range(B))
    beta = torch.ones(B, dtype=F64, device=X.device)
    for it in range(1, max_iter + 1):
        A, ZA = space.mm(s, *rows.weights(s))
        X1, Z1 = _orthonormalize(space, A, ZA, (X, s.ZT))
        s1 = rows.state(Z1)
        worse = s1.F < s.F  # cannot happen in exact arithmetic (MM); guard against round-off
        if bool(worse.any()):
            X1, s1 = torch.where(worse[:, None, None], X, X1), s.where(worse, s1)
        if accelerate:
            b3 = beta[:, None, None]
            # Z of the extrapolated point by linearity, where Z is exact enough: (1 + 2 beta) times the
            # error of float32 products (beta up to 64) made F look higher than it was.
            ZE = s1.ZT + b3 * (s1.ZT - s.ZT) if space.exact_z else None
            Q, ZQ = _orthonormalize(space, X1 + b3 * (X1 - X), ZE, (X1, s1.ZT))
            se = rows.state(ZQ)
            better = se.F > s1.F
            X1, s1 = torch.where(better[:, None, None], Q, X1), se.where(better, s1)
            beta = torch.where(better, (beta * 2.0).clamp(max=64.0), (beta / 4.0).clamp(min=0.25))
            for j in better.nonzero().flatten().tolist():
                accepted[active[j]] += 1
        gain = s1.F - s.F
        done = gain <= tol * (1.0 - s1.F)
        X, s = X1, s1
        for j, f in enumerate(s.F.tolist()):
            histories[active[j]].append(f)
            iterations[active[j]] = it
        if bool(done.any()):
            idx = done.nonzero().flatten()
            for j in idx.tolist():
                converged[active[j]] = True
            target = torch.tensor([active[j] for j in idx.tolist()], device=X.device)
            out_X[target], out_F[target] = X[idx], s.F[idx]
            keep = (~done).nonzero().flatten()
            if keep.numel() == 0:
                break
            active = [active[j] for j in keep.tolist()]
            rows = rows.take(keep)
            space, X, s, beta = space.take(keep, rows), X[keep], s.take(keep), beta[keep]
    else:  # max_iter reached: the items still running end where they are
        target = torch.tensor(active, device=X.device)
        out_X[target], out_F[target] = X, s.F
    return {"X": out_X, "F": out_F, "histories": histories, "iterations": iterations,
            "accepted_extrapolations": accepted, "converged": converged}


@dataclass
class _Group:
    """B matrices of one shape and rank, ready for the ascent: the space they work in, the start bases."""

    W: torch.Tensor
    rank: int
    seeds: list[int]
    dtype: torch.dtype
    tol: float
    rows: _Rows
    kind: str  # "row" | "column"
    K: torch.Tensor | None  # row space: U U^T (B, m, m) float64
    units: torch.Tensor | None  # column space: unit rows (B, m, d) in dtype
    starts: list[tuple[str, torch.Tensor]]  # (name, X0 (B, r, n)), n = m (row) or d (column)

    @property
    def n(self) -> int:
        return self.W.shape[1] if self.kind == "row" else self.W.shape[2]


def _prepare(W: torch.Tensor, rank: int, opts: dict[str, Any], seeds: list[int]) -> _Group:
    """The space to work in and the start bases: spectral's top-r subspace, then `restarts` random
    r-dim subspaces of the top-min(2r, m, d) one (seeded per matrix). In float64 work the top
    subspace is computed exactly as `core.approx._top_subspace` computes it (the same Gram matrix
    and eigensolver call), so nkp starts where rescale ends."""
    from core.approx import top_eigh

    B, m, d = W.shape
    dtype = work_dtype(m, d, rank, opts["precision"])
    rows = _Rows(W)
    restarts = opts["restarts"]
    k = min(2 * rank, m, d) if restarts else rank
    wide = m < d
    while True:
        Wc = W.to(dtype)
        G = Wc @ _T(Wc) if wide else _T(Wc) @ Wc
        pairs = [top_eigh(g, k) for g in G]
        vals = torch.stack([v for v, _ in pairs]).to(device=W.device, dtype=F64)
        vecs = torch.stack([q for _, q in pairs]).to(device=W.device, dtype=F64)  # (B, s, k)
        # A float32 Gram matrix resolves eigenvalues down to ~1e-7 of the largest: where the r-th is below
        # FLOAT32_MIN_EIG_RATIO of it (steep spectra of trained layers) its subspace is float32 noise.
        if (dtype == F64 or opts["precision"] == "float32"
                or bool((vals[:, rank - 1] > FLOAT32_MIN_EIG_RATIO * vals[:, 0]).all())):
            break
        dtype = F64
    tol = DEFAULT_TOL[dtype] if opts["tol"] is None else opts["tol"]
    K = units = None
    if wide and bool((vals[:, rank - 1] > _COND_FLOOR * vals[:, 0]).all()):
        # P = W^T Q Lambda^{-1/2} = U^T D Q Lambda^{-1/2}: coefficients Lambda^{-1/2} Q^T D; K = D^-1 G D^-1
        kind = "row"
        inv = torch.where(rows.nz, rows.norms, 1.0)
        K = torch.where(rows.nz[:, :, None] & rows.nz[:, None, :], G.to(F64) / (inv[:, :, None] * inv[:, None, :]), 0.0)
        space = _RowSpace(rows, K)
        top = _T(vecs * rows.norms[:, :, None]) * vals.clamp_min(1e-300).rsqrt()[:, :, None]  # (B, k, m)
    else:
        kind = "column"
        units = rows.units64.to(dtype)
        space = _ColumnSpace(rows, units)
        # wide: columns sigma_i v_i, orthonormalized (rank-deficient: QR completes the basis)
        top = _T(torch.linalg.qr(_T(W.to(F64)) @ vecs).Q) if wide else _T(vecs)

    def orth(X: torch.Tensor) -> torch.Tensor:
        if kind == "column":
            return _T(torch.linalg.qr(_T(X)).Q)
        Z = space.z(X)
        return _orthonormalize(space, X, Z, (X, Z))[0]

    starts = [("spectral", orth(top[:, :rank]))]
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    for j in range(restarts):
        R = torch.stack([torch.randn(k, rank, generator=g, dtype=F64) for g in gens]).to(W.device)
        starts.append((f"random{j + 1}", orth(_T(R) @ top)))
    return _Group(W, rank, list(seeds), dtype, tol, rows, kind, K, units, starts)


BATCH_OVERHEAD = 3e6  # an item's per-iteration overhead in multiply-adds: what sharing a batch saves (CPU, measured)


def _cost(kind: str, m: int, n: int, r: int) -> float:
    """Multiply-adds of one ascent iteration for an item of m rows, n basis coordinates, rank r: the
    products with U or K, the two orthonormalizations' (r, n) x (r, r) products and (r, r) eigh."""
    if kind == "row":
        return m * m * r + 6.0 * m * r * r + 20.0 * r ** 3
    return 3.0 * m * n * r + 4.0 * n * r * r + 20.0 * r ** 3


def _buckets(groups: list[_Group]) -> list[list[tuple[int, int]]]:
    """(group, item) pairs batched together: one kind, dtype and tol each; items of different shapes
    and ranks share a padded batch while the padding costs fewer multiply-adds than the per-iteration
    overhead it saves (BATCH_OVERHEAD per item merged), and a batch stays under _MAX_GROUP_ELEMENTS."""
    classes: dict[tuple, list[tuple[int, int]]] = {}
    for g, grp in enumerate(groups):
        for b in range(grp.W.shape[0]):
            classes.setdefault((grp.kind, grp.dtype, grp.tol, grp.W.device), []).append((g, b))
    out = []
    for (kind, *_), items in classes.items():
        def dims(it: tuple[int, int]) -> tuple[int, int, int]:
            grp = groups[it[0]]
            return grp.W.shape[1], grp.n, grp.rank

        items.sort(key=lambda it: _cost(kind, *dims(it)))
        current: list[tuple[int, int]] = []
        for it in items:
            trial = current + [it]
            shapes = [dims(x) for x in trial]
            R = max(r for _, _, r in shapes)
            N = max(n + R - r for _, n, r in shapes)
            M = N if kind == "row" else max(m for m, _, _ in shapes)
            padded = len(trial) * _cost(kind, M, N, R)
            actual = sum(_cost(kind, *x) for x in shapes)
            if current and (padded - actual > BATCH_OVERHEAD * (len(trial) - 1) or len(trial) * M * N > _MAX_GROUP_ELEMENTS):
                out.append(current)
                trial = [it]
            current = trial
        if current:
            out.append(current)
    return out


def _bucket(groups: list[_Group], items: list[tuple[int, int]]):
    """One padded batch of (group, item) pairs: rows, space and per-start bases (B, R, N).

    Item i (m_i rows, n_i coordinates, rank r_i) sits in the top-left corner; padded rows have zero
    norm (no weight in F); its basis gets R - r_i dummy rows e_{n_i}, e_{n_i + 1}, ... at coordinates
    that no unit row touches (row space: padded rows of K with K_jj = 1), so every basis, product and
    Gram matrix is block-diagonal, and the real block evolves exactly as it would alone."""
    first = groups[items[0][0]]
    kind, dev = first.kind, first.W.device
    shapes = [(groups[g].W.shape[1], groups[g].n, groups[g].rank) for g, _ in items]
    if len(set(shapes)) == 1 and len(set(g for g, _ in items)) == 1:  # one group, no padding
        g = items[0][0]
        idx = torch.tensor([b for _, b in items], device=dev)
        grp = groups[g]
        rows = grp.rows.take(idx)
        space = _RowSpace(rows, grp.K[idx]) if kind == "row" else _ColumnSpace(rows, grp.units[idx])
        return rows, space, [X0[idx] for _, X0 in grp.starts]
    B = len(items)
    R = max(r for _, _, r in shapes)
    N = max(n + R - r for _, n, r in shapes)
    M = N if kind == "row" else max(m for m, _, _ in shapes)
    norms = torch.zeros(B, M, dtype=F64, device=dev)
    sign = torch.zeros(B, M, dtype=F64, device=dev)
    E = torch.zeros(B, R, N, dtype=F64, device=dev)
    X0s = [torch.zeros(B, R, N, dtype=F64, device=dev) for _ in first.starts]
    if kind == "row":
        big = torch.eye(M, dtype=F64, device=dev).repeat(B, 1, 1)
    else:
        big = torch.zeros(B, M, N, dtype=first.dtype, device=dev)
    for k, ((g, b), (m, n, r)) in enumerate(zip(items, shapes)):
        grp = groups[g]
        norms[k, :m], sign[k, :m] = grp.rows.norms[b], grp.rows.sign[b]
        if kind == "row":
            big[k, :m, :m] = grp.K[b]
        else:
            big[k, :m, :n] = grp.units[b]
        for j in range(r, R):
            E[k, j, n + j - r] = 1.0
        for X0, (_, start) in zip(X0s, grp.starts):
            X0[k, :r, :n] = start[b]
    for X0 in X0s:
        X0 += E
    n_real = torch.tensor([float(r) for _, _, r in shapes], dtype=F64, device=dev)
    pad = (E, n_real) if min(r for _, _, r in shapes) < R else None
    rows = _Rows(None, parts=(norms, sign, None))
    space = _RowSpace(rows, big, pad) if kind == "row" else _ColumnSpace(rows, big, pad)
    return rows, space, X0s


def nkp_many(jobs: list[tuple[torch.Tensor, int, list[int]]], opts: dict[str, Any]) -> list[list[tuple]]:
    """NKP factors for several groups of matrices, each (W (B, m, d), rank, seeds): per group, per matrix
    (U (m, r) float64, V (r, d) float64, MM iterations summed over starts, info).

    The ascent runs in padded batches across groups (`_buckets`); the best final F over the starts
    wins, the spectral start on ties; the answer is computed per group in float64.
    """
    groups = [_prepare(W, rank, opts, seeds) for W, rank, seeds in jobs]
    # per group, per start: X (B, r, n), F (B,), histories, iterations, accepted, converged
    runs = [[{"X": torch.zeros_like(X0), "F": torch.zeros(grp.W.shape[0], dtype=F64, device=X0.device),
              "histories": [None] * grp.W.shape[0], "iterations": [0] * grp.W.shape[0],
              "accepted_extrapolations": [0] * grp.W.shape[0], "converged": [False] * grp.W.shape[0]}
             for _, X0 in grp.starts] for grp in groups]
    for items in _buckets(groups):
        rows, space, X0s = _bucket(groups, items)
        tol = groups[items[0][0]].tol
        for j, X0 in enumerate(X0s):
            res = ascent(space, rows, X0, opts["max_iter"], tol, opts["accelerate"])
            for k, (g, b) in enumerate(items):
                grp, run = groups[g], runs[g][j]
                run["X"][b] = res["X"][k, :grp.rank, :grp.n]
                run["F"][b] = res["F"][k]
                for key in ("histories", "iterations", "accepted_extrapolations", "converged"):
                    run[key][b] = res[key][k]
    out = []
    for grp, grp_runs in zip(groups, runs):
        B = grp.W.shape[0]
        best = torch.stack([run["F"] for run in grp_runs]).argmax(dim=0)  # first maximum: the spectral start on ties
        X = torch.stack([grp_runs[int(best[b])]["X"][b] for b in range(B)])
        PT = _reorthonormalize(X @ grp.rows.units64 if grp.kind == "row" else X)
        s, M = grp.rows.answer(PT)
        U, V = balanced_split(M, _T(PT), opts["balanced"])
        res = []
        for b in range(B):
            chosen = grp_runs[int(best[b])]
            info = {
                "objective_history": chosen["histories"][b],  # F(P)/||W||_F^2 per iteration (work precision)
                "objective": float(s.F[b]),  # F at the answer's subspace, float64: error = 1 - objective
                "histories": [run["histories"][b] for run in grp_runs],
                "starts": [name for name, _ in grp.starts],
                "best_start": grp.starts[int(best[b])][0],
                "converged": chosen["converged"][b],
                "accepted_extrapolations": chosen["accepted_extrapolations"][b],
                "rescale_objective": grp_runs[0]["histories"][b][0],
                "precision": "float64" if grp.dtype == F64 else "float32",
                "space": grp.kind,
            }
            res.append((U[b], V[b], sum(run["iterations"][b] for run in grp_runs), info))
        out.append(res)
    return out


def _reorthonormalize(PT: torch.Tensor) -> torch.Tensor:
    """PT (B, r, d) float64 with nearly orthonormal rows -> orthonormal rows spanning the same space (polar)."""
    lam, vecs = torch.linalg.eigh(PT @ _T(PT))
    Q = ((vecs * lam.clamp_min(1e-300).rsqrt()[:, None, :]) @ _T(vecs)) @ PT
    return 1.5 * Q - 0.5 * ((Q @ _T(Q)) @ Q)


def subspace_answer(W: torch.Tensor, P: torch.Tensor) -> tuple[float, torch.Tensor]:
    """F and the optimal rows M (m, r) of one matrix W (m, d) in the subspace of orthonormal P (d, r), float64."""
    s, M = _Rows(W[None]).answer(_T(P.to(F64)[None]))
    return float(s.F[0]), M[0]


def balanced_split(M: torch.Tensor, P: torch.Tensor, balanced: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of W' = M P^T (M (B, m, r), P (B, d, r) orthonormal): balanced (X S^1/2, S^1/2 Y^T P^T) or (M, P^T)."""
    if not balanced:
        return M, _T(P).contiguous()
    X, S, Yh = torch.linalg.svd(M, full_matrices=False)
    root = S.sqrt()
    return X * root[:, None, :], (root[..., None] * Yh) @ _T(P)
