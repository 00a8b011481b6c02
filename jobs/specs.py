"""Job specs: the single source of truth for what a job accepts (API validates, worker parses, CLI builds).

Pure pydantic, no torch: the API imports this. Every model forbids unknown keys, so a typo is a
422 naming the field rather than a silently ignored option. Limits that an operator may change
(rank, matrix size, epochs, Monte Carlo samples) come from `jobs.settings` at validation time.

    spec = parse_spec({"kind": "approx", "weights": {"source": "gaussian", "m": 64, "d": 32}, "rank": 4})
    queue_for(spec)  # -> "cpu"
"""
from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationInfo, field_validator

from jobs.settings import get_settings
from jobs.models import MAX_JOB_DEVICES

APPROX_METHODS = ("spectral", "rescale", "nkp", "random", "reference")
MODELS = ("resnet18", "resnet34", "resnet50", "resnet101",
          "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3")
DATASETS = ("digits", "synthetic", "cifar10", "cifar100", "imagefolder")
TRAIN_INITS = ("spectral", "rescale", "nkp", "random", "dense")

# Printable text: no control characters (Postgres text cannot hold NUL; logs and tables stay sane).
TEXT_PATTERN = r"^[^\x00-\x1f\x7f]+$"
TAG_PATTERN = r"^[A-Za-z0-9_.:=+\-/]+$"

Priority = Literal["high", "normal", "low"]
Device = str  # a queue family of jobs.models.QUEUES: "cpu", "gpu" or "gpu<N>"
ModelName = Literal["resnet18", "resnet34", "resnet50", "resnet101",
                    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3"]
_LAYER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
Tag = Annotated[str, Field(min_length=1, max_length=64, pattern=TAG_PATTERN)]


class _Spec(BaseModel):
    # NaN/inf are never valid parameters (and JSON cannot store them).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# ---------------------------------------------------------------------------------------------
# Weights sources: where an approx job's matrix (or a learn job's teacher) comes from.

class GaussianWeights(_Spec):
    """An m x d matrix with i.i.d. N(0, 1/d) entries drawn from the job's seed."""

    source: Literal["gaussian"]
    m: int = Field(ge=1, description="rows (output dimension)")
    d: int = Field(ge=1, description="columns (input dimension)")

    @field_validator("d")
    @classmethod
    def _size(cls, d: int, info: ValidationInfo) -> int:
        m = info.data.get("m")
        limit = get_settings().max_matrix_elements
        if m is not None and m * d > limit:
            raise ValueError(f"m*d = {m * d} exceeds the limit of {limit} elements (LOWRANK_MAX_MATRIX_ELEMENTS)")
        return d

    def shape(self) -> tuple[int, int] | None:
        return (self.m, self.d)


class UploadWeights(_Spec):
    """A file uploaded with POST /api/v1/uploads; `key` picks one array of an .npz/.safetensors/.pt."""

    source: Literal["upload"]
    upload_id: uuid.UUID
    key: str | None = Field(None, min_length=1, max_length=255, pattern=TEXT_PATTERN)

    def shape(self) -> tuple[int, int] | None:
        return None  # known only from the stored upload (checked by the store)


class ModelLayerWeights(_Spec):
    """The fresh-init weight matrix (out, in*kh*kw) of a layer of a registered model."""

    source: Literal["model_layer"]
    model: ModelName
    layer: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$",
                       description="dotted module name, e.g. layer1.0.conv1")

    def shape(self) -> tuple[int, int] | None:
        return None  # known only after building the model (checked by the worker)


WeightsSource = Annotated[Union[GaussianWeights, UploadWeights, ModelLayerWeights], Field(discriminator="source")]


def _check_rank(rank: int, info: ValidationInfo, source_field: str) -> int:
    limit = get_settings().max_rank
    if rank > limit:
        raise ValueError(f"rank must be <= {limit} (LOWRANK_MAX_RANK), got {rank}")
    source = info.data.get(source_field)
    shape = source.shape() if source is not None else None
    if shape is not None and rank > min(shape):
        raise ValueError(f"rank must be <= min(m, d) = {min(shape)} for a {shape[0]} x {shape[1]} matrix, got {rank}")
    return rank


# ---------------------------------------------------------------------------------------------
# Job kinds.

def _kind_required(schema: dict[str, Any]) -> None:
    # `kind` has a default (so ApproxSpec(...) needs no kind=) but the union needs it on the wire.
    required = schema.setdefault("required", [])
    if "kind" not in required:
        required.insert(0, "kind")


