"""What every reader and writer of the tables shares: the clock (also the models' column default), ids,
one row by id (or by an id prefix), the owner rule, stored file paths, keyset paging, and the database
dialect ("is this Postgres?", asked here only).

jobs/store/, jobs/sweeps/, jobs/search.py, jobs/claims.py and jobs/lease.py use these; none of them
defines its own.
"""
from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import os
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, and_, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from jobs.errors import Forbidden, InvalidInput, NotFound
from jobs.settings import get_settings

ID_PREFIX_MIN = 4  # hex digits; the dashboard and CLI show 8


def utcnow() -> dt.datetime:
    """This process's clock in UTC (hosts are expected to run NTP; staleness windows are minutes)."""
    return dt.datetime.now(dt.UTC)


def as_uuid(value: str | uuid.UUID, what: str = "job") -> uuid.UUID:
    """`value` as a UUID; NotFound naming `what` when it is not one (an id that cannot exist)."""
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise NotFound(f"{what} {value!r} not found (not a UUID)") from None


# ---------------------------------------------------------------------------------------------
# The dialect.

def is_postgres(bind: Session | Engine | Connection) -> bool:
    """True on Postgres; False on SQLite (the embedded default), the only other database supported."""
    if isinstance(bind, Session):
        bind = bind.get_bind()
    return bind.dialect.name == "postgresql"


def dialect_insert(session: Session):
    """The dialect's INSERT construct, which has `on_conflict_do_update` on both databases."""
    return postgresql.insert if is_postgres(session) else sqlite.insert


# ---------------------------------------------------------------------------------------------
# Rows by id, and who may act on them.

def get_row(session: Session, model: Any, row_id: str | uuid.UUID, what: str, *, for_update: bool = False) -> Any:
    """The `model` row with this id (a job or a sweep: `what` names it in errors); NotFound otherwise."""
    stmt = select(model).where(model.id == as_uuid(row_id, what))
    if for_update:
        stmt = stmt.with_for_update()
    row = session.scalars(stmt).one_or_none()
    if row is None:
        raise NotFound(f"{what} {row_id} not found")
    return row


def where_id_prefix(stmt: Any, model: Any, prefix: str) -> Any:
    """`stmt` limited to rows whose id starts with `prefix` (hex digits, dashes ignored, any case): a
    range on the primary key (indexed on Postgres and SQLite alike), not a LIKE over every row."""
    digits = prefix.replace("-", "").lower()
    if not ID_PREFIX_MIN <= len(digits) <= 32 or any(c not in "0123456789abcdef" for c in digits):
        raise InvalidInput(f"id_prefix must be {ID_PREFIX_MIN} to 32 hex digits (the start of an id), "
                           f"got {prefix[:40]!r}", ("query", "id_prefix"))
    low, high = uuid.UUID(digits.ljust(32, "0")), uuid.UUID(digits.ljust(32, "f"))
    return stmt.where(model.id >= low, model.id <= high)


def check_actor(row: Any, actor: str | None, admin: bool, action: str, what: str = "job") -> None:
    """Only the owner of a job or sweep, or an admin, may act on it (Forbidden)."""
    if not admin and row.owner != actor:
        raise Forbidden(f"{what} {row.id} belongs to {row.owner or 'nobody'}; only its owner or an admin may "
                        f"{action} it")


# ---------------------------------------------------------------------------------------------
# Files: paths under the artifact root are stored relative to it, so the root can move.

def rel_path(path: str | os.PathLike[str]) -> str:
    """Paths under the artifact root are stored relative to it, so the root can move."""
    p = Path(path).resolve()
    root = get_settings().artifacts
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)


def abs_path(stored: str) -> Path:
    p = Path(stored)
    return p if p.is_absolute() else get_settings().artifacts / p


# ---------------------------------------------------------------------------------------------
# Keyset paging, newest first.

def _encode_cursor(created_at: dt.datetime, row_id: uuid.UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(row_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[dt.datetime, uuid.UUID]:
    """(created_at in UTC, id) of a cursor _encode_cursor made; InvalidInput naming `cursor` for anything
    else (a client can send any text: wrong JSON types, a non-UUID, a time that overflows in UTC)."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        decoded = json.loads(raw)
        if not (isinstance(decoded, list) and len(decoded) == 2 and all(isinstance(x, str) for x in decoded)):
            raise ValueError("not [time, id]")
        when = dt.datetime.fromisoformat(decoded[0])
        if when.tzinfo is None:
            raise ValueError("naive")
        # In UTC here, as the database compares it: 0001-01-01T00:00:00+14:00 is before year 1 (OverflowError).
        return when.astimezone(dt.UTC), uuid.UUID(decoded[1])
    except (ValueError, TypeError, OverflowError, RecursionError, binascii.Error):
        raise InvalidInput("cursor is not a cursor this server returned (use next_cursor as given)",
                           ("query", "cursor")) from None


def keyset_page(session: Session, stmt: Any, model: Any, cursor: str | None, limit: int) -> tuple[list, str | None]:
    """One page of `stmt`'s rows newest first on (created_at, id) of `model`, after `cursor`: at most
    `limit` rows (1..1000) and the cursor of the next page (None on the last). One row more than
    `limit` is read to know whether a next page exists."""
    if not 1 <= limit <= 1000:
        raise InvalidInput(f"limit must be between 1 and 1000, got {limit}", ("query", "limit"))
    if cursor:
        when, last_id = _decode_cursor(cursor)
        stmt = stmt.where(or_(model.created_at < when, and_(model.created_at == when, model.id < last_id)))
    rows = list(session.scalars(stmt.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (_encode_cursor(rows[-1].created_at, rows[-1].id) if more else None)
