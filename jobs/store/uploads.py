"""Uploaded weight files: checked without loading them, stored by id, and the references job specs make
to them (an upload's id, the array's key, the matrix size a rank must fit; a compress job's source, a job or
an upload: jobs/compress_sources.py)."""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy.orm import Session

from jobs import models as m
from jobs import weightfiles
from jobs.compress_sources import check_compress_source
from jobs.db import session_scope
from jobs.errors import InvalidInput, NotFound, TooLarge
from jobs.latency_sources import resolve_latency_source
from jobs.rows import abs_path, as_uuid, rel_path, utcnow
from jobs.settings import get_settings
from jobs.specs import AnySpec, CompressSpec, LatencySpec, UploadWeights, matrix_size_error, parse_spec, spec_to_dict

UPLOAD_FORMATS = {".npy": "npy", ".npz": "npz", ".safetensors": "safetensors", ".pt": "pt", ".pth": "pt"}


@dataclasses.dataclass(frozen=True)
class UploadRecord:
    id: str
    filename: str
    format: str
    path: Path
    size: int
    sha256: str
    arrays: dict[str, Any] | None  # {name: {"shape": [..], "dtype": ".."}}; None: a .pt of one tensor (no names)
    owner: str | None
    created_at: dt.datetime

    @classmethod
    def from_row(cls, row: m.Upload) -> UploadRecord:
        return cls(id=str(row.id), filename=row.filename, format=row.format, path=abs_path(row.path),
                   size=row.size, sha256=row.sha256, arrays=row.arrays, owner=row.owner,
                   created_at=row.created_at)


def needs_references(spec: AnySpec) -> bool:
    """Whether `check_references` reads anything for this spec (an upload, a compress or latency source)."""
    return (isinstance(spec, CompressSpec) or needs_resolution(spec)
            or any(isinstance(getattr(spec, f, None), UploadWeights) for f in ("weights", "teacher")))


def needs_resolution(spec: AnySpec) -> bool:
    """Whether the stored spec takes values from stored data (`resolve_references`): a latency job's source."""
    return isinstance(spec, LatencySpec) and spec.source is not None


def resolve_references(session: Session, spec: AnySpec, *, owner: str | None = None, admin: bool = True) -> AnySpec:
    """`spec` as it is stored: a latency job's source checked and the compress job's model, classes, stem and
    (unless given) image size filled in (jobs/latency_sources.py); any other spec checked (check_references) and
    returned as it is. InvalidInput naming the field."""
    if not needs_resolution(spec):
        check_references(session, spec, owner=owner, admin=admin)
        return spec
    resolved = resolve_latency_source(session, spec, owner=owner, admin=admin)
    return parse_spec({**spec_to_dict(spec), **resolved})


def check_references(session: Session, spec: AnySpec, *, owner: str | None = None, admin: bool = True) -> None:
    """Checks a spec against stored data (uploads it names, rank vs the uploaded matrix, a compress job's
    source: jobs/compress_sources.py, where `owner` and `admin` say whose jobs and uploads it may use);
    InvalidInput."""
    if isinstance(spec, CompressSpec):
        check_compress_source(session, spec, owner=owner, admin=admin)
        return
    if needs_resolution(spec):
        resolve_latency_source(session, spec, owner=owner, admin=admin)
        return
    for field in ("weights", "teacher"):
        source = getattr(spec, field, None)
        if not isinstance(source, UploadWeights):
            continue
        loc = (spec.kind, field)
        upload = session.get(m.Upload, source.upload_id)
        if upload is None:
            raise InvalidInput(f"{field}.upload_id: no upload with id {source.upload_id}", loc + ("upload_id",))
        if upload.arrays is None:  # .pt: the worker loads it (weights_only) and checks it
            continue
        if upload.format == "npy" and source.key is not None:
            raise InvalidInput(f"{field}.key: a .npy upload holds one array; leave key out", loc + ("key",))
        two_d = {k: v for k, v in upload.arrays.items() if len(v["shape"]) == 2}
        if source.key is None:
            if len(two_d) != 1:
                raise InvalidInput(f"{field}.key: upload {source.upload_id} holds the 2-D arrays "
                                   f"{sorted(two_d)}; name one with key", loc + ("key",))
            key = next(iter(two_d))
        else:
            key = source.key
            if key not in upload.arrays:
                raise InvalidInput(f"{field}.key: {key!r} is not in upload {source.upload_id}; "
                                   f"it holds {sorted(upload.arrays)}", loc + ("key",))
            if key not in two_d:
                raise InvalidInput(f"{field}.key: array {key!r} has shape {upload.arrays[key]['shape']}, "
                                   "a weight matrix must be 2-D", loc + ("key",))
        rows, cols = two_d[key]["shape"]
        too_big = matrix_size_error(rows, cols)
        if too_big:  # an upload stored under a larger limit, or before uploads were held to it
            raise InvalidInput(f"{field}.upload_id: the uploaded matrix {key!r} is {rows} x {cols}; {too_big}",
                               loc + ("upload_id",))
        rank = getattr(spec, "rank", None)
        if rank is not None and rank > min(rows, cols):
            raise InvalidInput(f"rank must be <= min(m, d) = {min(rows, cols)} for the uploaded "
                               f"{rows} x {cols} matrix, got {rank}", (spec.kind, "rank"))


