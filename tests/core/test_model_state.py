"""The torch-free state_dict table (core/model_state.py) against the real models and core.source: the API refuses
an upload that does not fit its architecture with it, so it must say what loading the file in the worker says."""
from __future__ import annotations

import json

import pytest
import torch

from core import model_state
from core.models import build_model
from core.names import MODELS
from core.source import SourceError, check_state_dict


def test_the_stored_table_is_what_the_models_give():
    """Regenerate from core.models; a changed model (or torchvision) must regenerate the file:
    `python -m core.model_state --write`."""
    stored = json.loads(model_state.TABLE_PATH.read_text())
    assert stored == model_state.build_table()
    assert model_state.TABLE_PATH.read_text() == model_state.dumps_table(stored)
    assert list(stored) == list(MODELS)


@pytest.mark.parametrize("name, num_classes, small_input", [
    ("resnet18", 10, False), ("resnet18", 3, True), ("resnet50", 1000, False), ("efficientnet_b0", 100, True),
    ("efficientnet_b3", 7, False)])
def test_expected_shapes_are_the_models_state_dict(name, num_classes, small_input):
    torch.manual_seed(0)
    real = build_model(name, num_classes=num_classes, small_input=small_input).state_dict()
    assert model_state.expected_shapes(name, num_classes=num_classes, small_input=small_input) == {
        k: tuple(v.shape) for k, v in real.items()}
    shapes = {k: tuple(v.shape) for k, v in real.items()}
    assert model_state.infer_num_classes(name, shapes) == num_classes
    # a ResNet's stem says its input size; an EfficientNet's stem differs in stride only (not visible)
    assert model_state.infer_small_input(name, shapes) == (small_input if name.startswith("resnet") else None)


def _problems_like_core(model, state: dict[str, torch.Tensor]) -> tuple[str, str]:
    """(core.source's message, the torch-free check's problems) for `state` against `model`."""
    with pytest.raises(SourceError) as exc:
        check_state_dict(model, state, "the model")
    torch_free = model_state.state_problems({k: tuple(v.shape) for k, v in model.state_dict().items()},
                                            {k: tuple(v.shape) for k, v in state.items()})
    return str(exc.value), "; ".join(torch_free)


def test_state_problems_say_what_core_source_says():
    torch.manual_seed(0)
    net = build_model("resnet18", num_classes=10)
    good = net.state_dict()
    assert model_state.state_problems({k: tuple(v.shape) for k, v in good.items()},
                                      {k: tuple(v.shape) for k, v in good.items() if "num_batches" not in k}) == []
    cases = [
        {**good, "fc.weight": torch.zeros(7, 512), "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)},  # 2 mismatched
        {k: v for k, v in good.items() if not k.startswith("layer4")},                                   # missing
        {**good, "extra.weight": torch.zeros(3)},                                                        # unexpected
    ]
    for state in cases:
        core_message, torch_free = _problems_like_core(net, state)
        assert torch_free and core_message == f"source: the weights do not fit the model: {torch_free}"
    # the first mismatched key is the first in the model's order, with both shapes
    _, text = _problems_like_core(net, cases[0])
    assert text.startswith("first mismatched key 'layer1.0.conv1.weight': file has shape (64, 64, 1, 1), the model "
                           "expects (64, 64, 3, 3) (2 mismatched in all)")


def test_a_data_parallel_prefix_is_stripped_only_when_every_key_has_it():
    assert model_state.strip_dp_prefix({"module.a": 1, "module.b": 2}) == ({"a": 1, "b": 2}, True)
    assert model_state.strip_dp_prefix({"module.a": 1, "b": 2}) == ({"module.a": 1, "b": 2}, False)
