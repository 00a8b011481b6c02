"""Hostile weights files for the upload tests: small on disk, huge once expanded.

`deflated_zeros_npz(path, shape)` writes a valid `.npz` (numpy.load reads it, CRC included) holding
one all-zero array `arr_0` of `shape`, deflated ~1000:1: 32768 x 32768 float32 (4 GiB) is a 4 MB
file. Written in seconds without holding the array: the deflate stream of one 64 MiB zero chunk is
repeated (after a full flush the compressor's output for equal input is equal), in a zip64 member
written by hand (zipfile cannot store pre-compressed data).
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np

CHUNK = 64 << 20
NAME = b"arr_0.npy"


def npy_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def deflated_zeros_npz(path: Path, shape: tuple[int, ...], dtype: str = "<f4") -> Path:
    header = npy_header(shape, dtype)
    zeros = int(np.prod(shape)) * np.dtype(dtype).itemsize
    assert zeros % CHUNK == 0, "the array's bytes must be a multiple of 64 MiB"
    chunk = bytes(CHUNK)
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = co.compress(header) + co.flush(zlib.Z_FULL_FLUSH)
    block = co.compress(chunk) + co.flush(zlib.Z_FULL_FLUSH)
    last = co.flush(zlib.Z_FINISH)
    crc = zlib.crc32(header)
    for _ in range(zeros // CHUNK):
        crc = zlib.crc32(chunk, crc)
    size = len(header) + zeros
    compressed = len(first) + len(block) * (zeros // CHUNK) + len(last)
    zip64 = struct.pack("<HHQQ", 1, 16, size, compressed)
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 45, 0, 8, 0, 0x21, crc, 0xFFFFFFFF, 0xFFFFFFFF,
                        len(NAME), len(zip64)) + NAME + zip64
    central = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 45, 45, 0, 8, 0, 0x21, crc, 0xFFFFFFFF, 0xFFFFFFFF,
                          len(NAME), len(zip64), 0, 0, 0, 0, 0) + NAME + zip64
    with open(path, "wb") as f:
        f.write(local)
        f.write(first)
        for _ in range(zeros // CHUNK):
            f.write(block)
        f.write(last)
        directory_at = f.tell()
        f.write(central)
        f.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(central), directory_at, 0))
    return path
