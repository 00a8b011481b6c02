"""The training fields, defined once: core.train.TrainConfig and jobs.specs.TrainSpec are both built from `FIELDS`.

Each field has its type, default, allowed values or bounds, and a doc line. A default of None on a
field with `resolved=True` means "the recipe's value" (core.recipes.resolve fills it before
validation; image_size falls back to the data set's, small_input to `image_size <= 64`). The
service narrows a few fields for a shared cluster (`service_*`: device is a queue, data_root must lie
under LOWRANK_DATA_ROOTS, nothing downloads); those differences are declared here and nowhere else,
and tests/core/test_train_contract.py fails on any other difference between the two classes.

`check(values)` applies the rules that involve several fields (or the layer table) to resolved
values and returns the first broken one as a FieldError naming its field; the per-field checks
(type, choices, bounds) are `check_field`. Torch-free: the API imports it.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass
from typing import Any

from core import model_layers, recipes
from core.names import (
    DATASETS,
    DEFAULT_DATASET,
    DEFAULT_MODEL,
    DIGITS_TRAIN_SIZE,
    INIT_METHODS,
    MODELS,
    dataset_classes,
)

TRAIN_INITS = INIT_METHODS + ("dense",)   # dense: the unfactored network (no rank)
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
WD_MODES = ("standard", "frobenius")
AMP_MODES = ("none", "bf16", "fp16")
DEVICE_PATTERN = r"auto|cpu|cuda|cuda:[0-9]+"
LAYER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
_SAME = object()


class FieldError(ValueError):
    """A value a user gave (or left to a recipe) that cannot train; `field` names it, the message says what is allowed."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class TrainField:
    name: str
    type: Any                              # int, float, bool, str or list[str]; `| None` when None is allowed
    default: Any
    doc: str
    choices: tuple[str, ...] | None = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    pattern: str | None = None             # a string value must match it (fullmatch) ...
    pattern_text: str | None = None        # ... which this says in words
    max_items: int | None = None           # lists
    resolved: bool = False                 # None = from the recipe; never None once resolved
    service: bool = True                   # False: core only (not in job specs)
    service_default: Any = _SAME           # the service's own default / allowed values, where it differs
    service_choices: tuple[str, ...] | None = None
    service_le: float | None = None

    @property
    def base_type(self) -> Any:
        """The type without its `| None`."""
        args = typing.get_args(self.type)
        return next(a for a in args if a is not type(None)) if type(None) in args else self.type

    @property
    def optional(self) -> bool:
        """None is a valid value after resolution."""
        return not self.resolved and self.default is None

    def for_service(self) -> TrainField:
        """This field as the service's job spec has it (service_default / service_choices / service_le applied)."""
        return dataclasses.replace(
            self, default=self.default if self.service_default is _SAME else self.service_default,
            choices=self.service_choices or self.choices, pattern=None if self.service_choices else self.pattern,
            le=self.service_le if self.service_le is not None else self.le)

    def bounds_text(self) -> str:
        low = f"[{self.ge}" if self.ge is not None else f"({self.gt}" if self.gt is not None else None
        high = f"{self.le}]" if self.le is not None else f"{self.lt})" if self.lt is not None else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return (">= " if low[0] == "[" else "> ") + low[1:]
        return ("<= " if high[-1] == "]" else "< ") + high[:-1] if high else ""


