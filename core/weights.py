"""Weight matrices from files or from a seed, and saving rank-r factors.

* :func:`load_weights` reads ``"PATH"`` or ``"PATH:KEY"``: ``.npy``, ``.npz``, ``.safetensors``, ``.pt``
  (``torch.load(weights_only=True)``: a tensor, or a (possibly nested) state dict with ``KEY``).
  The result must be a finite 2-D real matrix; anything else raises :class:`WeightsError` with one
  clear line. A convolution weight ``(out, in, kh, kw)`` is *not* reshaped silently: reshape it to
  ``(out, in*kh*kw)`` (MATH.md Section 7) and save that matrix.
* :func:`gaussian_weights` draws an ``(m, d)`` float32 matrix with i.i.d. ``N(0, 1/d)`` entries.
* :func:`save_factors` writes ``U`` and ``V`` to a safetensors file atomically.
"""
from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["WeightsError", "load_weights", "gaussian_weights", "save_factors", "split_ref", "SUFFIXES"]

SUFFIXES = (".npy", ".npz", ".safetensors", ".pt", ".pth")


class WeightsError(ValueError):
    """A weights reference that cannot be turned into a finite 2-D matrix (the message says why)."""


def split_ref(ref: str) -> tuple[Path, str | None]:
    """Split "PATH[:KEY]" into (path, key). A path that exists as given wins over a ':' split."""
    if not isinstance(ref, str) or not ref:
        raise WeightsError(f"weights must be a path PATH or PATH:KEY, got {ref!r}")
    if os.path.exists(ref) or ":" not in ref:
        return Path(ref), None
    path, key = ref.rsplit(":", 1)
    if not key:
        raise WeightsError(f"weights {ref!r}: empty key after ':'")
    return Path(path), key


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _flatten(obj: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def _choose(names: list[str], key: str | None, path: Path, what: str) -> str:
    """The name of the array to load: `key`, or the only one in the file."""
    if key is None:
        if len(names) == 1:
            return names[0]
        if not names:
            raise WeightsError(f"{path}: the {what} holds no arrays")
        raise WeightsError(f"{path}: the {what} holds {len(names)} arrays; name one as {path}:KEY, KEY one of {_listing(names)}")
    if key not in names:
        raise WeightsError(f"{path}: no key {key!r} in the {what}; available: {_listing(names)}")
    return key


def _load_pt(path: Path, key: str | None) -> Any:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle errors, non-allowlisted globals, truncated files
        raise WeightsError(f"{path}: not a readable torch file with weights_only=True ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if isinstance(obj, torch.Tensor):
        if key is not None:
            raise WeightsError(f"{path}: holds a single tensor, so no key is allowed (got {key!r})")
        return obj
    if isinstance(obj, Mapping):
        flat = {k: v for k, v in _flatten(obj).items() if isinstance(v, torch.Tensor)}
        if key is not None and key not in flat:
            # A checkpoint wrapping a state dict ({"state_dict": {...}}, {"model": {...}}): accept the inner key.
            matches = [k for k in flat if k.endswith("." + key)]
            if len(matches) == 1:
                return flat[matches[0]]
        return flat[_choose(list(flat), key, path, "state dict")]
    raise WeightsError(f"{path}: holds a {type(obj).__name__}, expected a tensor or a state dict of tensors")


def load_weights(ref: str) -> torch.Tensor:
    """Load the 2-D weight matrix named by "PATH[:KEY]" as a float tensor (m, d) on the CPU.

    float64 stays float64; other real dtypes become float32. Raises WeightsError (a ValueError)
    for a missing file, an unknown suffix, a missing or needed-but-absent key, a tensor that is not
    2-D (naming its shape), a complex or non-numeric array, or NaN/Inf entries.
    """
    path, key = split_ref(ref)
    if not path.exists():
        raise WeightsError(f"weights file not found: {path}")
    if not path.is_file():
        raise WeightsError(f"weights path is not a file: {path}")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise WeightsError(f"{path}: unsupported weights format {suffix or '(no suffix)'!r}; use one of {', '.join(SUFFIXES)}")
    try:
        if suffix == ".npy":
            if key is not None:
                raise WeightsError(f"{path}: a .npy file holds one array, so no key is allowed (got {key!r})")
            arr: Any = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                arr = npz[_choose(list(npz.files), key, path, ".npz archive")]
        elif suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                arr = fh.get_tensor(_choose(list(fh.keys()), key, path, "safetensors file"))
        else:
            arr = _load_pt(path, key)
    except WeightsError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt files: one line naming the file and the reason
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise WeightsError(f"{path}: cannot read weights ({type(exc).__name__}: {first})") from None
    return _as_matrix(arr, f"{path}" + (f":{key}" if key else ""))


def _as_matrix(arr: Any, name: str) -> torch.Tensor:
    if isinstance(arr, np.ndarray):
        if arr.dtype == object or arr.dtype.kind not in "biuf":
            raise WeightsError(f"{name}: expected a real numeric array, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    else:
        t = arr
    if t.is_complex():
        raise WeightsError(f"{name}: expected a real matrix, got complex dtype {t.dtype}")
    if t.dim() != 2:
        hint = " (a conv weight (out, in, kh, kw) must be reshaped to (out, in*kh*kw) first)" if t.dim() == 4 else ""
        raise WeightsError(f"{name}: expected a 2-D weight matrix (m, d), got shape {tuple(t.shape)}{hint}")
    if t.numel() == 0:
        raise WeightsError(f"{name}: the weight matrix is empty, shape {tuple(t.shape)}")
    if t.dtype != torch.float64:
        t = t.to(torch.float32)
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum().item())
        raise WeightsError(f"{name}: {bad} NaN/Inf entries; weights must be finite")
    return t.contiguous()


def gaussian_weights(m: int, d: int, seed: int = 0) -> torch.Tensor:
    """An (m, d) float32 matrix with i.i.d. N(0, 1/d) entries, drawn from a CPU generator seeded with `seed`."""
    for name, v in (("m", m), ("d", d)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(m, d, generator=gen, dtype=torch.float32) * (1.0 / math.sqrt(d))


def save_factors(path: str | os.PathLike, U: torch.Tensor, V: torch.Tensor) -> None:
    """Write tensors "U" (m, r) and "V" (r, d) to a safetensors file, atomically.

    The data go to a temporary file in the same folder which then replaces `path` (os.replace),
    so a reader sees either the old file or the complete new one, never a partial write.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if U.dim() != 2 or V.dim() != 2 or U.shape[1] != V.shape[0]:
        raise ValueError(f"U (m, r) and V (r, d) must be 2-D with matching r, got {tuple(U.shape)} and {tuple(V.shape)}")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({"U": U.detach().cpu().contiguous(), "V": V.detach().cpu().contiguous()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
