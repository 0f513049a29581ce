"""An open page costs the machine little while nothing happens: only the shown tab's
timer asks the app for news. Every opened tab's timer ticked before, and a training run
beside the page paid for them."""
from __future__ import annotations

import time

import pytest

from apptools import chromium_browser, start_app, wait_model_ready_in_page

pytestmark = [pytest.mark.browser, pytest.mark.slow]

QUIET_S = 8


def _events_during(page, events: list[float], seconds: float) -> int:
    """Events sent while the page sits for `seconds`."""
    start = time.monotonic()
    page.wait_for_timeout(seconds * 1000)
    return sum(t >= start for t in events)


def test_an_idle_page_asks_only_for_its_tab(linked_data_dir):
    app = start_app(linked_data_dir, timeout=180)
    try:
        with chromium_browser() as browser:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
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

            sent = _events_during(page, events, QUIET_S)
            # Before: the Label, Train and Data timers, 12 events in 8 s.
            assert sent <= 2, f"{sent} events in {QUIET_S} s on the Chat tab"

            page.get_by_role("tab", name="Train").click()
            page.wait_for_timeout(3000)
            sent = _events_during(page, events, QUIET_S)
            assert sent >= 2, "the Train tab's timer stopped ticking while the tab is shown"
    finally:
        app.stop()
