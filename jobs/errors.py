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


class Forbidden(DomainError):
    """The caller may not act on this object (403): not its owner and not an admin."""

    status_code = 403
    code = "forbidden"


class Unauthorized(DomainError):
    """No valid API token (401)."""

    status_code = 401
    code = "unauthorized"


class Unavailable(DomainError):
    """A backing service (database, broker) cannot be reached right now (503)."""

    status_code = 503
    code = "unavailable"