def create_upload(filename: str, fileobj: BinaryIO, *, owner: str | None = None) -> UploadRecord:
    """Store an uploaded weights file as ARTIFACT_ROOT/uploads/<id><ext> (never under a client-given path)
    after checking it without loading it (jobs/weightfiles.py): what its arrays expand to, from their
    headers, against LOWRANK_MAX_MATRIX_ELEMENTS (per array) and LOWRANK_MAX_UPLOAD_EXPANDED_BYTES (all
    together) before any data is read; then every array streamed (exact length, finite values). A .pt's
    pickle is replayed inertly (jobs/ptcheck.py; no torch here); the worker loads it with
    torch.load(weights_only=True). Raises TooLarge over LOWRANK_MAX_UPLOAD_BYTES or the expanded limit,
    InvalidInput otherwise."""
    settings = get_settings()
    # Display name only (the file is stored by id): last path component, printable, bounded.
    base = "".join(ch for ch in os.path.basename(filename or "") if ch.isprintable()).strip()[:255] or "upload"
    ext = "".join(Path(base).suffixes[-1:]).lower()
    fmt = UPLOAD_FORMATS.get(ext)
    if fmt is None:
        raise InvalidInput(f"file: {base!r} has an unsupported extension; allowed: .npy, .npz, .safetensors, .pt",
                           ("file",))
    folder = settings.artifacts / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    upload_id = uuid.uuid4()
    digest = hashlib.sha256()
    size = 0
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=".incoming-", suffix=ext)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := fileobj.read(1 << 20):
                size += len(chunk)
                if size > settings.max_upload_bytes:
                    raise TooLarge(f"file is larger than {settings.max_upload_bytes} bytes (LOWRANK_MAX_UPLOAD_BYTES)")
                digest.update(chunk)
                out.write(chunk)
        if size == 0:
            raise InvalidInput("file: the uploaded file is empty", ("file",))
        try:
            found = weightfiles.inspect_weights(tmp, fmt, weightfiles.Limits.from_settings(settings))
        except weightfiles.OverByteLimit as exc:
            raise TooLarge(f"file: {base!r}: {exc}") from None
        except weightfiles.OverElementLimit as exc:
            raise InvalidInput(f"file: {base!r}: {exc}", ("file",)) from None
        except weightfiles.WeightsFileError as exc:
            raise InvalidInput(f"file: {base!r} is not a valid .{fmt} weights file: {exc}", ("file",)) from None
        arrays = None if found is None else {k: a.public() for k, a in found.items()}
        if arrays is not None:
            if not arrays:
                raise InvalidInput(f"file: {base!r} holds no arrays", ("file",))
            if not any(len(a["shape"]) == 2 for a in arrays.values()):
                raise InvalidInput(f"file: {base!r} holds no 2-D array (shapes: "
                                   f"{ {k: a['shape'] for k, a in arrays.items()} })", ("file",))
        final = folder / f"{upload_id}{ext}"
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        with session_scope() as session:
            row = m.Upload(id=upload_id, filename=base[:255], format=fmt, path=rel_path(final), size=size,
                           sha256=digest.hexdigest(), arrays=arrays, owner=owner, created_at=utcnow())
            session.add(row)
            session.flush()
            return UploadRecord.from_row(row)
    except BaseException:
        final.unlink(missing_ok=True)
        raise


def get_upload(upload_id: str | uuid.UUID) -> UploadRecord:
    with session_scope() as session:
        row = session.get(m.Upload, as_uuid(upload_id, "upload"))
        if row is None:
            raise NotFound(f"upload {upload_id} not found")
        return UploadRecord.from_row(row)


def get_upload_path(upload_id: str | uuid.UUID) -> Path:
    """Absolute path of an uploaded weights file (NotFound if the upload does not exist)."""
    return get_upload(upload_id).path
