"""The Team tab's and the Chat tab's trust handlers called directly: agreement figures,
flags, gold marking, blind pairings, the leaderboard and an adapter's lineage."""
from __future__ import annotations

import json

import gradio as gr
import pytest

from apptools import seed_store
from rpo_app.adapters import BASE_LABEL
from rpo_app.config import ServeConfig, TeamSettings
from rpo_app.labelqueue import LabelQueue
from rpo_app.ui import chat
from rpo_app.ui import team as team_tab
from rpo_app.ui.context import AppContext


@pytest.fixture
def ctx(data_dir):
    seed_store(data_dir, n_prompts=12, answers_per_prompt=2)
    context = AppContext(ServeConfig(data_dir=data_dir), load_model=False)
    yield context
    context.index(timeout=120)
    context.store.close()


def _label(q, name, n, verdict):
    for _ in range(n):
        item = q.next_item(name)
        q.submit(item.token, verdict(item) if callable(verdict) else verdict, name)


def test_team_view_shows_agreement_once_two_annotators_share_items(ctx):
    summary, *_ = team_tab.view(ctx)
    assert "No item has two annotators yet" in summary
    team_tab.save_settings(ctx, 2, 0.0, 0.0, "lead")
    q = LabelQueue(ctx.store, seed=1)
    # Both prefer answer 0 on even prompts and answer 1 on odd ones: they agree on every item.
    def rule(item):
        lower_left = item.left["id"] < item.right["id"]
        return "left" if lower_left == (item.left["prompt_id"] % 2 == 0) else "right"

    _label(q, "ada", 12, rule)
    _label(q, "bob", 12, rule)
    summary, alpha, kappa, people, flags, gold, table = team_tab.view(ctx)
    assert "**12 items** judged by two or more" in summary and "α = 1.00" in summary
    assert kappa.iloc[0][["annotator 1", "annotator 2", "items"]].tolist() == ["ada", "bob", 12]
    assert set(people["annotator"]) == {"ada", "bob"} and len(table) == 24


def test_an_annotator_who_always_picks_left_is_flagged_with_the_numbers(ctx):
    q = LabelQueue(ctx.store, seed=2)
    _label(q, "lefty", 12, "left")
    *_, flags, _gold, _table = team_tab.view(ctx)
    assert "**lefty**" in flags and "12 of 12" in flags and "expected 50%" in flags


def test_settings_are_validated_and_gold_marks_show_in_the_table(ctx):
    with pytest.raises(gr.Error, match="overlap"):
        team_tab.save_settings(ctx, 0, 0.1, 0.0, "lead")
    assert TeamSettings.load(ctx.store) == TeamSettings()  # nothing was changed
    assert "annotator(s)" in team_tab.save_settings(ctx, 3, 0.2, 0.05, "lead")
    assert TeamSettings.load(ctx.store) == TeamSettings(3, 0.2, 0.05)
    q = LabelQueue(ctx.store, seed=3)
    _label(q, "ada", 2, "left")
    line, table = team_tab.mark_gold(ctx, "#1, 2", "lead")
    assert "Marked 2" in line and table.set_index("id").loc[[1, 2], "gold"].tolist() == ["★", "★"]
    with pytest.raises(gr.Error, match="no judgment #99"):
        team_tab.mark_gold(ctx, "99", "lead")
    with pytest.raises(gr.Error, match="not a judgment id"):
        team_tab.mark_gold(ctx, "one", "lead")
    line, table = team_tab.mark_gold(ctx, "1", "lead", mark=False)
    assert "Unmarked 1" in line and table.set_index("id").loc[1, "gold"] == ""


def _vote(ctx, left_name, right_name, verdict, n=1, tag=""):
    """A blind vote as the Chat tab stores it (answers with their model's provenance)."""
    for i in range(n):
        hist = lambda who: [{"role": "user", "content": f"Q{tag}{i}?"},  # noqa: E731
                            {"role": "assistant", "content": f"{who} says {tag}{i}"}]
        chat.store_vote(ctx, hist(left_name), hist(right_name),
                        {"left": left_name, "right": right_name}, verdict, "ada", "test-model")


