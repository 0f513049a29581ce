"""The tabs' handlers called directly, without Gradio events: a real AppContext (no model)
over a real store."""
from __future__ import annotations

import json
import subprocess
import sys

import gradio as gr
import pytest

from apptools import REPO, seed_store
from rpo_app.config import ServeConfig
from rpo_app.runfolder import MetricRow, RunFolder, RunStatus, SampleRow
from rpo_app.trainconfig import ConfigError, TrainConfig
from rpo_app.ui import chat, label, train
from rpo_app.adapters import BASE_LABEL
from rpo_app.ui.context import AppContext

# What the Train tab's form sends (blank steps, no annotators), with a batch small
# enough for these stores.
FORM = {"loss": "rpo-paired", "beta": 1.0, "temperature": 0.5, "learning_rate": 3e-4,
        "max_steps": None, "batch_size": 2, "lora_r": 16, "max_length": 512,
        "kinds": ["paired", "cross", "unpaired"], "annotators": [], "preview_prompts": ""}


@pytest.fixture
def ctx(data_dir):
    seed_store(data_dir, n_prompts=6, answers_per_prompt=2)  # and no seed prompts to embed
    context = AppContext(ServeConfig(data_dir=data_dir), load_model=False)
    yield context
    context.index(timeout=120)  # the embedder's loader writes to the store: let it finish
    context.store.close()


def _judge(store, annotator="ada"):
    """6 same-prompt pairs, 2 cross-prompt pairs, a tie and two thumbs."""
    prompts = [p["id"] for p in store.prompts()]
    answers = {pid: [r["id"] for r in store.responses_for_prompt(pid)] for pid in prompts}
    for pid in prompts:
        store.add_judgment("paired", *answers[pid], "a", annotator)
    store.add_judgment("paired", *answers[prompts[0]], "tie", annotator)
    store.add_judgment("cross", answers[prompts[0]][0], answers[prompts[1]][0], "a", annotator)
    store.add_judgment("cross", answers[prompts[2]][1], answers[prompts[3]][1], "b", annotator)
    store.add_judgment("unpaired", answers[prompts[4]][0], None, "up", annotator)
    store.add_judgment("unpaired", answers[prompts[5]][0], None, "down", annotator)


# -- the Train tab's form ----------------------------------------------------------------

def test_form_values_map_to_config_fields_by_name_and_dependent_settings_follow(ctx):
    cfg = train.config_from_form(ctx, {**FORM, "loss": "dpo", "beta": None, "lora_r": 8.0,
                                       "max_length": 100, "annotators": [],
                                       "preview_prompts": "Say hi.\n\n  Name a colour. \n"})
    assert cfg.loss == "dpo" and cfg.beta == 0.1  # a blank beta is the loss's own
    assert cfg.lora_r == 8 and isinstance(cfg.lora_r, int) and cfg.lora_alpha == 16
    assert cfg.max_prompt_length == 50  # half of max_length
    assert cfg.max_steps is None and cfg.annotators is None
    assert cfg.preview_prompts == ["Say hi.", "Name a colour."]
    assert cfg.model == ctx.cfg.model and cfg.device == ctx.cfg.device
    # A field the form leaves out keeps TrainConfig's default; derived ones still follow.
    partial = train.config_from_form(ctx, {"loss": "kto", "max_length": 2048})
    assert partial.beta == 0.1 and partial.max_prompt_length == 256 and partial.lora_alpha == 32


def test_steps_box_at_zero_means_epochs(ctx):
    """Gradio turns the blank Steps box into 0 once the page is up; the default form
    must still start a run of one epoch with the step floor, not be refused."""
    _judge(ctx.store)
    cfg = train.config_from_form(ctx, {**FORM, "max_steps": 0})
    assert cfg.max_steps is None and cfg.planned_steps(3) == cfg.min_steps
    assert "enough to start" in train.usable_line(ctx, {**FORM, "max_steps": 0})


