"""factorize_model: which layers, which rank, the report, full-rank exactness, NKP vs spectral."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from core.approx import approximate
from core.factorize import FactorizeError, factorize_model, fresh_init_weight, layer_seed, resolve_rank
from core.layers import FactoredConv2d, FactoredLinear
from core.models import build_model, layer_weight_matrix
from core.surgery import get_module

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TinyNet(nn.Module):
    """stem conv, a 3x3 conv, a depthwise conv, a 1x1 conv, two linears (the last is the classifier)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU(),
                                  nn.Conv2d(32, 64, 1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 48), nn.ReLU(),
                                  nn.Linear(48, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(torch.relu(self.stem(x))))


def _rows(report):
    return {row.layer: row for row in report.layers}


def test_default_choice_of_layers_and_ranks():
    torch.manual_seed(0)
    net = TinyNet()
    report = factorize_model(net, rank_ratio=0.25, method="spectral")
    rows = _rows(report)
    assert rows["stem"].status == "skipped" and rows["stem"].reason == "stem conv"
    assert rows["head.4"].status == "skipped" and rows["head.4"].reason == "classifier"
    assert rows["body.2"].status == "skipped" and "grouped" in rows["body.2"].reason
    # body.0: 32 x (16*9=144), r = round(0.25*32) = 8: 8*(32+144) = 1408 < 4608 -> factored
    assert rows["body.0"].status == "factored" and rows["body.0"].rank == 8
    assert rows["body.0"].params_factored == 8 * (32 + 144) + 32  # plus the kept bias
    # body.4: 64 x 32 (1x1), r = 8: 8*96 = 768 < 2048 -> factored; head.2: 48 x 64, r = 12
    assert rows["body.4"].rank == 8 and rows["head.2"].rank == 12
    assert isinstance(get_module(net, "body.0"), FactoredConv2d)
    assert isinstance(get_module(net, "head.2"), FactoredLinear)
    assert isinstance(get_module(net, "stem"), nn.Conv2d) and isinstance(get_module(net, "head.4"), nn.Linear)
    # totals agree with the model's own parameter count and the rows
    assert report.totals["params_factored"] == sum(p.numel() for p in net.parameters())
    saved = sum(r.params_dense - r.params_factored for r in report.layers)
    assert report.totals["params_dense"] - report.totals["params_factored"] == saved
    assert report.totals["layers_factored"] == 3
    json.dumps(report.to_dict())
    out = net(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_layer_left_full_rank_when_factoring_would_not_shrink_it():
    torch.manual_seed(0)
    net = TinyNet()
    # head.2 is 48 x 64: r = round(0.75*48) = 36, 36*(48+64) = 4032 >= 3072 -> stays dense
    report = factorize_model(net, rank_ratio=0.75, method="spectral")
    row = _rows(report)["head.2"]
    assert row.status == "full_rank" and row.params_factored == row.params_dense
    assert isinstance(get_module(net, "head.2"), nn.Linear)
    # an int rank above min(m, d) is clipped, then the layer stays dense for the same reason
    assert resolve_rank(48, 64, rank=1000, rank_ratio=None) == 48
    assert resolve_rank(48, 64, rank=None, rank_ratio=0.001) == 1


def test_include_and_exclude_by_dotted_name():
    torch.manual_seed(0)
    net = TinyNet()
    report = factorize_model(net, rank=4, method="random", include=["stem", "head"])
    rows = _rows(report)
    # explicitly included: the stem and the classifier are factored too; body is not included
    assert {r.layer for r in report.factored()} == {"stem", "head.2", "head.4"}
    assert rows["body.0"].reason == "not included"
    net = TinyNet()
    report = factorize_model(net, rank=4, method="random", exclude=["body.4"])
    assert {r.layer for r in report.factored()} == {"body.0", "head.2"}
    assert _rows(report)["body.4"].reason == "excluded"


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=4, include=["body.9"]), "include: no Conv2d/Linear layer named 'body.9'"),
    (dict(rank=4, exclude=["nope"]), "exclude: no Conv2d/Linear layer named 'nope'"),
    (dict(rank=4, include=["body.2"]), "grouped conv"),
    (dict(rank=4, include="body.0"), "list of dotted layer names"),
    (dict(rank=4, rank_ratio=0.5), "exactly one of rank"),
    (dict(), "exactly one of rank"),
    (dict(rank=0), "rank must be an integer >= 1"),
    (dict(rank_ratio=1.5), r"rank_ratio must be in \(0, 1\]"),
    (dict(rank=2, method="svd"), "method must be one of spectral, rescale, nkp, random"),
])
def test_bad_requests_name_the_field(kwargs, message):
    with pytest.raises(FactorizeError, match=message):
        factorize_model(TinyNet(), **kwargs)


