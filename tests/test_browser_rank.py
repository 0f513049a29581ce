"""Ranking in a real browser: rank 4 answers by keys (with a tie), fix a bad order, move a
card by drag, undo, then train on the rankings."""
from __future__ import annotations

import re
import time

import pytest

from apptools import chromium_browser, screenshot, seed_store, start_app
from rpo_app.store import Store

pytestmark = [pytest.mark.browser, pytest.mark.slow]
TIMEOUT = 30_000


def _box(page, elem_id):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def _cards(page) -> list[tuple[str, str]]:
    """(label, text) of the ranking cards, in the order shown."""
    return page.locator("#lbl-rank-cards .rank-card").evaluate_all(
        "els => els.map(e => [e.dataset.label, e.querySelector('.rank-text').innerText])")


def _best_first(cards) -> list[str]:
    """The labels ordered as this test's annotator prefers: the answer's "Option X", A best."""
    return [label for label, _ in sorted(
        cards, key=lambda c: re.search(r"Option (\w)", c[1]).group(1))]


def _wait_for_new_cards(page, old_first: str | None) -> None:
    page.wait_for_function(
        "old => { const c = document.querySelector('#lbl-rank-cards .rank-card .rank-text'); "
        "return c && c.innerText !== old; }", arg=old_first or "", timeout=TIMEOUT)


