"""BN folding and block contexts (core/blocks.py), calibration patches, grouped second moments,
BN re-estimation and calibration subsets (core/calibration.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from core.blocks import block_contexts, block_output, fold_bn
from core.calibration import (
    MomentAccumulator,
    PatchAccumulator,
    calibration_subsets,
    layer_patches,
    moment_bytes,
    reestimate_bn,
    run_grouped_passes,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _trained_bn(bn: nn.BatchNorm2d | nn.BatchNorm1d, seed: int) -> nn.Module:
    """A BN with non-trivial running statistics and affine parameters (as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.normal_(generator=g)
        bn.running_var.uniform_(0.1, 3.0, generator=g)
        bn.weight.uniform_(-1.5, 2.0, generator=g)  # negative gammas flip the activation's side
        bn.bias.normal_(generator=g)
    return bn.eval()


@pytest.mark.parametrize("act,kw", [("relu", dict(padding=1)), ("silu", dict(padding=2, stride=2, dilation=2)),
                                    ("none", dict(padding=0, stride=1))])
def test_folded_bn_block_equals_the_original_block(act, kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, 3, bias=True, **kw)
    bn = _trained_bn(nn.BatchNorm2d(7, eps=1e-3), seed=1)
    a = {"relu": nn.ReLU(), "silu": nn.SiLU(), "none": nn.Identity()}[act]
    block = nn.Sequential(conv, bn, a).eval()
    x = torch.randn(3, 5, 11, 11)
    with torch.no_grad():
        expected = block(x)  # (N, 7, Ho, Wo)
        D, c = fold_bn(conv, bn)
        X, P = layer_patches(conv, x, None)  # every position
        z = X.double() @ conv.weight.reshape(7, -1).double().T  # W x, without the conv's bias
        got = block_output(z, D, c, act)
    Ho, Wo = expected.shape[-2:]
    assert Ho * Wo == P
    got = got.reshape(3, Ho, Wo, 7).permute(0, 3, 1, 2)
    assert torch.allclose(got.float(), expected, atol=1e-5)


def test_fold_without_bn_keeps_the_bias_and_linear_layers_fold_too():
    torch.manual_seed(2)
    lin = nn.Linear(6, 4)
    bn = _trained_bn(nn.BatchNorm1d(4), seed=3)
    x = torch.randn(10, 6)
    with torch.no_grad():
        D, c = fold_bn(lin, bn)
        assert torch.allclose(block_output(x.double() @ lin.weight.double().T, D, c, "relu").float(),
                              torch.relu(bn(lin(x))), atol=1e-5)
        D0, c0 = fold_bn(lin, None)
        assert torch.equal(D0, torch.ones(4, dtype=torch.float64)) and torch.allclose(c0.float(), lin.bias)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_sampled_patches_are_rows_of_the_full_unfold(padding_mode):
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2, padding_mode=padding_mode)
    x = torch.randn(2, 3, 9, 9)
    full, P = layer_patches(conv, x, None)
    sub, P2 = layer_patches(conv, x, 5, torch.Generator().manual_seed(0))
    assert P == P2 == 25 and full.shape == (2 * 25, 27) and sub.shape == (2 * 5, 27)
    for row in sub:  # every sampled patch is one of the image's patches
        assert (full - row).abs().sum(1).min() < 1e-6
    with torch.no_grad():  # and the conv's output is W x + b on the patches
        out = conv(x).permute(0, 2, 3, 1).reshape(-1, 4)
        assert torch.allclose(full @ conv.weight.reshape(4, -1).T + conv.bias, out, atol=1e-5)
    lin = nn.Linear(8, 3)
    X, P = layer_patches(lin, torch.randn(4, 6, 8), 2, torch.Generator().manual_seed(1))
    assert P == 6 and X.shape == (8, 8)


