"""What follows a layer: its BatchNorm (folded) and activation (MATH.md Section 8, "Setting").

In eval mode a `conv -> BN -> a` block computes `a(D W x + c)` on each input patch `x`, with

    D = diag(gamma / sqrt(running_var + eps)),   c = beta - D running_mean + D b

(`b` the conv's own bias, if any). A layer with no BN after it has `D = 1`, `c = b`. The block
structure is read off a `torch.fx` trace of the model: a layer's BN is the only consumer of its
output, and its activation the only consumer of the BN's (or the layer's) output. Anything else
(a residual add, two consumers) counts as no activation (`none`): the block output is then the
affine `D W x + c`, as MATH.md's folding defines it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["ACTIVATIONS", "BlockContext", "block_contexts", "fold_bn", "block_output"]

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu, "silu": F.silu, "relu6": F.relu6, "hardswish": F.hardswish, "gelu": F.gelu,
    "sigmoid": torch.sigmoid, "none": lambda z: z,
}
_MODULE_ACTS = {nn.ReLU: "relu", nn.SiLU: "silu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish",
                nn.GELU: "gelu", nn.Sigmoid: "sigmoid"}
_FUNCTION_ACTS = {torch.relu: "relu", F.relu: "relu", F.silu: "silu", F.relu6: "relu6",
                  F.hardswish: "hardswish", F.gelu: "gelu", torch.sigmoid: "sigmoid"}
_METHOD_ACTS = {"relu": "relu", "sigmoid": "sigmoid"}


@dataclass
class BlockContext:
    """The block around one layer: `bn` the dotted name of its BatchNorm (None: none follows it),
    `activation` a key of ACTIVATIONS, `note` why the context is what it is when it is not obvious."""

    layer: str
    bn: str | None = None
    activation: str = "none"
    note: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _activation_of(node, gm: nn.Module) -> str | None:
    if node.op == "call_module":
        return _MODULE_ACTS.get(type(gm.get_submodule(node.target)))
    if node.op == "call_function":
        return _FUNCTION_ACTS.get(node.target)
    if node.op == "call_method":
        return _METHOD_ACTS.get(node.target)
    return None


def _usable_bn(module: nn.Module) -> bool:
    # Without running statistics BN uses batch statistics even in eval mode: no fixed affine map.
    return isinstance(module, _BatchNorm) and module.track_running_stats and module.running_mean is not None


def block_contexts(model: nn.Module, names: list[str]) -> dict[str, BlockContext]:
    """`{layer name: BlockContext}` for the named Conv2d/Linear layers of `model`.

    When the model cannot be traced by torch.fx every layer gets the plain context (no BN, no
    activation) with a note saying so; the caller reports it.
    """
    import torch.fx

    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - dynamic control flow etc.: report, do not guess
        note = f"no block context: torch.fx could not trace the model ({type(exc).__name__})"
        return {n: BlockContext(layer=n, note=note) for n in names}
    wanted = set(names)
    out: dict[str, BlockContext] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in wanted:
            continue
        ctx = BlockContext(layer=node.target)
        if node.target in out:
            ctx.note = "layer is called more than once; the first call's context is used"
            out[node.target].note = ctx.note
            continue
        head = node
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and _usable_bn(gm.get_submodule(users[0].target)):
            ctx.bn = users[0].target
            head = users[0]
        users = list(head.users)
        act = _activation_of(users[0], gm) if len(users) == 1 else None
        if act is not None:
            ctx.activation = act
        elif len(users) != 1:
            ctx.note = f"output feeds {len(users)} nodes: the block ends at the {'BN' if ctx.bn else 'layer'}"
        out[node.target] = ctx
    for n in names:
        out.setdefault(n, BlockContext(layer=n, note="layer not called in a traced forward pass"))
    return out


@torch.no_grad()
def fold_bn(layer: nn.Conv2d | nn.Linear, bn: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(D, c)`, each `(m,)` float64 on the layer's device: the block's pre-activation is `D * (W x) + c`.

    D = gamma / sqrt(running_var + eps), c = beta - D * running_mean + D * b (eval-mode BN of
    `layer`'s m outputs); with bn None, D = 1 and c = b (or 0).
    """
    w = layer.weight
    m = w.shape[0]
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros(m, dtype=torch.float64, device=w.device)
    if bn is None:
        return torch.ones(m, dtype=torch.float64, device=w.device), bias
    if not _usable_bn(bn) or bn.num_features != m:
        raise ValueError(f"cannot fold {type(bn).__name__}: it must have running statistics and {m} features")
    D = (bn.running_var.double() + bn.eps).rsqrt()
    if bn.affine:
        D = D * bn.weight.detach().double()
    c = -D * bn.running_mean.double() + D * bias
    if bn.affine:
        c = c + bn.bias.detach().double()
    return D, c


def block_output(z: torch.Tensor, D: torch.Tensor, c: torch.Tensor, activation: str) -> torch.Tensor:
    """`a(D z + c)` for pre-BN outputs `z` (n, m) without the layer's bias; D, c `(m,)`; z's dtype."""
    return ACTIVATIONS[activation](z * D.to(z.dtype) + c.to(z.dtype))
