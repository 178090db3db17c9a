"""The reviewer page end to end in headless Chromium (Debian's, driven by Playwright) against a live server:
keyboard labeling, undo, what the database holds afterwards, inert user text, and basic accessibility."""

from __future__ import annotations

import itertools
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from guardloop.core.labels import LABELS
from guardloop.core.settings import Settings
from guardloop.storage import UNCERTAIN, Database, LabelRequest, PoolRecord, PoolRepository, ReviewerRepository
from guardloop.storage.tables import Label
from tests.conftest import live_server, unavailable
from tests.tiny_onnx import publish_tiny

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
XSS_SCRIPT = "<script>window.__xss = 'script'</script> please help"
XSS_IMG = "<img src=x onerror=\"window.__xss='img'\"> what now"
XSS_SVG = '"><svg onload="window.__xss=\'svg\'"></svg> &amp; more'
PLAIN = "my landlord kept my deposit"
# Highest priority first: the order the page shows them.
ITEMS = [(XSS_SCRIPT, 0.9), (XSS_IMG, 0.8), (XSS_SVG, 0.7), (PLAIN, 0.6), ("the last one", 0.5)]


def seed(database: Database) -> dict[str, int]:
    pool = PoolRepository(database)
    now = datetime.now(UTC)
    pool.write_batch(
        [
            PoolRecord(
                text=text,
                label="not-harmful",
                scores=dict.fromkeys(LABELS, 0.08) | {"not-harmful": 0.6},
                uncertainty=0.81,
                margin=0.52,
                model_version="v-test",
                sampled_by=UNCERTAIN,
                client_id=None,
                seen_at=now,
            )
            for text, _ in ITEMS
        ]
    )
    ids = {item.text: item.id for item in pool.iter_items()}
    reason = {"strategy": "cluster", "cluster": 4, "uncertainty": 0.81, "note": "<b onmouseover=alert(1)>x</b>"}
    pool.mark_requested([LabelRequest(ids[text], reason, priority) for text, priority in ITEMS], at=now)
    return ids


def relative_luminance(rgb: str) -> float:
    channels = [int(v) / 255 for v in rgb[rgb.index("(") + 1 : rgb.index(")")].split(",")[:3]]
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(foreground: str, background: str) -> float:
    lighter, darker = sorted((relative_luminance(foreground), relative_luminance(background)), reverse=True)
    return (lighter + 0.05) / (darker + 0.05)


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
        unavailable("Chromium", f"{CHROMIUM} not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            yield browser
        finally:
            browser.close()


def test_a_reviewer_labels_with_the_keyboard_undoes_and_user_text_stays_inert(settings, registry, tmp_path, browser):
    publish_tiny(registry, tmp_path, seed=1)
    url = f"sqlite:///{tmp_path / 'review.db'}"
    settings = Settings(**(settings.model_dump() | {"database_url": url}))
    database = Database(url)
    database.ensure_schema()
    ids = seed(database)
    token = ReviewerRepository(database).add("ann")

    with live_server(settings) as base:
        page = browser.new_page()
        dialogs: list[str] = []
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.goto(f"{base}/review")
        page.wait_for_selector("body[data-state=login]")

        # Sign in through a real, labeled input.
        page.get_by_label("Reviewer token").fill(token)
        page.keyboard.press("Enter")
        page.wait_for_selector(f"body[data-state=ready][data-item-id='{ids[XSS_SCRIPT]}']")
        assert page.text_content("#who") == "ann"
        assert page.text_content("#queue-length") == "5" and page.text_content("#my-count") == "0"
        assert page.text_content("#item-prediction") == "not-harmful"
        assert "strategy: cluster" in page.text_content("#item-reason")
        assert page.locator("#item-scores tr").count() == 3

        # The stored text is shown as text: its markup is neither parsed nor run.
        assert page.text_content("#item-text") == XSS_SCRIPT
        assert page.locator("#item script, #item img, #item svg, #item b").count() == 0

        expected = {ids[XSS_SCRIPT]: "self-harm", ids[XSS_IMG]: "legal-advice", ids[XSS_SVG]: "not-harmful"}
        order = [ids[XSS_SCRIPT], ids[XSS_IMG], ids[XSS_SVG], ids[PLAIN]]
        for key, (item_id, next_id) in zip(("1", "3", "6"), itertools.pairwise(order), strict=True):
            assert page.get_attribute("body", "data-item-id") == str(item_id)
            assert page.text_content("#item-text") == next(text for text, i in ids.items() if i == item_id)
            page.keyboard.press(key)
            page.wait_for_selector(f"body[data-state=ready][data-item-id='{next_id}']")
        assert page.text_content("#my-count") == "3" and page.text_content("#queue-length") == "2"

        page.keyboard.press("u")  # undo the last label: its item comes back
        page.wait_for_selector(f"body[data-state=ready][data-item-id='{ids[XSS_SVG]}']")
        assert "Undid" in page.text_content("#status")
        assert page.text_content("#my-count") == "2" and page.text_content("#queue-length") == "3"
        assert page.text_content("#item-text") == XSS_SVG

        assert page.evaluate("window.__xss") is None and dialogs == []

        # Accessibility: a visible focus ring when tabbing, and enough contrast for text and buttons.
        page.keyboard.press("Tab")
        outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
        assert outline not in ("", "none")
        text_colors = page.evaluate(
            "[getComputedStyle(document.querySelector('#item-text')).color,"
            " getComputedStyle(document.querySelector('#item-text')).backgroundColor]"
        )
        button_colors = page.evaluate(
            "[getComputedStyle(document.querySelector('.label-button')).color,"
            " getComputedStyle(document.querySelector('.label-button')).backgroundColor]"
        )
        assert contrast(*text_colors) >= 7 and contrast(*button_colors) >= 4.5
        assert page.get_by_role("button", name="1 self-harm").count() == 1
        page.close()

    with database.read() as session:
        rows = session.scalars(select(Label).order_by(Label.id)).all()
    live = {row.item_id: row.label for row in rows if row.active}
    assert live == {ids[XSS_SCRIPT]: "self-harm", ids[XSS_IMG]: "legal-advice"}
    (undone,) = [row for row in rows if not row.active]
    assert (undone.item_id, undone.label, undone.reviewer) == (ids[XSS_SVG], expected[ids[XSS_SVG]], "ann")
    assert undone.retracted_at is not None and len(rows) == 3
    assert all(row.reviewer == "ann" for row in rows)
