"""The torch-free layer table and factorization plan (core/model_layers.py) against the real models and
core.factorize.factorize_model: the API refuses a no-op rank with them, so they must say what core does."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core import model_layers
from core.factorize import factorize_model
from core.model_layers import no_op_rank_message, plan
from core.models import build_model
from core.names import MODELS


def test_the_stored_table_is_what_the_models_give():
    """Regenerate from core.models; a changed model (or torchvision) must regenerate the file:
    `python -m core.model_layers --write`."""
    stored = json.loads(model_layers.TABLE_PATH.read_text())
    assert stored == model_layers.build_table()
    assert model_layers.TABLE_PATH.read_text() == model_layers.dumps_table(stored)
    assert list(stored) == list(MODELS)


CASES = [
    # (model, options)
    ("resnet18", dict(rank_ratio=0.25)),
    ("resnet18", dict(rank_ratio=0.9)),
    ("resnet18", dict(rank=1000)),
    ("resnet18", dict(rank=200, small_input=True, include=["conv1", "layer4", "fc"], num_classes=10)),
    ("resnet18", dict(rank_ratio=0.5, exclude=["layer2", "layer3.0.conv1"])),
    ("resnet18", dict(rank=8, include=["fc"], num_classes=1000)),
    ("resnet50", dict(rank_ratio=0.1)),
    ("resnet50", dict(rank=300, include=["layer1", "layer4.2"])),
    ("resnet101", dict(rank_ratio=0.6)),
    ("resnet34", dict(rank=64, exclude=["layer1"])),
    ("efficientnet_b0", dict(rank_ratio=0.25)),
    ("efficientnet_b0", dict(rank=16, include=["features.2", "classifier"], num_classes=100)),
    ("efficientnet_b1", dict(rank_ratio=0.5, small_input=True)),
    ("efficientnet_b2", dict(rank=4)),
    ("efficientnet_b3", dict(rank_ratio=0.75, exclude=["features.7"])),
]


@pytest.mark.parametrize("model_name, options", CASES, ids=[f"{m}-{o}" for m, o in CASES])
def test_plan_matches_factorize_model(model_name, options):
    options = {"num_classes": 10, **options}
    small = options.pop("small_input", False)
    num_classes = options.pop("num_classes")
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=num_classes, small_input=small)
    report = factorize_model(model, compute_init=False, compare_spectral=False, **options)
    want = [(r.layer, r.m, r.d, r.status, r.rank if r.status == "factored" else None) for r in report.layers]
    got = [(p.name, p.m, p.d, "skipped" if p.status == "skipped" else p.status,
            p.rank if p.status == "factored" else None)
           for p in plan(model_name, num_classes=num_classes, small_input=small, **options)]
    assert got == want


def test_plan_refuses_what_factorize_model_refuses():
    with pytest.raises(ValueError, match=r"include: no Conv2d/Linear layer named 'layer9' \(nor under it\)"):
        plan("resnet18", rank=4, include=["layer9"])
    with pytest.raises(ValueError, match=r"include: features.1.0.block.0.0 is a grouped conv \(groups=32\)"):
        plan("efficientnet_b0", rank=4, include=["features.1.0.block.0.0"])


def test_no_op_rank_messages_name_the_field_and_what_works():
    msg = no_op_rank_message("resnet18", rank=1000, rank_ratio=None, num_classes=10)
    # largest useful rank over resnet18's layers: layer4's 512 x 4608 convs, floor((512*4608 - 1) / 5120) = 460
    assert msg.startswith("rank 1000 factorizes no layer of resnet18 (every layer would keep its full size")
    assert msg.endswith("the largest rank that factorizes a layer here is 460 (layer4.0.conv2, 512 x 4608)")
    factor = build_model("resnet18")
    assert factorize_model(factor, rank=461, compute_init=False).totals["layers_factored"] == 0
    assert factorize_model(build_model("resnet18"), rank=460, compute_init=False).totals["layers_factored"] > 0
    msg = no_op_rank_message("resnet18", rank=None, rank_ratio=0.9, include=["layer1"], num_classes=10)
    # 64 x 576: largest rank floor((36864 - 1) / 640) = 57, ratio 57 / 64 = 0.891
    assert msg.startswith("rank_ratio 0.9 factorizes no layer of the included layers of resnet18")
    assert "use a rank_ratio <= 0.891" in msg
    assert no_op_rank_message("resnet18", rank=None, rank_ratio=0.25, num_classes=10) is None
    assert no_op_rank_message("resnet18", rank=460, rank_ratio=None, num_classes=10) is None
    # the classifier of an imagefolder run (class count unknown until the data is read) is given the benefit
    assert no_op_rank_message("resnet18", rank=8, rank_ratio=None, include=["fc"], num_classes=None) is None


def test_the_service_modules_do_not_import_torch():
    """jobs/specs.py (the API) imports these: each alone must leave torch unloaded; core/__init__ stays empty."""
    mods = ["core.names", "core.recipes", "core.train_fields", "core.model_layers", "core.guards", "core.paired",
            "core.compress_fields", "core.model_state"]
    code = ("import sys, importlib; [importlib.import_module(m) for m in sys.argv[1:]]; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'numpy')))")
    out = subprocess.run([sys.executable, "-c", code, *mods], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert model_layers.__file__ and Path(model_layers.__file__).with_name("__init__.py").read_text() == ""
