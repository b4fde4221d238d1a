"""The web portal: one page and its assets, served by the API at ``/`` (no other server).

Everything ships in the package (``service/api/static``): no CDN, no build step. The page signs
in with a team key it keeps in ``sessionStorage`` and sends as ``Authorization`` (never in a
URL), so the assets themselves need no key. A strict Content-Security-Policy allows only this
origin's scripts, styles and calls.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from .problems import not_found

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = {name: "text/javascript" for name in ("app.js", "charts.js", "forms.js", "lists.js", "job.js")}
ASSETS["style.css"] = "text/css"
HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/portal/{name}")
async def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise not_found("portal file", name)
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=HEADERS)