@pytest.mark.parametrize("changes,message", [
    ({"batch_size": None}, "batch_size is empty"),
    ({"learning_rate": "fast"}, "learning_rate must be a number, got 'fast'"),
    ({"lora_r": 2.5}, "lora_r must be a whole number"),
    ({"learning_rate": -1e-4}, "learning_rate must be > 0"),
    ({"loss": "nope"}, "unknown loss 'nope'"),
    ({"kinds": ["paired", "gossip"]}, "unknown judgment kinds"),
    ({"lora_rank": 8}, "unknown training settings: lora_rank"),
])
def test_bad_form_values_name_the_field(ctx, changes, message):
    with pytest.raises(ConfigError, match=message):
        train.config_from_form(ctx, {**FORM, **changes})
    assert train.usable_line(ctx, {**FORM, **changes}).startswith("⚠ ")


def test_beta_follows_the_loss():
    assert train.beta_for_loss("rpo-paired") == 1.0
    assert train.beta_for_loss("dpo") == 0.1


def test_usable_line_on_an_empty_store(ctx):
    line = train.usable_line(ctx, FORM)
    assert line.startswith("Current judgments give **0 pairs**")
    assert "**0 chosen / 0 rejected items**" in line and "no judgments to train on" in line


def test_usable_line_counts_what_each_loss_trains_on(ctx):
    _judge(ctx.store)
    line = train.usable_line(ctx, FORM)
    assert ("Current judgments give **8 pairs** (6 same-prompt, 2 cross-prompt) and "
            "**9 chosen / 9 rejected items**") in line
    assert "✔ enough to start" in line and "time estimate once the model has loaded" in line
    # DPO trains on same-prompt pairs only; KTO on the pools; the summary is the same.
    dpo = train.usable_line(ctx, {**FORM, "loss": "dpo"})
    assert "**8 pairs** (6 same-prompt" in dpo
    trained = int(dpo.split("dpo trains on ")[1].split()[0])
    assert 1 <= trained <= 6
    assert "chosen /" in train.usable_line(ctx, {**FORM, "loss": "kto"}).split("trains on")[1]
    only_paired = train.usable_line(ctx, {**FORM, "kinds": ["paired"]})
    assert "**6 pairs** (6 same-prompt, 0 cross-prompt) and **6 chosen / 6 rejected" in only_paired
    # Fewer pairs than one batch: they train in batches of all of them, and the line says so.
    big = train.usable_line(ctx, {**FORM, "batch_size": 64, "max_steps": 5})
    assert "✔ enough to start" in big and "fewer than the batch size (64)" in big
    assert "small set" not in big
    # a small set trains in the small-set schedule's batches, and the line says why
    small = train.usable_line(ctx, {**FORM, "loss": "kto", "batch_size": 8})
    assert "A small set (fewer than 96): it trains in batches of 4." in small
    assert "fewer than the batch size" not in small
    # rpo-unpaired on a small set trained longer than the small-set schedule: the measured
    # caution, before the run starts
    assert "or use KTO" not in train.usable_line(ctx, {**FORM, "loss": "rpo-unpaired"})
    beyond = train.usable_line(ctx, {**FORM, "loss": "rpo-unpaired", "small_set": 4, "batch_size": 8})
    assert "✔ enough to start" in beyond and "⚠ **Measured:** on fewer than 128 liked" in beyond
    assert "or use KTO" not in train.usable_line(ctx, {**FORM, "loss": "kto", "small_set": 4, "batch_size": 8})
    # 60 steps of 2 show it fewer examples than 40 of 4: no caution
    assert "or use KTO" not in train.usable_line(ctx, {**FORM, "loss": "rpo-unpaired", "small_set": 4})


def test_train_tab_never_imports_the_training_loop(ctx, monkeypatch):
    monkeypatch.setitem(sys.modules, "rpo_app.train", None)  # any import of it now fails
    _judge(ctx.store)
    assert "enough to start" in train.usable_line(ctx, FORM)
    with pytest.raises(gr.Error, match="learning_rate must be > 0"):
        train.start_run(ctx, {**FORM, "learning_rate": -1})
    code = "import sys, rpo_app.ui.app; sys.exit('rpo_app.train' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, check=False).returncode == 0


