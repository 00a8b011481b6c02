"""One source of truth for compression: CompressOptions / CompressConfig (core) and CompressSpec (the service's
compress job) have the fields, defaults and allowed values of core/compress_fields.py, except for the service's
declared narrowing; a fine-tune's training fields are core.train_fields' and take the recipe's values.

Each comparison reads the finished classes (their dataclass fields, the pydantic model's JSON schema), not the
table they are checked with, so a field added to or changed in one class only fails here.
"""
from __future__ import annotations

import dataclasses
import uuid

import pydantic
import pytest

from core import compress_fields, recipes
from core.allocation import STRATEGIES
from core.compress import REFINE_MODES, CompressOptions
from core.compress_run import CompressConfig
from core.layer_compress import DATA_METHODS, METHODS
from core.names import ALLOCATIONS, COMPRESS_DATA_METHODS, COMPRESS_METHODS
from jobs.specs import CompressSpec, parse_spec

JOB_ONLY = {"kind", "name", "tags", "priority", "source", "finetune"}
CORE_ONLY = {"source", "model", "num_classes", "small_input"}  # a job names a job or an upload instead
DECLARED = {  # the service's narrowing (core.compress_fields: service_*), and nothing else
    "device": {"default": "cpu", "choices": ("cpu", "cuda")},
    "data_root": {"default": None},
    "rank_step": {"le": 4096}, "refine_steps": {"le": 100_000}, "refine_patches": {"le": 1 << 20},
    "positions_per_image": {"le": 4096}, "max_group_mb": {"le": 65536}, "calib_images": {"le": 1_000_000},
    "heldout_images": {"le": 1_000_000},
}
# The fine-tune's training-field overrides: a mapping (core.train_fields' table checks each entry).
FINETUNE_CONFIG = {"finetune"}
SOURCE = {"job": str(uuid.uuid4())}


def core_defaults() -> dict:
    return {f.name: f.default for f in dataclasses.fields(CompressConfig) if f.name not in FINETUNE_CONFIG}


def service_view() -> dict[str, dict]:
    schema = CompressSpec.model_json_schema()["properties"]
    out = {}
    for name, info in CompressSpec.model_fields.items():
        if name in JOB_ONLY:
            continue
        options = schema[name].get("anyOf", [schema[name]])
        entry = {"default": info.default, "choices": next((tuple(o["enum"]) for o in options if "enum" in o), None)}
        for o in options:
            entry.update({b: o[k] for b, k in (("ge", "minimum"), ("gt", "exclusiveMinimum"), ("le", "maximum"),
                                                ("lt", "exclusiveMaximum")) if k in o})
        out[name] = entry
    return out


def test_the_classes_have_the_tables_fields_and_defaults():
    assert [f.name for f in dataclasses.fields(CompressOptions)] == [f.name for f in compress_fields.OPTION_FIELDS]
    assert list(core_defaults()) == [f.name for f in compress_fields.FIELDS]
    assert core_defaults() == {f.name: f.default for f in compress_fields.FIELDS}
    service = service_view()
    assert set(core_defaults()) - set(service) == CORE_ONLY
    assert set(service) - set(core_defaults()) == set()


def test_service_defaults_and_bounds_differ_only_as_declared():
    core_table = {f.name: f for f in compress_fields.FIELDS}
    for name, got in service_view().items():
        f = core_table[name]
        want = {"default": f.default, "choices": f.choices,
                **{b: getattr(f, b) for b in ("ge", "gt", "le", "lt") if getattr(f, b) is not None},
                **DECLARED.get(name, {})}
        if name == "data_root":  # the API's own path check (LOWRANK_DATA_ROOTS) replaces core's free text
            continue
        assert {k: v for k, v in got.items() if v is not None} == {k: v for k, v in want.items() if v is not None}, name


def test_names_are_core_names():
    assert METHODS == COMPRESS_METHODS and DATA_METHODS == COMPRESS_DATA_METHODS
    assert STRATEGIES == ALLOCATIONS and REFINE_MODES == ("off", "independent", "sequential")


@pytest.mark.parametrize("field, value, message", [
    ("method", "svd", "method must be one of spectral, nkp, whiten, asvd, nkp-data, got 'svd'"),
    ("allocation", "best", "allocation must be one of uniform, energy, stable-rank, greedy, got 'best'"),
    ("refine", "both", "refine must be one of off, independent, sequential, got 'both'"),
    ("budget", 1.5, "budget must be in (0, 1], got 1.5"),
    ("calib_images", 0, "calib_images must be >= 1, got 0"),
    ("asvd_alpha", 2.0, "asvd_alpha must be in [0, 1], got 2.0"),
    ("include", ["layer1..conv"], "include: 'layer1..conv' is not a dotted layer name"),
])
def test_core_and_service_refuse_the_same_values_naming_the_field(field, value, message):
    base = {"budget": 0.5, field: value}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")) as core_error:
        CompressConfig.from_dict({"source": "x.pt", **base})
    assert core_error.value.field == field
    with pytest.raises(pydantic.ValidationError) as info:
        parse_spec({"kind": "compress", "source": SOURCE, **base})
    assert info.value.errors()[0]["loc"][:2] == ("compress", field)


