"""One source of truth: TrainConfig (core) and TrainSpec (service) have the same training fields, defaults and
allowed values (core/train_fields.py), except for the service's declared narrowing; names come from core.

Each comparison reads the finished classes (their dataclass fields, their pydantic fields and JSON
schema), not the table they are built from, so a field added to or changed in one class only fails here.
"""
from __future__ import annotations

import dataclasses
import typing

import pytest

from core import names, recipes
from core.train import TrainConfig
from core.train_fields import FIELDS, SERVICE_FIELDS
from jobs.models import MAX_JOB_DEVICES
from jobs.specs import TrainSpec

JOB_ONLY = {"kind", "name", "tags", "priority"}  # describe the job, not the training
# Everything the service declares differently (core.train_fields: service_*), and nothing else.
DECLARED = {
    "device": {"default": "cpu", "choices": ("cpu", "cuda")},       # a queue: cpu or gpu workers
    "devices": {"le": MAX_JOB_DEVICES},                               # the gpu<N> queues that exist
    "data_root": {"default": None},                                   # imagefolder only, under LOWRANK_DATA_ROOTS
}
CORE_ONLY = {"download"}                                              # workers never download


def core_view() -> dict[str, dict]:
    """name -> {default, choices} of TrainConfig as built (choices: from its validation of a bad value)."""
    out = {}
    for f in dataclasses.fields(TrainConfig):
        out[f.name] = {"default": f.default}
    return out


def service_view() -> dict[str, dict]:
    """name -> {default, choices, ge, gt, le, lt} of TrainSpec as the API sees it (its JSON schema)."""
    schema = TrainSpec.model_json_schema()["properties"]
    out = {}
    for name, info in TrainSpec.model_fields.items():
        if name in JOB_ONLY:
            continue
        prop = schema[name]
        options = prop.get("anyOf", [prop])
        choices = next((tuple(o["enum"]) for o in options if "enum" in o), None)
        bounds = {}
        for o in options:
            bounds.update({b: o[k] for b, k in (("ge", "minimum"), ("gt", "exclusiveMinimum"), ("le", "maximum"),
                                                ("lt", "exclusiveMaximum")) if k in o})
        out[name] = {"default": info.default, "choices": choices, **bounds}
    return out


def table_view(fields, *, service: bool) -> dict[str, dict]:
    out = {}
    for f in fields:
        entry = {"default": f.default}
        if service:
            entry["choices"] = f.choices
            entry.update({b: getattr(f, b) for b in ("ge", "gt", "le", "lt") if getattr(f, b) is not None})
        out[f.name] = entry
    return out


def test_the_two_classes_have_the_same_training_fields():
    core, service = set(core_view()), set(service_view())
    assert core - service == CORE_ONLY, "a field in TrainConfig only: add it to core/train_fields.py"
    assert service - core == set(), "a field in TrainSpec only: add it to core/train_fields.py"
    assert [f.name for f in dataclasses.fields(TrainConfig)] == [f.name for f in FIELDS]


def test_defaults_agree_but_for_the_declared_service_differences():
    core, service = core_view(), service_view()
    for name in service:
        want = DECLARED.get(name, {}).get("default", core[name]["default"])
        assert service[name]["default"] == want, f"{name}: TrainSpec default {service[name]['default']!r}, " \
                                                 f"TrainConfig default {core[name]['default']!r}"


def test_allowed_values_and_bounds_agree_but_for_the_declared_differences():
    service = service_view()
    core_table = table_view(FIELDS, service=True)
    for name, got in service.items():
        want = {**core_table[name], **DECLARED.get(name, {})}
        want.pop("default")
        got = {k: v for k, v in got.items() if k != "default" and v is not None}
        if name == "data_root":  # the API's own path check replaces core's free text
            continue
        assert got == {k: v for k, v in want.items() if v is not None}, name
    assert table_view(SERVICE_FIELDS, service=False) == {n: {"default": service[n]["default"]} for n in service}


def test_core_validation_uses_the_same_allowed_values():
    """A value outside a field's choices is refused by both, naming the field."""
    import pydantic

    for f in FIELDS:
        if not f.choices or not f.service:
            continue
        with pytest.raises(ValueError, match=f"{f.name} must be one of {', '.join(f.choices)}"):
            TrainConfig.from_dict({"init": "dense", f.name: "no-such-value"})
        with pytest.raises(pydantic.ValidationError) as info:
            TrainSpec.model_validate({"init": "dense", f.name: "no-such-value"})
        assert info.value.errors()[0]["loc"] == (f.name,)


def test_a_resolved_spec_is_a_valid_config_and_back():
    """The worker passes the stored spec to core unchanged: the same resolved values on both sides."""
    from worker.runners import train_config_dict

    spec = TrainSpec.model_validate({"model": "resnet18", "dataset": "digits", "rank_ratio": 0.25})
    config = TrainConfig.from_dict(train_config_dict(spec))
    dumped = spec.model_dump()
    for key, value in config.to_dict().items():
        if key in CORE_ONLY or key in DECLARED:
            continue
        assert dumped[key] == value, key


def test_names_come_from_core_registries():
    from core.approx import METHODS
    from core.data import DATASETS
    from core.factorize import INIT_METHODS
    from core.models import MODELS
    from lowrank.cli.approx import METHODS as CLI_METHODS
    from lowrank.cli.factorize import METHOD_NAMES, MODEL_NAMES

    assert tuple(MODELS) == names.MODELS == MODEL_NAMES
    assert DATASETS == names.DATASETS
    assert METHODS == names.APPROX_METHODS == CLI_METHODS
    assert INIT_METHODS == names.INIT_METHODS == METHOD_NAMES
    assert typing.get_args(TrainSpec.model_fields["model"].annotation) == names.MODELS
    assert set(recipes.DEFAULT_RECIPE) == set(names.DATASETS)