class _Blocks(nn.Module):
    """conv-BN-relu, conv-BN (+ residual add), an SE-like conv-silu, linear-relu, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.se = nn.Conv2d(8, 8, 1)
        self.act = nn.SiLU()
        self.fc1, self.fc = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(y)) + y
        y = self.act(self.se(y))
        return self.fc(torch.relu(self.fc1(y.mean((2, 3)))))


def test_block_contexts_follow_the_graph():
    ctx = block_contexts(_Blocks(), ["c1", "c2", "se", "fc1", "fc"])
    assert (ctx["c1"].bn, ctx["c1"].activation) == ("b1", "relu")
    assert (ctx["c2"].bn, ctx["c2"].activation) == ("b2", "none")  # a residual add follows the BN
    assert (ctx["se"].bn, ctx["se"].activation) == (None, "silu")
    assert (ctx["fc1"].bn, ctx["fc1"].activation) == (None, "relu")
    assert (ctx["fc"].bn, ctx["fc"].activation) == (None, "none")


def test_grouped_passes_bound_memory_and_give_the_same_statistics():
    torch.manual_seed(5)
    net = _Blocks().eval()
    layers = [(n, getattr(net, n)) for n in ("c1", "c2", "se", "fc1")]
    loader = DataLoader(TensorDataset(torch.randn(12, 3, 8, 8)), batch_size=4)

    def collect(max_bytes: int) -> tuple[dict, dict]:
        sigmas = {}
        facts = run_grouped_passes(net, layers, loader, lambda n, m: MomentAccumulator(m.weight[0].numel()),
                                   lambda n, acc: sigmas.__setitem__(n, acc.sigma()), max_group_bytes=max_bytes,
                                   positions_per_image=7, seed=3)
        return sigmas, facts

    one, facts_one = collect(1 << 30)
    tight = max(moment_bytes(m) for _, m in layers)  # room for the largest layer alone
    many, facts_many = collect(tight)
    assert facts_one["passes"] == 1 and facts_many["passes"] > 1
    assert facts_many["peak_group_bytes"] <= tight < facts_one["peak_group_bytes"]
    assert [n for g in facts_many["groups"] for n in g] == ["c1", "c2", "se", "fc1"]
    for n in one:  # same positions, same images: identical second moments
        assert torch.allclose(one[n], many[n], atol=1e-12)
    assert facts_one["positions"]["c1"] == {"per_image": 7, "available": 64, "patches": 12 * 7}
    assert facts_one["positions"]["fc1"]["per_image"] == 1  # a Linear after pooling: one position


def test_passes_sample_the_same_positions_in_two_networks():
    torch.manual_seed(6)
    a = _Blocks().eval()
    b = _Blocks().eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        b.c1.weight.mul_(0.5)  # only what c1 computes differs; c1's own inputs are the images
    loader = DataLoader(TensorDataset(torch.randn(6, 3, 8, 8)), batch_size=3)
    got = {}
    for key, net in (("a", a), ("b", b)):
        run_grouped_passes(net, [("c1", net.c1)], loader, lambda n, m: PatchAccumulator(100),
                           lambda n, acc, key=key: got.__setitem__(key, acc.patches()), acc_bytes=lambda m: 0,
                           positions_per_image=5, seed=9)
    assert torch.equal(got["a"], got["b"])


def test_reestimate_bn_measures_the_data():
    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    net[1].running_mean.fill_(5.0)
    images = torch.randn(16, 3, 6, 6) * 2 + 1
    used = reestimate_bn(net, DataLoader(TensorDataset(images, torch.zeros(16)), batch_size=5), "cpu")
    assert used == 15  # the last batch of one image is skipped
    with torch.no_grad():
        z = net[0](images[:15])
    assert torch.allclose(net[1].running_mean, z.mean((0, 2, 3)), atol=1e-4)
    assert not net.training and net[1].momentum == 0.1


def test_calibration_subsets_are_disjoint_seeded_and_unaugmented():
    from core.data import TensorImages

    images, labels = torch.randn(50, 3, 8, 8), torch.arange(50)
    train, val = TensorImages(images, labels, shift=2), TensorImages(images[:5], labels[:5])
    fit, held = calibration_subsets(train, val, 20, 10, seed=1)
    assert not set(fit.indices) & set(held.indices) and len(fit) == 20 and len(held) == 10
    assert calibration_subsets(train, val, 20, 10, seed=1)[0].indices == fit.indices
    assert calibration_subsets(train, val, 20, 10, seed=2)[0].indices != fit.indices
    assert torch.equal(fit[0][0], images[fit.indices[0]])  # no random shift in calibration images
    assert train.shift == 2  # the training set itself is untouched
    with pytest.raises(ValueError, match="calib_images \\+ heldout_images = 60 exceeds the 50"):
        calibration_subsets(train, val, 50, 10, seed=0)
