"""Calibration statistics of a trained network's layers (MATH.md Section 8, "Second moment").

A layer's inputs are its im2col patches `x` (a conv's `in*kh*kw` window at each output position;
a Linear's input vector). Calibration images run through the network in eval mode; forward
pre-hooks on the layers take, per image, `positions_per_image` output positions drawn without
replacement (all of them when there are fewer), extract only those patches (no full unfold) and
hand the `(n, d)` batch to a per-layer accumulator: the second moment `Sigma = E[x x^T]` and
`E|x|` in float64 (`MomentAccumulator`), or the patches themselves (`PatchAccumulator`).

Memory: a `d x d` float64 Sigma of a ResNet-50 layer4 conv (d = 4608) is 170 MB, and those of all
52 compressible ResNet-50 layers together 919 MiB (ResNet-18: 702 MiB, EfficientNet-B0: 117 MiB), so layers are calibrated in groups of at most
`max_group_bytes` (one pass over the images per group; each pass stops after the group's last
layer). A group's statistics are handed to `finish` and dropped before the next group starts.

The positions drawn depend only on `(seed, layer name, batch index)`, so two networks with the
same layer names (dense and compressed) fed the same unshuffled loader see identical patches.
"""
from __future__ import annotations

import copy
import math
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

__all__ = ["Accumulator", "MomentAccumulator", "PatchAccumulator", "SafeRoot", "CalibrationCancelled",
           "layer_patches", "run_grouped_passes", "safe_root", "moment_bytes", "reestimate_bn",
           "evaluate_top1", "calibration_subsets"]


class CalibrationCancelled(Exception):
    """Raised between batches when the caller's `should_stop()` returned True."""


class _StopForward(Exception):
    """Raised by a hook once every layer of the current group has seen the batch."""


class Accumulator(Protocol):
    def update(self, X: torch.Tensor) -> None: ...


def _matrix_dim(module: nn.Module) -> int:
    return module.weight[0].numel()


def moment_bytes(module: nn.Module) -> int:
    """Bytes of a layer's float64 Sigma plus E|x| (the dominant cost of calibrating it)."""
    d = _matrix_dim(module)
    return 8 * d * (d + 1)


class MomentAccumulator:
    """Running `sum x x^T` (unless `second=False`) and `sum |x|` (float64) over patches `x` of dimension d."""

    def __init__(self, d: int, device: torch.device | str = "cpu", second: bool = True) -> None:
        self.sum_xx = torch.zeros(d, d, dtype=torch.float64, device=device) if second else None
        self.sum_abs = torch.zeros(d, dtype=torch.float64, device=device)
        self.n = 0

    def update(self, X: torch.Tensor) -> None:
        X = X.to(torch.float64)
        if self.sum_xx is not None:
            self.sum_xx.addmm_(X.T, X)
        self.sum_abs += X.abs().sum(0)
        self.n += X.shape[0]

    def sigma(self) -> torch.Tensor | None:
        """E[x x^T] `(d, d)` float64, exactly symmetric (None with second=False); ValueError when no patch was seen."""
        if self.n == 0:
            raise ValueError("no calibration patches reached this layer")
        if self.sum_xx is None:
            return None
        S = self.sum_xx / self.n
        return (S + S.T) / 2

    def mean_abs(self) -> torch.Tensor:
        """E|x_j| `(d,)` float64."""
        if self.n == 0:
            raise ValueError("no calibration patches reached this layer")
        return self.sum_abs / self.n


class PatchAccumulator:
    """Keeps the first `cap` patches (float32, on the device they arrive on)."""

    def __init__(self, cap: int) -> None:
        self.cap, self.chunks, self.n = int(cap), [], 0

    def update(self, X: torch.Tensor) -> None:
        take = min(X.shape[0], self.cap - self.n)
        if take > 0:
            self.chunks.append(X[:take].float())
            self.n += take

    def patches(self) -> torch.Tensor:
        if not self.chunks:
            raise ValueError("no calibration patches reached this layer")
        return torch.cat(self.chunks)


