"""A compress job's source against what is stored: the job or upload it names (at submit), and where its
weights are (in the worker).

At submit (`check_compress_source`, called by jobs.store.check_references inside the submitting
transaction) a source is refused with InvalidInput naming the field when:
* {"job": id}: no such job; not a train or compress job; another user's (unless the caller is an admin);
  not succeeded; without its model artifact; `model` given and not the job's, or not given where the
  fine-tune's recipe differs per model family and the job's is not a ResNet; its classes not the data set's;
* {"upload": id, "model": m}: no such upload; another user's; not a .safetensors / .pt state_dict; its
  tensors (names and shapes from the upload's headers: jobs/weightfiles.py) not `m`'s state_dict (the
  first mismatched key, missing and unexpected keys: core.model_state, the same words core.source uses);
  its classes not the data set's.
include/exclude name layers of the source's architecture (core.model_layers) when it is a dense one.

`source_weights` (the worker) gives the file and the architecture hints `core.compress_run` loads.
Torch-free: the API imports it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from core import model_layers, model_state, recipes
from core.names import MODELS, dataset_classes, model_family
from jobs import models as m
from jobs.errors import InvalidInput

__all__ = ["MODEL_ARTIFACT", "COMPRESSED_ARTIFACT", "check_compress_source", "source_weights", "SourceWeights"]

COMPRESSED_ARTIFACT = "compressed.safetensors"  # a compress job's model (core.artifact.save_compressed)
MODEL_ARTIFACT = {"train": "checkpoints/last.pt", "compress": COMPRESSED_ARTIFACT}  # a source job's model file
STATE_DICT_FORMATS = ("safetensors", "pt")


def _refuse(message: str, *loc: str) -> InvalidInput:
    return InvalidInput(message, ("compress", "source", *loc))


def _check_owner(row: Any, what: str, owner: str | None, admin: bool, field: str) -> None:
    if not admin and row.owner != owner:
        raise _refuse(f"source.{field}: {what} {row.id} belongs to another user; compress your own jobs and uploads "
                      "(or ask its owner or an admin)", field)


def job_model(row: m.Job) -> str | None:
    """The architecture of a train job (its spec) or a compress job (its result)."""
    if row.kind == "train":
        return row.spec.get("model")
    return (row.result or {}).get("model")


def _job_classes(row: m.Job) -> int | None:
    if row.kind == "train":
        return dataset_classes(row.spec.get("dataset"), row.spec.get("num_classes"))
    return (row.result or {}).get("num_classes")


def _check_classes(classes: int | None, spec: Any, what: str) -> None:
    # synthetic data takes the model's class count; imagefolder's is known only from its folders
    want = None if spec.dataset == "synthetic" else dataset_classes(spec.dataset, None)
    if classes is not None and want is not None and classes != want:
        raise InvalidInput(f"dataset: {what} has {classes} outputs, data set {spec.dataset} has {want} classes",
                           ("compress", "dataset"))


def _check_layers(spec: Any, model: str) -> None:
    names = [row[0] for row in model_layers.layer_table()[model]["layers"]]
    for field in ("include", "exclude"):
        try:
            model_layers.check_layer_names(field, getattr(spec, field), names)
        except ValueError as exc:
            raise InvalidInput(str(exc), ("compress", field)) from None


def check_compress_source(session: Session, spec: Any, *, owner: str | None = None, admin: bool = True) -> None:
    """InvalidInput (HTTP 422, naming the field) unless `spec.source` names a model the caller may compress."""
    source = spec.source
    if hasattr(source, "job"):
        _check_job_source(session, spec, source, owner, admin)
    else:
        _check_upload_source(session, spec, source, owner, admin)


def _check_job_source(session: Session, spec: Any, source: Any, owner: str | None, admin: bool) -> None:
    row = session.get(m.Job, source.job)
    if row is None:
        raise _refuse(f"source.job: no job with id {source.job}", "job")
    if row.kind not in MODEL_ARTIFACT:
        raise _refuse(f"source.job: job {row.id} is a {row.kind} job; a compress source is a train job's "
                      "checkpoint or a compress job's compressed model", "job")
    _check_owner(row, "job", owner, admin, "job")
    if row.status != "succeeded":
        raise _refuse(f"source.job: job {row.id} is {row.status}; its model can be compressed once it has "
                      "succeeded", "job")
    name = MODEL_ARTIFACT[row.kind]
    if session.get(m.Artifact, (row.id, name)) is None:
        raise _refuse(f"source.job: job {row.id} has no artifact {name!r} (its model)", "job")
    model = job_model(row)
    if source.model is not None and model is not None and source.model != model:
        raise _refuse(f"source.model: job {row.id} trained a {model}, not a {source.model}", "model")
    recipe = spec.finetune.recipe if spec.finetune is not None else None
    if (source.model is None and model is not None and recipe in recipes.RECIPES and recipes.RECIPES[recipe].family
            and model_family(model) != model_family(MODELS[0])):
        # The fine-tune's recipe values were resolved for a ResNet (the spec alone does not say the model).
        raise _refuse(f"source.model: recipe {recipe!r} differs per model family and job {row.id} trained a "
                      f"{model}: give source.model {model!r} so the fine-tune takes the {model_family(model)} "
                      "values", "model")
    _check_classes(_job_classes(row), spec, f"the model of job {row.id}")
    dense = row.kind == "train" and row.spec.get("init") == "dense"
    if dense and model in model_layers.layer_table():
        _check_layers(spec, model)


def upload_state_shapes(arrays: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """`{key: shape}` of an upload's tensor listing, without a DataParallel `module.` prefix (as core.source)."""
    return model_state.strip_dp_prefix({k: tuple(v["shape"]) for k, v in arrays.items()})[0]


