"""Model registry (torchvision ResNets and EfficientNets, never pretrained) and MAC counting.

Variants are data: `MODELS` maps a name to its torchvision constructor. `build_model` gives a
freshly initialized network (global RNG: seed it first) with `num_classes` outputs; with
`small_input=True` the stem suits 32 px images (ResNet: 3x3 stride-1 conv, no max-pool;
EfficientNet: the first conv at stride 1).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision
from torch import nn

from core import names
from core.factorize import fresh_init_weight
from core.surgery import get_module

# The names live in core.names (torch-free, read by the service and the CLI); each is torchvision's constructor.
MODELS: dict[str, Callable[..., nn.Module]] = {name: getattr(torchvision.models, name) for name in names.MODELS}


def build_model(name: str, num_classes: int = 10, small_input: bool = False) -> nn.Module:
    """A freshly initialized `name` with `num_classes` outputs; input `(N, 3, H, W)` float images."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {name!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    model = MODELS[name](weights=None, num_classes=num_classes)  # weights=None: never downloads
    if small_input:
        if name.startswith("resnet"):
            model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        else:
            stem = model.features[0][0]
            stem.stride = (1, 1)  # same weight shape, so its init is unchanged
    return model


def layer_weight_matrix(model_name: str, layer: str, seed: int = 0, *, num_classes: int = 10,
                        small_input: bool = False) -> torch.Tensor:
    """The `(out, in*kh*kw)` float32 matrix of layer `layer`'s fresh init in `model_name`.

    The same matrix `factorize_model(..., seed=seed)` approximates for that layer (core/factorize.py).
    """
    model = build_model(model_name, num_classes=num_classes, small_input=small_input)
    try:
        module = get_module(model, layer)
    except KeyError as exc:
        raise ValueError(f"layer: {exc.args[0]}") from None
    if type(module) not in (nn.Conv2d, nn.Linear):
        raise ValueError(f"layer: {layer!r} of {model_name} is a {type(module).__name__}, "
                         "not a Conv2d or Linear")
    return fresh_init_weight(module, layer, seed)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224)) -> int:
    """Multiply-accumulates of one forward pass on one `input_size` image, over Conv2d and Linear.

    Counted with forward hooks (conv: output elements * in/groups * kh * kw; linear: output
    elements * in_features). BatchNorm, activations and pooling are not counted.
    """
    total = 0

    def conv_hook(mod: nn.Conv2d, inp, out) -> None:
        nonlocal total
        kh, kw = mod.kernel_size
        total += out.numel() * (mod.in_channels // mod.groups) * kh * kw

    def linear_hook(mod: nn.Linear, inp, out) -> None:
        nonlocal total
        total += out.numel() * mod.in_features

    handles = []
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            handles.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()  # BatchNorm needs no batch statistics; one image suffices
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        model(torch.zeros(1, *input_size, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return int(total)
