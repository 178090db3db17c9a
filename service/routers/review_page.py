"""The reviewer page (GET /review): one server-rendered template, one stylesheet, one script; no build step.

The page itself holds no data: its script signs in with a reviewer token kept in sessionStorage and talks to
the review API. User text only ever reaches the DOM through textContent, and the Content-Security-Policy
forbids inline scripts and every origin but this one, so a stored `<script>` or `onerror=` stays text.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse, HTMLResponse
from guardloop.service.deps import SettingsDep
from jinja2 import Environment, FileSystemLoader, select_autoescape

from guardloop.core.label_definitions import load_definitions
from guardloop.core.labels import LABELS

SERVICE_DIR = Path(__file__).resolve().parent.parent
TEMPLATES = Environment(
    loader=FileSystemLoader(SERVICE_DIR / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
)
STATIC_DIR = SERVICE_DIR / "static"

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
ASSETS = {"review.js": "text/javascript; charset=utf-8", "review.css": "text/css; charset=utf-8"}

router = APIRouter(tags=["review"], include_in_schema=False)


@router.get("/review", response_class=HTMLResponse)
def review_page(settings: SettingsDep) -> HTMLResponse:
    keyed = [(str(i + 1), label) for i, label in enumerate(LABELS)]
    # Validated when the settings were read, so this cannot fail here; the file is read once (cached).
    definitions = load_definitions(settings.review_definitions_path)
    html = TEMPLATES.get_template("review.html").render(
        labels=keyed,
        definitions=definitions.in_label_order(),
        hide_guess=settings.review_hide_model_guess,
    )
    return HTMLResponse(html, headers=PAGE_HEADERS)


@router.get("/review/assets/{name}")
def review_asset(name: str) -> FileResponse:
    if name not in ASSETS:  # a fixed list: no path from the URL ever reaches the file system
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no asset {name!r}")
    return FileResponse(STATIC_DIR / name, media_type=ASSETS[name], headers=PAGE_HEADERS)