def upload_architecture(model: str, shapes: dict[str, tuple[int, ...]],
                        small_input: bool | None) -> tuple[int, bool]:
    """(num_classes, small_input) of a state_dict of `model`, read off its weights as core.source does."""
    num_classes = model_state.infer_num_classes(model, shapes) or 10
    if small_input is None:
        small_input = bool(model_state.infer_small_input(model, shapes))
    return num_classes, small_input


def _check_upload_source(session: Session, spec: Any, source: Any, owner: str | None, admin: bool) -> None:
    row = session.get(m.Upload, source.upload)
    if row is None:
        raise _refuse(f"source.upload: no upload with id {source.upload}", "upload")
    _check_owner(row, "upload", owner, admin, "upload")
    if row.format not in STATE_DICT_FORMATS:
        raise _refuse(f"source.upload: upload {row.id} is a .{row.format} file; a compress source is a state_dict "
                      "in .safetensors or a weights-only .pt", "upload")
    if not row.arrays:
        raise _refuse(f"source.upload: upload {row.id} holds no named tensors (a .pt of one tensor or of a layout "
                      "other than a state_dict); upload the model's state_dict", "upload")
    shapes = upload_state_shapes(row.arrays)
    num_classes, small_input = upload_architecture(source.model, shapes, source.small_input)
    expected = model_state.expected_shapes(source.model, num_classes=num_classes, small_input=small_input)
    problems = model_state.state_problems(expected, shapes)
    if problems:
        raise _refuse(f"source.upload: the tensors of upload {row.id} do not fit {source.model} (num_classes="
                      f"{num_classes}, small_input={small_input}): " + "; ".join(problems), "upload")
    _check_classes(num_classes, spec, f"the {source.model} of upload {row.id}")
    _check_layers(spec, source.model)


@dataclass(frozen=True)
class SourceWeights:
    """Where a compress job's model is and what core.compress_run needs besides the file."""

    path: Path
    model: str | None = None          # the architecture, for a plain state_dict
    small_input: bool | None = None
    description: str = ""             # for the result: "train job <id>", "upload <id> (<filename>)"
    dataset: str | None = None        # a source job's data set and image size: the calibration's default size
    image_size: int | None = None     # (a compressed model's file does not say the size it was trained at)


def source_weights(source: Any) -> SourceWeights:
    """The file a (validated) source names, read from the store (the worker calls this; NotFound when gone)."""
    from jobs import store

    if hasattr(source, "job"):
        job = store.get_job(str(source.job))
        artifact = store.get_artifact(job.id, MODEL_ARTIFACT[job.kind])
        data = job.spec if job.kind == "train" else (job.result or {}).get("data") or {}
        return SourceWeights(artifact.path, description=f"{job.kind} job {job.id}", dataset=data.get("dataset"),
                             image_size=data.get("image_size"))
    upload = store.get_upload(str(source.upload))
    return SourceWeights(upload.path, model=source.model, small_input=source.small_input,
                         description=f"upload {upload.id} ({upload.filename})")
