"""Liveness (/healthz: the process answers) and readiness (/readyz: database at head and broker reachable)."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import CeleryDep, SettingsDep
from api.schemas import HealthPublic
from jobs import migrate, store

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthPublic)
def healthz() -> HealthPublic:
    return HealthPublic(status="ok")


@router.get("/readyz", response_model=HealthPublic, responses={503: {"model": HealthPublic}})
def readyz(settings: SettingsDep, celery: CeleryDep) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        store.ping_database()
        checks["database"] = "ok" if migrate.is_at_head(settings.database_url) else "not at the head revision"
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        checks["database"] = f"unreachable: {type(exc).__name__}"
    try:
        with celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2, timeout=3)
        checks["broker"] = "ok"
    except Exception as exc:  # noqa: BLE001 - whatever the broker raises, readiness reports it as down
        checks["broker"] = f"unreachable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    body = HealthPublic(status="ready" if ready else "not ready", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)