def test_full_rank_factorization_reproduces_resnet18_outputs():
    torch.manual_seed(0)
    dense = build_model("resnet18").eval()
    factored = copy.deepcopy(dense)
    # stages 1-3 (layer4's 512 x 4608 SVDs cost seconds and test nothing new here)
    report = factorize_model(factored, rank=10**6, method="spectral", weights="current",
                             always_factor=True, compare_spectral=False, exclude=["layer4"])
    assert report.totals["layers_factored"] == 14  # 3x3 and 1x1 convs of stages 1-3
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(factored(x), dense(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["nkp", "rescale"])
def test_full_rank_function_methods_are_exact_too(method):
    torch.manual_seed(0)
    dense = TinyNet()
    factored = copy.deepcopy(dense)
    factorize_model(factored, rank=10**6, method=method, weights="current", always_factor=True,
                    include=["body", "head.2"])
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(factored(x), dense(x), atol=1e-5, rtol=1e-5)


def test_factors_are_the_approximation_of_the_seeded_fresh_init():
    torch.manual_seed(0)
    net = build_model("resnet18")
    state = torch.get_rng_state()
    report = factorize_model(net, rank_ratio=0.25, method="nkp", seed=7, include=["layer2.0.conv1"])
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    row = report.layers[[r.layer for r in report.layers].index("layer2.0.conv1")]
    # the same matrix layer_weight_matrix serves (approx jobs on a model layer use it)
    W = layer_weight_matrix("resnet18", "layer2.0.conv1", seed=7)
    assert W.shape == (128, 64 * 9) and row.rank == 32
    want = approximate(W, 32, "nkp", seed=layer_seed(7, "layer2.0.conv1"))
    layer = get_module(net, "layer2.0.conv1")
    torch.testing.assert_close(layer.dense_weight().reshape(128, -1), want.U @ want.V, atol=1e-6, rtol=1e-5)
    assert row.error == pytest.approx(want.error, rel=1e-9)
    assert row.spectral_error == pytest.approx(approximate(W, 32, "spectral").error, rel=1e-9)
    assert row.error < row.spectral_error
    # a different seed gives a different init; the same seed the same one
    assert not torch.equal(W, layer_weight_matrix("resnet18", "layer2.0.conv1", seed=8))
    assert torch.equal(W, fresh_init_weight(nn.Conv2d(64, 128, 3, 2, 1, bias=False), "layer2.0.conv1", 7))


def test_nkp_error_never_above_spectral_on_every_layer():
    torch.manual_seed(0)
    report = factorize_model(build_model("efficientnet_b0"), rank_ratio=0.1, method="nkp")
    rows = report.factored()
    assert len(rows) > 30
    for row in rows:
        assert row.error <= row.spectral_error + 1e-9, row.layer
    assert report.totals["mean_error"] < report.totals["mean_spectral_error"]


def test_current_weights_mode_approximates_what_the_model_holds():
    torch.manual_seed(0)
    net = TinyNet()
    W = net.body[0].weight.detach().reshape(32, -1).clone()
    factorize_model(net, rank=32, method="spectral", weights="current", always_factor=True, include=["body.0"])
    torch.testing.assert_close(net.body[0].dense_weight().reshape(32, -1), W, atol=1e-5, rtol=1e-5)