# -- the Train tab's runs ---------------------------------------------------------------

def _finished_run(ctx, rid: str, final_metrics: dict | None = None) -> None:
    ctx.store.record_run(rid, {"loss": "rpo-paired", "beta": 1.0, "learning_rate": 3e-4},
                         str(ctx.layout.run_dir(rid)), state="finished")
    if final_metrics is not None:
        ctx.store.update_run(rid, final_metrics=final_metrics)


def test_runs_view_links_a_renamed_adapter_to_its_run(ctx, tmp_path):
    _finished_run(ctx, "run-a", {"loss": 0.25, "eval_accuracy": 0.75})
    _finished_run(ctx, "run-b", {"loss": 0.5, "eval/accuracy": 0.625})  # recorded before the rename of keys
    ctx.store.register_adapter("run-a", str(tmp_path / "a"), "run-a", None)
    ctx.store.rename_adapter("run-a", "my-tuned", str(tmp_path / "my-tuned"))
    frame, *pickers, _annotators = train.runs_view(ctx)
    rows = {r["run"]: r for r in frame.to_dict("records")}
    assert rows["run-a"]["adapter"] == "my-tuned" and rows["run-b"]["adapter"] == ""
    assert rows["run-a"]["held-out acc"] == "0.750" and rows["run-a"]["final loss"] == "0.250"
    assert rows["run-b"]["held-out acc"] == "0.625"
    assert all(sorted(p["choices"]) == ["run-a", "run-b"] for p in pickers)


def test_watch_reads_a_run_folder(ctx):
    rid = "run-w"
    folder = RunFolder(ctx.layout.run_dir(rid))
    for step in (1, 2, 3, 4):
        folder.append_metric(MetricRow(step=step, loss=1.0 / step, margin=0.1 * step, accuracy=0.5,
                                       pairs_per_s=2.0, eval_accuracy=0.75 if step == 4 else None))
    folder.append_sample(SampleRow(step=4, prompt="Say hi.", base="Hello there.", tuned="Hi!"))
    folder.write_status(RunStatus(state="finished", step=4, max_steps=4, elapsed_s=12.0,
                                  peak_memory_gb=3.25))
    _finished_run(ctx, rid)

    view = dict(zip(train.LIVE, train.watch(ctx, None)))
    assert view["status"].startswith(f"**Run {rid}** · **finished** · step 4/4 · loss 0.2500")
    assert "held-out accuracy **0.75**" in view["status"] and "peak memory 3.2 GB" in view["status"]
    assert set(view["acc_plot"]["series"]) == {"train acc", "train acc (smoothed)", "held-out acc"}
    assert view["samples"].to_dict("records") == [
        {"step": 4, "prompt": "Say hi.", "tuned": "Hi!", "base": "Hello there."}]
    again = dict(zip(train.LIVE, train.watch(ctx, rid, view["drawn"])))
    assert again["loss_plot"] == again["samples"] == {"__type__": "update"}  # gr.skip()

    status = train.watch_json(ctx, "")
    json.dumps(status)
    assert status["run_id"] == rid and status["state"] == "finished" and status["step"] == 4
    assert status["final_metrics"]["eval_accuracy"] == 0.75


def _skipped(value) -> bool:
    return isinstance(value, dict) and value == gr.skip()


def test_watch_without_a_run_draws_the_empty_charts_once(ctx):
    """A newcomer's Train tab has no run for minutes; the timer used to send three empty
    charts and a table every 2 s, and the browser redrew them each time."""
    first = dict(zip(train.LIVE, train.watch(ctx, None)))
    assert first["status"] == "No run yet." and not _skipped(first["loss_plot"])
    again = dict(zip(train.LIVE, train.watch(ctx, None, first["drawn"])))
    assert [n for n in train.LIVE if not _skipped(again[n])] == ["drawn"]
    assert again["drawn"] == first["drawn"]
    # A run that starts is drawn at the next tick.
    RunFolder(ctx.layout.run_dir("run-new")).write_status(RunStatus(state="running", step=1, max_steps=4))
    _finished_run(ctx, "run-new")
    started = dict(zip(train.LIVE, train.watch(ctx, None, again["drawn"])))
    assert started["status"].startswith("**Run run-new**") and not _skipped(started["loss_plot"])


