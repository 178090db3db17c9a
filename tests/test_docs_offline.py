"""/docs and /redoc render in headless Chromium with every request off loopback blocked: their scripts and
stylesheet come from the service itself, and their Content-Security-Policy lets them run without 'unsafe-inline'
scripts (Chromium reports any violation on the console)."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient
from guardloop.service.app import create_app

from tests.conftest import live_server
from tests.test_review_page import browser  # noqa: F401  (the Chromium fixture)

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CLASSIFY_SUMMARY = "Classify one or more user messages"


def open_offline(browser, url: str):  # noqa: F811
    """A page whose requests to anything but 127.0.0.1 are aborted (and recorded), with console errors kept."""
    page = browser.new_page()
    blocked: list[str] = []
    errors: list[str] = []

    def route(route) -> None:
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    page.route("**/*", route)
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    return page, blocked, errors


def test_swagger_ui_and_redoc_render_with_the_network_blocked(settings, browser):  # noqa: F811
    with live_server(settings) as base:
        page, blocked, errors = open_offline(browser, f"{base}/docs")
        page.wait_for_selector(".opblock-summary-path[data-path='/classify']", timeout=30_000)
        assert CLASSIFY_SUMMARY in page.text_content(".opblock-post .opblock-summary-description")
        assert blocked == [] and errors == []

        page, blocked, errors = open_offline(browser, f"{base}/redoc")
        page.locator("h2", has_text=CLASSIFY_SUMMARY).first.wait_for(timeout=30_000)  # the operation's section
        assert "/classify" in page.text_content("body")
        # ReDoc's "API docs by Redocly" badge points at its CDN; the policy refuses it before any request leaves.
        refused_badge = [e for e in errors if "cdn.redoc.ly/redoc/logo-mini.svg" in e and "Content Security" in e]
        assert blocked == [] and [e for e in errors if e not in refused_badge] == []


def test_docs_pages_name_only_local_assets_under_a_strict_policy(settings):
    with TestClient(create_app(settings)) as client:
        for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
            page = client.get(path)
            assert page.status_code == 200
            assert "http://" not in page.text and "https://" not in page.text.replace("https://github.com", "")
            policy = page.headers["content-security-policy"]
            assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
            assert "'unsafe-inline'" not in policy.split("script-src", 1)[1].split(";", 1)[0]
            assert page.headers["x-frame-options"] == "DENY"
        for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png"):
            response = client.get(f"/docs-assets/{asset}")
            assert response.status_code == 200 and len(response.content) > 1000, asset
