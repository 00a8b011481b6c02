"""The dashboard: HTML page shells (templates/) and plain JavaScript (static/) served by the API process.

Pages carry no data: the browser reads the JSON API (`/api/v1/...`) with the user's Bearer token
(kept in sessionStorage), so a page shows exactly what its viewer may read. Plotly.js comes from
the installed `plotly` Python package (no CDN: the dashboard works on a cluster without internet).
No template engine: a page is `layout.html` with its body fragment and a few escaped values put in.
"""
from __future__ import annotations

import gzip
import hashlib
import html
import importlib.metadata
import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
STATIC_PREFIX = "/dashboard/static"
PLOTLY_JS = "plotly.min.js"
# Files under static/ the server hands out (the folder is a package, so skip its Python files).
STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


@lru_cache(maxsize=1)
def plotly_js_path() -> Path:
    """The plotly.min.js bundled in the installed `plotly` package (found without importing plotly;
    looked up once per process)."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the `plotly` package is not installed (a dependency of lowrank-lab)")
    path = Path(next(iter(spec.submodule_search_locations))) / "package_data" / PLOTLY_JS
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed plotly package")
    return path


@lru_cache(maxsize=1)
def plotly_version() -> str:
    """The installed plotly package's version (the cache-busting ?v= of plotly.min.js), read once per process."""
    return importlib.metadata.version("plotly")


@lru_cache(maxsize=1)
def plotly_js_gzip() -> bytes:
    """plotly.min.js gzipped once per process (4.8 MB -> ~1.4 MB over the wire)."""
    return gzip.compress(plotly_js_path().read_bytes(), compresslevel=6, mtime=0)


@lru_cache(maxsize=64)
def _file_version(path: Path, mtime_ns: int) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def asset_url(name: str) -> str:
    """A cache-busting URL of a static file (its content hash in ?v=)."""
    if name == PLOTLY_JS:
        return f"{STATIC_PREFIX}/{PLOTLY_JS}?v={plotly_version()}"
    path = STATIC / name
    return f"{STATIC_PREFIX}/{name}?v={_file_version(path, path.stat().st_mtime_ns)}"


def static_file(name: str) -> tuple[Path, str] | None:
    """(path, media type) of a servable static file, or None (unknown names, traversal, Python files)."""
    if "/" in name or "\\" in name or name.startswith("."):
        return None
    media = STATIC_TYPES.get(Path(name).suffix)
    path = STATIC / name
    if media is None or not path.is_file():
        return None
    return path, media


def render(page: str, title: str, data: dict[str, Any] | None = None) -> str:
    """layout.html with the page's body fragment, its script and `data` (JSON, read by the page's JS)."""
    layout = (TEMPLATES / "layout.html").read_text(encoding="utf-8")
    body = (TEMPLATES / f"{page}.html").read_text(encoding="utf-8")
    values = {
        "{{title}}": html.escape(title),
        "{{css}}": html.escape(asset_url("style.css")),
        "{{plotly}}": html.escape(asset_url(PLOTLY_JS)),
        "{{common}}": html.escape(asset_url("common.js")),
        "{{script}}": html.escape(asset_url(f"{page}.js")),
        "{{page}}": html.escape(page),
        # JSON inside an attribute: html.escape quotes it; the JS reads dataset.page_data.
        "{{data}}": html.escape(json.dumps(data or {}), quote=True),
    }
    # A body may load more of static/ with {{asset:NAME}} (the sweep page: search.js).
    body = re.sub(r"\{\{asset:([A-Za-z0-9_.-]+)\}\}", lambda mo: html.escape(asset_url(mo.group(1))), body)
    out = layout.replace("{{body}}", body)
    for key, value in values.items():
        out = out.replace(key, value)
    return out
