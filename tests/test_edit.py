"""Editing an answer into a better one: a new response with its parent and editor, the
judgment "edited ≻ original", refusals that store nothing, the diff, and training data."""
from __future__ import annotations

import pytest

from rpo_app.batches import judgment_pairs
from rpo_app.labelqueue import LabelQueue
from rpo_app.store import EDIT_SOURCE, StoreError
from rpo_app.textdiff import counts, diff_html


def _pair(store):
    pid, _ = store.add_prompt("How do I boil an egg?", "test")
    a, _ = store.add_response(pid, "Put it in water.", "model", model="m")
    b, _ = store.add_response(pid, "Eggs are food.", "model", model="m")
    return pid, a, b


def test_an_edit_is_a_new_answer_that_beats_its_original(store):
    pid, a, b = _pair(store)
    out = store.add_edit(a, "Put it in boiling water for 7 minutes, then in cold water.", "ada")
    new = store.response(out["response_id"])
    assert (new["source"], new["parent_id"], new["editor"], new["prompt_id"]) == (EDIT_SOURCE, a, "ada", pid)
    j = store.judgment(out["judgment_id"])
    assert (j["kind"], j["response_a"], j["response_b"], j["verdict"], j["source"]) == \
        ("paired", a, out["response_id"], "b", EDIT_SOURCE)
    # Training sees the edit as the chosen answer and the original as the rejected one.
    (pair,) = judgment_pairs(store.training_judgments())
    assert pair.chosen.response.startswith("Put it in boiling") and pair.rejected.response == "Put it in water."


@pytest.mark.parametrize("parent, text, message", [
    (None, "  ", "is empty"),
    (None, "Put it in water.", "same as the original"),
    (None, "Eggs are food.", "already has an answer with exactly that text"),
    (999, "Something new.", "no answer #999"),
    (None, "Bad \x1b[31m escape", "control character"),
])
def test_bad_edits_are_refused_and_store_nothing(store, parent, text, message):
    _, a, _ = _pair(store)
    before = store.snapshot()
    with pytest.raises(StoreError, match=message):
        store.add_edit(parent or a, text, "ada")
    assert store.snapshot() == before


def test_the_queue_edits_the_answer_on_screen_once_and_keeps_the_item_open(store):
    _pair(store)
    q = LabelQueue(store, seed=1)
    item = q.next_item("ada")
    text = item.right["text"] + " With more detail."
    first = q.submit_edit(item.token, "right", text, "ada")
    again = q.submit_edit(item.token, "right", text, "ada")  # a double click
    assert first["created"] and not again["created"]
    assert again["response_id"] == first["response_id"] and first["original_id"] == item.right["id"]
    assert len(store.judgments()) == 1
    with pytest.raises(ValueError, match="'left' or 'right'"):
        q.submit_edit(item.token, "middle", "x", "ada")
    # The pair on screen can still be judged.
    assert q.submit(item.token, "left", "ada")["created"]
    with pytest.raises(ValueError, match="no longer open"):
        q.submit_edit(item.token, "left", "late", "ada")


def test_the_diff_marks_words_and_escapes_html():
    html = diff_html("Put it in water.", "Put it in <b>boiling</b> water.")
    assert "<ins" in html and "&lt;b&gt;boiling&lt;/b&gt;" in html and "<b>" not in html
    assert counts("a b c", "a x c d") == (1, 2)


@pytest.mark.slow
def test_an_sft_weight_adds_the_chosen_answers_nll_to_the_loss(tmp_path, tiny_model_dir, data_dir):
    """Off by default; with a weight, step 1 (untouched model, every reward 0) is
    log 2 plus weight x the per-token NLL of the chosen answers."""
    import math

    from rpo_app.runfolder import read_jsonl
    from rpo_app.train import main
    from test_train import make_judgments, tiny_args, write_jsonl

    judgments = write_jsonl(tmp_path / "j.jsonl", make_judgments())
    out = tmp_path / "run"
    assert main(tiny_args(out, judgments, tiny_model_dir, data_dir, **{"max-steps": 1,
                                                                         "sft-weight": 0.5})) == 0
    first = read_jsonl(out / "metrics.jsonl")[0]
    # The tiny model is random: its NLL per token is near ln(vocabulary), far above 1.
    assert first["loss"] - math.log(2) > 0.5
