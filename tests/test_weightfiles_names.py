"""An upload lists its tensors by name and shape without torch (jobs/weightfiles.py, jobs/ptcheck.py): a .pt's
state_dict read from its pickle, replayed inertly, says what torch.load(weights_only=True) gives, and what
core.source would load (a train checkpoint's or a wrapper's state_dict)."""
from __future__ import annotations

import collections

import pytest
import torch

from core.models import build_model
from jobs import weightfiles

LIMITS = weightfiles.Limits(max_elements=1 << 26, max_bytes=1 << 30)


def listing(path, fmt="pt"):
    found = weightfiles.inspect_weights(path, fmt, LIMITS)
    return None if found is None else {k: (list(a.shape), a.dtype) for k, a in found.items()}


def test_a_state_dict_pt_lists_what_torch_loads(tmp_path):
    torch.manual_seed(0)
    state = build_model("resnet18", num_classes=10).state_dict()
    state["fc.bias"] = state["fc.bias"].to(torch.float64)
    state["bn1.weight"] = torch.nn.Parameter(state["bn1.weight"].to(torch.bfloat16))
    torch.save(state, tmp_path / "sd.pt")
    loaded = torch.load(tmp_path / "sd.pt", weights_only=True)
    dtype_name = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bf16", torch.int64: "int64"}
    assert listing(tmp_path / "sd.pt") == {k: (list(v.shape), dtype_name[v.dtype]) for k, v in loaded.items()}
    assert list(listing(tmp_path / "sd.pt")) == list(loaded)  # in the file's order


def test_wrapped_state_dicts_are_listed_as_core_source_reads_them(tmp_path):
    w = torch.zeros(4, 3)
    cases = {
        "checkpoint": ({"format": 1, "config": {"model": "resnet18"}, "model": {"fc.weight": w},
                        "optimizer": {"state": {0: {"momentum_buffer": torch.zeros(5)}}}},
                       {"fc.weight": ([4, 3], "float32")}),
        "wrapper": ({"state_dict": collections.OrderedDict(a=w), "epoch": 7}, {"a": ([4, 3], "float32")}),
        "nested": ({"a": {"b": w}, "c": torch.zeros(2, dtype=torch.int64)},
                   {"a.b": ([4, 3], "float32"), "c": ([2], "int64")}),
        "one_tensor": (w, None),
        "no_tensors": ({"epoch": 3}, None),
    }
    for name, (obj, want) in cases.items():
        torch.save(obj, tmp_path / f"{name}.pt")
        assert listing(tmp_path / f"{name}.pt") == want, name


def test_code_in_a_pickle_is_still_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("true",))

    torch.save({"w": torch.zeros(2, 2), "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(weightfiles.WeightsFileError, match="global (posix|os).system is not allowed"):
        listing(tmp_path / "evil.pt")
