"""The shell commands in README.md's ```sh blocks, as argv lists: what the README tests run.

Used by tests/test_readme.py (the local commands) and tests/service/test_readme_submit.py (the
service ones), so editing the README's examples changes what they run. A line may hold several
commands separated by ` ; `; `#` starts a comment; a trailing backslash continues the line.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def readme_commands(text: str | None = None) -> list[list[str]]:
    """Every command of every ```sh block of the README, in order, as shlex-split argv lists."""
    text = README.read_text() if text is None else text
    commands = []
    for block in re.findall(r"^```sh\n(.*?)^```", text, flags=re.S | re.M):
        joined = re.sub(r"\\\n", " ", block)
        for line in joined.splitlines():
            for part in line.split(" ; "):
                argv = shlex.split(part, comments=True)
                if argv:
                    commands.append(argv)
    return commands


def find(prefix: list[str], text: str | None = None) -> list[str]:
    """The one README command that starts with `prefix` (e.g. ["lowrank", "train"]); AssertionError if not one."""
    found = [argv for argv in readme_commands(text) if argv[:len(prefix)] == prefix]
    assert len(found) == 1, f"README.md should show exactly one `{' '.join(prefix)} ...` command, found {found}"
    return found[0]
