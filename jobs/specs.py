"""Job specs: the single source of truth for what a job accepts (API validates, worker parses, CLI builds).

Pure pydantic, no torch: the API imports this. Every model forbids unknown keys, so a typo is a
422 naming the field rather than a silently ignored option. A train spec's fields, defaults, allowed
values and rules are core/train_fields.py's (the trainer's TrainConfig is built from the same table),
its left-out fields take the recipe's values at validation (core/recipes.py), and a rank that
factorizes no layer is refused from the torch-free layer table (core/model_layers.py). A compress spec's fields are
core/compress_fields.py's (core.compress_run.CompressConfig validates with the same table), its fine-tune's training
fields left out take the recipe's values; its source (a job, an upload) is checked against the store at submit
(jobs/compress_sources.py). Limits that an operator may change (rank, matrix size, epochs, Monte Carlo samples)
come from `jobs.settings` at validation time.

    spec = parse_spec({"kind": "approx", "weights": {"source": "gaussian", "m": 64, "d": 32}, "rank": 4})
    queue_for(spec)  # -> "cpu"
"""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic import Tag as UnionTag
from pydantic_core import InitErrorDetails, PydanticCustomError

from core import compress_fields, model_layers, recipes, train_fields
from core.names import APPROX_METHODS, MODELS
from jobs.settings import get_settings
from jobs.vocabulary import Priority

# Printable text: no control characters (Postgres text cannot hold NUL; logs and tables stay sane).
TEXT_PATTERN = r"^[^\x00-\x1f\x7f]+$"
TAG_PATTERN = r"^[A-Za-z0-9_.:=+\-/]+$"

Device = str  # a queue family of jobs.vocabulary.QUEUES: "cpu", "gpu" or "gpu<N>"
ModelName = Literal[MODELS]
Tag = Annotated[str, Field(min_length=1, max_length=64, pattern=TAG_PATTERN)]


class _Spec(BaseModel):
    # NaN/inf are never valid parameters (and JSON cannot store them).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def matrix_size_error(m: int, d: int) -> str | None:
    """Why an m x d weight matrix is refused (over LOWRANK_MAX_MATRIX_ELEMENTS), or None. Every weights
    source obeys it: a Gaussian here, an upload at upload, submit (jobs.store) and in the worker."""
    limit = get_settings().max_matrix_elements
    if m * d > limit:
        return f"m*d = {m * d} exceeds the limit of {limit} elements (LOWRANK_MAX_MATRIX_ELEMENTS)"
    return None


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
        too_big = matrix_size_error(m, d) if m is not None else None
        if too_big:
            raise ValueError(too_big)
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


WeightsSource = Annotated[GaussianWeights | UploadWeights | ModelLayerWeights, Field(discriminator="source")]


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
    method: Literal[APPROX_METHODS] = "nkp"
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


def _service_field(f: train_fields.TrainField) -> tuple[Any, Any]:
    """A pydantic (annotation, Field) for a training field, with the service's declared narrowing."""
    base = Literal[f.choices] if f.choices else f.base_type
    nullable = f.default is None or f.resolved
    bounds = {b: getattr(f, b) for b in ("ge", "gt", "le", "lt") if getattr(f, b) is not None}
    extra: dict[str, Any] = {"max_length": f.max_items} if f.max_items else {}
    if f.name == "data_root":  # a path the API checks against LOWRANK_DATA_ROOTS (validator below)
        extra.update(max_length=1000, pattern=TEXT_PATTERN, validate_default=True)
    return (base | None if nullable else base), Field(f.default, description=f.doc, **bounds, **extra)


def _resolve_recipe(cls: type, data: Any) -> Any:
    # Fields left out (or null) take the recipe's values before any check, so the stored spec is complete.
    return recipes.resolve(data) if isinstance(data, dict) else data


def _limit_rank(cls: type, rank: int | None) -> int | None:
    limit = get_settings().max_rank
    if rank is not None and rank > limit:
        raise ValueError(f"rank must be <= {limit} (LOWRANK_MAX_RANK), got {rank}")
    return rank


def _limit_epochs(cls: type, epochs: int | None) -> int | None:
    limit = get_settings().max_epochs
    if epochs is not None and epochs > limit:
        raise ValueError(f"epochs must be <= {limit} (LOWRANK_MAX_EPOCHS), got {epochs}")
    return epochs


def _data_root(cls: type, root: str | None, info: ValidationInfo) -> str | None:
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
        # The allowed folders are the server's layout: named by setting, never listed to a client.
        raise ValueError(f"data_root {root!r} is not under a folder this server allows for imagefolder data "
                         "(LOWRANK_DATA_ROOTS; ask the operator which folders those are)")
    return str(path)


