"""What every benchmark's table states (the machine, the versions, the date), and where results go.

`write_result(name, markdown, data=None)` writes `<RESULTS>/<name>.md` and, next to it,
`<RESULTS>/<name>.json`: the run's metadata (date, mode, environment line), every markdown table
of the report parsed into rows (keyed by its section heading), and `data`, the module's own
machine-readable numbers when it passes them. bench/summary.py composes docs/results/README.md
from these JSON files, so the summary's numbers always come from a run, never from typing.

RESULTS is where results go: docs/results/ by default; `python -m bench --out DIR` points it
(and the RESULTS name of each benchmark module it runs) at DIR. Modules should refer to
`common.RESULTS` or their own module-level `RESULTS` at call time, not copy it elsewhere.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
from importlib import metadata
from pathlib import Path
from typing import Any

DEFAULT_RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
RESULTS = Path(os.environ["LOWRANK_BENCH_OUT"]).resolve() if os.environ.get("LOWRANK_BENCH_OUT") else DEFAULT_RESULTS
MODE: str | None = None  # "quick" | "full" while `python -m bench` runs; recorded in each JSON


def set_results_dir(path: str | os.PathLike[str]) -> Path:
    """Point RESULTS (here and for subprocesses, via LOWRANK_BENCH_OUT) at `path`; returns it."""
    global RESULTS
    RESULTS = Path(path).resolve()
    os.environ["LOWRANK_BENCH_OUT"] = str(RESULTS)
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS


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
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
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
    try:  # a shared machine: how busy it was when the table was written (1, 5, 15 min averages)
        load = "; load average " + " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = ""
    return (
        f"*Measured {_dt.datetime.now(_dt.UTC):%Y-%m-%d %H:%M UTC} on {cpu} "
        f"({os.cpu_count()} cores), device {device}; Python {platform.python_version()}, {versions}{load}.*\n"
    )


_HEADER_RE = re.compile(r"^\*Measured (.+?) on .*\*$", re.M)


def parse_tables(markdown: str) -> list[dict[str, Any]]:
    """Every pipe table of a markdown text: [{"section": last heading above it, "columns": [...],
    "rows": [{column: cell text}]}]. Cells stay text (with their units); bench/summary.py reads numbers."""
    tables: list[dict[str, Any]] = []
    section = ""
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        if (line.startswith("|") and i + 1 < len(lines)
                and re.fullmatch(r"\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?", lines[i + 1].strip())):
            columns = [c.strip() for c in line.strip("|").split("|")]
            rows = []
            i += 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                rows.append(dict(zip(columns, cells)))
                i += 1
            tables.append({"section": section, "columns": columns, "rows": rows})
            continue
        i += 1
    return tables


def write_result(name: str, markdown: str, data: dict[str, Any] | None = None) -> Path:
    """Write <RESULTS>/<name>.md (header + body) and <RESULTS>/<name>.json; return the .md path.

    `data` (optional, JSON-serializable): the module's own numbers, e.g. {"p99_ms": 41.0, ...};
    bench/summary.py prefers them to the parsed tables."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    header = _HEADER_RE.search(markdown)
    meta = {
        "name": name,
        "markdown": path.name,
        "written_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "measured": header.group(1) if header else None,
        "mode": MODE,
        "data": data,
        "tables": parse_tables(markdown),
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
    return path


PY_LOOP_N = 10_000_000


def python_loop_seconds(n: int = PY_LOOP_N) -> float:
    """Seconds one pure-Python loop of `n` integer additions takes here (best of 3): the machine's
    single-core speed for interpreter-bound work, so runs on different days (or VMs) can be told
    apart from code changes. An idle modern x86 core: about 0.4-0.6 s."""
    import time

    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        s = 0
        for i in range(n):
            s += i
        best = min(best, time.perf_counter() - t0)
    return best


def process_group_cpu_s(pgid: int) -> float:
    """User + system CPU seconds of every live process in process group `pgid` (from /proc): the
    API's own cost, whatever else runs on the machine. NaN where /proc is absent."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    try:
        pids = [d for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return float("nan")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[2]) == pgid:  # fields after "(comm)": state ppid pgrp ... utime(11) stime(12)
            total += int(fields[11]) + int(fields[12])
    return total / tick


def cpu_busy_fraction(seconds: float = 2.0) -> float:
    """Fraction of all CPUs' time spent busy (not idle or waiting on I/O) over the next `seconds`,
    from /proc/stat: whether other work shares the machine right now, unlike the 1-minute load
    average, which still remembers the previous benchmark for a minute. NaN where /proc is absent."""
    import time

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except OSError:
        return float("nan")
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)
