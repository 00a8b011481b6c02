"""What a weights file expands to, read from its headers, and the limits on it (no torch here).

A weights file can be small on disk and huge in memory: a 4 MB deflated `.npz` of zeros holds a
32768 x 32768 matrix (4 GiB). `inspect_weights` learns each array's shape and dtype from headers
only and checks two limits on them BEFORE any array data is read:

* every array at most `Limits.max_elements` elements (LOWRANK_MAX_MATRIX_ELEMENTS, the limit a
  Gaussian m x d obeys): `OverElementLimit` (the API answers 422);
* all arrays together at most `Limits.max_bytes` bytes in memory (LOWRANK_MAX_UPLOAD_EXPANDED_BYTES):
  `OverByteLimit` (413).

Headers: .npy's own; each .npz member's .npy header through a streamed, bounded decompression; the
safetensors JSON header (its length bounded too); a .pt's pickle (jobs/ptcheck.py: its storages and
tensor shapes, and the archive's member sizes; a state_dict's tensors are listed by name, as the other
formats' arrays are). Zip archives are bounded before zipfile parses them
(members, central directory), and only stored or deflated members are read (zipfile's bzip2 and
lzma readers decompress without an output bound).

With `scan=True` (the API, at upload) every array's data is then streamed in chunks: exactly the
bytes its header promises (a zip's declared sizes are never trusted alone: reading stops there,
fewer or more bytes is an error) and, for float arrays numpy can hold, finite values only. Memory
stays at one chunk whatever the file holds. The worker calls it with `scan=False` before it loads an
upload (defence in depth, with the worker's own settings).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from jobs import ptcheck

CHUNK_BYTES = 4 << 20
MAX_NPY_HEADER_BYTES = 10_000  # numpy's own default bound
MAX_SAFETENSORS_HEADER_BYTES = 16 << 20  # ~100 bytes per tensor: 160,000 tensors
MAX_ZIP_MEMBERS = 10_000
MAX_ZIP_DIRECTORY_BYTES = 4 << 20
READABLE_COMPRESSION = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}
# safetensors dtype -> (bytes per element, numpy dtype, or None where numpy has none: shape only)
SAFETENSORS_DTYPES: dict[str, tuple[int, str | None]] = {
    "F64": (8, "<f8"), "F32": (4, "<f4"), "F16": (2, "<f2"), "BF16": (2, None), "F8_E4M3": (1, None),
    "F8_E5M2": (1, None), "I64": (8, "<i8"), "I32": (4, "<i4"), "I16": (2, "<i2"), "I8": (1, "i1"),
    "U64": (8, "<u8"), "U32": (4, "<u4"), "U16": (2, "<u2"), "U8": (1, "u1")}


class WeightsFileError(ValueError):
    """Not a weights file this server accepts; the message says why (the API answers 422)."""


class OverElementLimit(WeightsFileError):
    """An array has more elements than LOWRANK_MAX_MATRIX_ELEMENTS (422, as a Gaussian m x d over it)."""


class OverByteLimit(WeightsFileError):
    """The arrays expand to more than LOWRANK_MAX_UPLOAD_EXPANDED_BYTES in memory (413)."""


@dataclasses.dataclass(frozen=True)
class Limits:
    max_elements: int  # per array
    max_bytes: int  # all arrays of the file together, expanded

    @classmethod
    def from_settings(cls, settings: Any) -> Limits:
        return cls(settings.max_matrix_elements, settings.max_upload_expanded_bytes)


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
    shape: tuple[int, ...]
    dtype: str  # numpy's name ("float32"), or safetensors' in lower case where numpy has none ("bf16")
    nbytes: int  # in memory

    def public(self) -> dict[str, Any]:
        """The form stored with an upload: {"shape": [...], "dtype": "..."}."""
        return {"shape": list(self.shape), "dtype": self.dtype}


class _Budget:
    """The limits, applied to each array's header as it is read (before its data)."""

    def __init__(self, limits: Limits) -> None:
        self.limits, self.total = limits, 0

    def admit(self, what: str, shape: tuple[int, ...], nbytes: int) -> None:
        """`what` ("array 'w'") of `shape` taking `nbytes` in memory."""
        n = math.prod(shape)
        if n > self.limits.max_elements:
            raise OverElementLimit(f"{what} has shape {list(shape)} = {n} elements, over the limit of "
                                   f"{self.limits.max_elements} elements (LOWRANK_MAX_MATRIX_ELEMENTS)")
        self.add_bytes(what, nbytes)

    def add_bytes(self, what: str, nbytes: int) -> None:
        self.total += nbytes
        if self.total > self.limits.max_bytes:
            raise OverByteLimit(f"its arrays expand to more than {self.limits.max_bytes} bytes in memory (at least "
                                f"{self.total} with {what}) (LOWRANK_MAX_UPLOAD_EXPANDED_BYTES)")