def test_watch_names_the_phase_instead_of_a_step_eta_outside_the_steps(ctx):
    """Before step 1 (loading, reference scoring) and after the last step (final previews,
    saving) the step ETA would read 0 s or nothing while work remains."""
    import os

    rid = "run-p"
    folder = RunFolder(ctx.layout.run_dir(rid))
    ctx.store.record_run(rid, {"loss": "rpo-paired"}, str(folder.root), state="running", pid=os.getpid())
    folder.write_status(RunStatus(state="running", phase="scoring 40 answers with the base model (once)",
                                  step=0, max_steps=60, eta_s=0.0, pid=os.getpid()))
    view = dict(zip(train.LIVE, train.watch(ctx, rid)))
    assert "*scoring 40 answers with the base model (once)…*" in view["status"]
    assert "ETA" not in view["bar"]
    folder.write_status(RunStatus(state="running", phase="training", step=10, max_steps=60, eta_s=30.0,
                                  pid=os.getpid()))
    view = dict(zip(train.LIVE, train.watch(ctx, rid)))
    assert "training" not in view["status"] and "ETA 30 s" in view["bar"]


# -- the Chat tab's pickers (defect 6) ---------------------------------------------------

def test_default_picks_put_the_newest_adapter_on_the_right():
    names = [BASE_LABEL, "old", "new"]
    assert chat.default_picks(names, BASE_LABEL, BASE_LABEL, False) == (BASE_LABEL, "new")
    assert chat.default_picks(names, "old", BASE_LABEL, True) == ("old", BASE_LABEL)
    assert chat.default_picks(names, "gone", "gone", True) == (BASE_LABEL, "new")
    assert chat.default_picks([BASE_LABEL], BASE_LABEL, BASE_LABEL, False) == (BASE_LABEL, BASE_LABEL)


def test_chat_opens_with_the_newest_adapter_on_the_right(ctx, tmp_path):
    for name in ("first", "second"):
        ctx.store.register_adapter(name, str(tmp_path / name), None, None)
    left, right, *_ = chat.load_view(ctx, BASE_LABEL, BASE_LABEL, False)
    assert right["value"] == "second" and right["choices"] == [BASE_LABEL, "first", "second"]
    assert "value" not in left  # unchanged
    # The user's own pick survives the next refresh.
    _, kept = chat.refresh_picks(ctx, BASE_LABEL, BASE_LABEL, True)
    assert "value" not in kept


# -- the Label and Data tabs ---------------------------------------------------------------

def test_label_handlers_judge_and_undo(ctx):
    shown = dict(zip(label.VIEW, label.show_next(ctx, "paired", None)))
    # The store has pairs: "nothing left" would be untrue, and the request is made once.
    assert "Enter your name" in shown["question"] and "Nothing left" not in shown["question"]
    assert shown["status"] == "" and shown["token"] is None
    shown = dict(zip(label.VIEW, label.show_next(ctx, "paired", "ada")))
    assert shown["token"] and shown["prompt"]["value"].startswith("Test prompt")
    # The page load's late first item (or a name-less one) leaves the item on screen alone.
    kept = dict(zip(label.VIEW, label.poll(ctx, shown["token"], "paired", None)))
    assert all(kept[name] == gr.skip() for name in label.VIEW if name != "poll")
    judged = dict(zip(label.VIEW, label.judge(ctx, "left", shown["token"], "paired", "clearly", "ada")))
    assert judged["status"].startswith("Saved judgment #1 (A better)")
    assert ctx.store.judgment(1)["strength"] == "clearly"
    undone = dict(zip(label.VIEW, label.undo(ctx, "paired", "ada")))
    assert undone["status"].startswith("Undid judgment #1")
    assert undone["left"]["value"] == shown["left"]["value"]


