"""A blind chat of two turns in a real browser (Playwright + Debian's chromium) on the tiny
random model, a vote on the second turn, and a short training run that takes it in: the
vote is stored with each side's conversation up to that turn as its prompt."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from apptools import chromium_browser, make_lora_adapter, screenshot, seed_store, start_app
from rpo_app.store import Store
from test_browser_train_chat import (TIMEOUT, _box, _button, _set_number, _train_until_finished,
                                     _wait_for_adapter, _wait_until_streams_end)

pytestmark = [pytest.mark.browser, pytest.mark.slow]
ADAPTER = "seeded-adapter"
SIDES = ("chat-left", "chat-right")


def _seed(data_dir, tiny_model_dir, tmp_path) -> None:
    """Ten prompts with two answers each, eight of them judged in the Label tab's way, and
    one adapter on the tiny model, so blind mode has a pair to draw."""
    from rpo_app import adapters
    from rpo_app.config import DataLayout

    seeded = seed_store(data_dir, n_prompts=10, answers_per_prompt=2)
    make_lora_adapter(Path(tiny_model_dir), tmp_path / "run" / "adapter")
    store = Store(data_dir)
    try:
        for pid in seeded["prompts"][:8]:
            store.add_judgment("paired", *seeded["responses"][pid], "a", "ada")
        adapters.register_from_run(store, DataLayout(data_dir), tmp_path / "run", ADAPTER,
                                   base_model=str(tiny_model_dir))
    finally:
        store.close()


def _bot_turns(page, elem_id) -> int:
    return page.locator(f"#{elem_id} .message-row, #{elem_id} [data-testid=\"bot\"]").count()


def _send(page, text: str, turn: int) -> None:
    """Send a message and wait until both sides have answered it (the turn picker shows
    the new turn once both streams end)."""
    _box(page, "chat-input").fill(text)
    _button(page, "chat-send").click()
    page.wait_for_function("t => document.querySelector('#chat-turn input').value === t",
                           arg=str(turn), timeout=120_000)
    _wait_until_streams_end(page, SIDES)


def _pick_turn(page, turn: int) -> None:
    page.locator("#chat-turn input").first.click()
    page.locator("#chat-turn").get_by_role("option", name=str(turn), exact=True).click()
    page.wait_for_function("t => document.querySelector('#chat-turn input').value === t",
                           arg=str(turn), timeout=TIMEOUT)


def test_blind_vote_on_the_second_turn_then_train_on_it(data_dir, tiny_model_dir, tmp_path):
    _seed(data_dir, tiny_model_dir, tmp_path)
    app = start_app(data_dir, extra_args=("--model", str(tiny_model_dir)), wait_model=True)
    try:
        with chromium_browser() as browser:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(app.url, timeout=60_000)
            _box(page, "annotator-name").fill("grace")
            _box(page, "annotator-name").press("Enter")
            page.get_by_role("tab", name="Chat").click()
            page.locator("#chat-settings").get_by_text("Generation settings").click()
            _set_number(page, "chat-max-new", 16)
            page.locator("#chat-blind input").check()
            page.wait_for_function("() => document.querySelector('#chat-reveal').innerText"
                                   ".includes('Blind mode')", timeout=TIMEOUT)

            _send(page, "Name a fruit.", 1)
            _send(page, "Why that one?", 2)
            assert _button(page, "vote-left").is_visible()
            # An earlier turn offers its branch; the last turn is plain Regenerate.
            _pick_turn(page, 1)
            _button(page, "chat-regen-turn").wait_for(state="visible", timeout=TIMEOUT)
            assert "Regenerate turn 1" in _button(page, "chat-regen-turn").inner_text()
            page.locator("#chat-turn").scroll_into_view_if_needed()
            screenshot(page, "chat-turn-branch.png")
            _pick_turn(page, 2)
            _button(page, "chat-regen-turn").wait_for(state="hidden", timeout=TIMEOUT)

            _button(page, "vote-left").click()
            page.wait_for_function("() => document.querySelector('#chat-reveal').innerText"
                                   ".includes('Saved turn 2')", timeout=TIMEOUT)
            reveal = page.locator("#chat-reveal").inner_text()
            assert "Left was" in reveal and ADAPTER in reveal and "base model" in reveal
            assert "Blind votes: 1" in page.locator("#chat-tally").inner_text()
            assert _bot_turns(page, "chat-left") >= 4 and _bot_turns(page, "chat-right") >= 4
            page.locator("#chat-left").scroll_into_view_if_needed()
            shot = screenshot(page, "chat-turn-vote.png", full_page=True)
            assert shot.exists()

            jid, left_conv = _check_vote(data_dir)
            assert left_conv[0]["content"] == "Name a fruit."

            # 8 label pairs and the chat vote: a short run from the Train tab.
            _train_until_finished(page, 9, "Say hi.", steps=4, batch=2)
            page.evaluate("() => window.scrollTo(0, 0)")
            screenshot(page, "chat-turn-vote-trained.png")
            run_id = _wait_for_adapter(data_dir)  # the app registers it: before it stops
    finally:
        app.stop()

    store = Store(data_dir)
    try:
        used = store.runs_using([jid])[jid]
        assert [u["run_id"] for u in used] == [run_id]
        assert used[0]["role"] in ("train", "held_out")
        assert store.run(run_id)["state"] == "finished"
    finally:
        store.close()


def _check_vote(data_dir) -> tuple[int, list[dict]]:
    """The one blind vote: at turn 2, each side's own conversation as its prompt."""
    store = Store(data_dir)
    try:
        votes = [j for j in store.judgments() if j["source"] == "blind-chat"]
    finally:
        store.close()
    assert len(votes) == 1
    vote = votes[0]
    assert vote["annotator"] == "grace"
    assert {vote["adapter_a"], vote["adapter_b"]} == {None, ADAPTER}
    convs = [json.loads(vote["prompt_a_messages"]), json.loads(vote["prompt_b_messages"])]
    for conv in convs:
        assert [m["role"] for m in conv] == ["user", "assistant", "user"]
        assert conv[0]["content"] == "Name a fruit." and conv[2]["content"] == "Why that one?"
    # Each side's context is its own first answer: two contexts, a cross-prompt pair (or
    # one prompt, a paired judgment, if both sides happened to answer alike).
    same = convs[0] == convs[1]
    assert vote["kind"] == ("paired" if same else "cross")
    assert same == (vote["prompt_a_id"] == vote["prompt_b_id"])
    left_won = (vote["verdict"] == "a") == (vote["a_side"] == "left")
    assert left_won
    left = convs[0] if vote["a_side"] == "left" else convs[1]
    return vote["id"], left