def test_blind_pairings_and_the_leaderboard(ctx, tmp_path):
    with pytest.raises(gr.Error, match="needs a trained adapter"):
        chat.blind_pair(ctx)
    for name in ("one", "two"):
        ctx.store.register_adapter(name, str(tmp_path / name), None, None)
    assert set(chat.blind_pair(ctx).values()) >= {"two", BASE_LABEL}  # newest vs base
    with pytest.raises(gr.Error, match="two different models"):
        chat.blind_pair(ctx, chat.PICKED, "one", "one")
    picked = chat.blind_pair(ctx, chat.PICKED, "one", "two")
    assert {picked["left"], picked["right"]} == {"one", "two"} and picked["how"] == chat.PICKED
    assert chat.votes_view(ctx)[1].empty
    _vote(ctx, "two", BASE_LABEL, "left", n=3, tag="a")
    _vote(ctx, "one", BASE_LABEL, "right", n=2, tag="b")
    # The pair nobody has compared yet comes next.
    fewest = chat.blind_pair(ctx, chat.FEWEST)
    assert {fewest["left"], fewest["right"]} == {"one", "two"}
    before = chat.votes_view(ctx)[1].set_index("model")
    assert before.loc["two", "rating"] > before.loc[BASE_LABEL, "rating"] == 1000
    assert before.loc["two", ["votes", "wins"]].tolist() == [3, 3]
    _vote(ctx, "one", "two", "left", n=4, tag="c")  # one beats two, four times
    after = chat.votes_view(ctx)[1].set_index("model")
    assert after.loc["one", "rating"] > before.loc["one", "rating"]
    assert after.loc["two", "votes"] == 7 and "Blind votes: **9**" in chat.votes_view(ctx)[0]


def test_adapter_lineage_view_and_train_again_refusals(ctx, tmp_path):
    folder = tmp_path / "tuned"
    folder.mkdir()
    (folder / "lineage.json").write_text(json.dumps({
        "source": "the store", "train_ids": [1, 2, 3], "held_out_ids": [4],
        "counts": {"train": 3, "held_out": 1, "by_kind": {"paired": 4},
                   "by_annotator": {"ada": 3, "bob": 1}},
        "left_out": {"annotators": {"eve": {"judgments": 2, "why": "excluded"}}},
        "store": {"active_judgments": 6, "max_judgment_id": 6}}))
    ctx.store.register_adapter("tuned", str(folder), None, None)
    text, who = chat.lineage_view(ctx, "tuned")
    assert "**3 judgments**, 1 held out" in text and "ada 3, bob 1" in text
    assert "Left out **eve** (2 judgments, excluded)" in text and who["choices"] == ["ada", "bob"]
    with pytest.raises(gr.Error, match="a run here trained"):
        chat.train_again(ctx, "tuned", ["bob"], "")


def test_the_train_form_takes_a_gold_accuracy_bar(ctx):
    from rpo_app.ui import train

    form = {"loss": "rpo-paired", "batch_size": 2, "kinds": ["paired"], "annotators": [],
            "preview_prompts": ""}
    assert train.config_from_form(ctx, {**form, "min_gold_accuracy": 0}).min_gold_accuracy is None
    assert train.config_from_form(ctx, {**form, "min_gold_accuracy": 0.7}).min_gold_accuracy == 0.7
    store = ctx.store
    gold = []
    for pid in [p["id"] for p in store.prompts()][:6]:
        a, b = [r["id"] for r in store.responses_for_prompt(pid)]
        gold.append(store.add_judgment("paired", a, b, "a", "lead")[0])
        store.add_judgment("paired", a, b, "b", "sloppy", source="gold-check")
    store.mark_gold(gold, by="lead")
    line = train.usable_line(ctx, {**form, "min_gold_accuracy": 0.7})
    assert "leaving out sloppy" in line and "below the gold-accuracy bar" in line
