"""Factored (low-rank) layers: `W = U V` as two stacked layers (MATH.md Section 7, step 4).

A `Conv2d` with weight `(out, in, kh, kw)` is the layer `relu(W x)` on every input patch `x`,
with `W` the `out x (in*kh*kw)` matrix. Its factored form is

    Conv2d(in -> r, kh x kw, same stride/padding/dilation, no bias)   weight V viewed (r, in, kh, kw)
    Conv2d(r -> out, 1 x 1, with the original bias)                   weight U viewed (out, r, 1, 1)

and a `Linear(in -> out)` becomes `Linear(in -> r, no bias)` then `Linear(r -> out, bias)`.
`factors()` returns `U (out, r)` and `V (r, d)` as *views* of the two weights, so the
Frobenius decay `||U V||_F^2` (Khodak et al. 2021) differentiates straight into the parameters.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


class FactoredConv2d(nn.Module):
    """`kh x kw` conv `in -> rank` (`.v`, no bias) followed by a 1x1 conv `rank -> out` (`.u`, bias)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        rank: int,
        *,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank = int(rank)
        self.v = nn.Conv2d(in_channels, rank, kernel_size, stride=stride, padding=padding,
                           dilation=dilation, bias=False, padding_mode=padding_mode)
        self.u = nn.Conv2d(rank, out_channels, 1, bias=bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, U: torch.Tensor, V: torch.Tensor) -> FactoredConv2d:
        """Factored replacement of `conv` with `W ~ U V`; U `(out, r)`, V `(r, in*kh*kw)`; bias copied."""
        if conv.groups != 1:
            raise ValueError(f"grouped convolutions (groups={conv.groups}) cannot be factored")
        out, cin, kh, kw = conv.weight.shape
        r = U.shape[1]
        if U.shape != (out, r) or V.shape != (r, cin * kh * kw):
            raise ValueError(f"factors U{tuple(U.shape)} V{tuple(V.shape)} do not fit conv weight "
                             f"{tuple(conv.weight.shape)} (need U (out, r), V (r, in*kh*kw))")
        layer = cls(cin, out, (kh, kw), r, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode)
        layer.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            layer.v.weight.copy_(V.reshape(r, cin, kh, kw))
            layer.u.weight.copy_(U.reshape(out, r, 1, 1))
            if conv.bias is not None:
                layer.u.bias.copy_(conv.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u(self.v(x))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views `U (out, r)` and `V (r, in*kh*kw)` of the two weights (gradients flow through)."""
        return self.u.weight.flatten(1), self.v.weight.flatten(1)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent full conv weight `(out, in, kh, kw)` = `U V` reshaped."""
        U, V = self.factors()
        return (U @ V).reshape(self.u.out_channels, *self.v.weight.shape[1:])

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


class FactoredLinear(nn.Module):
    """`Linear(in -> rank, no bias)` (`.v`) followed by `Linear(rank -> out, bias)` (`.u`)."""

    def __init__(self, in_features: int, out_features: int, rank: int, *, bias: bool = True) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank = int(rank)
        self.v = nn.Linear(in_features, rank, bias=False)
        self.u = nn.Linear(rank, out_features, bias=bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, U: torch.Tensor, V: torch.Tensor) -> FactoredLinear:
        """Factored replacement of `linear` with `W ~ U V`; U `(out, r)`, V `(r, in)`; bias copied."""
        out, d = linear.weight.shape
        r = U.shape[1]
        if U.shape != (out, r) or V.shape != (r, d):
            raise ValueError(f"factors U{tuple(U.shape)} V{tuple(V.shape)} do not fit linear weight "
                             f"{tuple(linear.weight.shape)} (need U (out, r), V (r, in))")
        layer = cls(d, out, r, bias=linear.bias is not None)
        layer.to(device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            layer.v.weight.copy_(V)
            layer.u.weight.copy_(U)
            if linear.bias is not None:
                layer.u.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u(self.v(x))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`U (out, r)` and `V (r, in)`: the two weights themselves."""
        return self.u.weight, self.v.weight

    def dense_weight(self) -> torch.Tensor:
        """The equivalent full weight `(out, in)` = `U V`."""
        U, V = self.factors()
        return U @ V

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


FACTORED_TYPES = (FactoredConv2d, FactoredLinear)


def factored_modules(model: nn.Module) -> Iterator[tuple[str, FactoredConv2d | FactoredLinear]]:
    """`(dotted name, module)` for every factored layer of `model`."""
    for name, module in model.named_modules():
        if isinstance(module, FACTORED_TYPES):
            yield name, module


def factor_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The U and V weights of every factored layer (not biases): the parameters Frobenius decay covers."""
    params: list[nn.Parameter] = []
    for _, module in factored_modules(model):
        params.extend([module.u.weight, module.v.weight])
    return params


def frobenius_penalty(model: nn.Module) -> torch.Tensor:
    """`sum over factored layers of ||U V||_F^2` (a 0-d float32 tensor; 0 when none are factored).

    Computed as `trace((U^T U)(V V^T))`, two `r x r` Gram matrices, never the `m x d` product.
    """
    total: torch.Tensor | None = None
    for _, module in factored_modules(model):
        U, V = module.factors()
        U = U.float()
        V = V.float()
        term = ((U.T @ U) * (V @ V.T)).sum()  # trace(A B) = sum(A * B^T), both symmetric
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total