def test_a_page_left_behind_is_redrawn_and_judges_nothing_it_did_not_show(ctx):
    item = dict(zip(label.VIEW, label.show_next(ctx, "paired", "ada")))
    assert item["shown"] == item["token"]  # the page carries the token it shows
    # In step with the server: the tick keeps the order line current and nothing else.
    line, seen, behind = label.sync(ctx, item["token"], item["token"], None)
    assert line.startswith("Order:") and seen is None and not behind
    # An older "enter your name" answer landed over the item (the page shows no token while
    # the server holds one). One tick waits: an answer may still be on its way.
    _, seen, behind = label.sync(ctx, item["token"], "", None)
    assert seen and not behind
    _, _, behind = label.sync(ctx, item["token"], "", seen)
    assert behind
    _, again, behind = label.sync(ctx, item["token"], "", "some-other|mismatch")
    assert again == seen and not behind  # a different difference starts over
    redrawn = dict(zip(label.VIEW, label.redraw(ctx, item["token"], "paired", "ada")))
    assert redrawn["token"] == redrawn["shown"] == item["token"]
    assert redrawn["left"]["value"] == item["left"]["value"]
    assert "Enter your name" not in redrawn["question"]
    # A click on a page that showed another item stores nothing and shows the server's item.
    late = dict(zip(label.VIEW, label.judge(ctx, "left", item["token"], "paired", "none", "ada",
                                            shown="an-older-token")))
    assert late["status"].startswith("⚠ Not saved: the click was on an earlier item")
    assert late["token"] == item["token"] and ctx.store.stats()["judgments"] == 0
    late = dict(zip(label.VIEW, label.skip(ctx, item["token"], "paired", "ada",
                                           shown="an-older-token")))
    assert late["token"] == item["token"] and ctx.queue.item(item["token"]) is not None
    # The page in step (or a script that does not say what it shows): stored.
    done = dict(zip(label.VIEW, label.judge(ctx, "left", item["token"], "paired", "none", "ada",
                                            shown=item["token"])))
    assert done["status"].startswith("Saved judgment #1")
    done = dict(zip(label.VIEW, label.judge(ctx, "right", done["token"], "paired", "none", "ada")))
    assert done["status"].startswith("Saved judgment #2")


def test_label_tab_says_which_answer_stopped_at_the_token_limit(tmp_path):
    from rpo_app.store import Store

    store = Store(tmp_path)
    (pid,), _ = store.add_prompts(["Tell me about sleep."], "t")
    store.add_response(pid, "Sleep is good because it", "model", cut_off=True,
                       gen_settings={"max_new_tokens": 192})
    store.add_response(pid, "Sleep helps you recover.", "model", gen_settings={"max_new_tokens": 192})
    store.close()
    context = AppContext(ServeConfig(data_dir=tmp_path), load_model=False)
    try:
        shown = dict(zip(label.VIEW, label.show_next(context, "paired", "ada")))
        cut_side = "A" if shown["left"]["value"].endswith("because it") else "B"
        assert (f"Answer {cut_side} stopped at the model's token limit (192 new tokens) before it ended."
                in shown["question"])
        assert f"Answer {'AB'.replace(cut_side, '')} stopped" not in shown["question"]
    finally:
        context.index(timeout=120)
        context.store.close()


def test_data_tab_backlog_is_the_cli_backlog(ctx):
    from rpo_app.generate import backlog

    store = ctx.store
    fresh = [store.add_prompt(f"New prompt {i}?", source="test")[0] for i in range(2)]
    store.add_response(fresh[1], "one answer", source="model", adapter="tuned")
    assert backlog(store, 2) == [(fresh[0], 0), (fresh[1], 1)]
    assert backlog(store, 2, limit=1) == [(fresh[0], 0)]
    by_tuned = backlog(store, 1, adapter="tuned")
    assert (fresh[1], 1) not in by_tuned and (fresh[0], 0) in by_tuned and len(by_tuned) == 7
    assert backlog(store, 2, prompt_ids=[fresh[1], fresh[0]]) == [(fresh[1], 1), (fresh[0], 0)]