def test_rank_by_keys_and_drag_then_train(data_dir, tiny_model_dir):
    seed_store(data_dir, n_prompts=4, answers_per_prompt=4)
    app = start_app(data_dir, extra_args=("--model", str(tiny_model_dir)), wait_model=True)
    try:
        with chromium_browser() as browser:
            page = browser.new_page(viewport={"width": 1400, "height": 1300})
            page.goto(app.url, timeout=60_000)
            _box(page, "annotator-name").fill("ada")
            _box(page, "annotator-name").press("Enter")
            page.get_by_label("Rank several answers").check()
            _wait_for_new_cards(page, None)

            # 1. By keys, with a tie between the 2nd and 3rd best: "W > X = Y > Z".
            order = _best_first(_cards(page))
            page.evaluate("() => document.activeElement && document.activeElement.blur()")
            for key in [order[0], order[1], "=", order[2], order[3]]:
                page.keyboard.press("Equal" if key == "=" else key.lower())
            assert _box(page, "lbl-rank-order").input_value() == \
                f"{order[0]} > {order[1]} = {order[2]} > {order[3]}"
            # The cards follow the typed order, the tied ones sharing a place.
            shown = page.locator("#lbl-rank-cards .rank-card").evaluate_all(
                "els => els.map(e => e.dataset.label + e.querySelector('.rank-place').innerText)")
            assert shown == [f"{order[0]}#1", f"{order[1]}#2", f"{order[2]}#2", f"{order[3]}#3"]
            screenshot(page, "label-rank.png", full_page=True)
            first = _cards(page)[0][1]
            page.keyboard.press("Enter")
            page.wait_for_function("() => document.querySelector('#lbl-status').innerText"
                                   ".includes('Saved ranking #1')", timeout=TIMEOUT)
            assert "6 pairs, 5 with a winner" in page.locator("#lbl-status").inner_text()

            # 2. A bad order is refused with its reason; the item and the typed text stay.
            _wait_for_new_cards(page, first)
            cards = _cards(page)
            _box(page, "lbl-rank-order").fill(f"{cards[0][0]} {cards[1][0]}")
            page.locator("button#lbl-rank-save").click()
            page.wait_for_function("() => document.querySelector('#lbl-status').innerText"
                                   ".includes('leaves out')", timeout=TIMEOUT)
            assert f"answers {cards[2][0]} and {cards[3][0]}" in \
                page.locator("#lbl-status").inner_text()
            assert _box(page, "lbl-rank-order").input_value() == f"{cards[0][0]} {cards[1][0]}"
            assert _cards(page)[0][1] in {c[1] for c in cards}

            # 3. Drag the cards into order (the worst to the top first, so at least one
            # drag happens); the box follows.
            _box(page, "lbl-rank-order").fill("")
            order = _best_first(cards)

            def move(label: str, k: int) -> None:
                page.locator(f"#lbl-rank-cards .rank-card[data-label='{label}']").drag_to(
                    page.locator("#lbl-rank-cards .rank-card").nth(k),
                    target_position={"x": 30, "y": 3})

            move(order[-1], 0)
            for k, label in enumerate(order[:-1]):
                if [c[0] for c in _cards(page)].index(label) != k:
                    move(label, k)
            page.wait_for_function(
                "want => { const b = document.querySelector('#lbl-rank-order textarea, "
                "#lbl-rank-order input'); return b && b.value === want; }",
                arg=" > ".join(order), timeout=TIMEOUT)
            first = _cards(page)[0][1]
            page.locator("button#lbl-rank-save").click()
            page.wait_for_function("() => document.querySelector('#lbl-status').innerText"
                                   ".includes('Saved ranking #2')", timeout=TIMEOUT)

            # 4. Undo takes the whole ranking back and shows its answers again.
            page.evaluate("() => document.activeElement && document.activeElement.blur()")
            page.keyboard.press("z")
            page.wait_for_function("() => document.querySelector('#lbl-status').innerText"
                                   ".includes('Undid ranking #2')", timeout=TIMEOUT)
            assert {c[1] for c in _cards(page)} == {c[1] for c in cards}
            for prompt in range(3):  # rank it again, and the two prompts left, by keys
                cards = _cards(page)
                first = cards[0][1]
                page.evaluate("() => document.activeElement && document.activeElement.blur()")
                for label in _best_first(cards):
                    page.keyboard.press(label.lower())
                page.keyboard.press("Enter")
                page.wait_for_function(
                    f"() => document.querySelector('#lbl-status').innerText"
                    f".includes('Saved ranking #{prompt + 3}')", timeout=TIMEOUT)
                if prompt < 2:
                    _wait_for_new_cards(page, first)
            page.wait_for_function("() => document.querySelector('#lbl-question').innerText"
                                   ".includes('Nothing left to rank')", timeout=TIMEOUT)

            # 5. Train on the rankings: 5 + 6 + 6 + 6 decided pairs.
            page.get_by_role("tab", name="Train").click()
            for name, value in (("steps", 2), ("batch", 4)):
                box = page.locator(f"#train-{name} input").first
                box.fill(str(value))
                box.press("Tab")
            _box(page, "train-previews").fill("Say hi.")
            page.wait_for_function("() => document.querySelector('#train-usable').innerText"
                                   ".includes('23 pairs')", timeout=TIMEOUT)
            page.locator("button#train-start, #train-start button").first.click()
            page.wait_for_function("() => document.querySelector('#train-status').innerText"
                                   ".includes('finished')", timeout=300_000)
        # The app registers the adapter when the training process has exited.
        store = Store(data_dir)
        try:
            run_id = store.runs()[0]["id"]
            deadline = time.monotonic() + 60
            while store.adapter_for_run(run_id) is None:
                assert time.monotonic() < deadline, f"run {run_id} left no adapter"
                time.sleep(0.3)
        finally:
            store.close()
    finally:
        app.stop()
    store = Store(data_dir)
    try:
        active = store.rankings()
        assert len(active) == 4 and all(r["annotator"] == "ada" for r in active)
        assert len(store.rankings(include_retracted=True)) == 5
        tied = [r for r in active if any(len(t) == 2 for t in r["tiers"])]
        assert len(tied) == 1
        for r in active:  # the store's best answer is the one that says "Option A"
            assert "Option A" in r["answers"][r["tiers"][0][0]]
        assert store.stats()["ranking_pairs"] == 24
        assert store.run(run_id)["state"] == "finished"
    finally:
        store.close()