class _Common(_Spec):
    model_config = ConfigDict(json_schema_extra=_kind_required)

    seed: int = Field(0, ge=0, le=2**63 - 1, description="seeds all randomness of the job")
    name: str | None = Field(None, min_length=1, max_length=200, pattern=TEXT_PATTERN)
    tags: list[Tag] = Field(default_factory=list, max_length=32)
    priority: Priority = "normal"


class ApproxSpec(_Common):
    """Approximate one weight matrix at `rank` with `method`; result.error is the normalized function error."""

    kind: Literal["approx"] = "approx"
    weights: WeightsSource
    rank: int = Field(ge=1)
    method: Literal["spectral", "rescale", "nkp", "random", "reference"] = "nkp"
    mc_samples: int = Field(0, ge=0, description="Monte Carlo samples for an error estimate beside the closed form (0 = none)")

    @field_validator("rank")
    @classmethod
    def _rank(cls, rank: int, info: ValidationInfo) -> int:
        return _check_rank(rank, info, "weights")

    @field_validator("mc_samples")
    @classmethod
    def _mc(cls, n: int) -> int:
        limit = get_settings().max_mc_samples
        if n > limit:
            raise ValueError(f"mc_samples must be <= {limit} (LOWRANK_MAX_MC_SAMPLES), got {n}")
        return n


class LearnSpec(_Common):
    """Learn a rank-`rank` approximation of `teacher` from samples to accuracy `eps` w.p. 1-`delta`."""

    kind: Literal["learn"] = "learn"
    teacher: WeightsSource
    rank: int = Field(ge=1)
    eps: float = Field(0.1, gt=0, lt=1, description="target excess normalized error")
    delta: float = Field(0.05, gt=0, lt=1, description="failure probability")
    noise: float | None = Field(None, ge=0, description="std of Gaussian label noise added to Y (None = clean)")

    @field_validator("rank")
    @classmethod
    def _rank(cls, rank: int, info: ValidationInfo) -> int:
        return _check_rank(rank, info, "teacher")


