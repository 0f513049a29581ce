"""The informative order in a real browser (Playwright + Debian's chromium), on the tiny
model: label a few pairs (queue order: no adapter yet, and the Label tab says so), train,
and see the Label tab switch to the most informative order once the finished run's
adapter has scored the unlabeled answers, with its first item on screen."""
from __future__ import annotations

import pytest

from apptools import chromium_browser, screenshot, seed_store, start_app
from rpo_app.store import Store
from test_browser_train_chat import _box, _label_pairs, _train_until_finished, _wait_for_adapter

pytestmark = [pytest.mark.browser, pytest.mark.slow]
TIMEOUT = 30_000


def _order_line(page) -> str:
    return page.locator("#lbl-order-info").inner_text()


def test_label_tab_switches_to_the_informative_order_after_a_run(data_dir, tiny_model_dir):
    seed_store(data_dir, n_prompts=10, answers_per_prompt=3)  # 30 pairs; 8 get labeled
    app = start_app(data_dir, extra_args=("--model", str(tiny_model_dir)), wait_model=True)
    try:
        with chromium_browser() as browser:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(app.url, timeout=60_000)
            _box(page, "annotator-name").fill("ada")
            _box(page, "annotator-name").press("Enter")
            page.wait_for_function("() => document.querySelector('#lbl-left-text textarea')"
                                   ".value.length > 0", timeout=TIMEOUT)
            # The Order box says "most informative first" from the start; with no adapter
            # the queue's own order picks the items, and the line says why.
            assert page.locator("#lbl-order input[value='informative']").is_checked()
            assert "until a training run has finished" in _order_line(page)
            _label_pairs(page, 8)

            _train_until_finished(page, 8, "Say hi.", steps=4, batch=2)
            run_id = _wait_for_adapter(data_dir)
            page.get_by_role("tab", name="Label").click()
            # The finished run's adapter scores the answers in the background; the order
            # line follows (a timer), and says the item on screen came before the scores.
            page.wait_for_function("() => document.querySelector('#lbl-order-info').innerText"
                                   ".includes('picked before')", timeout=120_000)
            page.evaluate("() => document.activeElement && document.activeElement.blur()")
            page.keyboard.press("3")  # a tie on the old item; the next comes from the scores
            page.wait_for_function("() => document.querySelector('#lbl-status').innerText"
                                   ".includes('Saved judgment #9 ')", timeout=TIMEOUT)
            page.wait_for_function("() => document.querySelector('#lbl-order-info').innerText"
                                   ".includes('most informative first:')", timeout=TIMEOUT)
            assert run_id in _order_line(page)
            shown = {_box(page, "lbl-left-text").input_value(), _box(page, "lbl-right-text").input_value()}
            assert all(shown)
            screenshot(page, "label-informative.png")
    finally:
        app.stop()

    store = Store(data_dir)
    try:
        meta = store.informative_meta()
        assert meta["complete"] and meta["adapter"] == run_id and meta["answers"] == 30
        # what is on screen is the best-scored pair still open to ada
        top = store.next_informative("ada", meta["scorer"], "paired", 1)[0]
        assert shown == {store.response(top["response_a"])["text"],
                         store.response(top["response_b"])["text"]}
    finally:
        store.close()