def _positions(n_images: int, P: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """`(n_images, k)` distinct output positions per image, uniformly at random."""
    return torch.rand(n_images, P, generator=gen).topk(k, dim=1).indices


def layer_patches(module: nn.Module, x: torch.Tensor, positions_per_image: int | None,
                  gen: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """`(X, P)`: patches `(n, d)` of `module`'s input `x`, and the positions per image there were.

    Conv2d: `x` is `(N, C, H, W)`; patches in the weight's `(in, kh, kw)` order, with the conv's own
    padding (zeros or its padding_mode), stride and dilation. Linear: `x` is `(N, ..., d)`, every
    leading index but the first is a position. With `positions_per_image` k < P, k positions per
    image drawn by `gen`; otherwise all P.
    """
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError("grouped convolutions have no single patch matrix")
        kh, kw = module.kernel_size
        (sh, sw), (dh, dw) = module.stride, module.dilation
        pad = module._reversed_padding_repeated_twice  # (left, right, top, bottom), also for padding="same"
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        xp = F.pad(x, pad, mode=mode) if any(pad) else x
        N, C, Hp, Wp = xp.shape
        Ho, Wo = (Hp - dh * (kh - 1) - 1) // sh + 1, (Wp - dw * (kw - 1) - 1) // sw + 1
        P = Ho * Wo
        if positions_per_image is None or positions_per_image >= P:
            cols = F.unfold(xp, (kh, kw), dilation=(dh, dw), stride=(sh, sw))  # (N, C*kh*kw, P)
            return cols.transpose(1, 2).reshape(-1, C * kh * kw), P
        idx = _positions(N, P, positions_per_image, gen).to(x.device)
        oi, oj = idx // Wo, idx % Wo
        rows = oi[..., None] * sh + torch.arange(kh, device=x.device) * dh  # (N, k, kh)
        cols = oj[..., None] * sw + torch.arange(kw, device=x.device) * dw  # (N, k, kw)
        n_idx = torch.arange(N, device=x.device)[:, None, None, None]
        win = xp.permute(0, 2, 3, 1)[n_idx, rows[..., :, None], cols[..., None, :]]  # (N, k, kh, kw, C)
        return win.permute(0, 1, 4, 2, 3).reshape(-1, C * kh * kw), P
    if isinstance(module, nn.Linear):
        X = x.reshape(x.shape[0], -1, x.shape[-1])
        P = X.shape[1]
        if positions_per_image is None or positions_per_image >= P:
            return X.reshape(-1, X.shape[-1]), P
        idx = _positions(X.shape[0], P, positions_per_image, gen).to(x.device)
        return X.gather(1, idx[..., None].expand(-1, -1, X.shape[-1])).reshape(-1, X.shape[-1]), P
    raise TypeError(f"expected a Conv2d or Linear layer, got {type(module).__name__}")


def _batch_generator(seed: int, name: str, batch: int) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}:{batch}".encode()) & 0x7FFFFFFF)


def _groups(layers: list[tuple[str, nn.Module]], sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Consecutive groups of layer indices whose sizes sum to at most max_bytes (a bigger layer alone)."""
    groups: list[list[int]] = []
    total = 0
    for i, size in enumerate(sizes):
        if groups and total + size <= max_bytes:
            groups[-1].append(i)
            total += size
        else:
            groups.append([i])
            total = size
    return groups


def run_grouped_passes(model: nn.Module, layers: list[tuple[str, nn.Module]], loader: Iterable,
                       make_acc: Callable[[str, nn.Module], Accumulator],
                       finish: Callable[[str, Any], None], *,
                       acc_bytes: Callable[[nn.Module], int] = moment_bytes,
                       max_group_bytes: int = 1 << 30, positions_per_image: int | None = 64,
                       seed: int = 0, device: torch.device | str = "cpu",
                       progress: Callable[[float], None] | None = None,
                       should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Run `loader`'s images through `model` (eval mode, no grad) once per group of `layers`.

    make_acc(name, module) makes a layer's accumulator (its `update` gets every `(n, d)` patch
    batch); after the group's pass, finish(name, acc) is called per layer in order and the
    accumulators are dropped. `loader` yields `images` or `(images, labels)` and must give the
    same batches in the same order on every pass (no shuffling). Returns JSON-able facts: passes,
    groups (layer names), peak_group_bytes (sum of acc_bytes in the largest group), positions
    (per layer: `{"per_image": k used, "available": P, "patches": n}`), time_s.
    """
    t0 = time.perf_counter()
    sizes = [acc_bytes(m) for _, m in layers]
    groups = _groups(layers, sizes, max_group_bytes)
    positions: dict[str, dict[str, int]] = {}
    was_training = model.training
    model.eval()
    try:
        for g, members in enumerate(groups):
            names = [layers[i][0] for i in members]
            accs = {layers[i][0]: make_acc(*layers[i]) for i in members}
            state = {"batch": 0, "fired": set()}
            handles = []
            for i in members:
                name, module = layers[i]

                def hook(mod: nn.Module, args: tuple, name: str = name) -> None:
                    gen = _batch_generator(seed, name, state["batch"])
                    X, P = layer_patches(mod, args[0], positions_per_image, gen)
                    accs[name].update(X)
                    info = positions.setdefault(name, {"per_image": 0, "available": P, "patches": 0})
                    info["per_image"] = min(P, positions_per_image or P)
                    info["patches"] += X.shape[0]
                    state["fired"].add(name)
                    if len(state["fired"]) == len(accs):
                        raise _StopForward

                handles.append(module.register_forward_pre_hook(hook))
            try:
                batches = len(loader) if hasattr(loader, "__len__") else None
                with torch.no_grad():
                    for b, batch in enumerate(loader):
                        if should_stop is not None and should_stop():
                            raise CalibrationCancelled(f"cancelled during calibration pass {g + 1} of {len(groups)}")
                        images = batch[0] if isinstance(batch, (tuple, list)) else batch
                        state["batch"], state["fired"] = b, set()
                        try:
                            model(images.to(device, non_blocking=True))
                        except _StopForward:
                            pass
                        if progress is not None and batches:
                            progress((g + (b + 1) / batches) / len(groups))
            finally:
                for h in handles:
                    h.remove()
            for name in names:
                finish(name, accs.pop(name))
            del accs
    finally:
        model.train(was_training)
    return {"passes": len(groups), "groups": [[layers[i][0] for i in grp] for grp in groups],
            "peak_group_bytes": max((sum(sizes[i] for i in grp) for grp in groups), default=0),
            "positions": positions, "time_s": time.perf_counter() - t0}


@dataclass
class SafeRoot:
    """Symmetric root of a floored second moment: `L = V sqrt(max(lam, floor)) V^T`, `L_pinv` its inverse.

    floor = eps * lam_max. `floored` counts the eigenvalues that were raised to the floor (dead
    channels, padding zeros, fewer patches than d). For Sigma = 0 (the layer never sees a nonzero
    input) L = L_pinv = 0 and `zero` is True. All tensors float64.
    """

    L: torch.Tensor
    L_pinv: torch.Tensor
    eigenvalues: torch.Tensor
    floor: float
    floored: int
    zero: bool

    def info(self) -> dict[str, Any]:
        lam = self.eigenvalues
        return {"lambda_max": float(lam[-1]), "floor": self.floor, "floored": self.floored,
                "d": int(lam.numel()), "zero": self.zero}


def safe_root(Sigma: torch.Tensor, eps: float = 1e-6) -> SafeRoot:
    """The eigen-floored symmetric root of a `(d, d)` PSD second moment (never a Cholesky)."""
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    S = Sigma.to(torch.float64)
    if not bool(torch.isfinite(S).all()):
        raise ValueError("the second moment has NaN/Inf entries (non-finite activations reached the layer)")
    lam, V = torch.linalg.eigh((S + S.T) / 2)
    lam_max = float(lam[-1].clamp_min(0.0))
    if lam_max <= 0.0:
        Z = torch.zeros_like(S)
        return SafeRoot(Z, Z.clone(), lam, 0.0, int(lam.numel()), True)
    floor = eps * lam_max
    floored = int((lam < floor).sum())
    lam_f = lam.clamp_min(floor)
    root = lam_f.sqrt()
    return SafeRoot((V * root) @ V.T, (V / root) @ V.T, lam, floor, floored, False)


@torch.no_grad()
def reestimate_bn(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu") -> int:
    """Re-estimate every BatchNorm's running mean/var on `loader`'s images (a cumulative average).

    Only the BN layers run in train mode (dropout, stochastic depth stay in eval); batches of one
    image are skipped (BN after global pooling needs two). Returns the number of images used; the
    model is left in eval mode.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    model.eval()
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average over all batches
        bn.train()
    seen = 0
    try:
        for batch in loader:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            if images.shape[0] < 2:
                continue
            model(images.to(device, non_blocking=True))
            seen += images.shape[0]
    finally:
        for bn, mom in zip(bns, saved):
            bn.momentum = mom
        model.eval()
    return seen


@torch.no_grad()
def evaluate_top1(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu",
                  max_batches: int | None = None) -> dict[str, float]:
    """`{"top1": fraction correct, "images": n}` of `model` (eval mode) over `(images, labels)` batches."""
    model.eval()
    hits, n = 0, 0
    for b, (images, labels) in enumerate(loader):
        if max_batches is not None and b >= max_batches:
            break
        logits = model(images.to(device, non_blocking=True))
        hits += int((logits.argmax(1).cpu() == labels).sum())
        n += int(labels.shape[0])
    return {"top1": hits / n if n else float("nan"), "images": n}


def _eval_view(train: Dataset, val: Dataset) -> Dataset:
    """`train` with the validation split's deterministic preprocessing (no random crops/flips/shifts)."""
    view = copy.copy(train)
    if hasattr(view, "shift"):  # core.data.TensorImages: random translation
        view.shift = 0
    if hasattr(view, "transform") and hasattr(val, "transform"):  # torchvision data sets
        view.transform = val.transform
    return view


def calibration_subsets(train: Dataset, val: Dataset, n_fit: int, n_heldout: int, seed: int) -> tuple[Subset, Subset]:
    """Disjoint seeded subsets of `train` (in eval preprocessing): `n_fit` images to fit, `n_heldout` to report.

    ValueError naming the field when the training split has fewer than `n_fit + n_heldout` images.
    """
    size = len(train)
    if n_fit + n_heldout > size:
        raise ValueError(f"calib_images + heldout_images = {n_fit + n_heldout} exceeds the {size} "
                         "training images of the data set")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(int(seed))).tolist()
    view = _eval_view(train, val)
    return Subset(view, sorted(order[:n_fit])), Subset(view, sorted(order[n_fit:n_fit + n_heldout]))
