"""Domain errors raised by the store; the API maps each to one HTTP status in one handler.

The store never knows HTTP: `status_code` is a hint the single exception handler in api/ reads,
so adding an error class here is the only change a new kind of failure needs.
"""
from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """Base of every error the store raises on purpose. `message` is shown to the user as is."""

    status_code = 400
    code = "error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class NotFound(DomainError):
    """The named job / sweep / upload / artifact does not exist (HTTP 404)."""

    status_code = 404
    code = "not_found"


class Conflict(DomainError):
    """The request conflicts with stored state, e.g. an idempotency key reused with another spec (409)."""

    status_code = 409
    code = "conflict"


class InvalidState(DomainError):
    """The action is not allowed in the object's current status, e.g. cancel a finished job (409)."""

    status_code = 409
    code = "invalid_state"


class InvalidInput(DomainError):
    """Input that passed the schema but fails a check against stored data (422).

    `loc` is the field path, in the same form as pydantic's (e.g. ("weights", "upload_id")).
    """

    status_code = 422
    code = "invalid_input"

    def __init__(self, message: str, loc: tuple[str | int, ...] = (), **details: Any) -> None:
        super().__init__(message, **details)
        self.loc = loc


class TooLarge(DomainError):
    """A body or file over its configured limit (413); the message names the limit setting."""

    status_code = 413
    code = "too_large"


class QuotaExceeded(DomainError):
    """The caller is over a per-owner quota (429; jobs/quotas.py); the message names the limit and its
    setting. `retry_after_s` is set where waiting helps (queued jobs start and leave the count)."""

    status_code = 429
    code = "quota_exceeded"

    def __init__(self, message: str, *, retry_after_s: int | None = None, **details: Any) -> None:
        super().__init__(message, **details)
        self.retry_after_s = retry_after_s


class Forbidden(DomainError):
    """The caller may not act on this object (403): not its owner and not an admin."""

    status_code = 403
    code = "forbidden"


class Unauthorized(DomainError):
    """No valid API token (401)."""

    status_code = 401
    code = "unauthorized"


def did_you_mean(word: str, choices: list[str] | tuple[str, ...] | set[str]) -> str:
    """'; did you mean 'x'?' naming the choice closest to a mistyped `word`, or '' when none is close."""
    import difflib

    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _server_folders() -> list[tuple[str, str]]:
    """(absolute folder, label) pairs a user-facing message must not show, longest first."""
    import sys
    import sysconfig
    from pathlib import Path

    from jobs.settings import get_settings

    settings = get_settings()
    folders = [(str(settings.artifacts), "<artifacts>"), (str(settings.home), "<lowrank home>")]
    folders += [(str(root), "<data root>") for root in settings.data_roots]
    python = {sys.prefix, sys.base_prefix, sys.exec_prefix, *sysconfig.get_paths().values()}
    folders += [(p, "<python>") for p in python if p and p != "/"]
    folders.append((str(Path(__file__).resolve().parents[1]), "<lowrank code>"))
    return sorted(folders, key=lambda f: len(f[0]), reverse=True)


def redact_paths(text: str) -> str:
    """`text` with the server's folders replaced by labels: the artifact root (`<artifacts>/uploads/x.npz`),
    LOWRANK_HOME, the data roots, Python's install folders (site-packages, the standard library) and the
    code's folder. For what users see of a job's failure (worker/tasks.py:error_text)."""
    import re

    for folder, label in _server_folders():
        text = re.sub(re.escape(folder) + r"(?=[/\s:'\",)\]]|$)", label, text)
    return text