def _devices(cls: type, devices: int, info: ValidationInfo) -> int:
    if devices > 1 and info.data.get("device") != "cuda":
        raise ValueError("devices > 1 needs device='cuda'")
    return devices


def _rules(spec: TrainSpec) -> TrainSpec:
    """core.train_fields' rules across fields, reported at the field they name (HTTP 422 loc)."""
    error = train_fields.check(spec.model_dump())
    if error is not None:
        detail = InitErrorDetails(type=PydanticCustomError("value_error", "{message}", {"message": str(error)}),
                                  loc=(error.field,), input=getattr(spec, error.field, None))
        raise ValidationError.from_exception_data("TrainSpec", [detail])
    return spec


# Train a factored (or dense) network: the training fields are core.train_fields' (with the service's
# declared narrowing), so TrainSpec and core.train.TrainConfig cannot drift apart.
TrainSpec = create_model(
    "TrainSpec",
    __base__=_Common,
    __module__=__name__,
    __doc__="Train a factored (or dense) ResNet/EfficientNet; exactly one of `rank` / `rank_ratio` unless "
            "init=dense. Fields left out take the recipe's values (`recipe`, default: the data set's).",
    __validators__={
        "_resolve_recipe": model_validator(mode="before")(classmethod(_resolve_recipe)),
        "_limit_rank": field_validator("rank")(classmethod(_limit_rank)),
        "_limit_epochs": field_validator("epochs")(classmethod(_limit_epochs)),
        "_data_root": field_validator("data_root")(classmethod(_data_root)),
        "_devices": field_validator("devices")(classmethod(_devices)),
        "_rules": model_validator(mode="after")(_rules),
    },
    kind=(Literal["train"], "train"),
    **{f.name: _service_field(f) for f in train_fields.SERVICE_FIELDS},
)


# ---------------------------------------------------------------------------------------------
# Compress a trained network (MATH.md Section 8): its fields are core.compress_fields' (the table
# core.compress_run.CompressConfig validates with), the source is a job or an upload, and a fine-tune's
# training fields left out take the recipe's values at validation (stored resolved, like a train spec's).

class JobSource(_Spec):
    """A finished job's model: a train job's final checkpoint (checkpoints/last.pt) or a compress job's
    compressed model (compressed.safetensors). Checked against the stored job at submit."""

    job: uuid.UUID = Field(description="id of a succeeded train or compress job")
    model: ModelName | None = Field(None, description="the job's model, only needed to pick a recipe's per-family "
                                                      "values for a fine-tune (checked against the job)")


class UploadSource(_Spec):
    """An uploaded state_dict (POST /api/v1/uploads: .safetensors or a weights-only .pt) of `model`; its tensor
    names and shapes are checked against the architecture at submit."""

    upload: uuid.UUID = Field(description="id of an upload")
    model: ModelName = Field(description="the architecture the state_dict is of")
    small_input: bool | None = Field(None, description="3x3 stride-1 stem without max-pool (default: read off a "
                                                       "ResNet's stem; EfficientNet: false)")


def _source_kind(value: Any) -> str | None:
    keys = value if isinstance(value, dict) else vars(value) if isinstance(value, _Spec) else {}
    return "job" if "job" in keys else "upload" if "upload" in keys else None


SOURCE_SHAPES = '{"job": <train or compress job id>} or {"upload": <upload id>, "model": <architecture>}'
CompressSource = Annotated[
    Annotated[JobSource, UnionTag("job")] | Annotated[UploadSource, UnionTag("upload")],
    Discriminator(_source_kind, custom_error_type="source_kind",
                  custom_error_message=f"source must be {SOURCE_SHAPES}")]

# The training fields a fine-tune takes (core.compress_fields.FINETUNE_FIELDS): None = the recipe's value.
FinetuneFields = create_model(
    "FinetuneFields", __base__=_Spec, __module__=__name__,
    __doc__="Training fields of the fine-tune (core.train_fields' definitions); left out: the recipe's values.",
    **{name: _service_field(train_fields.BY_NAME[name].for_service()) for name in compress_fields.FINETUNE_FIELDS})


def _source_model(source: Any) -> str | None:
    return source.get("model") if isinstance(source, dict) else getattr(source, "model", None)


def _resolve_finetune(cls: type, data: Any) -> Any:
    # A fine-tune's fields left out take the recipe's values before any check, so the stored spec is complete.
    if not isinstance(data, dict):
        return data
    epochs, given = data.get("finetune_epochs", 0), data.get("finetune")
    wanted = isinstance(epochs, int) and not isinstance(epochs, bool) and epochs > 0
    if wanted and (given is None or isinstance(given, dict)):
        try:
            data = {**data, "finetune": compress_fields.resolve_finetune(
                given, dataset=data.get("dataset", compress_fields.BY_NAME["dataset"].default),
                model=_source_model(data.get("source")), epochs=epochs)}
        except (train_fields.FieldError, TypeError, ValueError):
            pass  # named by _compress_rules (or by the field's own type check)
    return data