F = TrainField
_RECIPE = "default: the recipe's"
FIELDS: tuple[TrainField, ...] = (
    F("model", str, DEFAULT_MODEL, "network to train", choices=MODELS),
    F("dataset", str, DEFAULT_DATASET, "training data", choices=DATASETS),
    F("recipe", str | None, None, "named training defaults (`lowrank recipes`); default: the data set's",
      choices=tuple(recipes.RECIPES), resolved=True),
    F("num_classes", int | None, None, "classes (default: the data set's; synthetic: 10)", ge=1, le=100_000),
    F("image_size", int | None, None, "image side in px (default: the recipe's, else the data set's)",
      ge=8, le=1024, resolved=True),
    F("small_input", bool | None, None, "3x3 stride-1 stem without max-pool (default: images <= 64 px)",
      resolved=True),
    F("include", list[str] | None, None, "dotted layer names to factor (default: all but stem/classifier)",
      max_items=1000),
    F("exclude", list[str] | None, None, "dotted layer names to keep dense", max_items=1000),
    F("rank", int | None, None, "rank of every factored layer (one of rank / rank_ratio unless init=dense)", ge=1),
    F("rank_ratio", float | None, None, "rank as a fraction of min(out, in*kh*kw)", gt=0, le=1),
    F("init", str, "nkp", "factor initialization; dense = the unfactored network", choices=TRAIN_INITS),
    F("latency_aware", bool, False, "keep dense every layer whose factored form is not measured faster on the "
      "training device (core/latency.py); the report lists them with both times"),
    F("latency_batch", int, 1, "latency_aware: the batch size each layer pair is timed at", ge=1, le=4096),
    F("epochs", int | None, None, f"training epochs ({_RECIPE})", ge=1, resolved=True),
    F("batch_size", int | None, None, f"images per step per process ({_RECIPE})", ge=1, le=65536, resolved=True),
    F("lr", float | None, None, f"peak learning rate, after warm-up ({_RECIPE})", gt=0, resolved=True),
    F("optimizer", str | None, None, f"optimizer ({_RECIPE})", choices=OPTIMIZERS, resolved=True),
    F("momentum", float | None, None, f"SGD momentum, AdamW beta1 ({_RECIPE})", ge=0, lt=1, resolved=True),
    F("nesterov", bool | None, None, f"Nesterov momentum, SGD only ({_RECIPE})", resolved=True),
    F("weight_decay", float | None, None, f"weight decay ({_RECIPE})", ge=0, le=1, resolved=True),
    F("wd_mode", str, "standard", "standard, or frobenius: decay ||U V||_F^2 of factored layers", choices=WD_MODES),
    F("schedule", str | None, None, f"lr schedule after warm-up ({_RECIPE})", choices=SCHEDULES, resolved=True),
    F("step_size", int | None, None, "step schedule: epochs between decays (default: the recipe's, else 30)",
      ge=1, resolved=True),
    F("step_gamma", float | None, None, "step schedule: decay factor (default: the recipe's, else 0.1)",
      gt=0, le=1, resolved=True),
    F("warmup_epochs", float | None, None, f"linear warm-up in epochs, fractions allowed ({_RECIPE})",
      ge=0, le=1000, resolved=True),
    F("label_smoothing", float | None, None, f"label smoothing of the training loss ({_RECIPE})", ge=0, lt=1,
      resolved=True),
    F("amp", str, "none", "mixed precision (CUDA only)", choices=AMP_MODES),
    F("channels_last", bool, False, "channels-last memory format (CUDA only)"),
    F("device", str, "auto", "where to train: auto (cuda when present), cpu, cuda or cuda:N",
      pattern=DEVICE_PATTERN, pattern_text="auto, cpu, cuda or cuda:N",
      service_default="cpu", service_choices=("cpu", "cuda")),
    F("devices", int, 1, "processes (GPUs) for DistributedDataParallel", ge=1, service_le=8),
    F("seed", int, 0, "seeds all randomness of the run", ge=0, le=2**63 - 1),
    F("num_workers", int, 0, "DataLoader worker processes", ge=0, le=64),
    F("data_root", str, "data", "where imagefolder / cifar data lives (service: imagefolder only, a folder "
      "under LOWRANK_DATA_ROOTS)", service_default=None),
    F("download", bool, False, "cifar: fetch when missing (never otherwise)", service=False),
    F("synthetic_train_size", int, 1024, "synthetic: training images", ge=1, le=10_000_000),
    F("synthetic_val_size", int, 256, "synthetic: validation images", ge=1, le=10_000_000),
    F("max_train_batches", int | None, None, "cap on steps per epoch (smoke runs, benchmarks)", ge=1),
    F("max_val_batches", int | None, None, "cap on validation batches", ge=1),
    F("log_every", int, 50, "optimizer steps between step-level metrics (train_loss_step, lr)", ge=1),
)
BY_NAME = {f.name: f for f in FIELDS}
# The job spec's training fields: FIELDS with the service's narrowing applied, core-only ones left out.
SERVICE_FIELDS = tuple(f.for_service() for f in FIELDS if f.service)
RESOLVED_FIELDS = tuple(f.name for f in FIELDS if f.resolved)


