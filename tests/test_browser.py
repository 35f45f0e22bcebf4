"""The web page in a real browser: headless Chromium (Debian's, driven by Playwright, never downloaded)
uploads a synthetic defective part and sees the result, the overlay and the history appear; the history
view shows the records, the drift charts and their alarm, and takes a review.

Under CI=true a missing Chromium or Playwright fails the test; elsewhere it skips with the reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from qrs.predict import Scorer, score_files
from qrs.records import Inspection, RecordSettings, RecordStore, fingerprint, utcnow
from qrs.serve import create_app, serve_in_background
from scoring_setup import make_checkpoint, part_image, png
from services import unavailable

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
APT = ".ci/run installs chromium with apt"


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("Playwright's Python package is not installed (pip install -e '.[dev]')", APT)
    if not CHROMIUM.exists():
        unavailable(f"{CHROMIUM} is missing (apt-get install chromium)", APT)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.mark.timeout(300)
def test_page_scores_an_uploaded_part(browser: object, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    checkpoint = make_checkpoint(tmp_path / "model.pt")
    part = tmp_path / "defective_part.png"
    part.write_bytes(png(part_image(seed=5, defective=True, size=(115, 315))))
    [want] = score_files([part], checkpoint, out=tmp_path / "scores", progress=False).rows

    with serve_in_background(create_app(checkpoint)) as url:
        page = browser.new_page()
        requests: list[str] = []
        errors: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url + "/")
        expect(page.locator("#model")).to_contain_text("resnet18 at 32 px")
        page.set_input_files("#file-input", str(part))
        expect(page.locator("#result")).to_be_visible(timeout=120_000)
        # The overlay is drawn over the original image: 115 x 315 px.
        expect(page.locator("#overlay")).to_have_js_property("naturalWidth", 115)

        assert page.text_content("#file-name") == part.name
        assert page.get_attribute("#verdict", "data-value") == want["verdict"]
        assert page.text_content("#verdict") == want["verdict"].upper()
        assert float(page.get_attribute("#p-defective", "data-value")) == pytest.approx(want["p_defective"], abs=1e-5)
        assert float(page.get_attribute("#qrs", "data-value")) == pytest.approx(want["qrs"], abs=1e-5)
        assert page.text_content("#qrs") == f"{want['qrs']:.4f}"
        assert page.get_attribute("#risk", "data-value") == want["risk_level"]
        assert page.locator("#overlay").evaluate("img => img.naturalHeight") == 315
        history = page.locator("#history tr")
        expect(history).to_have_count(1)
        assert part.name in history.first.text_content()

        page.set_input_files("#file-input", str(part))
        expect(history).to_have_count(2)
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        page.close()

    assert (tmp_path / "page.png").stat().st_size > 0
    assert not errors
    origin = urlsplit(url).netloc
    assert all(urlsplit(u).scheme == "data" or urlsplit(u).netloc == origin for u in requests), requests


@pytest.mark.timeout(300)
def test_history_view_reviews_a_part_and_raises_the_drift_alarm(browser: object, tmp_path: Path) -> None:
    """A line whose share flagged jumped after its baseline: the page shows the alarm, both charts, the latest
    parts with their overlays, and an inspector's review lands in the database."""
    from playwright.sync_api import expect

    checkpoint = make_checkpoint(tmp_path / "fails.pt", fail=True)
    url_db = f"sqlite:///{tmp_path / 'line.sqlite'}"
    store = RecordStore(url_db).open()
    model_id = store.model_id(fingerprint(Scorer.load(checkpoint, device="cpu")))
    start = utcnow() - timedelta(hours=10)
    rng = np.random.default_rng(0)
    flagged = rng.random(1200) < np.where(np.arange(1200) < 900, 0.03, 0.3)
    store.add(model_id, [Inspection(file=f"old_{i}.png", row={"prediction": int(f), "p_defective": 0.5, "qrs": 0.0,
                                                               "risk_level": "low"}, image=None, station="press 4",
                                    part_id=f"old-{i}", time=start + timedelta(seconds=30 * i))
                         for i, f in enumerate(flagged)])
    part = tmp_path / "part.png"
    part.write_bytes(png(part_image(seed=5, defective=True, size=(115, 315))))

    with serve_in_background(create_app(checkpoint, records=RecordSettings(url_db, station="press 4"))) as url:
        scored = httpx.post(url + "/v1/score", files=[("files", (part.name, part.read_bytes(), "image/png"))],
                            data={"part_id": "A-17"}, timeout=120).json()["results"][0]
        page = browser.new_page()
        requests: list[str] = []
        errors: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url + "/")
        expect(page.locator("#tab-records")).to_have_class("alarm", timeout=60_000)
        page.click("#tab-records")
        expect(page.locator("#drift-alarm")).to_be_visible()
        assert "share flagged" in page.text_content("#drift-alarms")
        report = httpx.get(url + "/v1/drift").json()
        assert page.evaluate("() => Chart.getChart('chart-flagged').data.datasets[0].data.length") == len(
            report["flagged"]) == 11
        assert page.evaluate("() => Chart.getChart('chart-qrs').data.datasets.length") == 3

        rows = page.locator("#records tr")
        expect(rows).to_have_count(50)
        first = rows.first
        assert first.locator("td").nth(3).text_content() == "A-17" and "fail" in first.text_content()
        expect(first.locator("img")).to_have_js_property("naturalWidth", 115)
        first.click()
        expect(page.locator("#rv-overlay")).to_be_visible()
        expect(page.locator("#rv-verdict")).to_have_text("FAIL")
        expect(page.locator("#rv-reviews")).to_have_text("Not reviewed yet.")
        page.fill("#rv-reviewer", "Ann")
        page.fill("#rv-note", "scratch at the rim")
        page.click("#rv-defective")
        expect(page.locator("#rv-outcome")).to_have_text("Saved: confirmed defect.")
        expect(first.locator(".review")).to_have_text("confirmed defect (Ann)")
        page.select_option("#f-reviewed", "true")
        page.click("#f-apply")
        expect(rows).to_have_count(1)
        page.screenshot(path=str(tmp_path / "history.png"), full_page=True)
        page.close()

    [review] = store.get(scored["inspection_id"])["reviews"]
    assert (review["truth"], review["reviewer"], review["note"]) == ("defective", "Ann", "scratch at the rim")
    assert not errors
    origin = urlsplit(url).netloc
    assert all(urlsplit(u).scheme in ("data", "blob") or urlsplit(u).netloc == origin for u in requests), requests