def _limit_finetune_epochs(cls: type, epochs: int) -> int:
    limit = get_settings().max_epochs
    if epochs > limit:
        raise ValueError(f"finetune_epochs must be <= {limit} (LOWRANK_MAX_EPOCHS), got {epochs}")
    return epochs


def _compress_rules(spec: CompressSpec) -> CompressSpec:
    """core.compress_fields' rules across fields and the fine-tune's training rules, at the field they name."""
    values = spec.model_dump()
    error = compress_fields.check(values) or compress_fields.calibration_error(values)
    if error is None and spec.finetune_epochs == 0 and spec.finetune is not None:
        error = train_fields.FieldError("finetune", "finetune sets the training fields of a fine-tune: give "
                                                    "finetune_epochs >= 1, or leave finetune out")
    if error is None and spec.finetune_epochs > 0:
        try:  # the resolved values (_resolve_finetune) through core.train_fields' checks
            compress_fields.check_finetune(values["finetune"] or {}, epochs=spec.finetune_epochs, dataset=spec.dataset,
                                           model=_source_model(spec.source), device=spec.device,
                                           image_size=spec.image_size,
                                           synthetic_train_size=spec.synthetic_train_size,
                                           synthetic_val_size=spec.synthetic_val_size)
        except train_fields.FieldError as exc:
            error = exc
    if error is not None:
        loc = tuple(error.field.split("."))
        detail = InitErrorDetails(type=PydanticCustomError("value_error", "{message}", {"message": str(error)}),
                                  loc=loc, input=getattr(spec, loc[0], None))
        raise ValidationError.from_exception_data("CompressSpec", [detail])
    return spec


CompressSpec = create_model(
    "CompressSpec",
    __base__=_Common,
    __module__=__name__,
    __doc__="Compress a trained network (a train or compress job's model, or an uploaded state_dict) with "
            "calibration data to a budget, rank or rank ratio (exactly one); optionally fine-tune it. result: top-1 "
            "dense, compressed (before fine-tuning, after BN re-estimation) and per fine-tune epoch, params and MACs, "
            "per-layer rank and errors; artifact compressed.safetensors (a later compress job's source).",
    __validators__={
        "_resolve_finetune": model_validator(mode="before")(classmethod(_resolve_finetune)),
        "_limit_rank": field_validator("rank")(classmethod(_limit_rank)),
        "_limit_finetune_epochs": field_validator("finetune_epochs")(classmethod(_limit_finetune_epochs)),
        "_data_root": field_validator("data_root")(classmethod(_data_root)),
        "_rules": model_validator(mode="after")(_compress_rules),
    },
    kind=(Literal["compress"], "compress"),
    source=(CompressSource, Field(description=f"the trained model: {SOURCE_SHAPES}")),
    **{f.name: _service_field(f) for f in compress_fields.SERVICE_FIELDS},
    finetune=(FinetuneFields | None, Field(None, description="training fields of the fine-tune (recipes apply); "
                                                             "only with finetune_epochs >= 1")),
)


# ---------------------------------------------------------------------------------------------
# Measure forward latency, dense against factored (core.latency.compare_latency, what `lowrank latency` runs):
# at a rank or rank ratio, or at a compress job's per-layer ranks (`source`; its model, classes, stem and
# calibration image size are resolved at submit by jobs/latency_sources.py and stored in the spec).

LATENCY_MAX_BATCHES = 4
LATENCY_MAX_BATCH = 256
LATENCY_DEFAULT_IMAGE_SIZE = 224
LATENCY_DEFAULT_CLASSES = 10