def test_exactly_one_size_is_given():
    cases = [({}, "budget"), ({"budget": 0.3, "rank": 4}, "rank"), ({"rank": 4, "rank_ratio": 0.2}, "rank_ratio")]
    for sizes, loc in cases:
        with pytest.raises(ValueError, match="give exactly one of budget, rank, rank_ratio"):
            CompressConfig.from_dict({"source": "x.pt", **sizes})
        with pytest.raises(pydantic.ValidationError) as info:
            parse_spec({"kind": "compress", "source": SOURCE, **sizes})
        assert info.value.errors()[0]["loc"] == ("compress", loc)


def test_a_finetune_takes_the_recipes_values_and_stores_them():
    spec = parse_spec({"kind": "compress", "source": SOURCE, "budget": 0.25, "finetune_epochs": 2,
                       "finetune": {"lr": 0.005}})
    digits = recipes.recipe_values("digits", "resnet18")
    assert spec.finetune.lr == 0.005 and spec.finetune.recipe == "digits"
    for name in ("batch_size", "optimizer", "momentum", "weight_decay", "schedule", "warmup_epochs"):
        assert getattr(spec.finetune, name) == digits[name], name
    again = parse_spec(spec.model_dump(mode="json"))  # the stored spec resolves to itself
    assert again == spec
    evaluate = parse_spec({"kind": "compress", "source": SOURCE, "budget": 0.25})
    assert evaluate.finetune_epochs == 0 and evaluate.finetune is None


def test_a_recipe_per_model_family_uses_the_sources_model():
    up = {"upload": str(uuid.uuid4()), "model": "efficientnet_b0"}
    spec = parse_spec({"kind": "compress", "source": up, "budget": 0.5, "dataset": "synthetic",
                       "finetune_epochs": 6, "finetune": {"recipe": "imagenet"}})
    assert spec.finetune.lr == recipes.recipe_values("imagenet", "efficientnet_b0")["lr"] == 0.125
    spec = parse_spec({"kind": "compress", "source": {**up, "model": "resnet50"}, "budget": 0.5,
                       "dataset": "synthetic", "finetune_epochs": 6, "finetune": {"recipe": "imagenet"}})
    assert spec.finetune.lr == 0.1
    # A job source that does not name its model: a ResNet's values (the submit check refuses another family's job)
    spec = parse_spec({"kind": "compress", "source": SOURCE, "budget": 0.5, "dataset": "synthetic",
                       "finetune_epochs": 6, "finetune": {"recipe": "imagenet"}})
    assert spec.finetune.lr == 0.1 and spec.finetune.schedule == "step"


@pytest.mark.parametrize("extra, loc, message", [
    ({"finetune": {"lr": 0.1}}, ("finetune",), "give finetune_epochs >= 1, or leave finetune out"),
    ({"finetune_epochs": 1, "finetune": {"warmup_epochs": 2}}, ("finetune", "warmup_epochs"),
     "finetune.warmup_epochs must be <= finetune_epochs (1), got 2.0"),
    ({"finetune_epochs": 1, "finetune": {"optimizer": "adamw", "nesterov": True}}, ("finetune", "nesterov"),
     "finetune.nesterov needs optimizer 'sgd'"),
    ({"finetune_epochs": 1, "finetune": {"amp": "bf16"}}, ("device",), "amp='bf16' needs a CUDA device"),
    ({"finetune_epochs": 1, "finetune": {"batch_size": 2000}}, ("finetune", "batch_size"),
     "finetune.batch_size: 2000 x 1 process(es) exceeds the 1437 training images of digits"),
    ({"finetune_epochs": 1, "finetune": {"epochs": 3}}, ("finetune", "epochs"), "Extra inputs are not permitted"),
    ({"calib_images": 1400}, ("calib_images",), "calib_images + heldout_images = 1464 exceeds the 1437"),
    ({"finetune_epochs": 100_000}, ("finetune_epochs",), "finetune_epochs must be <= 1000 (LOWRANK_MAX_EPOCHS)"),
])
def test_finetune_and_calibration_rules_name_the_field(extra, loc, message):
    with pytest.raises(pydantic.ValidationError) as info:
        parse_spec({"kind": "compress", "source": SOURCE, "budget": 0.3, **extra})
    err = info.value.errors()[0]
    assert err["loc"] == ("compress", *loc) and message in err["msg"], err


def test_the_source_is_a_job_or_an_upload():
    for source in ({"jobb": 1}, "abc", {"upload": str(uuid.uuid4()), "model": "vgg"}):
        with pytest.raises(pydantic.ValidationError) as info:
            parse_spec({"kind": "compress", "source": source, "budget": 0.3})
        assert info.value.errors()[0]["loc"][:2] == ("compress", "source")
    with pytest.raises(pydantic.ValidationError, match=r'source must be \{"job"'):
        parse_spec({"kind": "compress", "source": {"jobb": 1}, "budget": 0.3})
