"""Dashboard pages (`/`, `/jobs/{id}`, `/sweeps/{id}`, `/compare?jobs=...`) and their static files.

Pages are shells: their JavaScript reads the JSON API with the viewer's token, so these routes
need no principal and leak nothing. Not part of the OpenAPI schema (they are not the API).
"""
from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, Response

from api import dashboard
from jobs.errors import InvalidInput, NotFound
from jobs.store import ID_PREFIX_MIN

router = APIRouter(include_in_schema=False)

MAX_COMPARE = 20
# Scripts only from this server (Plotly included); Plotly sets inline styles on its SVG.
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
_PAGE_HEADERS = {"Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff",
                 "Referrer-Policy": "same-origin", "Cache-Control": "no-cache"}
_STATIC_HEADERS = {"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"}


def _page(page: str, title: str, data: dict | None = None) -> HTMLResponse:
    return HTMLResponse(dashboard.render(page, title, data), headers=_PAGE_HEADERS)


@router.get("/", response_class=HTMLResponse)
def index_page() -> HTMLResponse:
    return _page("index", "lowrank-lab: jobs")


def _id_or_prefix(text: str, what: str, loc: tuple[str, ...]) -> str:
    """A full id (normalized) or the start of one (4+ hex digits, lower case). The page's script resolves
    a prefix through the API with the viewer's token (GET ...?id_prefix=), so this route learns nothing
    about which ids exist and tells nothing to a viewer without a token."""
    text = text.strip()
    try:
        return str(uuid.UUID(text))
    except ValueError:
        pass
    digits = text.replace("-", "").lower()
    if len(digits) < ID_PREFIX_MIN or len(digits) > 32 or any(c not in "0123456789abcdef" for c in digits):
        raise InvalidInput(f"expected a {what} id (a UUID) or its first {ID_PREFIX_MIN} to 32 hex digits; "
                           f"got {text[:40]!r}", loc)
    return digits


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: str) -> HTMLResponse:
    ref = _id_or_prefix(job_id, "job", ("path", "job_id"))
    return _page("job", f"job {ref[:8]}", {"job_id": ref})


@router.get("/sweeps/{sweep_id}", response_class=HTMLResponse)
def sweep_page(sweep_id: str) -> HTMLResponse:
    ref = _id_or_prefix(sweep_id, "sweep", ("path", "sweep_id"))
    return _page("sweep", f"sweep {ref[:8]}", {"sweep_id": ref})


@router.get("/compare", response_class=HTMLResponse)
def compare_page(jobs: Annotated[list[str], Query(description="job ids or unique prefixes, comma-separated "
                                                              "and/or repeated")]) -> HTMLResponse:
    ids: list[str] = []
    for part in ",".join(jobs).split(","):
        if part.strip():
            ids.append(_id_or_prefix(part, "job", ("query", "jobs")))
    ids = list(dict.fromkeys(ids))
    if not 1 <= len(ids) <= MAX_COMPARE:
        raise InvalidInput(f"jobs must name 1 to {MAX_COMPARE} jobs, got {len(ids)}", ("query", "jobs"))
    return _page("compare", f"compare {len(ids)} jobs", {"job_ids": ids})


@router.get(f"{dashboard.STATIC_PREFIX}/{dashboard.PLOTLY_JS}")
def plotly_js(request: Request) -> Response:
    """Plotly.js from the installed plotly package; gzipped when the browser accepts it."""
    headers = {**_STATIC_HEADERS, "Vary": "Accept-Encoding"}
    if "gzip" in request.headers.get("accept-encoding", ""):
        return Response(dashboard.plotly_js_gzip(), media_type="text/javascript; charset=utf-8",
                        headers={**headers, "Content-Encoding": "gzip"})
    return FileResponse(dashboard.plotly_js_path(), media_type="text/javascript; charset=utf-8", headers=headers)


@router.get(dashboard.STATIC_PREFIX + "/{name}")
def static_file(name: str) -> FileResponse:
    found = dashboard.static_file(name)
    if found is None:
        raise NotFound(f"no dashboard file {name!r}")
    path, media = found
    return FileResponse(path, media_type=media, headers=_STATIC_HEADERS)
