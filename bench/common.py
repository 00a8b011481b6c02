"""What every benchmark's table states: the machine, the versions, the date."""
from __future__ import annotations

import datetime as _dt
import os
import platform
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "absent"


def environment_header() -> str:
    """A markdown block naming the machine, the library versions and the date of the run."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((l.split(":", 1)[1].strip() for l in fh if l.startswith("model name")), cpu)
    except OSError:
        pass
    device = "cpu"
    try:
        import torch

        if torch.cuda.is_available():
            device = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    versions = ", ".join(f"{p} {_version(p)}" for p in ("torch", "numpy", "fastapi", "celery", "sqlalchemy"))
    return (
        f"*Measured {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M UTC} on {cpu} "
        f"({os.cpu_count()} cores), device {device}; Python {platform.python_version()}, {versions}.*\n"
    )


def write_result(name: str, markdown: str) -> Path:
    """Write docs/results/<name>.md (header + body) and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    return path
