"""The first minutes in a real browser: an empty data dir (seed prompts, no answers), the
Label tab's first-run button, a first pair while the rest is still being written, a
judgment on it, and the Data tab's count rising as answers are stored."""
from __future__ import annotations

import re
import time

import pytest

from apptools import chromium_browser, screenshot, start_app, wait_model_ready_in_page
from rpo_app.models import link_model_cache

pytestmark = [pytest.mark.browser, pytest.mark.slow]

TIMEOUT = 30_000  # ms, one round trip on a busy 2-core machine
# The first batch is one prompt's two answers (about 10 s on 2 quiet cores; see
# `bench --only first-run`); the limit leaves room for a loaded CI machine.
FIRST_PAIR_LIMIT_S = 90


def _responses(page) -> int:
    """The 'responses' count in the Data tab's store table."""
    text = page.locator("#data-stats").inner_text()
    match = re.search(r"responses\s+(\d+)", text)
    return int(match.group(1)) if match else -1


def test_first_run_from_an_empty_store(data_dir, model_cache_dir):
    from playwright.sync_api import expect

    link_model_cache(model_cache_dir, data_dir)
    app = start_app(data_dir, timeout=180)
    try:
        with chromium_browser() as browser:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(app.url, timeout=60_000)
            wait_model_ready_in_page(page, 240)
            name = page.locator("#annotator-name input, #annotator-name textarea").first
            name.fill("newcomer")
            name.press("Enter")
            expect(page.locator("#lbl-question")).to_contain_text("Start here", timeout=TIMEOUT)
            expect(page.locator("#lbl-question")).to_contain_text("on this machine", timeout=TIMEOUT)
            button = page.locator("button#lbl-first-run")
            expect(button).to_be_visible()
            screenshot(page, "first-run.png")

            t0 = time.monotonic()
            button.click()
            page.wait_for_function(
                "() => { const el = document.querySelector('#lbl-prompt textarea');"
                " return el && el.value; }", timeout=FIRST_PAIR_LIMIT_S * 1000)
            first_pair_s = time.monotonic() - t0
            assert first_pair_s < FIRST_PAIR_LIMIT_S
            left = page.locator("#lbl-left-text textarea").input_value()
            right = page.locator("#lbl-right-text textarea").input_value()
            assert left and right and left != right
            screenshot(page, "first-pair.png")

            page.locator("button#lbl-left").click()
            expect(page.locator("#lbl-status")).to_contain_text("Saved judgment", timeout=TIMEOUT)

            page.get_by_role("tab", name="Data").click()
            expect(page.locator("#gen-status")).to_contain_text("Generating answers", timeout=TIMEOUT)
            before = _responses(page)
            deadline = time.monotonic() + 240
            while _responses(page) <= before and time.monotonic() < deadline:
                page.wait_for_timeout(1000)
            after = _responses(page)
            assert after > before >= 2, (before, after)
            screenshot(page, "first-run-data-tab.png")

            # The Train tab counts the judgment made after the page loaded (it said
            # "0 pairs ... label some first" until a reload).
            page.get_by_role("tab", name="Train").click()
            expect(page.locator("#train-usable")).to_contain_text("give 1 pair (1 same-prompt", timeout=TIMEOUT)
            print(f"first pair after {first_pair_s:.1f} s; Data tab {before} -> {after} answers")
    finally:
        app.stop()
