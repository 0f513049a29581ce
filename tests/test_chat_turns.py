"""The Chat tab's votes on any turn and regenerating a turn (a branch), at handler level:
a real AppContext over a real store; the tiny random model where answers are generated."""
from __future__ import annotations

import json
from types import SimpleNamespace

import gradio as gr
import pytest

from apptools import seed_store
from rpo_app.adapters import BASE_LABEL
from rpo_app.config import ServeConfig
from rpo_app.ui import chat
from rpo_app.ui.context import AppContext

SETTINGS = (0.7, 0.95, 8, 0, "")  # temperature, top-p, max new tokens, seed, system prompt
PAIR = {"left": "tuned", "right": BASE_LABEL, "how": chat.NEWEST}


@pytest.fixture
def ctx(data_dir, monkeypatch):
    """No model: votes only need its name."""
    seed_store(data_dir, n_prompts=2, answers_per_prompt=2)  # and no seed prompts to embed
    context = AppContext(ServeConfig(data_dir=data_dir), load_model=False)
    monkeypatch.setattr(context, "host", lambda timeout=None: SimpleNamespace(model_name="tiny"))
    yield context
    context.index(timeout=120)  # the embedder's loader writes to the store: let it finish
    context.store.close()


def _chat(*turns):
    """A Chatbot history from (user message, answer) turns; answer None: not answered."""
    out = []
    for user, answer in turns:
        out.append({"role": "user", "content": user})
        if answer is not None:
            out.append({"role": "assistant", "content": answer})
    return out


LEFT = _chat(("Name a fruit.", "Apple."), ("Why that one?", "It is crunchy."))
RIGHT = _chat(("Name a fruit.", "Banana."), ("Why that one?", "It is sweet."))


def _only_judgment(store) -> dict:
    rows = store.judgments()
    assert len(rows) == 1
    return rows[0]


def _by_side(row) -> dict:
    """side -> (prompt messages or None, prompt text, answer, adapter) of a judgment."""
    a = (row["prompt_a_messages"], row["prompt_a"], row["response_a_text"], row["adapter_a"])
    b = (row["prompt_b_messages"], row["prompt_b"], row["response_b_text"], row["adapter_b"])

    def load(side):
        msgs = side[0]
        return (json.loads(msgs) if msgs else None, *side[1:])

    return {"left": load(a), "right": load(b)} if row["a_side"] == "left" else \
        {"left": load(b), "right": load(a)}


def test_a_vote_at_turn_2_stores_each_sides_conversation_as_a_cross_pair(ctx):
    jid = chat.store_vote(ctx, LEFT, RIGHT, PAIR, "left", "ada", "tiny", turn=2)
    row = _only_judgment(ctx.store)
    assert row["id"] == jid and row["kind"] == "cross" and row["source"] == chat.BLIND_SOURCE
    sides = _by_side(row)
    assert sides["left"][0] == [{"role": "user", "content": "Name a fruit."},
                                {"role": "assistant", "content": "Apple."},
                                {"role": "user", "content": "Why that one?"}]
    assert sides["right"][0] == [{"role": "user", "content": "Name a fruit."},
                                 {"role": "assistant", "content": "Banana."},
                                 {"role": "user", "content": "Why that one?"}]
    assert sides["left"][2:] == ("It is crunchy.", "tuned")
    assert sides["right"][2:] == ("It is sweet.", None)
    assert sides["left"][1].startswith("User: Name a fruit.\n\nAssistant: Apple.")
    # Left won, whichever of the two is A.
    assert (row["verdict"] == "a") == (row["a_side"] == "left")
    assert row["model_a"] == row["model_b"] == "tiny"
    assert row["response_a_source"] == row["response_b_source"] == "chat"
    # The trainer sees both histories.
    (item,) = ctx.store.training_judgments()
    assert len(item["prompt_a_messages"]) == len(item["prompt_b_messages"]) == 3


def test_a_vote_at_turn_1_is_a_paired_judgment_on_the_plain_message(ctx):
    chat.store_vote(ctx, LEFT, RIGHT, PAIR, "tie", "ada", "tiny", turn=1)
    row = _only_judgment(ctx.store)
    assert row["kind"] == "paired" and row["verdict"] == "tie"
    assert row["prompt_a"] == row["prompt_b"] == "Name a fruit."
    assert row["prompt_a_messages"] is None
    assert {row["response_a_text"], row["response_b_text"]} == {"Apple.", "Banana."}


