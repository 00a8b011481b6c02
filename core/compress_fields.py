"""The compress fields, defined once: core.compress.CompressOptions and core.compress_run.CompressConfig
validate with them, and jobs.specs.CompressSpec (the service's `compress` job) is built from them.

`OPTION_FIELDS` are CompressOptions' (how to compress), `CONFIG_FIELDS` what CompressConfig adds (where
the model and the data come from, fine-tuning). Each is a core.train_fields.TrainField: type, default,
allowed values or bounds, a doc line, and the service's declared narrowing (`service_*`, `service=False`
for what a job spec says otherwise: the source file is a job or an upload there). The checks are
train_fields' own (`check_field`), so a compress field and a training field are judged alike;
tests/core/test_compress_fields.py fails when the dataclasses or the job spec differ from this table.

Fine-tuning a compressed model takes the training fields named in `FINETUNE_FIELDS` (their definitions
are core.train_fields'); `resolve_finetune` fills what the user left out from the data set's recipe
(core.recipes), as `lowrank train` does, and `check_finetune` puts them through core.train_fields'
checks (those core.train.TrainConfig applies), naming `finetune.<field>`. Torch-free: the API imports it.
"""
from __future__ import annotations

from typing import Any

from core import recipes, train_fields
from core.names import ALLOCATIONS, COMPRESS_METHODS, DATASETS, DIGITS_TRAIN_SIZE, MODELS, REFINE_MODES
from core.train_fields import DEVICE_PATTERN, LAYER_NAME, FieldError, TrainField, check_field

__all__ = ["OPTION_FIELDS", "CONFIG_FIELDS", "FIELDS", "SERVICE_FIELDS", "FINETUNE_FIELDS", "SIZE_FIELDS",
           "check", "validate", "calibration_error", "finetune_train_values", "resolve_finetune", "check_finetune"]

F = TrainField
SIZE_FIELDS = ("budget", "rank", "rank_ratio")  # exactly one says how much to keep
OPTION_FIELDS: tuple[TrainField, ...] = (
    F("method", str, "whiten", "spectral, nkp (data-free); whiten, asvd, nkp-data (calibration data)",
      choices=COMPRESS_METHODS),
    F("budget", float | None, None, "fraction of the compressed layers' weights to keep", gt=0, le=1),
    F("rank", int | None, None, "or one rank for every layer", ge=1),
    F("rank_ratio", float | None, None, "or one ratio of min(out, in*kh*kw) for every layer", gt=0, le=1),
    F("allocation", str, "uniform", "how a budget is split over layers", choices=ALLOCATIONS),
    F("rank_step", int, 1, "greedy allocation's rank step", ge=1, service_le=4096),
    F("refine", str, "off", "layer-wise reconstruction after factoring: inputs from the dense network "
      "(independent) or the compressed one (sequential)", choices=REFINE_MODES),
    F("refine_steps", int, 100, "Adam steps per layer for refine", ge=1, service_le=100_000),
    F("refine_lr", float, 1e-2, "refine's step size, relative to the factors' RMS", gt=0),
    F("refine_patches", int, 4096, "calibration patches per layer for refine", ge=1, service_le=1 << 20),
    F("eps", float, 1e-6, "eigen-floor of the second moment, relative to its largest eigenvalue", gt=0),
    F("asvd_alpha", float, 0.5, "asvd's exponent of E|x|", ge=0, le=1),
    F("linear_blocks", str, "svd", "nkp-data on blocks without an activation: svd (their exact minimizer) or nkp",
      choices=("svd", "nkp")),
    F("positions_per_image", int, 64, "output positions sampled per image and layer", ge=1, service_le=4096),
    F("max_group_mb", int, 1024, "second moments held at once (MiB); layers are calibrated in groups", ge=1,
      service_le=65536),
    F("include", list[str] | None, None, "dotted layer names to compress (default: all but stem, classifier)",
      max_items=1000),
    F("exclude", list[str] | None, None, "dotted layer names to keep dense", max_items=1000),
    F("bn_reestimate", bool, True, "re-estimate every BatchNorm's statistics on the calibration images"),
    F("latency_aware", bool, False, "keep dense every layer whose factored form is not measured faster on the "
      "compress device at its allocated rank (core/latency.py); the report lists them with both times"),
    F("latency_batch", int, 1, "latency_aware: the batch size each layer pair is timed at", ge=1, le=4096),
    F("seed", int, 0, "draws the calibration images and positions (and seeds fine-tuning)", ge=0, le=2**63 - 1),
)
CONFIG_FIELDS: tuple[TrainField, ...] = (
    F("source", str, "", "train checkpoint last.pt, state_dict (.safetensors/.pt) or compressed model",
      service=False),
    F("model", str | None, None, "architecture when the file does not say it", choices=MODELS, service=False),
    F("num_classes", int | None, None, "default: read off the classifier", ge=1, le=100_000, service=False),
    F("small_input", bool | None, None, "default: the checkpoint's, or read off a ResNet stem", service=False),
    F("dataset", str, "digits", "calibration images (training split) and top-1 (validation split)",
      choices=DATASETS),
    F("data_root", str, "data", "where imagefolder / cifar data lives (service: imagefolder only, a folder "
      "under LOWRANK_DATA_ROOTS)", service_default=None),
    F("image_size", int | None, None, "px; default: the train checkpoint's (same data set), else the data set's",
      ge=8, le=1024),
    F("synthetic_train_size", int, 1024, "synthetic: training images", ge=1, le=10_000_000),
    F("synthetic_val_size", int, 256, "synthetic: validation images", ge=1, le=10_000_000),
    F("calib_images", int, 256, "images whose patches fit the statistics", ge=1, service_le=1_000_000),
    F("heldout_images", int, 64, "disjoint images the per-layer errors are measured on", ge=1,
      service_le=1_000_000),
    F("calib_batch_size", int, 64, "images per calibration batch", ge=1, le=65536),
    F("max_val_batches", int | None, None, "cap on validation batches for top-1 (default: all)", ge=1),
    F("device", str, "auto", "where to run: auto (cuda when present), cpu, cuda or cuda:N", pattern=DEVICE_PATTERN,
      pattern_text="auto, cpu, cuda or cuda:N", service_default="cpu", service_choices=("cpu", "cuda")),
    F("finetune_epochs", int, 0, "epochs of fine-tuning the compressed model (0: evaluate only)", ge=0),
)
FIELDS = OPTION_FIELDS + CONFIG_FIELDS
BY_NAME = {f.name: f for f in FIELDS}
SERVICE_FIELDS = tuple(f.for_service() for f in FIELDS if f.service)