# The training fields a compress run's fine-tuning takes as overrides (its `finetune` mapping). The others come
# from the compress run itself (model, data set, image size, seed, device, max_val_batches) or have their own
# name there (epochs: finetune_epochs).
FINETUNE_FIELDS = ("recipe", "batch_size", "lr", "optimizer", "momentum", "nesterov", "weight_decay", "wd_mode",
                   "schedule", "step_size", "step_gamma", "warmup_epochs", "label_smoothing", "amp", "channels_last",
                   "num_workers", "max_train_batches", "log_every")


def finetune_error(exc: FieldError) -> FieldError:
    """A training field's error as the compress run's: `lr ...` -> `finetune.lr ...`, `epochs` -> `finetune_epochs`
    (also where a rule names the epochs: `warmup_epochs must be <= finetune_epochs (1)`)."""
    field = "finetune_epochs" if exc.field == "epochs" else f"finetune.{exc.field}" \
        if exc.field in FINETUNE_FIELDS else exc.field
    text = str(exc)
    if field != exc.field:
        text = field + text[len(exc.field):] if text.startswith(exc.field) else f"{field}: {text}"
    return FieldError(field, text.replace(" <= epochs (", " <= finetune_epochs ("))


def check_finetune(values: Any) -> None:
    """Each override of a compress run's `finetune` mapping, before the recipe fills the rest: known field, type,
    choices, bounds (None: the recipe's value, where the recipe gives one). FieldError naming `finetune.<field>`;
    the rules across fields are checked once the whole training config is resolved (core.compress_run)."""
    import difflib

    if not isinstance(values, dict):
        raise FieldError("finetune", f"finetune must be a mapping of training fields ({', '.join(FINETUNE_FIELDS)}), "
                                     f"got {type(values).__name__}")
    for name, value in values.items():
        if name not in FINETUNE_FIELDS:
            close = difflib.get_close_matches(str(name), FINETUNE_FIELDS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            why = ("not an override: fine-tuning lasts finetune_epochs" if name == "epochs"
                   else "set by the compress run itself" if name in BY_NAME else "not a training field")
            raise FieldError(f"finetune.{name}", f"finetune.{name} is {why}{hint}; allowed: {', '.join(FINETUNE_FIELDS)}")
        f = BY_NAME[name]
        if value is None and f.resolved:
            continue  # the recipe's value
        try:
            check_field(f, value)
        except FieldError as exc:
            raise finetune_error(exc) from None


def check_type(name: str, value: Any, hint: Any) -> None:
    """`value` (not None) is of type `hint` (bool, int, float, str, list[str], or X | None): FieldError naming
    the field. The one type check of the config dataclasses (training fields, core.compress's options)."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return
        hint = next(a for a in args if a is not type(None))
    if hint == list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise FieldError(name, f"{name} must be a list of non-empty strings, got {value!r}")
    elif hint is bool and not isinstance(value, bool):
        raise FieldError(name, f"{name} must be true or false, got {value!r}")
    elif hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise FieldError(name, f"{name} must be an integer, got {value!r}")
    elif hint is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
        raise FieldError(name, f"{name} must be a finite number, got {value!r}")
    elif hint is str and not isinstance(value, str):
        raise FieldError(name, f"{name} must be a string, got {value!r}")


def check_field(f: TrainField, value: Any) -> None:
    """Type, choices, pattern and bounds of one resolved value; FieldError naming the field."""
    name = f.name
    if value is None:
        if f.optional:
            return
        raise FieldError(name, f"{name} must not be null" + (" (no recipe value: check dataset/model/recipe)"
                                                               if f.resolved else ""))
    base = f.base_type
    check_type(name, value, base)
    if base == list[str]:
        if f.max_items is not None and len(value) > f.max_items:
            raise FieldError(name, f"{name} may list at most {f.max_items} names, got {len(value)}")
        return
    if f.choices is not None and value not in f.choices:
        raise FieldError(name, f"{name} must be one of {', '.join(f.choices)}, got {value!r}")
    if f.pattern is not None and not re.fullmatch(f.pattern, value):
        raise FieldError(name, f"{name} must be {f.pattern_text}, got {value!r}")
    if base in (int, float):
        ok = ((f.ge is None or value >= f.ge) and (f.gt is None or value > f.gt)
              and (f.le is None or value <= f.le) and (f.lt is None or value < f.lt))
        if not ok:
            raise FieldError(name, f"{name} must be {f.bounds_text()}, got {value!r}")


def _from_recipe(values: dict[str, Any], name: str) -> str:
    """' (recipe R's value)' when `values[name]` is what its recipe gives, else ''."""
    recipe, model = values.get("recipe"), values.get("model")
    if recipe in recipes.RECIPES and model in MODELS and recipes.recipe_values(recipe, model).get(name) == values[name]:
        return f" (the value of recipe {recipe!r})"
    return ""


