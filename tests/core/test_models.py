"""The model registry, generated: every model factorized with every method at several ratios.

Cost control (two shared cores): `random` runs on every whole model at two or three ratios.
`spectral` and `nkp` need an SVD per layer, so each (model, method) pair runs at one ratio,
rotating through 0.1 / 0.25 / 0.5 over the registry (each method meets every ratio); whole
ResNet-18 and EfficientNets, and stages 1-2 of the larger ResNets (their bottleneck and
downsample shapes; stages 3-4 repeat them at larger sizes). NKP is capped at 3 MM iterations:
this test checks the surgery, shapes and gradients; NKP's convergence and quality are tested
per layer (test_methods.py, test_factorize.py, and the digits run in test_train.py).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from core.factorize import candidate_layers, factorize_model
from core.layers import FactoredConv2d, FactoredLinear, factored_modules
from core.models import MODELS, build_model, count_macs, count_params, layer_weight_matrix
from core.surgery import get_module

RATIOS = (0.1, 0.25, 0.5)
WHOLE = {"resnet18", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cases():
    for i, name in enumerate(MODELS):
        small = name in ("resnet18", "efficientnet_b0")
        for j, method in enumerate(("random", "spectral", "nkp")):
            if method == "random":
                ratios, include = (RATIOS if small else (0.1, 0.5)), None
            else:
                ratios = (RATIOS[(i + j) % 3],)
                include = None if name in WHOLE else ["layer1", "layer2"]
            for ratio in ratios:
                yield pytest.param(name, method, ratio, include, id=f"{name}-{method}-{ratio}")


@pytest.mark.parametrize("name, method, ratio, include", list(_cases()))
def test_factorized_model_trains_a_step(name, method, ratio, include):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7)
    dense_params = count_params(model)
    options = {"max_iter": 3} if method == "nkp" else None
    report = factorize_model(model, rank_ratio=ratio, method=method, include=include,
                             compare_spectral=False, approx_options=options)
    factored = report.factored()
    assert factored, "no layer was factored"
    assert report.totals["params_dense"] == dense_params
    assert report.totals["params_factored"] == count_params(model) < dense_params
    for row in factored:
        assert row.rank == max(1, round(ratio * min(row.m, row.d)))
        assert row.rank * (row.m + row.d) < row.m * row.d
        assert math.isfinite(row.error)
        # spectral and nkp never do worse than the zero matrix (error 1); random's scale is its own
        assert 0.0 <= row.error <= (1.0 + 1e-9 if method != "random" else float("inf"))
    assert_every_parameter_learns(model, num_classes=7)


def assert_every_parameter_learns(model: nn.Module, num_classes: int, batch: int = 8) -> None:
    """One training step on (batch, 3, 32, 32) noise: every parameter gets a finite gradient (never
    None), U and V of every factored layer a nonzero one, and one SGD step changes every U and V.

    batch 8: EfficientNet's stochastic depth (train mode) drops a block for a whole batch of 8 with
    probability <= 0.2^8, so no block's factors get an all-zero gradient by chance.
    """
    factors = {f"{name}.{half}": getattr(module, half).weight
               for name, module in factored_modules(model) for half in ("u", "v")}
    assert factors, "no factored layer"
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad(set_to_none=True)
    before = {name: w.detach().clone() for name, w in factors.items()}
    out = model(torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    assert out.shape == (batch, num_classes) and torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.arange(batch) % num_classes).backward()
    params = dict(model.named_parameters())
    assert [n for n, p in params.items() if p.grad is None] == []
    assert [n for n, p in params.items() if not torch.isfinite(p.grad).all()] == []
    assert [n for n, w in factors.items() if not w.grad.abs().max() > 0] == []
    opt.step()
    assert [n for n, w in factors.items() if torch.equal(w.detach(), before[n])] == []


@pytest.mark.parametrize("name", list(MODELS))
def test_every_factor_of_every_architecture_gets_a_gradient_and_moves(name):
    """Every Conv2d/Linear that can be factored is (stem and classifier too, so FactoredLinear is in
    the graph): a factor cut off the graph (a detached U or V) gets no gradient and fails here."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=5)
    names = [n for n, mod in candidate_layers(model) if getattr(mod, "groups", 1) == 1]
    report = factorize_model(model, rank_ratio=0.25, method="random", include=names, always_factor=True,
                             compare_spectral=False)
    assert len(report.factored()) == len(names)
    kinds = {type(mod) for _, mod in factored_modules(model)}
    assert kinds == {FactoredConv2d, FactoredLinear}
    assert_every_parameter_learns(model, num_classes=5)


