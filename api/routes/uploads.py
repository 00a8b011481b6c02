"""/api/v1/uploads: weights files (.npy, .npz, .safetensors, .pt): a matrix for approx/learn jobs, a state_dict for
compress jobs."""
from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, File, UploadFile, status

from api.deps import PrincipalDep
from api.schemas import ErrorPublic, UploadPublic
from jobs import store

router = APIRouter(prefix="/api/v1/uploads", tags=["uploads"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=UploadPublic,
             responses={413: {"model": ErrorPublic}})
def create_upload(file: Annotated[UploadFile, File(description="multipart field `file`")],
                  principal: PrincipalDep) -> store.UploadRecord:
    """Checked before it is stored, without loading it: each array's shape and dtype from the file's
    headers against LOWRANK_MAX_MATRIX_ELEMENTS (per array: 422) and LOWRANK_MAX_UPLOAD_EXPANDED_BYTES
    (all arrays, in memory: 413) before any data is read, then the data streamed (finite values, exact
    length). A `.pt` pickle is replayed inertly (only torch's weights_only globals); the worker loads it
    with torch.load(weights_only=True). The answer lists the file's tensors (`arrays`: name -> shape, dtype; a .pt's
    state_dict by its keys). Use the id as `{"source": "upload", "upload_id": id}` (approx, learn) or as a compress
    job's `{"source": {"upload": id, "model": ...}}`, which is checked against the architecture at submit."""
    return store.create_upload(file.filename or "", file.file, owner=principal.name)


@router.get("/{upload_id}", response_model=UploadPublic, responses={404: {"model": ErrorPublic}})
def get_upload(upload_id: uuid.UUID) -> store.UploadRecord:
    """The upload and its tensors (`arrays`: name -> shape, dtype)."""
    return store.get_upload(upload_id)