def check(values: dict[str, Any]) -> FieldError | None:
    """The first rule across fields that resolved `values` break (each field already passed check_field)."""
    v = values
    unresolved = [name for name in RESOLVED_FIELDS if v.get(name) is None]
    if unresolved:
        return FieldError(unresolved[0], f"{unresolved[0]} has no value: recipe {v.get('recipe')!r} could not be "
                                         "applied (check model, dataset and recipe)")
    factored = v["rank"] is not None or v["rank_ratio"] is not None
    if v["rank"] is not None and v["rank_ratio"] is not None:
        return FieldError("rank_ratio", "give exactly one of rank or rank_ratio, not both")
    if v["init"] == "dense" and factored:
        return FieldError("init", "init='dense' trains the unfactored model: leave rank and rank_ratio out")
    if v["init"] != "dense" and not factored:
        return FieldError("init", f"init={v['init']!r} factorizes the model: give exactly one of rank or "
                                  "rank_ratio (or init='dense' for an unfactored baseline)")
    for name in ("include", "exclude"):
        if v[name] is not None and not factored:
            return FieldError(name, "include/exclude choose layers to factor: give rank or rank_ratio too")
        for layer in v[name] or []:
            if not LAYER_NAME.fullmatch(layer):
                return FieldError(name, f"{name}: {layer!r} is not a dotted layer name (e.g. layer1.0.conv1)")
    if v.get("latency_aware") and not factored:
        return FieldError("latency_aware", "latency_aware chooses which layers to factor: give rank or rank_ratio too")
    if factored:
        try:
            why = model_layers.no_op_rank_message(
                v["model"], rank=v["rank"], rank_ratio=v["rank_ratio"], include=v["include"], exclude=v["exclude"],
                num_classes=dataset_classes(v["dataset"], v["num_classes"]), small_input=v["small_input"])
        except ValueError as exc:  # an unknown include/exclude name: the message starts with the field
            return FieldError(str(exc).split(":")[0], str(exc))
        if why is not None:
            return FieldError("rank" if v["rank"] is not None else "rank_ratio", why)
    if v["nesterov"] and (v["optimizer"] != "sgd" or v["momentum"] == 0):
        return FieldError("nesterov", "nesterov needs optimizer 'sgd' with momentum > 0")
    if v["warmup_epochs"] > v["epochs"]:
        return FieldError("warmup_epochs", f"warmup_epochs must be <= epochs ({v['epochs']}), got "
                                           f"{v['warmup_epochs']!r}{_from_recipe(v, 'warmup_epochs')}")
    if v["dataset"] in ("cifar10", "cifar100") and v["image_size"] != 32:
        return FieldError("image_size", f"image_size: {v['dataset']} images are 32 px, got {v['image_size']}"
                                        f"{_from_recipe(v, 'image_size')}")
    if v["amp"] != "none" and v["device"] == "cpu":
        return FieldError("device", f"amp={v['amp']!r} needs a CUDA device; on device cpu use amp='none' "
                                    "(mixed precision is for GPUs)")
    if v["channels_last"] and v["device"] == "cpu":
        return FieldError("device", "channels_last needs a CUDA device; on device cpu set channels_last=false")
    train_size = {"digits": DIGITS_TRAIN_SIZE, "synthetic": v["synthetic_train_size"]}.get(v["dataset"])
    if train_size is not None and v["batch_size"] * v["devices"] > train_size:
        return FieldError("batch_size", f"batch_size: {v['batch_size']} x {v['devices']} process(es) exceeds the "
                                        f"{train_size} training images of {v['dataset']}"
                                        f"{_from_recipe(v, 'batch_size')}")
    return None


def validate(values: dict[str, Any], *, fields: tuple[TrainField, ...] = FIELDS) -> None:
    """check_field on every field of `fields` present in resolved `values`, then `check`; raises FieldError."""
    for f in fields:
        check_field(f, values.get(f.name))
    error = check(values)
    if error is not None:
        raise error
