"""An open page costs the machine little while nothing happens: only the shown tab's
timer asks the app for news, and Gradio's status tracker no longer draws 60 frames a
second (rpo_app.ui.earlyjs). Both ran on every open page before, and a training run
beside the page paid for them."""
from __future__ import annotations

import time

import pytest

from apptools import chromium_browser, start_app, wait_model_ready_in_page

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# Installed before any of the page's scripts: counts the frames the page asks for that
# reach the browser (the early script, which wraps this, keeps the tracker's away).
COUNT_FRAMES = """
window.__frames = 0;
const frame = window.requestAnimationFrame.bind(window);
window.requestAnimationFrame = (callback) => { window.__frames++; return frame(callback); };
"""
QUIET_S = 8


def _events_during(page, events: list[float], seconds: float) -> tuple[int, int]:
    """(events sent, frames asked for) while the page sits for `seconds`."""
    page.evaluate("() => { window.__frames = 0; }")
    start = time.monotonic()
    page.wait_for_timeout(seconds * 1000)
    return sum(t >= start for t in events), page.evaluate("() => window.__frames")


def test_an_idle_page_asks_only_for_its_tab_and_draws_no_frames(linked_data_dir):
    app = start_app(linked_data_dir, timeout=180)
    try:
        with chromium_browser() as browser:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.add_init_script(COUNT_FRAMES)
            events: list[float] = []
            page.on("request", lambda r: events.append(time.monotonic())
                    if r.method == "POST" and r.url.split("?")[0].endswith("/queue/join") else None)
            page.goto(app.url, timeout=60_000)
            wait_model_ready_in_page(page, 240)
            # Every tab drawn once: a timer ticks from the moment its tab is first drawn.
            for tab in ("Train", "Data", "Team", "Chat"):
                page.get_by_role("tab", name=tab).click()
                page.wait_for_timeout(1500)
            page.wait_for_timeout(3000)  # the tab switches' own events answered

            sent, frames = _events_during(page, events, QUIET_S)
            # Before: the Label, Train and Data timers, 12 events in 8 s, and 480 frames.
            assert sent <= 2, f"{sent} events in {QUIET_S} s on the Chat tab"
            assert frames < 10 * QUIET_S, f"{frames} frames in {QUIET_S} s"

            page.get_by_role("tab", name="Train").click()
            page.wait_for_timeout(3000)
            sent, _ = _events_during(page, events, QUIET_S)
            assert sent >= 2, "the Train tab's timer stopped ticking while the tab is shown"
    finally:
        app.stop()
