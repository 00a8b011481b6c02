"""Request body limits, enforced before a body is read: 413 naming the setting."""
from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobs.settings import Settings

UPLOAD_PATH = "/api/v1/uploads"
MULTIPART_SLACK = 1 << 20  # boundaries and part headers around the file


class _TooLarge(Exception):
    pass


class BodySizeLimit:
    """413 when a request body exceeds LOWRANK_MAX_BODY_BYTES (LOWRANK_MAX_UPLOAD_BYTES for uploads).

    Checks Content-Length up front, and counts streamed bytes for chunked bodies without one.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def _limit(self, path: str) -> tuple[int, str]:
        if path.rstrip("/") == UPLOAD_PATH:
            return self.settings.max_upload_bytes + MULTIPART_SLACK, "LOWRANK_MAX_UPLOAD_BYTES"
        return self.settings.max_body_bytes, "LOWRANK_MAX_BODY_BYTES"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = self._limit(scope["path"])
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > limit:
                    await _reject(send, limit, setting)
                    return
        seen = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    exceeded = True
                    raise _TooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                # The app turned our exception into its own error (FastAPI: 400 "error parsing the
                # body"); answer the 413 instead and drop the app's messages.
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await _reject(send, limit, setting)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            if not started:
                await _reject(send, limit, setting)


async def _reject(send: Send, limit: int, setting: str) -> None:
    body = json.dumps({"detail": f"request body is larger than {limit} bytes ({setting})",
                       "code": "too_large"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