def inspect_weights(source: Path | BinaryIO, fmt: str, limits: Limits, *,
                    scan: bool = True) -> dict[str, ArrayInfo] | None:
    """{array name: ArrayInfo} of a weights file of format npy | npz | safetensors | pt (a .pt: the tensors
    of its state_dict, ptcheck.state_dict_tensors; None when it holds one tensor or no named ones),
    checked against `limits` from the headers before any data is read; with `scan`, every array's data
    is streamed and checked too.
    Raises WeightsFileError (OverElementLimit and OverByteLimit among them)."""
    budget = _Budget(limits)
    try:
        with _opened(source) as f:
            if fmt == "npy":
                return {"array": _npy(f, "array", budget, scan)}
            if fmt == "npz":
                return _npz(f, budget, scan)
            if fmt == "pt":
                return _torch(f, budget, scan)
            if fmt != "safetensors":
                raise WeightsFileError(f"unknown weights format {fmt!r}")
            arrays = _safetensors(f, budget, scan)
    except WeightsFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a malformed file makes a parser raise
        raise WeightsFileError(f"{type(exc).__name__}: {exc}") from None
    if scan and isinstance(source, Path):
        _safetensors_library_accepts(source)
    return arrays


@contextlib.contextmanager
def _opened(source: Path | BinaryIO) -> Iterator[BinaryIO]:
    if isinstance(source, (str, Path)):
        with open(source, "rb") as f:
            yield f
    else:
        yield source


# ---------------------------------------------------------------------------------------------
# .npy / .npz

def _npy(f: BinaryIO, name: str, budget: _Budget, scan: bool) -> ArrayInfo:
    """One .npy stream (a file, or an .npz member): header, limits, then (scan) its data."""
    fmt = np.lib.format
    version = fmt.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = fmt.read_array_header_1_0(f, max_header_size=MAX_NPY_HEADER_BYTES)
    elif version in ((2, 0), (3, 0)):
        shape, _, dtype = fmt.read_array_header_2_0(f, max_header_size=MAX_NPY_HEADER_BYTES)
    else:
        raise WeightsFileError(f"array {name!r}: unsupported .npy format version {version}")
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in "fiu":
        raise WeightsFileError(f"array {name!r} has dtype {dtype}; weights must be numeric")
    if any(s < 0 for s in shape):
        raise WeightsFileError(f"array {name!r} has a negative dimension in its shape {list(shape)}")
    info = ArrayInfo(tuple(shape), str(dtype), math.prod(shape) * dtype.itemsize)
    budget.admit(f"array {name!r}", info.shape, info.nbytes)
    if scan:
        _stream(f, info.nbytes, f"array {name!r}", dtype if dtype.kind == "f" else None)
        if f.read(1):
            raise WeightsFileError(f"array {name!r}: the file holds more bytes than its header promises")
    return info


def _npz(f: BinaryIO, budget: _Budget, scan: bool) -> dict[str, ArrayInfo]:
    out: dict[str, ArrayInfo] = {}
    with _zip(f) as z:
        for info in z.infolist():
            if info.is_dir() or not info.filename.endswith(".npy"):
                raise WeightsFileError(f"member {info.filename!r} is not a .npy array")
            name = info.filename[:-4]  # numpy's key for it
            with _member(z, info) as member:
                out[name] = _npy(member, name, budget, scan)
    return out


