"""Model surgery: find and replace submodules by dotted name (`layer1.0.conv1`, `features.3.0`)."""
from __future__ import annotations

from torch import nn


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at dotted `name` ("" is the model itself); KeyError naming what is missing."""
    if name == "":
        return model
    module = model
    walked: list[str] = []
    for part in name.split("."):
        children = module._modules
        if part not in children or children[part] is None:
            where = ".".join(walked) or "<model>"
            raise KeyError(f"no submodule {part!r} under {where} (looking up {name!r}); "
                           f"children there: {', '.join(k for k in children) or 'none'}")
        module = children[part]
        walked.append(part)
    return module


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` at dotted `name` inside `model` and return the module it replaced."""
    if name == "":
        raise ValueError("cannot replace the model itself; name a submodule")
    parent_name, _, child = name.rpartition(".")
    parent = get_module(model, parent_name)
    old = get_module(parent, child)
    # setattr registers the module under the same key, so Sequential order and state_dict keys hold.
    setattr(parent, child, new)
    return old
