"""The one place that maps errors to HTTP: domain errors by their status, outages to 503.

Routes never catch store errors; they propagate here. Validation errors keep FastAPI's shape
(`{"detail": [{"loc": [...], "msg": ..., "type": ...}]}`) so clients parse one format for 422.
"""
from __future__ import annotations

import json
import logging
from typing import Any

import pydantic
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from kombu.exceptions import OperationalError as BrokerOperationalError
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from jobs.errors import DomainError, InvalidInput

log = logging.getLogger("api")

_LOC_ROOTS = ("body", "query", "path", "header", "cookie")


def _loc(loc: tuple[str | int, ...]) -> list[str | int]:
    return list(loc) if loc and loc[0] in _LOC_ROOTS else ["body", *loc]


def _json_safe(value: Any) -> bool:
    try:
        return len(json.dumps(value, allow_nan=False)) <= 1000
    except (TypeError, ValueError):
        return False


def validation_details(errors: list[dict[str, Any]], prefix_body: bool) -> list[dict[str, Any]]:
    """FastAPI's 422 detail shape, made JSON-safe: `input` only when small and serializable (a NaN
    or a megabyte string is not echoed back), `ctx` values as strings."""
    out = []
    for e in errors:
        item: dict[str, Any] = {"loc": _loc(tuple(e["loc"])) if prefix_body else list(e["loc"]),
                                "msg": e["msg"], "type": e["type"]}
        if "input" in e and _json_safe(e["input"]):
            item["input"] = e["input"]
        if e.get("ctx"):
            item["ctx"] = {k: v if _json_safe(v) else str(v) for k, v in e["ctx"].items()}
        out.append(item)
    return out


def domain_error_response(exc: DomainError) -> JSONResponse:
    if isinstance(exc, InvalidInput):
        detail = [{"loc": _loc(exc.loc), "msg": exc.message, "type": "value_error"}]
        return JSONResponse({"detail": detail}, status_code=422)
    body = {"detail": exc.message, "code": exc.code}
    if exc.details:
        body["info"] = jsonable_encoder(exc.details)
    headers = {"WWW-Authenticate": 'Bearer realm="lowrank"'} if exc.status_code == 401 else {}
    if getattr(exc, "retry_after_s", None):
        headers["Retry-After"] = str(exc.retry_after_s)
    return JSONResponse(body, status_code=exc.status_code, headers=headers or None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain(_: Request, exc: DomainError) -> JSONResponse:
        return domain_error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Router-level errors (unknown path 404, 405) in the same shape as domain errors.
        return JSONResponse({"detail": exc.detail, "code": f"http_{exc.status_code}"},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_details(list(exc.errors()), prefix_body=False)}, status_code=422)

    @app.exception_handler(pydantic.ValidationError)
    async def _validation(_: Request, exc: pydantic.ValidationError) -> JSONResponse:
        # A spec validated inside the store (e.g. a dict built from a sweep grid point).
        return JSONResponse({"detail": validation_details(exc.errors(), prefix_body=True)}, status_code=422)

    async def _outage(_: Request, exc: Exception) -> JSONResponse:
        return outage_response(exc)

    for outage in OUTAGE_ERRORS:
        app.add_exception_handler(outage, _outage)

    @app.exception_handler(Exception)
    async def _unhandled(_: Request, exc: Exception) -> Response:
        # Starlette runs this one outermost (ServerErrorMiddleware), so it also sees what a middleware
        # raised - e.g. a token lookup (api/security.py) while Postgres is down: 503, not 500.
        if isinstance(exc, OUTAGE_ERRORS):
            return outage_response(exc)
        return PlainTextResponse("Internal Server Error", status_code=500)  # Starlette's default


# Errors that mean a backing service is down or overloaded (the client should retry), not a bug.
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, BrokerOperationalError)


def outage_response(exc: BaseException) -> JSONResponse:
    """503 + Retry-After naming the service that is down (database or message broker)."""
    what = "message broker" if isinstance(exc, BrokerOperationalError) else "database"
    log.warning("%s unavailable: %s", what, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return JSONResponse({"detail": f"the {what} is unavailable; retry later", "code": "unavailable"},
                        status_code=503, headers={"Retry-After": "5"})