@pytest.mark.parametrize("name, layer, rank, params", [
    ("resnet18", "layer1.0.conv1", 16, 16 * (64 + 64 * 9)),           # 3x3 64 -> 64
    ("resnet18", "layer4.1.conv2", 128, 128 * (512 + 512 * 9)),       # 3x3 512 -> 512
    ("resnet18", "layer2.0.downsample.0", 16, 16 * (128 + 64)),       # 1x1 64 -> 128, stride 2
    ("resnet50", "layer1.0.conv1", 16, 16 * (64 + 64)),               # 1x1 64 -> 64
    ("resnet50", "layer1.0.conv3", 16, 16 * (256 + 64)),              # 1x1 64 -> 256
    ("efficientnet_b0", "features.1.0.block.2.0", 4, 4 * (16 + 32)),  # 1x1 project 32 -> 16
    ("efficientnet_b0", "features.1.0.block.1.fc1", 2, 2 * (8 + 32) + 8),  # SE 32 -> 8, bias kept
])
def test_parameter_counts_by_hand(name, layer, rank, params):
    torch.manual_seed(0)
    model = build_model(name)
    report = factorize_model(model, rank_ratio=0.25, method="random", include=[layer])
    (row,) = report.factored()
    assert (row.layer, row.rank, row.params_factored) == (layer, rank, params)
    assert sum(p.numel() for p in get_module(model, layer).parameters()) == params


def test_depthwise_convs_stay_dense():
    report = factorize_model(build_model("efficientnet_b0"), rank_ratio=0.25, method="random")
    rows = {r.layer: r for r in report.layers}
    assert rows["features.1.0.block.0.0"].status == "skipped"
    assert "grouped" in rows["features.1.0.block.0.0"].reason
    assert rows["features.0.0"].reason == "stem conv" and rows["classifier.1"].reason == "classifier"


def test_small_input_stems():
    resnet = build_model("resnet18", small_input=True)
    assert resnet.conv1.kernel_size == (3, 3) and resnet.conv1.stride == (1, 1)
    assert isinstance(resnet.maxpool, nn.Identity)
    eff = build_model("efficientnet_b0", small_input=True)
    assert eff.features[0][0].stride == (1, 1)
    # 32 px in: a stride-1 stem keeps 32x32 maps into the first stage instead of 8x8
    assert count_macs(resnet, (3, 32, 32)) > 10 * count_macs(build_model("resnet18"), (3, 32, 32))
    out = resnet.eval()(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 10)


def test_macs_match_published_counts_and_shrink_by_hand():
    # torchvision's model cards: ResNet-18 1.81 GMACs ("GFLOPS"), ResNet-50 4.09, EfficientNet-B0 0.39 at 224 px
    assert count_macs(build_model("resnet18")) == pytest.approx(1.814e9, rel=2e-3)
    assert count_macs(build_model("resnet50")) == pytest.approx(4.089e9, rel=2e-3)
    assert count_macs(build_model("efficientnet_b0")) == pytest.approx(0.386e9, rel=1e-2)
    # one factored 3x3 conv on a 10x10 map (stride 1, padding 1): r*in*9*100 + out*r*100
    layer = FactoredConv2d(8, 16, 3, 4, padding=1)
    assert count_macs(layer, (8, 10, 10)) == 4 * 8 * 9 * 100 + 16 * 4 * 100


def test_registry_errors_and_layer_matrix():
    with pytest.raises(ValueError, match="model must be one of resnet18"):
        build_model("vgg16")
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
        build_model("resnet18", num_classes=0)
    W = layer_weight_matrix("resnet34", "layer3.0.conv1", seed=3)
    assert W.shape == (256, 128 * 9) and W.dtype == torch.float32
    assert torch.equal(W, layer_weight_matrix("resnet34", "layer3.0.conv1", seed=3))
    with pytest.raises(ValueError, match="layer: no submodule 'conv9'"):
        layer_weight_matrix("resnet18", "layer1.0.conv9")
    with pytest.raises(ValueError, match="is a BatchNorm2d, not a Conv2d or Linear"):
        layer_weight_matrix("resnet18", "bn1")


def test_cli_model_names_match_the_registry():
    from lowrank.cli.factorize import MODEL_NAMES

    assert tuple(MODELS) == MODEL_NAMES