def test_data_tab_says_when_answers_await_the_cut_check(ctx):
    from rpo_app.store import CUT_UNCHECKED_KEY
    from rpo_app.ui import data

    def rows():
        frame = data.refresh(ctx)[0]
        return frame[frame["what"] == "responses not checked for a cut"]

    assert rows().empty  # a store that always recorded cut answers
    ctx.store.put_setting(CUT_UNCHECKED_KEY, {"answers": 5}, by="migration")
    row = rows().iloc[0]
    assert row["count"] == 5 and "5 generated answers were stored before" in row["detail"]
    assert "python -m rpo_app mark-cut" in row["detail"]


def test_data_tab_export_leaves_out_cut_answers_when_asked(ctx):
    import pandas as pd

    from rpo_app.ui import data

    pid = ctx.store.prompts()[0]["id"]
    whole = ctx.store.add_response(pid, "A whole answer.", "generate", model="m")[0]
    cut = ctx.store.add_response(pid, "An answer that ran out of", "generate", model="m", cut_off=True)[0]
    ctx.store.add_judgment("unpaired", whole, None, "up", "ada")
    ctx.store.add_judgment("unpaired", cut, None, "down", "ada")
    path, status = data.export(ctx, "trl-kto:jsonl")
    assert "1 of them holds an answer cut at its token limit" in status
    assert len(pd.read_json(path, lines=True)) == 2
    path, status = data.export(ctx, "trl-kto:jsonl", True)
    assert list(pd.read_json(path, lines=True)["completion"]) == ["A whole answer."]
    assert "left out 1 row that holds" in status
    with pytest.raises(gr.Error, match="applies to the TRL formats"):
        data.export(ctx, "full:csv", True)


def test_label_tab_offers_the_first_run_on_a_store_without_answers(tmp_path):
    ctx = AppContext(ServeConfig(data_dir=tmp_path), load_model=False)  # the seed prompts only
    try:
        _first_run_then_nothing_left(ctx)
    finally:
        ctx.index(timeout=120)
        ctx.store.close()


def _first_run_then_nothing_left(ctx):
    assert ctx.store.count_prompts() > 0 and ctx.store.stats()["responses"] == 0
    shown = dict(zip(label.VIEW, label.show_next(ctx, "paired", "ada")))
    assert "Start here" in shown["question"]
    assert shown["first_run"]["visible"] is True
    assert "once the model has loaded" in shown["question"]  # this ctx has no model
    nameless = dict(zip(label.VIEW, label.show_next(ctx, "paired", None)))
    assert "Start here" in nameless["question"] and "Enter your name" in nameless["status"]
    ctx.store.add_response(ctx.store.prompts(limit=1)[0]["id"], "An answer.", source="test")
    shown = dict(zip(label.VIEW, label.show_next(ctx, "paired", "ada")))
    assert "Nothing left to judge" in shown["question"] and shown["first_run"]["visible"] is False


def test_the_data_tabs_job_line_moves_between_answers(ctx):
    """The Data tab's timer redraws the store tables only when the counts change, and a
    running job's line every time: its ETA counts down while a batch stores nothing."""
    import time

    from rpo_app.genjob import GenJobStatus
    from rpo_app.ui import data

    line, _stats, _prompts, shown = data.poll(ctx)
    assert not _skipped(line)
    assert all(map(_skipped, data.poll(ctx, shown)[:3]))  # no job, nothing changed
    ctx.generation._status = GenJobStatus(state="running", total=32, done=2, prompts=16,
                                          started_at=time.time() - 24, updated_at=time.time() - 4,
                                          plan=[(2, 20.0), (8, 40.0), (22, 80.0)])
    line, _stats, _prompts, shown = data.poll(ctx, shown)
    again = data.poll(ctx, shown)
    assert _skipped(again[1]) and _skipped(again[2]) and again[3] == shown  # tables kept
    assert "ETA" in again[0] and "2/32 stored" in again[0]
    ctx.generation._status.started_at -= 30  # 30 s on with no new answer: the ETA moved
    assert data.poll(ctx, shown)[0] != again[0]


