"""The story page in a real browser: Playwright driving Debian's chromium, headless.

Needs `pip install playwright` (the Python package only: `playwright install` would
download a browser, which CI cannot) and `apt-get install chromium`; skipped otherwise.
The screenshot goes to tmp_path, or to docs/serve.png with TINYSTORY_UPDATE_SCREENSHOT=1
(TINYSTORY_SCREENSHOT_RUN=<run dir> shows a trained model's story there instead of the
random test model's).

In CI set TINYSTORY_REQUIRE_BROWSER=1, so that a missing browser fails instead of skipping.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import PacedGenerator

from tinystory.generation import Generator
from tinystory.sampling import SamplingParams

REQUIRED = os.environ.get("TINYSTORY_REQUIRE_BROWSER", "") not in ("", "0")  # CI: fail, do not skip
CHROMIUM = os.environ.get("TINYSTORY_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DOCS_PNG = Path(__file__).resolve().parents[1] / "docs" / "serve.png"
TIMEOUT_MS = 20_000


@pytest.fixture
def chromium() -> str:
    """Debian's chromium with Playwright to drive it; skip (or fail in CI) without them."""
    missing = []
    for module, install in (("fastapi", "pip install 'tinystory-llm[serve]'"), ("playwright",
                                                                                "pip install playwright")):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"needs {module}: {install}")
    if not Path(CHROMIUM).is_file():
        missing.append(f"needs Debian's chromium at {CHROMIUM}: apt-get install -y chromium")
    if missing and REQUIRED:
        pytest.fail("; ".join(missing) + " (TINYSTORY_REQUIRE_BROWSER is set)", pytrace=False)
    if missing:
        pytest.skip("; ".join(missing))
    return CHROMIUM


def test_page_streams_a_story_and_stops(chromium, random_run, tmp_path):
    from playwright.sync_api import sync_playwright

    from tinystory.serve import serve_in_thread

    update = os.environ.get("TINYSTORY_UPDATE_SCREENSHOT", "") not in ("", "0")
    run = os.environ.get("TINYSTORY_SCREENSHOT_RUN") if update else None
    gen = Generator.load(run or random_run, device="cpu")
    defaults = SamplingParams(max_new_tokens=256, temperature=0.8, top_p=0.9, top_k=40, seed=42)
    opening = "Once upon a time, there was a little dog named Max."
    with serve_in_thread(PacedGenerator(gen, 0.025 if run else 0.03), defaults) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 820, "height": 760})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url + "/")
            assert page.input_value("#prompt") == "Once upon a time"
            assert page.text_content("#model").startswith(f"{gen.name} · ")
            assert page.input_value("#top_k") == "40" and page.input_value("#temperature") == "0.8"

            page.fill("#prompt", opening)
            page.click("text=Tell me a story")
            enough = 420 if run else 60  # a trained run's screenshot shows a few sentences
            page.wait_for_function(f"document.getElementById('story').dataset.text.length > {enough}")
            assert page.is_enabled("#stop") and page.is_disabled("#go")
            assert page.text_content("#stats").endswith(" …") and "tok/s" in page.text_content("#stats")
            page.click("#stop")
            page.wait_for_function("!document.getElementById('go').disabled")
            stats = page.text_content("#stats")
            assert stats.endswith(" · stopped") and "tok/s · first token" in stats, stats
            story = page.text_content("#story")
            assert story.startswith(opening) and len(story) > len(opening) + 60
            assert page.text_content("#error") == ""
            assert page.is_enabled("#copy")

            # the server stopped generating when the page hung up
            deadline = time.monotonic() + 3
            while page.request.get(url + "/health").json()["busy"]:
                assert time.monotonic() < deadline, "generation went on after Stop"
                time.sleep(0.05)

            page.screenshot(path=str(DOCS_PNG if update else tmp_path / "serve.png"), full_page=True)

            # phone-sized: nothing sticks out sideways, the button is still reachable
            page.set_viewport_size({"width": 375, "height": 740})
            assert page.evaluate("document.documentElement.scrollWidth") <= 375
            assert page.is_visible("text=Tell me a story")
            page.screenshot(path=str(tmp_path / "serve-phone.png"), full_page=True)
        finally:
            browser.close()
