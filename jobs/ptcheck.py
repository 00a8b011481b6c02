"""Check an uploaded `.pt` file without torch and without running any of its pickle.

The API process never imports torch, yet it must not store a `.pt` whose pickle would run code when
loaded. This reads the zip archive torch.save writes (torch >= 1.6), and replays its `data.pkl`
with an Unpickler whose `find_class` resolves ONLY the globals torch's own `weights_only=True`
loader needs for tensors and state dicts, each to an inert stand-in (nothing of torch, os or
builtins is ever called). Any other global (os.system, builtins.eval, subprocess.Popen, ...) is a
ValueError naming it. The worker loads accepted files with torch.load(weights_only=True) again.
"""
from __future__ import annotations

import io
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

MAX_PICKLE_BYTES = 64 << 20  # data.pkl holds structure only; tensor bytes live in data/<n>

_TORCH_NAMES = re.compile(
    r"^(?:[A-Z][A-Za-z0-9]*Storage|Size|device|"
    r"(?:float|int|uint|bfloat|complex)\d*|half|double|long|short|bool|cfloat|cdouble|chalf|"
    r"float8_e4m3fn|float8_e5m2|float8_e4m3fnuz|float8_e5m2fnuz)$")
_ALLOWED = {
    "torch._utils": {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter",
                     "_rebuild_parameter_with_state"},
    "torch.serialization": {"_get_layout"},
    "collections": {"OrderedDict"},
}


class _Inert:
    """Stands in for every allowed global: calling it, or building it, records nothing and runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert(*args)

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:  # OrderedDict stand-in (SETITEMS)
        pass


class _Checker(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and _TORCH_NAMES.fullmatch(name):
            return _Inert()
        if name in _ALLOWED.get(module, ()):
            return _Inert()
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a weights file "
                                     "(torch.load weights_only=True would refuse it too)")

    def persistent_load(self, pid: Any) -> Any:
        return _Inert()


def check_torch_file(path: Path) -> None:
    """Raise ValueError unless `path` is a torch.save zip archive whose pickle uses only allowed globals."""
    if not zipfile.is_zipfile(path):
        raise ValueError("not a torch.save archive (zip format, torch >= 1.6); re-save it with torch.save, "
                         "or upload .safetensors / .npy")
    with zipfile.ZipFile(path) as z:
        pickles = [i for i in z.infolist() if i.filename.endswith("data.pkl") and i.filename.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError("not a torch.save archive (expected exactly one <name>/data.pkl)")
        info = pickles[0]
        if info.file_size > MAX_PICKLE_BYTES:
            raise ValueError(f"its data.pkl is {info.file_size} bytes (over {MAX_PICKLE_BYTES})")
        data = z.read(info)
    try:
        _Checker(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        raise ValueError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - truncated or malformed pickles
        raise ValueError(f"its pickle is malformed ({type(exc).__name__}: {exc})") from None