def test_a_waiting_label_tab_redraws_only_its_line(tmp_path):
    """While the first answers are written the tab's timer asks every 2 s. It sends the line
    that says how far they are, not the whole tab (two tables and the ranking cards each
    time kept the browser busy beside the model); the item, once there, comes whole."""
    import time

    from rpo_app.genjob import GenJobStatus

    ctx = AppContext(ServeConfig(data_dir=tmp_path), load_model=False)
    try:
        ctx.generation._status = GenJobStatus(state="running", total=32, prompts=16,
                                              started_at=time.time())
        loaded = dict(zip(label.VIEW, label.poll(ctx, None, "paired", "ada")))  # page load
        assert "being written" in loaded["question"] and not any(map(_skipped, loaded.values()))
        ticked = dict(zip(label.VIEW, label.poll(ctx, None, "paired", "ada", timer=True)))
        assert "being written" in ticked["question"] and ticked["poll"].active
        assert [n for n in label.VIEW if not _skipped(ticked[n])] == list(label.WAITING_VIEW)
        prompt = ctx.store.prompts(limit=1)[0]["id"]
        for text in ("A first answer.", "A second, different answer."):
            ctx.store.add_response(prompt, text, source="test")
        shown = dict(zip(label.VIEW, label.poll(ctx, None, "paired", "ada", timer=True)))
        assert shown["token"] and shown["left"]["value"] and not shown["poll"].active
        assert not any(map(_skipped, shown.values()))
    finally:
        ctx.index(timeout=120)
        ctx.store.close()


def test_train_bar_names_the_phase_and_never_says_eta_0(ctx):
    import time

    running = RunStatus(state="running", phase="scoring the answers with the base model",
                        phase_done=0, phase_total=5000, phase_unit="tokens",
                        phase_started_at=time.time() - 3, step=0, max_steps=60)
    bar = train.run_bar(running)
    assert "scoring the answers with the base model" in bar and "ETA" not in bar
    running.phase_done = 2500
    assert "ETA" in train.run_bar(running) and "2500/5000 tokens" in train.run_bar(running)
    previews = RunStatus(state="running", phase="the final previews", phase_done=96, phase_total=96,
                         phase_unit="tokens", phase_started_at=time.time() - 3, step=60, max_steps=60)
    assert "finishing" in train.run_bar(previews) and "ETA 0" not in train.run_bar(previews)
    previews.phase_done = 93  # 3 tokens left, about 0.1 s: work remains, so never "ETA 0 s"
    assert "ETA 1 s" in train.run_bar(previews)
    loading = RunStatus(state="running", phase="loading the model", phase_started_at=time.time())
    assert "loading the model" in train.run_bar(loading) and "value=" not in train.run_bar(loading)
    steps = RunStatus(state="running", phase="training", step=20, max_steps=60, eta_s=400.0,
                      elapsed_s=200.0)
    assert "ETA 7 min" in train.run_bar(steps) and "20/60 steps" in train.run_bar(steps)