def test_the_same_earlier_answers_make_a_paired_judgment_on_the_conversation(ctx):
    left = _chat(("Name a fruit.", "Apple."), ("Why?", "Crunchy."))
    right = _chat(("Name a fruit.", "Apple."), ("Why?", "Red."))
    chat.store_vote(ctx, left, right, PAIR, "right", "ada", "tiny")  # no turn: the last
    row = _only_judgment(ctx.store)
    assert row["kind"] == "paired" and row["prompt_a_id"] == row["prompt_b_id"]
    assert len(_by_side(row)["left"][0]) == 3
    assert (row["verdict"] == "a") == (row["a_side"] == "right")


@pytest.mark.parametrize("left,right,turn,message", [
    (LEFT, _chat(("Name a fruit.", "Banana."), ("Why that one?", None)), 2,
     "turn 2 has no answer on the right"),
    (LEFT, _chat(("Name a fruit.", "Banana."), ("Why that one?", "It is crunchy.")), 2,
     "both answers to turn 2 are identical"),
    (_chat(("Name a fruit.", ""), ("Why that one?", "No idea.")), RIGHT, 2,
     "the left answer to turn 1 is empty"),
])
def test_votes_that_cannot_be_stored_are_refused_and_write_nothing(ctx, left, right, turn,
                                                                   message):
    counts = (ctx.store.count_prompts(), ctx.store.count_responses())
    with pytest.raises(gr.Error, match=message):
        chat.store_vote(ctx, left, right, PAIR, "left", "ada", "tiny", turn=turn)
    assert (ctx.store.count_prompts(), ctx.store.count_responses()) == counts
    assert ctx.store.count_judgments() == 0


def test_the_vote_handler_picks_a_turn_reveals_and_keeps_later_votes_apart(ctx):
    reveal, tally, pair, row, _board = chat.vote(ctx, "left", LEFT, RIGHT, PAIR, "ada", 2)
    assert "Saved turn 2 as judgment #1" in reveal and "cross-prompt" in reveal
    assert "Left was tuned" in reveal and row["visible"] is True
    assert pair["revealed"] is True and pair["votes"] == {"2": 1}
    assert "Blind votes: **1**" in tally
    with pytest.raises(gr.Error, match="turn 2 of this conversation has its vote already"):
        chat.vote(ctx, "right", LEFT, RIGHT, pair, "ada", "2")
    with pytest.raises(gr.Error, match="there is no turn 3"):
        chat.vote(ctx, "right", LEFT, RIGHT, pair, "ada", 3)
    # After the reveal another turn can still be voted on, but it is not a blind vote.
    reveal, tally, pair, _, _ = chat.vote(ctx, "right", LEFT, RIGHT, pair, "ada", "1")
    assert "Saved turn 1 as judgment #2 (same prompt)" in reveal and "after the reveal" in reveal
    assert pair["votes"] == {"2": 1, "1": 2}
    first, second = ctx.store.judgments()
    assert (first["source"], second["source"]) == (chat.BLIND_SOURCE, chat.REVEALED_SOURCE)
    assert (first["kind"], second["kind"]) == ("cross", "paired")
    assert "Blind votes: **1**" in tally  # the revealed vote is not counted as blind
    with pytest.raises(gr.Error, match="chat in blind mode first"):
        chat.vote(ctx, "left", LEFT, RIGHT, None, "ada", 1)


def test_the_turn_picker_offers_the_turns_both_sides_answered():
    assert chat.answered_turns(LEFT, RIGHT) == [1, 2]
    assert chat.answered_turns(LEFT[:3], RIGHT) == [1]
    assert chat.turn_update(LEFT, RIGHT)["choices"] == [1, 2]
    assert chat.turn_update(LEFT, RIGHT)["value"] == 2
    assert chat.turn_update([], [])["value"] == ""  # blank: the last turn, when there is one
    assert chat.branch_button(2, LEFT, RIGHT)["visible"] is False  # the last: plain Regenerate
    early = chat.branch_button("1", LEFT, RIGHT)
    assert early["visible"] is True and early["value"] == "Regenerate turn 1 (drops turn 2)"
    three = LEFT + _chat(("And?", "Done.")), RIGHT + _chat(("And?", "Over."))
    assert chat.branch_button(1, *three)["value"] == "Regenerate turn 1 (drops turns 2–3)"
    assert chat.branch_button("", LEFT, RIGHT)["visible"] is False


# -- regenerating a turn, with the tiny model -------------------------------------------------

def _last(gen):
    """Run a streaming handler to its end: its first and its last output."""
    outs = list(gen)
    return outs[0], outs[-1]


