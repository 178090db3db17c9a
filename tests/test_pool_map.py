"""The pool map: `guardloop pool map --output FILE.png` on a small real pool (real t-SNE, real matplotlib), its
operator errors, and the service's /ops page serving the map the trainer drew (GET /admin/ops/pool-map.png), in
Chromium too.

The embedder is synthetic (tests/test_drift.TopicEmbedder): the real MiniLM one needs a ~15 s ONNX export into a
fresh cache; projection and drawing, what the map is made of, are the real ones.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from guardloop.service.app import create_app
from guardloop.trainer import embeddings
from guardloop.trainer.pool_map import class_shares, draw, gather
from matplotlib.image import imread
from typer.testing import CliRunner

from guardloop.cli import app
from guardloop.core.labels import LABELS
from guardloop.core.settings import Settings
from guardloop.storage import (
    RANDOM_SAMPLE,
    UNCERTAIN,
    Database,
    LabelRequest,
    PoolRecord,
    PoolRepository,
    ReviewRepository,
    upgrade_database,
)
from tests.conftest import ADMIN_TOKEN, live_server, unavailable, wait_for
from tests.test_drift import TOPICS, TopicEmbedder

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fill(database: Database, n: int = 60) -> list[int]:
    """n items over two days, every label, a rare emergency class; 6 picked by cycle c-1, 3 of them reviewed."""
    now = datetime.now(UTC)
    common = [label for label in LABELS if label != "emergency-situation"]
    records = []
    for i in range(n):
        label = "emergency-situation" if i % 30 == 0 else common[i % len(common)]
        scores = dict.fromkeys(LABELS, 0.04) | {label: 0.8}
        text = f"{TOPICS[i % len(TOPICS)]} pool text {i}"
        sampled = RANDOM_SAMPLE if i % 2 else UNCERTAIN
        records.append(PoolRecord(text, label, scores, 0.5, 0.2, "v", sampled, None, now - timedelta(hours=i)))
    pool = PoolRepository(database)
    pool.write_batch(records)
    ids = [item.id for item in sorted(pool.iter_items(), key=lambda item: item.last_seen, reverse=True)]  # newest first
    pool.mark_requested([LabelRequest(item_id, {"cycle_id": "c-1"}) for item_id in ids[:6]], at=now)
    reviews = ReviewRepository(database)
    for item_id in ids[:3]:
        reviews.add_label(item_id, "ana", "not-harmful")
    return ids


@pytest.fixture
def pool_db(tmp_path: Path) -> tuple[str, Database]:
    url = f"sqlite:///{tmp_path / 'pool.db'}"
    database = Database(url)
    upgrade_database(database)
    return url, database


def test_gather_marks_the_latest_picks_and_the_reviewed_items(pool_db):
    _, database = pool_db
    ids = fill(database)
    items = gather(database, limit=50)
    assert len(items.texts) == 50 and items.cycle_id == "c-1"
    assert items.picked.sum() == 6 and items.reviewed.sum() == 3  # the newest 50 hold every pick
    assert items.sampled.sum() == 25
    assert len(ids) == 60


def test_class_shares_sum_to_one_per_time_bin():
    now = datetime.now(UTC)
    labels = [LABELS[i % 2] for i in range(40)] + [LABELS[5]] * 40
    seen = [now - timedelta(hours=80 - i) for i in range(80)]
    starts, shares = class_shares(labels, seen, max_bins=4)
    assert len(starts) == 4 and np.allclose(shares.sum(axis=1), 1.0)
    assert shares[0, 0] == pytest.approx(0.5) and shares[-1, 5] == pytest.approx(1.0)  # the shift shows


def test_pool_map_command_draws_a_png(pool_db, tmp_path: Path, monkeypatch):
    url, database = pool_db
    fill(database)
    monkeypatch.setattr(embeddings, "SentenceEmbedder", lambda cache_dir: TopicEmbedder())
    monkeypatch.setenv("GUARDLOOP_DATABASE_URL", url)
    monkeypatch.setenv("GUARDLOOP_DATA_DIR", str(tmp_path / "data"))
    output = tmp_path / "map.png"
    result = CliRunner().invoke(app, ["pool", "map", "--output", str(output), "--items", "40"])
    assert result.exit_code == 0, result.output
    assert "pool map of 40 items written to" in result.output and "projection" in result.output
    image = imread(output)
    assert image.shape[0] > 600 and image.shape[1] > 1200  # two panels side by side
    assert not list(tmp_path.glob(".map.png.*"))  # written beside it and renamed: no temporary left


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--output", "map.jpg"], "the map is a PNG"),
        (["--output", "missing-dir/map.png"], "no such directory"),
        (["--output", "map.png"], "the pool is empty"),
    ],
)
def test_pool_map_command_refuses_in_one_line(pool_db, tmp_path: Path, monkeypatch, arguments, message):
    url, _ = pool_db
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(embeddings, "SentenceEmbedder", lambda cache_dir: TopicEmbedder())
    monkeypatch.setenv("GUARDLOOP_DATABASE_URL", url)
    monkeypatch.setenv("GUARDLOOP_DATA_DIR", str(tmp_path / "data"))
    result = CliRunner().invoke(app, ["pool", "map", *arguments])
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_the_service_serves_the_map_the_trainer_drew(settings: Settings, pool_db):
    _, database = pool_db
    fill(database)
    with TestClient(create_app(settings)) as client:
        page = client.get("/ops")
        assert page.status_code == 200 and "ops.js" in page.text
        assert "blob:" in page.headers["content-security-policy"]
        assert client.get("/ops/assets/ops.js").status_code == 200
        assert client.get("/admin/ops/pool-map.png").status_code == 401
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        missing = client.get("/admin/ops/pool-map.png", headers=admin)
        assert missing.status_code == 404 and "guardloop pool map" in missing.json()["detail"]

        items = gather(database, limit=60)
        draw(items, np.random.default_rng(0).normal(size=(60, 2)), settings.pool_map_path)
        served = client.get("/admin/ops/pool-map.png", headers=admin)
        assert served.status_code == 200 and served.headers["content-type"] == "image/png"
        assert served.content.startswith(PNG_MAGIC) and served.headers["cache-control"] == "no-store"
    assert settings.pool_map_path.parent == settings.registry_dir / ".ops"  # the volume both processes see


def test_the_ops_page_shows_the_map_in_chromium(settings: Settings, pool_db):
    """The page's script really runs: a wrong token is refused and forgotten, the right one shows the image (a blob
    URL the Content-Security-Policy allows), and no console error appears."""
    from tests.test_review_page import CHROMIUM

    if not Path(CHROMIUM).exists():
        unavailable("Chromium", f"{CHROMIUM} not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    _, database = pool_db
    fill(database)
    draw(gather(database, limit=60), np.random.default_rng(0).normal(size=(60, 2)), settings.pool_map_path)
    with live_server(settings) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.goto(f"{base}/ops")
            page.get_by_label("Admin token").fill("wrong-token")
            page.keyboard.press("Enter")
            # Polled from here through page.evaluate (the DevTools protocol, which the page's CSP does not govern):
            # page.wait_for_function evaluates its string inside the page with eval, which `script-src 'self'`
            # refuses whenever the first check comes too early to be true.
            assert wait_for(lambda: "admin token" in page.evaluate("document.getElementById('status').textContent"))
            assert page.evaluate("sessionStorage.getItem('guardloop.adminToken')") is None
            errors.clear()  # the browser logs the refused fetch (403) as an error: that one was the point
            page.get_by_label("Admin token").fill(ADMIN_TOKEN)
            page.keyboard.press("Enter")
            page.wait_for_selector("body[data-state=ready]")
            assert wait_for(lambda: page.evaluate("document.getElementById('map').naturalWidth") > 1000)
            assert page.evaluate("document.getElementById('map').src").startswith("blob:")
            assert errors == []
        finally:
            browser.close()
