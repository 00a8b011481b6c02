"""Typed dependencies: a handler's signature says what it needs (settings, broker, caller)."""
from __future__ import annotations

import dataclasses
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request

from jobs.errors import Unauthorized
from jobs.settings import Settings


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who calls: `name` is the owner recorded on what they create (None with auth off)."""

    name: str | None
    admin: bool


ANONYMOUS = Principal(name=None, admin=True)


# Dependencies are `async def` on purpose: they do no I/O, and a sync dependency would cost a
# threadpool hop per request (POST /api/v1/jobs is the hot path).
async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_celery(request: Request) -> Celery:
    return request.app.state.celery


async def get_principal(request: Request) -> Principal:
    """The caller that api.security.BearerAuth authenticated (ANONYMOUS, an admin, where auth is off).

    Without that middleware's verdict (not installed, or an open path) the request is anonymous only
    when auth is off; with LOWRANK_AUTH=required it is refused with 401.
    """
    state = request.scope.get("state", {})
    principal = state.get("principal")
    if principal is not None:
        return principal
    settings: Settings = request.app.state.settings
    if settings.auth == "off" and not state.get("auth_required", False):
        return ANONYMOUS
    raise Unauthorized("this server requires an API token: send `Authorization: Bearer <token>`")


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