class LatencySpec(_Common):
    """Forward latency (p50, p90, images/s) of a registered model, dense against factored, end to end at each
    batch size and per factored layer on its real input shape, on the job's device; exactly one of `rank`,
    `rank_ratio`, `source` (a succeeded compress job of yours: its per-layer ranks). result: core.latency's
    report; metrics latency_ms_b<N>, dense_latency_ms_b<N>, speedup_b<N>, slower_layers_b<N>."""

    kind: Literal["latency"] = "latency"
    model: ModelName | None = Field(None, description="the architecture (with source: the compress job's, resolved "
                                                      "at submit)")
    rank: int | None = Field(None, ge=1, description="rank of every factored layer")
    rank_ratio: float | None = Field(None, gt=0, le=1, description="rank as a fraction of min(out, in*kh*kw)")
    source: uuid.UUID | None = Field(None, description="id of a succeeded compress job of yours: its per-layer ranks "
                                                       "are measured (layers it did not factor stay dense)")
    image_size: int | None = Field(None, ge=8, le=1024, description=f"px (default {LATENCY_DEFAULT_IMAGE_SIZE}; with "
                                                                    "source: its calibration image size)")
    batches: list[int] = Field(default_factory=lambda: [1, 32], min_length=1, max_length=LATENCY_MAX_BATCHES,
                               description=f"batch sizes, each 1..{LATENCY_MAX_BATCH}, distinct")
    device: Literal["cpu", "cuda"] = Field("cpu", description="cpu, or cuda (a GPU worker's queue)")
    threads: int | None = Field(None, ge=1, le=1024, description="CPU intra-op threads while timing (default: "
                                                                 "the worker's)")
    channels_last: bool | None = Field(None, description="channels-last memory format (default: on CUDA only)")
    repeats: int = Field(20, ge=3, le=200, description="timed samples per network and per layer")
    per_layer: bool = Field(True, description="also each factored layer against its dense original")
    latency_aware: bool = Field(False, description="also the network that keeps dense every layer whose factored "
                                                   "form is not faster")
    latency_batch: int | None = Field(None, ge=1, le=LATENCY_MAX_BATCH, description="batch the latency-aware choice "
                                                                                    "is timed at (default: the first)")
    num_classes: int | None = Field(None, ge=1, le=100_000, description=f"classifier outputs (default "
                                                                        f"{LATENCY_DEFAULT_CLASSES}; with source: "
                                                                        "the compressed model's)")
    small_input: bool | None = Field(None, description="3x3 stride-1 stem without max-pool (default: for images of "
                                                       "64 px or less; with source: the compressed model's)")

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        # Without a source the defaults are filled now, so the stored spec says what ran; a source's values are
        # filled at submit from the compress job (jobs/latency_sources.py).
        if isinstance(data, dict) and data.get("source") is None:
            data = dict(data)
            if data.get("image_size") is None:
                data["image_size"] = LATENCY_DEFAULT_IMAGE_SIZE
            if data.get("num_classes") is None:
                data["num_classes"] = LATENCY_DEFAULT_CLASSES
            size = data["image_size"]
            if data.get("small_input") is None and isinstance(size, int) and not isinstance(size, bool):
                data["small_input"] = size <= 64
        return data

    @field_validator("rank")
    @classmethod
    def _limit_rank(cls, rank: int | None) -> int | None:
        return _limit_rank(cls, rank)

    @field_validator("batches")
    @classmethod
    def _batches(cls, batches: list[int]) -> list[int]:
        if any(not 1 <= b <= LATENCY_MAX_BATCH for b in batches):
            raise ValueError(f"batches: each batch size must be 1..{LATENCY_MAX_BATCH}, got {batches}")
        if len(set(batches)) != len(batches):
            raise ValueError(f"batches: each batch size once, got {batches}")
        return batches

    @model_validator(mode="after")
    def _rules(self) -> LatencySpec:
        given = [f for f in ("rank", "rank_ratio", "source") if getattr(self, f) is not None]
        error: tuple[str, str] | None = None
        if len(given) != 1:
            error = (given[-1] if given else "rank",
                     "give exactly one of rank, rank_ratio or source (a compress job's per-layer ranks)"
                     + (f", not {' and '.join(given)}" if given else ""))
        elif self.source is None and self.model is None:
            error = ("model", f"model is required with {given[0]}: one of {', '.join(MODELS)}")
        elif self.source is None:
            why = model_layers.no_op_rank_message(self.model, rank=self.rank, rank_ratio=self.rank_ratio,
                                                  num_classes=self.num_classes, small_input=bool(self.small_input))
            if why is not None:
                error = (given[0], why)
        if error is None and self.latency_batch is not None and not self.latency_aware:
            error = ("latency_batch", "latency_batch is the batch the latency-aware choice is timed at: give "
                                      "latency_aware=true too, or leave latency_batch out")
        if error is not None:
            detail = InitErrorDetails(type=PydanticCustomError("value_error", "{message}", {"message": error[1]}),
                                      loc=(error[0],), input=getattr(self, error[0], None))
            raise ValidationError.from_exception_data("LatencySpec", [detail])
        return self


JobSpec = Annotated[ApproxSpec | LearnSpec | TrainSpec | CompressSpec | LatencySpec, Field(discriminator="kind")]
AnySpec = ApproxSpec | LearnSpec | TrainSpec | CompressSpec | LatencySpec
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
    if isinstance(spec, (CompressSpec, LatencySpec)) and spec.device == "cuda":
        return "gpu"
    return "cpu"
