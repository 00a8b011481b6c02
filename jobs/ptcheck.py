"""Read a `.pt` file's pickle without torch and without running any of it.

The API process never imports torch, yet it must not store a `.pt` whose pickle would run code when
loaded, nor one whose tensors expand past the upload limits. `scan_pickle` replays the `data.pkl` of
the zip archive torch.save writes (torch >= 1.6) with an Unpickler whose `find_class` resolves ONLY
the globals torch's own `weights_only=True` loader needs for tensors and state dicts, each to an
inert stand-in (nothing of torch, os or builtins is ever called). Any other global (os.system,
builtins.eval, subprocess.Popen, ...) is a ValueError naming it. On the way it records what the
archive declares: each storage (its type and element count, i.e. the bytes of `data/<key>`) and
each tensor's shape, so jobs/weightfiles.py can check the limits before reading any tensor data; and
the replayed structure (dicts, lists, `TensorStub`s for tensors), from which `state_dict_tensors`
names the tensors of a state_dict. The worker loads accepted files with torch.load(weights_only=True)
again.
"""
from __future__ import annotations

import dataclasses
import io
import pickle
import re
from typing import Any

MAX_PICKLE_BYTES = 16 << 20  # data.pkl holds structure only (a 1,000-tensor state dict: ~100 KB)

_TORCH_NAMES = re.compile(
    r"^(?:[A-Z][A-Za-z0-9_]*Storage|Size|device|"
    r"(?:float|int|uint|bfloat|complex)\d*|half|double|long|short|bool|cfloat|cdouble|chalf|"
    r"float8_e4m3fn|float8_e5m2|float8_e4m3fnuz|float8_e5m2fnuz)$")
_REBUILD_TENSOR = {"_rebuild_tensor", "_rebuild_tensor_v2"}
_REBUILD_PARAMETER = {"_rebuild_parameter", "_rebuild_parameter_with_state"}
_ALLOWED = {
    "torch._utils": _REBUILD_TENSOR | _REBUILD_PARAMETER,
    "torch.serialization": {"_get_layout"},
    "collections": {"OrderedDict"},
}
# Bytes per element of torch's storage types (torch.<Name>Storage).
_ITEMSIZE = {"Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2, "Char": 1,
             "Byte": 1, "Bool": 1, "ComplexFloat": 8, "ComplexDouble": 16, "ComplexHalf": 4, "QInt8": 1,
             "QUInt8": 1, "QInt32": 4, "QUInt4x2": 1, "QUInt2x4": 1, "Untyped": 1}
# numpy's names of torch's storage types (an upload lists its tensors' dtypes as the other formats do).
_DTYPE = {"Double": "float64", "Float": "float32", "Half": "float16", "BFloat16": "bf16", "Long": "int64",
          "Int": "int32", "Short": "int16", "Char": "int8", "Byte": "uint8", "Bool": "bool"}
# Where a checkpoint keeps its state_dict (as core.source reads it), and a train checkpoint's keys.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
TRAIN_CHECKPOINT_KEYS = {"format", "config", "model"}


def storage_itemsize(type_name: str) -> int | None:
    """Bytes per element of a storage type named like torch's `FloatStorage`; None when unknown."""
    base = type_name.removesuffix("Storage")
    return 1 if base.startswith("Float8") else _ITEMSIZE.get(base)


@dataclasses.dataclass(frozen=True)
class StorageRef:
    """A storage the pickle refers to: its bytes are the archive member `data/<key>`."""

    key: str
    type_name: str  # e.g. "FloatStorage"
    numel: int  # elements of its type

    @property
    def exact(self) -> bool:
        """Whether `nbytes` is exact (a known type) rather than an upper bound."""
        return storage_itemsize(self.type_name) is not None

    @property
    def nbytes(self) -> int:
        """The storage's bytes (unknown types: 8 per element, more than any torch type but complex)."""
        return self.numel * (storage_itemsize(self.type_name) or 8)


@dataclasses.dataclass(frozen=True)
class TensorStub:
    """A tensor of the pickle: its shape and dtype (numpy's name; the storage type's where numpy has none)."""

    shape: tuple[int, ...]
    dtype: str


