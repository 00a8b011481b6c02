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


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_celery(request: Request) -> Celery:
    return request.app.state.celery


def get_principal(request: Request) -> Principal:
    """With LOWRANK_AUTH=off every caller is anonymous and may act on everything.

    Token authentication (LOWRANK_AUTH=required; api_tokens table) replaces this function.
    """
    settings: Settings = request.app.state.settings
    if settings.auth == "off":
        return ANONYMOUS
    raise Unauthorized("LOWRANK_AUTH=required but this server has no token authentication configured")


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