# Training fields a fine-tune takes (core.train_fields' definitions and list; the length is `finetune_epochs`,
# the data and the model are the compression's). Left out: the recipe's value.
FINETUNE_FIELDS = train_fields.FINETUNE_FIELDS


def check(values: dict[str, Any]) -> FieldError | None:
    """The first rule across fields that `values` (each already through check_field) break."""
    given = [n for n in SIZE_FIELDS if values.get(n) is not None]
    if len(given) != 1:
        return FieldError(given[1] if given else "budget", "give exactly one of budget, rank, rank_ratio"
                          + (f" (got {', '.join(given)})" if given else ""))
    for name in ("include", "exclude"):
        for layer in values.get(name) or []:
            if not LAYER_NAME.fullmatch(layer):
                return FieldError(name, f"{name}: {layer!r} is not a dotted layer name (e.g. layer1.0.conv1)")
    return None


def validate(values: dict[str, Any], fields: tuple[TrainField, ...] = FIELDS) -> None:
    """check_field on every field of `fields`, then `check`; raises FieldError (a ValueError) naming the field."""
    for f in fields:
        check_field(f, values.get(f.name))
    error = check(values)
    if error is not None:
        raise error


def calibration_error(values: dict[str, Any]) -> FieldError | None:
    """calib_images + heldout_images must fit the training split where its size is known without the data."""
    size = {"digits": DIGITS_TRAIN_SIZE, "synthetic": values.get("synthetic_train_size")}.get(values.get("dataset"))
    need = (values.get("calib_images") or 0) + (values.get("heldout_images") or 0)
    if size is not None and need > size:
        return FieldError("calib_images", f"calib_images + heldout_images = {need} exceeds the {size} training "
                                          f"images of {values['dataset']}")
    return None


def finetune_train_values(overrides: dict[str, Any] | None, *, epochs: int, dataset: str, model: str | None,
                          device: str = "cpu", image_size: int | None = None, synthetic_train_size: int = 1024,
                          synthetic_val_size: int = 256) -> dict[str, Any]:
    """The training fields (core.train_fields) of a fine-tune of `epochs` epochs of a `model` compressed on
    `dataset`: the compress run's own values, `overrides` (FINETUNE_FIELDS names), the recipe's for the rest
    (`model` None: a ResNet's, for a recipe that differs per model family). FieldError naming
    `finetune.<field>` for a name that is not a fine-tuning field."""
    overrides = dict(overrides or {})
    train_fields.check_finetune(overrides)  # known names, types and bounds: FieldError naming finetune.<field>
    values = {f.name: f.default for f in train_fields.FIELDS}
    values.update(model=model or MODELS[0], dataset=dataset, init="dense", epochs=epochs, device=device,
                  image_size=image_size, synthetic_train_size=synthetic_train_size,
                  synthetic_val_size=synthetic_val_size, **overrides)
    return recipes.resolve(values)


def resolve_finetune(overrides: dict[str, Any] | None, *, dataset: str, model: str | None,
                     epochs: int = 1) -> dict[str, Any]:
    """The fine-tune's FINETUNE_FIELDS values: `overrides` over the recipe's (a stored, resolved dict resolves
    to itself). FieldError naming `finetune.<field>` for an unknown name."""
    resolved = finetune_train_values(overrides, epochs=epochs, dataset=dataset, model=model)
    return {name: resolved[name] for name in FINETUNE_FIELDS}


def check_finetune(values: dict[str, Any], *, epochs: int, dataset: str, model: str | None, device: str,
                   image_size: int | None = None, synthetic_train_size: int = 1024,
                   synthetic_val_size: int = 256) -> None:
    """The fine-tune's training config (resolved `values` in the compress run's context) through
    core.train_fields' own checks, as core.train.TrainConfig applies them; FieldError naming
    `finetune.<field>` (or `finetune_epochs`)."""
    full = finetune_train_values(values, epochs=epochs, dataset=dataset, model=model, device=device,
                                 image_size=image_size, synthetic_train_size=synthetic_train_size,
                                 synthetic_val_size=synthetic_val_size)
    try:
        train_fields.validate(full)
    except FieldError as exc:
        raise train_fields.finetune_error(exc) from None
