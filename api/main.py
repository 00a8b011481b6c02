"""The API application: `create_app()` builds it, `app` is what uvicorn serves (`api.main:app`).

This module only assembles: settings, the Celery sender, error handlers and routers.
It never imports torch, core/ or worker/ (tests/test_api_no_torch.py checks).
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI

from api.errors import install_error_handlers
from api.middleware import BodySizeLimit
from api.routes import dashboard, health, jobs, prometheus, sweeps, uploads
from api.security import install_security
from jobs import migrate
from jobs.db import dispose_engines
from jobs.queue import make_celery
from jobs.settings import get_settings

log = logging.getLogger("api")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = app.state.settings
    # Refuse to serve a database whose schema this code does not match (clear error, exit).
    migrate.require_head(settings.database_url)
    settings.artifacts.mkdir(parents=True, exist_ok=True)
    app.state.celery = make_celery(settings)
    # The sync route handlers run in anyio's default thread limiter (per event loop, so per process).
    limiter = anyio.to_thread.current_default_thread_limiter()
    limiter.total_tokens = settings.api_threads
    app.state.thread_limiter = limiter
    yield
    app.state.celery.close()
    dispose_engines()


def create_app() -> FastAPI:
    settings = get_settings()
    app = FastAPI(title="lowrank-lab", version="0.1.0", lifespan=lifespan,
                  description="Low-rank approximation and factored-network training jobs, sweeps and results.")
    app.state.settings = settings
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, settings=settings)
    for module in (health, jobs, uploads, prometheus, dashboard, sweeps):
        app.include_router(module.router)
    # Last: its middleware is the outermost (token checked before a body is read) and its OpenAPI
    # hook sees every route.
    install_security(app, settings)
    return app


app = create_app()
