"""/api/v1/uploads: weights files (.npy, .npz, .safetensors, .pt) for approx/learn jobs."""
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
    """Parsed safely before it is stored (numpy with allow_pickle=False, safetensors); `.pt` files are
    checked by the worker (torch.load with weights_only=True). Use the returned id as
    `{"source": "upload", "upload_id": id}`."""
    return store.create_upload(file.filename or "", file.file, owner=principal.name)


@router.get("/{upload_id}", response_model=UploadPublic, responses={404: {"model": ErrorPublic}})
def get_upload(upload_id: uuid.UUID) -> store.UploadRecord:
    return store.get_upload(upload_id)