def test_save_memory_box_and_the_last_runs_memory(ctx):
    import psutil

    assert train.config_from_form(ctx, {**FORM, "gradient_checkpointing": True}).gradient_checkpointing
    assert not train.config_from_form(ctx, {**FORM, "gradient_checkpointing": False}).gradient_checkpointing
    assert train.config_from_form(ctx, {**FORM, "lora_layers": 8}).lora_layers == 8
    assert train.config_from_form(ctx, {**FORM, "lora_layers": "8"}).lora_layers == 8  # typed in the box
    assert train.config_from_form(ctx, {**FORM, "lora_layers": "all"}).lora_layers == 0
    assert train.config_from_form(ctx, {**FORM, "lora_layers": "half"}).lora_layers is None
    assert train.config_from_form(ctx, FORM).lora_layers is None  # the top half, the default
    # "auto", 0 or blank: the rate follows the layers (trainconfig.resolve_for_model)
    assert train.config_from_form(ctx, {**FORM, "learning_rate": "auto"}).learning_rate is None
    assert train.config_from_form(ctx, {**FORM, "learning_rate": "6e-4"}).learning_rate == 6e-4
    assert train.config_from_form(ctx, {**FORM, "learning_rate": 0}).learning_rate is None
    assert train.config_from_form(ctx, {**FORM, "learning_rate": None}).learning_rate is None
    with pytest.raises(ConfigError, match="lora_layers must be a number, got 'most'"):
        train.config_from_form(ctx, {**FORM, "lora_layers": "most"})
    with pytest.raises(ConfigError, match="lora_layers"):
        train.config_from_form(ctx, {**FORM, "lora_layers": -1})
    rid = "run-m"
    folder = RunFolder(ctx.layout.run_dir(rid))
    folder.append_metric(MetricRow(step=1, loss=0.5, tokens_per_s=100.0))
    free = psutil.virtual_memory().available / 1e9
    ref = "scoring the answers with the base model"
    folder.write_status(RunStatus(state="finished", step=1, max_steps=1, peak_memory_gb=2 * free,
                                  phases=[{"phase": "loading the model", "seconds": 3.0},
                                          {"phase": ref, "seconds": 6.0, "work": 2000, "unit": "tokens"},
                                          {"phase": "training", "seconds": 9.0}]))
    _finished_run(ctx, rid)
    last = train._last_run_timings(ctx, "fp32")
    assert last["peak_memory_gb"] == 2 * free and last["step_s_per_token"] == pytest.approx(0.01)
    assert last["rates"] == {ref: pytest.approx(0.003)}  # the phases that counted tokens
    note = train._memory_note(last)
    assert f"({rid}, without gradient checkpointing) peaked at {2 * free:.1f} GB" in note
    assert "Tick *Save memory*" in note  # it needed more than is free now
    assert "Tick" not in train._memory_note({**last, "peak_memory_gb": free / 4})
    assert train._memory_note({}) == ""


def test_the_estimate_plans_a_steps_memory_as_the_trainer_will(tiny_model_dir):
    """Before any run: what a step needs beside the model against the memory free, and
    Save memory switching on by itself where the trainer would switch it on."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from rpo_app.runestimate import step_plan

    host = SimpleNamespace(device="cpu", model=AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    fits = step_plan(host, TrainConfig(), 8, 64)
    assert not fits.checkpointing and not fits.switched and 0 < fits.need_gb < fits.free_gb
    note = train._memory_note({}, fits)
    assert f"a step needs about {fits.need_gb:.1f} GB" in note and "switch on" not in note
    huge = 10 ** 8  # tokens: no machine has that memory
    short = step_plan(host, TrainConfig(), 8, huge)
    assert short.checkpointing and short.switched
    assert "*Save memory* will switch on by itself" in train._memory_note({}, short)
    asked = step_plan(host, TrainConfig(gradient_checkpointing=True), 8, huge)
    assert asked.checkpointing and not asked.switched
    assert asked.need_gb == short.need_gb < step_plan(
        host, TrainConfig(auto_checkpointing=False), 8, huge).need_gb  # planned without it
    assert not step_plan(host, TrainConfig(auto_checkpointing=False), 8, huge).checkpointing


def test_gradio_queue_polls_gently_when_idle():
    """Gradio's queue looks for work every 1 ms when it has none: 8% of a core on an idle
    2-core machine. The app slows that through Gradio's private attributes; a Gradio
    release that renames them fails here rather than burning the cores unnoticed."""
    from rpo_app.ui import app as app_ui

    with gr.Blocks() as demo:
        gr.Markdown("idle")
    demo.queue()
    assert app_ui.quiet_queue(demo)
    assert demo._queue.sleep_when_free == app_ui.QUEUE_IDLE_POLL_S
    assert demo._queue.progress_update_sleep_when_free == app_ui.QUEUE_PROGRESS_POLL_S


def test_the_device_line_names_the_arithmetic_a_default_run_uses(monkeypatch):
    """On a CPU with bf16 instructions a default run trains under bf16 autocast; the line
    said fp32 whatever the CPU."""
    import torch

    import rpo_app.models as models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    assert "bf16 autocast" in train._device_line() and "fp32" not in train._device_line()
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    assert train._device_line().split("),")[1].startswith(" fp32.")