@dataclasses.dataclass(frozen=True)
class PickleSummary:
    storages: dict[str, StorageRef]
    tensor_shapes: list[tuple[int, ...]]
    root: Any = None  # the replayed object: dicts, lists, tuples, TensorStubs, plain values, inert stand-ins


class _Dict(dict):
    """collections.OrderedDict's stand-in: a plain dict (a state_dict's `_metadata` attribute is dropped)."""

    def __setstate__(self, state: Any) -> None:
        pass


class _Inert:
    """Stands in for every allowed global: calling it, or building it, records nothing and runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert(*args)

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:  # OrderedDict stand-in (SETITEMS)
        pass


class _StorageType(_Inert):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name


class _Checker(pickle.Unpickler):
    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.storages: dict[str, StorageRef] = {}
        self.tensor_shapes: list[tuple[int, ...]] = []

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and _TORCH_NAMES.fullmatch(name):
            return _StorageType(name) if name.endswith("Storage") else _Inert()
        if module == "torch._utils" and name in _REBUILD_TENSOR:
            return self._rebuild_tensor
        if module == "torch._utils" and name in _REBUILD_PARAMETER:
            return _rebuild_parameter
        if module == "collections" and name == "OrderedDict":
            return _Dict
        if name in _ALLOWED.get(module, ()):
            return _Inert()
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a weights file "
                                     "(torch.load weights_only=True would refuse it too)")

    def persistent_load(self, pid: Any) -> Any:
        # torch.save's storages: ("storage", <torch.XStorage>, key, location, numel)
        if (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and isinstance(pid[4], int) and pid[4] >= 0):
            ref = StorageRef(key=pid[2], type_name=pid[1].name, numel=pid[4])
            self.storages[ref.key] = ref
            return ref
        raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:80]} (not a torch.save storage)")

    def _rebuild_tensor(self, storage: Any = None, offset: Any = None, size: Any = None, *rest: Any) -> TensorStub:
        if not (isinstance(size, tuple) and all(isinstance(s, int) and s >= 0 for s in size)):
            raise pickle.UnpicklingError(f"a tensor's size must be a tuple of non-negative integers, "
                                         f"got {str(size)[:80]}")
        self.tensor_shapes.append(size)
        type_name = storage.type_name.removesuffix("Storage") if isinstance(storage, StorageRef) else "?"
        return TensorStub(size, _DTYPE.get(type_name, type_name.lower()))


def _rebuild_parameter(data: Any = None, *rest: Any) -> Any:
    return data  # a Parameter is its tensor here


def scan_pickle(data: bytes) -> PickleSummary:
    """Replay a torch.save `data.pkl` inertly; ValueError unless it only uses allowed globals."""
    checker = _Checker(data)
    try:
        root = checker.load()
    except pickle.UnpicklingError as exc:
        raise ValueError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - truncated or malformed pickles
        raise ValueError(f"its pickle is malformed ({type(exc).__name__}: {exc})") from None
    return PickleSummary(storages=checker.storages, tensor_shapes=checker.tensor_shapes, root=root)


def _tensor_mapping(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, TensorStub) for k, v in obj.items())


def _flatten(obj: dict, prefix: str = "") -> dict[str, TensorStub]:
    out: dict[str, TensorStub] = {}
    for k, v in obj.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, TensorStub):
            out[f"{prefix}{k}"] = v
    return out


def state_dict_tensors(root: Any) -> dict[str, TensorStub] | None:
    """The named tensors of a replayed pickle, as the worker will read them: a state_dict's own (also inside
    a train checkpoint's `model`, or a lone `state_dict` / `model` / `model_state_dict` entry, as
    core.source unwraps them); else every tensor of nested dicts under its dotted path (core.weights'
    names); None for a single tensor or another layout (nothing to name)."""
    if not isinstance(root, dict) or not root:
        return None
    if _tensor_mapping(root):
        return dict(root)
    if set(root) >= TRAIN_CHECKPOINT_KEYS and isinstance(root["config"], dict) and _tensor_mapping(root["model"]):
        return dict(root["model"])
    inner = [k for k in WRAPPER_KEYS if _tensor_mapping(root.get(k))]
    if len(inner) == 1:
        return dict(root[inner[0]])
    return _flatten(root) or None