class TrainSpec(_Common):
    """Train a factored (or dense) ResNet/EfficientNet; exactly one of `rank` / `rank_ratio` unless init=dense."""

    kind: Literal["train"] = "train"
    model: ModelName
    dataset: Literal["digits", "synthetic", "cifar10", "cifar100", "imagefolder"]
    data_root: str | None = Field(None, max_length=1000, pattern=TEXT_PATTERN, validate_default=True, description="imagefolder only: a folder under LOWRANK_DATA_ROOTS")
    small_input: bool = Field(False, description="3x3 stride-1 stem without max-pool (32 px images)")
    image_size: int | None = Field(None, ge=8, le=1024, description="None: the data set's default")
    rank: int | None = Field(None, ge=1, description="rank of every factored layer")
    rank_ratio: float | None = Field(None, gt=0, le=1, validate_default=True,
                                     description="rank as a fraction of min(out, in*kh*kw)")
    init: Literal["spectral", "rescale", "nkp", "random", "dense"] = Field(
        "nkp", validate_default=True, description="factor initialization; dense = unfactored baseline")
    include: list[str] | None = Field(None, max_length=1000, description="dotted layer names to factor")
    exclude: list[str] | None = Field(None, max_length=1000, description="dotted layer names to keep dense")
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(128, ge=1, le=65536)
    lr: float = Field(0.1, gt=0, le=10)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0, le=1)
    wd_mode: Literal["standard", "frobenius"] = "standard"
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    step_size: int = Field(30, ge=1, description="step schedule: epochs between decays")
    step_gamma: float = Field(0.1, gt=0, le=1, description="step schedule: decay factor")
    warmup_epochs: float = Field(0.0, ge=0, le=1000)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False
    device: Literal["cpu", "cuda"] = Field("cpu", validate_default=True)  # checked against amp
    devices: int = Field(1, ge=1, le=MAX_JOB_DEVICES,
                         description="GPUs of one node for one job (device=cuda; >1 runs DDP under torchrun)")
    num_workers: int = Field(0, ge=0, le=64, description="DataLoader worker processes")
    synthetic_train_size: int = Field(1024, ge=1, le=10_000_000)
    synthetic_val_size: int = Field(256, ge=1, le=10_000_000)
    max_train_batches: int | None = Field(None, ge=1, description="cap on steps per epoch (smoke runs)")
    max_val_batches: int | None = Field(None, ge=1)
    log_every: int = Field(50, ge=1, description="optimizer steps between step-level metrics (train_loss_step, lr)")

    @field_validator("rank")
    @classmethod
    def _rank(cls, rank: int | None) -> int | None:
        limit = get_settings().max_rank
        if rank is not None and rank > limit:
            raise ValueError(f"rank must be <= {limit} (LOWRANK_MAX_RANK), got {rank}")
        return rank

    @field_validator("rank_ratio")
    @classmethod
    def _not_both(cls, ratio: float | None, info: ValidationInfo) -> float | None:
        # "neither" is checked in _init (declared after), since init=dense needs no rank.
        if info.data.get("rank") is not None and ratio is not None:
            raise ValueError("give exactly one of rank or rank_ratio, not both")
        return ratio

    @field_validator("init")
    @classmethod
    def _init(cls, init: str, info: ValidationInfo) -> str:
        if "rank" not in info.data or "rank_ratio" not in info.data:  # their own errors say why
            return init
        given = info.data["rank"] is not None or info.data["rank_ratio"] is not None
        if init == "dense" and given:
            raise ValueError("init='dense' trains the unfactored model: leave rank and rank_ratio out")
        if init != "dense" and not given:
            raise ValueError(f"init={init!r} factorizes the model: give exactly one of rank or rank_ratio "
                             "(or init='dense' for an unfactored baseline)")
        return init

    @field_validator("include", "exclude")
    @classmethod
    def _layer_names(cls, names: list[str] | None) -> list[str] | None:
        for n in names or []:
            if not _LAYER_NAME.fullmatch(n):
                raise ValueError(f"{n!r} is not a dotted layer name (e.g. layer1.0.conv1)")
        return names

    @field_validator("epochs")
    @classmethod
    def _epochs(cls, epochs: int) -> int:
        limit = get_settings().max_epochs
        if epochs > limit:
            raise ValueError(f"epochs must be <= {limit} (LOWRANK_MAX_EPOCHS), got {epochs}")
        return epochs

    @field_validator("data_root")
    @classmethod
    def _data_root(cls, root: str | None, info: ValidationInfo) -> str | None:
        dataset = info.data.get("dataset")
        if root is None:
            if dataset == "imagefolder":
                raise ValueError("dataset='imagefolder' needs data_root (a folder under LOWRANK_DATA_ROOTS)")
            return None
        if dataset is not None and dataset != "imagefolder":
            raise ValueError(f"data_root is only for dataset='imagefolder', not {dataset!r}")
        allowed = get_settings().data_roots
        path = Path(root).expanduser().resolve()
        if not any(path.is_relative_to(a) for a in allowed):
            raise ValueError(f"data_root {root!r} is not under an allowed root (LOWRANK_DATA_ROOTS = "
                             f"{[str(a) for a in allowed]})")
        return str(path)

    @field_validator("device")
    @classmethod
    def _amp_needs_cuda(cls, device: str, info: ValidationInfo) -> str:
        amp = info.data.get("amp")
        if amp not in (None, "none") and device != "cuda":
            raise ValueError(f"amp={amp!r} is mixed precision on a GPU: it needs device='cuda' "
                             f"(got {device!r}); use amp='none' on cpu")
        return device

    @field_validator("devices")
    @classmethod
    def _devices(cls, devices: int, info: ValidationInfo) -> int:
        if devices > 1 and info.data.get("device") != "cuda":
            raise ValueError("devices > 1 needs device='cuda'")
        return devices


JobSpec = Annotated[Union[ApproxSpec, LearnSpec, TrainSpec], Field(discriminator="kind")]
AnySpec = ApproxSpec | LearnSpec | TrainSpec
_adapter: TypeAdapter[AnySpec] = TypeAdapter(JobSpec)


def parse_spec(data: dict[str, Any]) -> AnySpec:
    """Validate a spec dict (raises pydantic.ValidationError with field locations)."""
    return _adapter.validate_python(data)


def spec_to_dict(spec: AnySpec) -> dict[str, Any]:
    """The canonical JSON form stored in jobs.spec (every field, defaults filled, JSON types)."""
    return spec.model_dump(mode="json")


def queue_for(spec: AnySpec) -> Device:
    """Which queue family runs this spec: train jobs on device=cuda go to GPU workers ("gpu" for one GPU,
    "gpu<N>" for devices=N, consumed by workers that hold N GPUs: `lowrank worker --gpus-per-worker N`),
    the rest to CPU workers."""
    if isinstance(spec, TrainSpec) and spec.device == "cuda":
        return "gpu" if spec.devices == 1 else f"gpu{spec.devices}"
    return "cpu"


def spec_json_schema() -> dict[str, Any]:
    return _adapter.json_schema()