def test_regenerating_turn_1_of_a_two_turn_chat_leaves_one_turn(model_ctx):
    _, one = _last(chat.submit(model_ctx, "Name a fruit.", [], [], BASE_LABEL, BASE_LABEL,
                               False, None, chat.NEWEST, *SETTINGS))
    _, out = _last(chat.submit(model_ctx, "Why that one?", one[0], one[1], BASE_LABEL,
                               BASE_LABEL, False, None, chat.NEWEST, *SETTINGS))
    left, right = out[0], out[1]
    assert [m["role"] for m in left] == ["user", "assistant"] * 2 and len(right) == 4
    assert out[5]["choices"] == [1, 2] and out[5]["value"] == 2
    pair = {**PAIR, "revealed": True, "votes": {"1": 7, "2": 8}}

    start, out = _last(chat.regenerate_turn(model_ctx, 1, left, right, BASE_LABEL, BASE_LABEL,
                                            False, pair, chat.NEWEST, *SETTINGS))
    assert start[0] == left[:1] and start[1] == right[:1]  # the branch point, at once
    assert start[2]["votes"] == {} and start[5]["choices"] == []
    assert [m["role"] for m in out[0]] == ["user", "assistant"]
    assert [m["role"] for m in out[1]] == ["user", "assistant"]
    assert out[0][0]["content"] == "Name a fruit." and out[5]["choices"] == [1]
    assert out[2]["votes"] == {}  # the votes on the dropped turns are forgotten here

    # Plain Regenerate answers the last turn again and keeps the earlier ones.
    two = _last(chat.submit(model_ctx, "And another?", [], [], BASE_LABEL, BASE_LABEL, False,
                            None, chat.NEWEST, *SETTINGS))[1]
    _, more = _last(chat.submit(model_ctx, "Why?", two[0], two[1], BASE_LABEL, BASE_LABEL,
                                False, {**PAIR, "votes": {"1": 3, "2": 4}}, chat.NEWEST,
                                *SETTINGS))
    _, again = _last(chat.regenerate(model_ctx, more[0], more[1], BASE_LABEL, BASE_LABEL,
                                     False, more[2], chat.NEWEST, *SETTINGS))
    assert again[0][:3] == more[0][:3] and len(again[0]) == 4 and again[2]["votes"] == {"1": 3}
    with pytest.raises(gr.Error, match="nothing to regenerate"):
        list(chat.regenerate(model_ctx, [], [], BASE_LABEL, BASE_LABEL, False, None,
                             chat.NEWEST, *SETTINGS))


# -- answers cut at the token limit -------------------------------------------------------

def _sides_cut(row) -> dict:
    a, b = bool(row["cut_off_a"]), bool(row["cut_off_b"])
    return {"left": a, "right": b} if row["a_side"] == "left" else {"left": b, "right": a}


def test_a_vote_stores_which_answers_were_cut_at_the_token_limit(ctx):
    pair = {**PAIR, "cut_off": {"2": [True, False]}}  # as _stream records it
    chat.store_vote(ctx, LEFT, RIGHT, pair, "left", "ada", "tiny", turn=2)
    chat.store_vote(ctx, LEFT, RIGHT, pair, "left", "ada", "tiny", turn=1)  # nothing recorded
    by_turn = {len(json.loads(r["prompt_a_messages"] or "[0]")): r for r in ctx.store.judgments()}
    assert _sides_cut(by_turn[3]) == {"left": True, "right": False}  # turn 2: 3 messages
    assert _sides_cut(by_turn[1]) == {"left": False, "right": False}


def test_the_chat_records_per_turn_which_answers_hit_the_token_limit(model_ctx):
    host = model_ctx.host()
    pair = {"left": BASE_LABEL, "right": BASE_LABEL, "how": chat.NEWEST}
    stops = host.stop_ids
    try:
        host.stop_ids = set()  # nothing ends: both answers run to the 8-token limit
        _, out = _last(chat.submit(model_ctx, "Name a fruit.", [], [], BASE_LABEL, BASE_LABEL,
                                   False, pair, chat.NEWEST, *SETTINGS))
        assert out[2]["cut_off"] == {"1": [True, True]}
        _, two = _last(chat.submit(model_ctx, "Why?", out[0], out[1], BASE_LABEL, BASE_LABEL,
                                   False, out[2], chat.NEWEST, *SETTINGS))
        assert two[2]["cut_off"] == {"1": [True, True], "2": [True, True]}
        chat.vote(model_ctx, "left", two[0], two[1], two[2], "ada", 2)
        assert _sides_cut(model_ctx.store.judgments()[-1]) == {"left": True, "right": True}
        host.stop_ids = set(range(host.base.config.vocab_size))  # every answer ends at once
        _, again = _last(chat.regenerate_turn(model_ctx, 1, two[0], two[1], BASE_LABEL,
                                              BASE_LABEL, False, two[2], chat.NEWEST,
                                              *SETTINGS))
    finally:
        host.stop_ids = stops
    assert again[2]["cut_off"] == {"1": [False, False]}  # turn 2 is gone, turn 1 redone
