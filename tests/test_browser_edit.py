"""Editing an answer in the Label tab, in a real browser: load an answer, rewrite it, see
the diff, save; the store holds the rewrite and "rewrite ≻ original"."""
from __future__ import annotations

import pytest

from apptools import chromium_browser, screenshot, seed_store, start_app
from rpo_app.store import EDIT_SOURCE, Store

pytestmark = [pytest.mark.browser, pytest.mark.slow]
TIMEOUT = 30_000


def _settled_value(box, quiet_s: float = 2.0, timeout_s: float = 30.0) -> str:
    """The box's value once it has stayed the same, and not empty, for quiet_s. The page's
    load and the name's Enter each show an item; on a loaded CI machine the answer box
    read "" between the two even after it had held the answer once."""
    import time

    last, since, deadline = None, time.monotonic(), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = box.input_value()
        if now != last:
            last, since = now, time.monotonic()
        elif now and time.monotonic() - since >= quiet_s:
            return now
        time.sleep(0.2)
    raise AssertionError(f"the answer box did not settle: last read {last!r}")


def test_edit_an_answer_in_the_label_tab(data_dir, tiny_model_dir):
    from playwright.sync_api import expect

    seed_store(data_dir, n_prompts=2, answers_per_prompt=2)
    app = start_app(data_dir, extra_args=("--model", str(tiny_model_dir)))
    try:
        with chromium_browser() as browser:
            page = browser.new_page(viewport={"width": 1280, "height": 1200})
            page.goto(app.url, timeout=60_000)
            name = page.locator("#annotator-name input, #annotator-name textarea").first
            name.fill("ada")
            name.press("Enter")
            # Both boxes: the prompt can show before the answers do, and an answer read
            # too early is "" (CI failed on that, not on lost keys as once suspected).
            page.wait_for_function("() => document.querySelector('#lbl-prompt textarea').value && "
                                   "document.querySelector('#lbl-left-text textarea').value",
                                   timeout=TIMEOUT)
            left = _settled_value(page.locator("#lbl-left-text textarea"))
            assert left
            page.locator("#lbl-edit-box").get_by_text("Write a better answer").first.click()
            page.locator("#lbl-edit-side").get_by_text("Answer A").click()
            page.locator("button#lbl-edit-load").click()
            box = page.locator("#lbl-edit-text textarea")
            expect(box).to_have_value(left, timeout=TIMEOUT)
            expect(page.locator("#lbl-edit-status")).to_contain_text("Edit the text", timeout=TIMEOUT)
            added = " It also names <b>two</b> caveats."
            box.press("End")
            box.type(added)  # typed: keys must not judge
            expect(box).to_have_value(left + added, timeout=TIMEOUT)
            expect(page.locator("#lbl-edit-diff ins")).to_contain_text("caveats", timeout=TIMEOUT)
            page.locator("button#lbl-edit-save").click()
            expect(page.locator("#lbl-edit-status")).to_contain_text("Saved: your answer is answer #",
                                                                      timeout=TIMEOUT)
            status = page.locator("#lbl-edit-status").inner_text()
            screenshot(page, "label-edit.png", full_page=True)
    finally:
        app.stop()
    store = Store(data_dir)
    rows = store.judgments()
    assert len(rows) == 1  # the edit's judgment only: typing judged nothing
    j = rows[0]
    assert j["source"] == EDIT_SOURCE and j["annotator"] == "ada" and j["verdict"] == "b"
    assert j["response_a_text"] == left
    assert j["response_b_text"] == left + " It also names <b>two</b> caveats."
    assert store.response(j["response_b"])["parent_id"] == j["response_a"]
    assert f"judgment #{j['id']}" in status
    store.close()
