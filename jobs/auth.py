"""API tokens: create (shown once), list, revoke, verify. Only a token's SHA-256 is stored.

A token is `lrk_` + 43 URL-safe characters (256 random bits), so a plain SHA-256 is enough (no
slow hash needed: guessing is hopeless and the hash is a lookup key). The token's `name` is the
principal: what a token creates is owned by its name, and a name may hold several tokens (rotation).
Revoked tokens keep their row (audit: created, last used, revoked).

    record, token = create_token("alice")          # token printed once by `lowrank token create`
    verify_token(token)   -> TokenPrincipal("alice", admin=False) or None (unknown or revoked)
    revoke_tokens("alice")  # by name (every live token of that name) or by id
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import ipaddress
import re
import secrets
import uuid

from sqlalchemy import select, update

from jobs import models as m
from jobs.db import session_scope
from jobs.errors import InvalidInput, NotFound

TOKEN_PREFIX = "lrk_"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.@+\-]{1,128}$")


@functools.lru_cache(maxsize=256)
def is_loopback_host(host: str | None) -> bool:
    """True for `localhost` and loopback IPs (127.0.0.0/8, ::1, with or without a zone); False for
    everything else, 0.0.0.0 and host names included (those bind or reach other machines)."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


# last_used_at is written at most this often per token (verification is cached in the API anyway).
LAST_USED_RESOLUTION = dt.timedelta(seconds=60)


@dataclasses.dataclass(frozen=True)
class TokenRecord:
    id: str
    name: str
    admin: bool
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None

    @classmethod
    def from_row(cls, row: m.ApiToken) -> TokenRecord:
        return cls(id=str(row.id), name=row.name, admin=row.admin, created_at=row.created_at,
                   last_used_at=row.last_used_at, revoked_at=row.revoked_at)


@dataclasses.dataclass(frozen=True)
class TokenPrincipal:
    """Who a valid token speaks for."""

    name: str
    admin: bool
    token_id: str


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def looks_like_token(token: str) -> bool:
    """Cheap shape check before any database lookup."""
    return token.startswith(TOKEN_PREFIX) and 20 <= len(token) <= 200 and token.isascii()


_now = m.utcnow


def create_token(name: str, *, admin: bool = False, url: str | None = None) -> tuple[TokenRecord, str]:
    """A new token for `name`; returns (record, the token itself - never stored, shown once)."""
    if not NAME_PATTERN.fullmatch(name or ""):
        raise InvalidInput(f"token name {name!r} must be 1-128 characters of letters, digits and _ . @ + -",
                           ("name",))
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with session_scope(url) as session:
        row = m.ApiToken(id=uuid.uuid4(), name=name, token_hash=hash_token(token), admin=admin, created_at=_now())
        session.add(row)
        session.flush()
        return TokenRecord.from_row(row), token


def list_tokens(*, include_revoked: bool = True, url: str | None = None) -> list[TokenRecord]:
    with session_scope(url) as session:
        stmt = select(m.ApiToken).order_by(m.ApiToken.created_at, m.ApiToken.id)
        if not include_revoked:
            stmt = stmt.where(m.ApiToken.revoked_at.is_(None))
        return [TokenRecord.from_row(r) for r in session.scalars(stmt)]


def revoke_tokens(name_or_id: str, *, url: str | None = None) -> list[TokenRecord]:
    """Revoke the token with this id, or every live token with this name. NotFound if none matched
    (a token already revoked is reported as such, not revoked again)."""
    try:
        token_id: uuid.UUID | None = uuid.UUID(name_or_id)
    except ValueError:
        token_id = None
    now = _now()
    with session_scope(url) as session:
        if token_id is not None:
            row = session.get(m.ApiToken, token_id)
            if row is None:
                raise NotFound(f"no token with id {name_or_id}")
            if row.revoked_at is not None:
                raise NotFound(f"token {name_or_id} ({row.name}) was already revoked at {row.revoked_at:%Y-%m-%d %H:%M:%S}Z")
            rows = [row]
        else:
            rows = list(session.scalars(select(m.ApiToken).where(m.ApiToken.name == name_or_id,
                                                                 m.ApiToken.revoked_at.is_(None))))
            if not rows:
                raise NotFound(f"no live token named {name_or_id!r} (see `lowrank token list`)")
        for row in rows:
            row.revoked_at = now
        session.flush()
        return [TokenRecord.from_row(r) for r in rows]


def verify_token(token: str, *, url: str | None = None) -> TokenPrincipal | None:
    """The principal of a live token, or None (malformed, unknown or revoked). One statement: it also
    records last_used_at (at most once a minute per token)."""
    if not looks_like_token(token):
        return None
    digest = hash_token(token)
    now = _now()
    with session_scope(url) as session:
        row = session.execute(
            select(m.ApiToken.id, m.ApiToken.name, m.ApiToken.admin, m.ApiToken.last_used_at)
            .where(m.ApiToken.token_hash == digest, m.ApiToken.revoked_at.is_(None))
        ).one_or_none()
        if row is None:
            return None
        token_id, name, admin, last_used = row
        if last_used is None or now - last_used > LAST_USED_RESOLUTION:
            session.execute(update(m.ApiToken).where(m.ApiToken.id == token_id).values(last_used_at=now)
                            .execution_options(synchronize_session=False))
        return TokenPrincipal(name=name, admin=bool(admin), token_id=str(token_id))


__all__ = ["TOKEN_PREFIX", "TokenPrincipal", "TokenRecord", "create_token", "hash_token", "list_tokens",
           "looks_like_token", "revoke_tokens", "verify_token"]
