"""Lint is part of the suite: `ruff check .` with the configuration in pyproject.toml ([tool.ruff]) must find
nothing, so `make test` (and CI) fails on a lint violation, listing each one."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_finds_no_violations() -> None:
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"ruff check . found violations (fix them, or justify a noqa):\n{out.stdout}{out.stderr}"
