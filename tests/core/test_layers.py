"""Factored layers: exact at full rank, parameter counts, factor views and Frobenius decay."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from core.layers import FactoredConv2d, FactoredLinear, factor_parameters, frobenius_penalty
from core.surgery import get_module, replace_module


def _full_rank_factors(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact U (m, k), V (k, d) with U V = W, k = min(m, d), from the SVD (float64 then float32)."""
    A, S, Bh = torch.linalg.svd(W.double(), full_matrices=False)
    return (A * S.sqrt()).float(), (S.sqrt()[:, None] * Bh).float()


@pytest.mark.parametrize("kwargs", [
    dict(in_channels=5, out_channels=7, kernel_size=3, stride=1, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 1), stride=2, padding=(2, 0), dilation=2, bias=False),
    dict(in_channels=3, out_channels=8, kernel_size=1, stride=1, padding=0),
    dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect"),
])
def test_factored_conv_at_full_rank_computes_the_same_function(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(**kwargs)
    if conv.bias is not None:
        nn.init.normal_(conv.bias)  # a non-zero bias must be carried over
    U, V = _full_rank_factors(conv.weight.detach().reshape(conv.out_channels, -1))
    layer = FactoredConv2d.from_conv(conv, U, V)
    x = torch.randn(2, conv.in_channels, 11, 9)
    torch.testing.assert_close(layer(x), conv(x), atol=1e-5, rtol=1e-5)
    # stride/padding/dilation live on the k x k half, the 1x1 half carries the bias
    assert layer.v.stride == conv.stride and layer.v.padding == conv.padding and layer.v.dilation == conv.dilation
    assert layer.v.bias is None and (layer.u.bias is not None) == (conv.bias is not None)
    assert layer.u.kernel_size == (1, 1)
    torch.testing.assert_close(layer.dense_weight(), conv.weight.detach(), atol=1e-5, rtol=1e-5)


def test_factored_linear_at_full_rank_computes_the_same_function():
    torch.manual_seed(1)
    lin = nn.Linear(12, 5)
    U, V = _full_rank_factors(lin.weight.detach())
    layer = FactoredLinear.from_linear(lin, U, V)
    x = torch.randn(4, 12)
    torch.testing.assert_close(layer(x), lin(x), atol=1e-5, rtol=1e-5)
    assert layer.v.bias is None and torch.equal(layer.u.bias, lin.bias)


def test_parameter_counts_by_hand():
    # conv 64 -> 128, 3x3, rank 16: V is 16 x (64*9), U is 128 x 16, plus the bias of 128
    conv = FactoredConv2d(64, 128, 3, 16, padding=1)
    assert sum(p.numel() for p in conv.parameters()) == 16 * 576 + 128 * 16 + 128 == 11392
    lin = FactoredLinear(512, 10, 4, bias=False)
    assert sum(p.numel() for p in lin.parameters()) == 4 * 512 + 10 * 4 == 2088


def test_low_rank_layer_applies_u_times_v():
    torch.manual_seed(2)
    conv = nn.Conv2d(6, 9, 3, padding=1)
    U, V = torch.randn(9, 2), torch.randn(2, 54)
    layer = FactoredConv2d.from_conv(conv, U, V)
    x = torch.randn(1, 6, 5, 5)
    want = nn.functional.conv2d(x, (U @ V).reshape(9, 6, 3, 3), conv.bias, padding=1)
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
    Uv, Vv = layer.factors()
    assert Uv.shape == (9, 2) and Vv.shape == (2, 54)
    assert Uv.data_ptr() == layer.u.weight.data_ptr() and Vv.data_ptr() == layer.v.weight.data_ptr()


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_gradients_of_u_and_v_are_the_chain_rule_through_w(kind):
    """L(U V): dL/dU = G V^T and dL/dV = U^T G, G = dL/dW of the dense layer with W = U V. A factor
    detached from the graph (in forward) gets no gradient; one used twice or transposed a wrong one."""
    torch.manual_seed(4)
    if kind == "conv":
        dense = nn.Conv2d(5, 7, 3, padding=1, stride=2)
        x = torch.randn(3, 5, 9, 9)
    else:
        dense = nn.Linear(10, 6)
        x = torch.randn(4, 10)
    U, V = torch.randn(dense.weight.shape[0], 3), torch.randn(3, dense.weight[0].numel())
    layer = (FactoredConv2d.from_conv(dense, U, V) if kind == "conv" else FactoredLinear.from_linear(dense, U, V))
    with torch.no_grad():
        dense.weight.copy_((U @ V).reshape(dense.weight.shape))
    target = torch.randn_like(dense(x))
    ((dense(x) - target) ** 2).sum().backward()
    ((layer(x) - target) ** 2).sum().backward()
    G = dense.weight.grad.reshape(U.shape[0], -1)
    Ug, Vg = layer.u.weight.grad, layer.v.weight.grad
    assert Ug is not None and Vg is not None
    torch.testing.assert_close(Ug.reshape(U.shape), G @ V.T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(Vg.reshape(V.shape), U.T @ G, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.u.bias.grad, dense.bias.grad, rtol=1e-4, atol=1e-4)


def test_frobenius_penalty_and_its_gradient():
    torch.manual_seed(3)
    model = nn.Sequential(FactoredConv2d(3, 8, 3, 2), nn.ReLU(), nn.Flatten(), FactoredLinear(8, 4, 3))
    want = sum((m.u.weight.flatten(1) @ m.v.weight.flatten(1)).pow(2).sum()
               for m in (model[0], model[3]))
    penalty = frobenius_penalty(model)
    torch.testing.assert_close(penalty, want)
    penalty.backward()
    # d/dU ||U V||_F^2 = 2 (U V) V^T
    U, V = model[3].u.weight.detach(), model[3].v.weight.detach()
    torch.testing.assert_close(model[3].u.weight.grad, 2 * (U @ V) @ V.T)
    assert len(factor_parameters(model)) == 4
    assert float(frobenius_penalty(nn.Linear(2, 2))) == 0.0


def test_bad_factors_and_grouped_convs_are_rejected():
    conv = nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="grouped"):
        FactoredConv2d.from_conv(conv, torch.zeros(4, 1), torch.zeros(1, 18))
    with pytest.raises(ValueError, match="do not fit"):
        FactoredConv2d.from_conv(nn.Conv2d(4, 4, 3), torch.zeros(4, 2), torch.zeros(2, 35))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        FactoredLinear(3, 3, 0)


def test_surgery_replaces_by_dotted_name():
    model = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 4)))
    new = nn.Linear(3, 4)
    old = replace_module(model, "1.1", new)
    assert isinstance(old, nn.Linear) and get_module(model, "1.1") is new
    assert list(dict(model.named_parameters())) == ["0.weight", "0.bias", "1.1.weight", "1.1.bias"]
    with pytest.raises(KeyError, match="no submodule 'x'"):
        get_module(model, "1.x")
    with pytest.raises(ValueError, match="cannot replace the model itself"):
        replace_module(model, "", new)
