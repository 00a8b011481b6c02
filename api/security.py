"""Bearer-token authentication for the API: an ASGI middleware in front of every route.

When is auth on? With LOWRANK_AUTH=required, and ALWAYS for a request that arrived on a
non-loopback local address (the socket's own address, `scope["server"]`): an API that binds
0.0.0.0 with LOWRANK_AUTH=off still demands tokens from everything that does not come in over
127.0.0.1/::1. (A unix socket or an unknown server address counts as non-loopback.) `lowrank api`
and `lowrank up` refuse to bind a non-loopback address with auth off in the first place.

What it protects: every path under /api/ (whatever router serves it, sweeps and uploads included)
and /metrics need `Authorization: Bearer <token>`; otherwise 401 with `WWW-Authenticate: Bearer`
(RFC 6750). Open: /healthz, /readyz, the OpenAPI docs and the dashboard's page shells and static
files (they hold no data: their JavaScript reads /api/v1 with the viewer's token). Rule for new
routes: anything that returns stored data lives under /api/. The principal lands in `scope["state"]["principal"]`,
which api.deps.get_principal hands to the routes (owner of what is created; owner/admin rule).

Verification is cached per process for `LOWRANK_AUTH_CACHE_S` seconds (Settings.auth_cache_s, default 5), both valid and
unknown tokens, so a busy client costs one database lookup per window, not one per request; a
revocation takes effect within that window.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import anyio.to_thread
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from api.deps import ANONYMOUS, Principal
from jobs import auth
from jobs.settings import Settings

log = logging.getLogger("api.security")

PROTECTED_PREFIX = "/api/"
PROTECTED_PATHS = frozenset({"/metrics", "/api"})
CACHE_MAX = 10_000
_CHALLENGE = b'Bearer realm="lowrank"'
is_loopback_host = auth.is_loopback_host


def is_protected(path: str) -> bool:
    return path.startswith(PROTECTED_PREFIX) or path.rstrip("/") in PROTECTED_PATHS


def auth_required(settings: Settings, scope: Scope) -> bool:
    """True when this request must carry a valid token."""
    if settings.auth == "required":
        return True
    server = scope.get("server")
    return not is_loopback_host(server[0] if server else None)


class TokenCache:
    """token hash -> (principal or None, expiry); bounded, thread-safe, per process."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[Principal | None, float]] = {}

    def get(self, key: str) -> tuple[bool, Principal | None]:
        entry = self._entries.get(key)
        if entry is None or entry[1] < time.monotonic():
            return False, None
        return True, entry[0]

    def put(self, key: str, principal: Principal | None) -> None:
        if self.ttl_s <= 0:
            return
        with self._lock:
            if len(self._entries) >= CACHE_MAX:
                self._entries.clear()
            self._entries[key] = (principal, time.monotonic() + self.ttl_s)


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            text = value.decode("latin-1").strip()  # latin-1 decodes any bytes
            scheme, _, credentials = text.partition(" ")
            if scheme.lower() != "bearer":
                return None
            return credentials.strip() or None
    return None


class BearerAuth:
    """Pure ASGI middleware (no per-request task or body wrapping: POST /api/v1/jobs stays fast)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.cache = TokenCache(settings.auth_cache_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        required = auth_required(self.settings, scope)
        state["auth_required"] = required
        if not required:
            state["principal"] = ANONYMOUS
            await self.app(scope, receive, send)
            return
        if not is_protected(scope["path"]):
            # An open page: no principal (a route here asking for one gets 401 from get_principal).
            await self.app(scope, receive, send)
            return
        token = _bearer(scope)
        if token is None:
            await _unauthorized(send, "this server requires an API token: send `Authorization: Bearer <token>` "
                                      "(create one with `lowrank token create NAME`)", error=None)
            return
        principal = await self.verify(token)
        if principal is None:
            await _unauthorized(send, "the API token is invalid or revoked", error="invalid_token")
            return
        state["principal"] = principal
        await self.app(scope, receive, send)

    async def verify(self, token: str) -> Principal | None:
        if not auth.looks_like_token(token):
            return None
        key = auth.hash_token(token)
        hit, principal = self.cache.get(key)
        if hit:
            return principal
        found = await anyio.to_thread.run_sync(auth.verify_token, token)
        principal = Principal(name=found.name, admin=found.admin) if found else None
        self.cache.put(key, principal)
        return principal


async def _unauthorized(send: Send, detail: str, error: str | None) -> None:
    body = json.dumps({"detail": detail, "code": "unauthorized"}).encode()
    challenge = _CHALLENGE + (f', error="{error}"'.encode() if error else b"")
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"www-authenticate", challenge)]})
    await send({"type": "http.response.body", "body": body})


def _document(app: FastAPI) -> None:
    """OpenAPI: a Bearer security scheme on every protected operation, and its 401 response."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {})
        components.setdefault("securitySchemes", {})["bearer"] = {
            "type": "http", "scheme": "bearer",
            "description": "`lowrank token create NAME`; required with LOWRANK_AUTH=required or a non-loopback bind"}
        error_ref = {"$ref": "#/components/schemas/ErrorPublic"} if "ErrorPublic" in components.get("schemas", {}) \
            else {"type": "object"}
        for path, ops in schema.get("paths", {}).items():
            if not is_protected(path):
                continue
            for op in ops.values():
                if not isinstance(op, dict) or "responses" not in op:
                    continue
                op["security"] = [{"bearer": []}]
                op["responses"].setdefault("401", {
                    "description": "missing, invalid or revoked API token",
                    "content": {"application/json": {"schema": error_ref}}})
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_security(app: FastAPI, settings: Settings) -> None:
    """Add the middleware (outermost, so an unauthenticated request is refused before its body is read)."""
    app.add_middleware(BearerAuth, settings=settings)
    _document(app)