def _stream(f: BinaryIO, nbytes: int, what: str, float_dtype: np.dtype | None) -> None:
    """Read exactly `nbytes` of `what` ("array 'w'") in chunks (fewer is an error); values of
    `float_dtype` must be finite."""
    left, carry = nbytes, b""
    while left:
        block = f.read(min(CHUNK_BYTES, left))
        if not block:
            raise WeightsFileError(f"{what} is truncated: its header promises {nbytes} bytes, "
                                   f"the file holds {nbytes - left}")
        left -= len(block)
        if float_dtype is not None:
            data = carry + block if carry else block
            count = len(data) // float_dtype.itemsize
            if not np.isfinite(np.frombuffer(data, float_dtype, count=count)).all():
                raise WeightsFileError(f"{what} holds NaN or infinite values")
            carry = data[count * float_dtype.itemsize:]


# ---------------------------------------------------------------------------------------------
# .safetensors

def _safetensors(f: BinaryIO, budget: _Budget, scan: bool) -> dict[str, ArrayInfo]:
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    prefix = f.read(8)
    if len(prefix) < 8:
        raise WeightsFileError("too short for a safetensors header")
    n = int.from_bytes(prefix, "little")
    if n > MAX_SAFETENSORS_HEADER_BYTES:
        raise WeightsFileError(f"its header is {n} bytes, over the {MAX_SAFETENSORS_HEADER_BYTES} this server reads")
    if 8 + n > size:
        raise WeightsFileError(f"its header of {n} bytes runs past the end of the file ({size} bytes)")
    header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise WeightsFileError("its header is not a JSON object")
    data_start, data_len = 8 + n, size - 8 - n
    out: dict[str, ArrayInfo] = {}
    spans: list[tuple[int, str, str | None, int]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise WeightsFileError(f"tensor {name!r}: its header entry needs dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise WeightsFileError(f"tensor {name!r} has dtype {dtype!r}; weights must be numeric "
                                   f"({', '.join(SAFETENSORS_DTYPES)})")
        if not (isinstance(shape, list) and all(_count(s) for s in shape)):
            raise WeightsFileError(f"tensor {name!r}: shape must be a list of non-negative integers")
        itemsize, np_dtype = SAFETENSORS_DTYPES[dtype]
        info = ArrayInfo(tuple(shape), str(np.dtype(np_dtype)) if np_dtype else dtype.lower(),
                         math.prod(shape) * itemsize)
        budget.admit(f"tensor {name!r}", info.shape, info.nbytes)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)
                and offsets[0] <= offsets[1] <= data_len and offsets[1] - offsets[0] == info.nbytes):
            raise WeightsFileError(f"tensor {name!r}: data_offsets {str(offsets)[:60]} do not hold its "
                                   f"{info.nbytes} bytes within the file's {data_len} data bytes")
        out[name] = info
        spans.append((offsets[0], name, np_dtype, info.nbytes))
    if scan:
        for begin, name, np_dtype, nbytes in sorted(spans):
            f.seek(data_start + begin)
            float_dtype = np.dtype(np_dtype) if np_dtype and np.dtype(np_dtype).kind == "f" else None
            _stream(f, nbytes, f"tensor {name!r}", float_dtype)
    return out


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _safetensors_library_accepts(path: Path) -> None:
    """The worker reads the file with the safetensors library: it must accept the header (no data read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            fh.keys()
    except Exception as exc:  # noqa: BLE001 - safetensors raises many types for a bad header: one error
        raise WeightsFileError(f"{type(exc).__name__}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# .pt (torch.save's zip archive)

def _torch(f: BinaryIO, budget: _Budget, scan: bool) -> dict[str, ArrayInfo] | None:
    if not zipfile.is_zipfile(f):
        raise WeightsFileError("not a torch.save archive (zip format, torch >= 1.6); re-save it with torch.save, "
                               "or upload .safetensors / .npy")
    with _zip(f) as z:
        infos = z.infolist()
        pickles = [i for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
        if len(pickles) != 1:
            raise WeightsFileError("not a torch.save archive (expected exactly one <name>/data.pkl)")
        summary = ptcheck.scan_pickle(_read_bounded(z, pickles[0], ptcheck.MAX_PICKLE_BYTES))
        for i, shape in enumerate(summary.tensor_shapes):
            budget.admit(f"tensor #{i} of its pickle", shape, 0)  # bytes: the storages below (views share them)
        prefix = pickles[0].filename[:-len("data.pkl")]
        members = {i.filename: i for i in infos}
        data = []
        for ref in summary.storages.values():
            info = members.get(f"{prefix}data/{ref.key}")
            if info is None:
                raise WeightsFileError(f"storage {ref.key!r} has no member data/{ref.key} in the archive")
            if ref.exact and info.file_size != ref.nbytes:
                raise WeightsFileError(f"member data/{ref.key} declares {info.file_size} bytes; its storage "
                                       f"({ref.numel} x {ref.type_name}) needs {ref.nbytes}")
            budget.add_bytes(f"storage {ref.key!r}", max(info.file_size, ref.nbytes))
            data.append((info, ref))
        if scan:
            for info, ref in data:
                with _member(z, info) as member:
                    _stream(member, info.file_size, f"storage {ref.key!r}", None)
                    if member.read(1):
                        raise WeightsFileError(f"member data/{ref.key} holds more than its declared bytes")
    named = ptcheck.state_dict_tensors(summary.root)
    if named is None:
        return None
    return {name: ArrayInfo(t.shape, t.dtype, math.prod(t.shape) * _PT_ITEMSIZE.get(t.dtype, 8))
            for name, t in named.items()}


_PT_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bf16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
                "uint8": 1, "bool": 1}


def _read_bounded(z: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    if info.file_size > limit:
        raise WeightsFileError(f"its {info.filename} is {info.file_size} bytes, over the {limit} this server reads")
    with _member(z, info) as member:
        data = member.read(limit + 1)
    if len(data) > limit:
        raise WeightsFileError(f"its {info.filename} holds more than {limit} bytes")
    return data


# ---------------------------------------------------------------------------------------------
# Zip archives: bounded before zipfile reads them.

_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")


@contextlib.contextmanager
def _zip(f: BinaryIO) -> Iterator[zipfile.ZipFile]:
    entries, directory_bytes = _directory_size(f)
    if entries > MAX_ZIP_MEMBERS:
        raise WeightsFileError(f"the archive holds {entries} members, over the {MAX_ZIP_MEMBERS} this server reads")
    if directory_bytes > MAX_ZIP_DIRECTORY_BYTES:
        raise WeightsFileError(f"the archive's directory is {directory_bytes} bytes, over the "
                               f"{MAX_ZIP_DIRECTORY_BYTES} this server reads")
    f.seek(0)
    with zipfile.ZipFile(f) as z:
        if len(z.infolist()) > MAX_ZIP_MEMBERS:
            raise WeightsFileError(f"the archive holds more than {MAX_ZIP_MEMBERS} members")
        yield z


def _directory_size(f: BinaryIO) -> tuple[int, int]:
    """(entries, bytes) of a zip's central directory, from its end records (zip64 included)."""
    size = f.seek(0, os.SEEK_END)
    tail_start = max(0, size - (_EOCD.size + 0xFFFF))  # the record plus the longest comment
    f.seek(tail_start)
    tail = f.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + _EOCD.size > len(tail):
        raise WeightsFileError("not a zip archive (no end of central directory record)")
    record = _EOCD.unpack_from(tail, at)
    entries, directory_bytes, offset = record[4], record[5], record[6]
    if entries == 0xFFFF or directory_bytes == 0xFFFFFFFF or offset == 0xFFFFFFFF:  # zip64
        locator_at = tail_start + at - _EOCD64_LOCATOR.size
        if locator_at < 0:
            raise WeightsFileError("malformed zip64 archive (no end of central directory locator)")
        f.seek(locator_at)
        signature, _, record64_at, _ = _EOCD64_LOCATOR.unpack(f.read(_EOCD64_LOCATOR.size))
        f.seek(record64_at)
        record64 = _EOCD64.unpack(f.read(_EOCD64.size))
        if signature != b"PK\x06\x07" or record64[0] != b"PK\x06\x06":
            raise WeightsFileError("malformed zip64 archive (bad end of central directory records)")
        entries, directory_bytes = record64[7], record64[8]
    return entries, directory_bytes


@contextlib.contextmanager
def _member(z: zipfile.ZipFile, info: zipfile.ZipInfo) -> Iterator[BinaryIO]:
    if info.compress_type not in READABLE_COMPRESSION:
        raise WeightsFileError(f"member {info.filename!r} uses compression method {info.compress_type}; "
                               "only stored or deflated members are read")
    with z.open(info) as member:
        yield member  # type: ignore[misc]
