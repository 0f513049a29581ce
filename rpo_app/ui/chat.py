"""The Chat tab: base and tuned side by side in one batched forward, blind votes, adapters.

A blind vote is stored as a paired judgment (source "blind-chat"): the user message
becomes a prompt, each answer a response that records which model/adapter made it.
"""
from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from rpo_app.labelqueue import canonical_pair
from rpo_app.ui.context import AppContext

BASE = "base model"
BLIND_SOURCE = "blind-chat"


def build(ctx: AppContext, annotator_box: gr.Textbox) -> dict:
    blind_pair = gr.State(None)  # {"left": name, "right": name} while blind
    with gr.Row():
        blind = gr.Checkbox(False, label="Blind mode: hide which model is which, then vote",
                            elem_id="chat-blind")
        tally = gr.Markdown("", elem_id="chat-tally")
    with gr.Row():
        with gr.Column():
            left_pick = gr.Dropdown([BASE], value=BASE, label="Left", elem_id="chat-left-pick",
                                    allow_custom_value=True)  # adapters appear after load
            left_bot = gr.Chatbot(label="Left", height=420, buttons=["copy"], elem_id="chat-left")
        with gr.Column():
            right_pick = gr.Dropdown([BASE], value=BASE, label="Right", elem_id="chat-right-pick",
                                     allow_custom_value=True)
            right_bot = gr.Chatbot(label="Right", height=420, buttons=["copy"],
                                   elem_id="chat-right")
    with gr.Row():
        message = gr.Textbox(placeholder="Ask both models something…", show_label=False,
                             scale=5, elem_id="chat-input")
        send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
    with gr.Row():
        regen = gr.Button("Regenerate", size="sm", elem_id="chat-regen")
        clear = gr.Button("Clear", size="sm", elem_id="chat-clear")
    with gr.Row(visible=False) as vote_row:
        v_left = gr.Button("Left is better", elem_id="vote-left")
        v_right = gr.Button("Right is better", elem_id="vote-right")
        v_tie = gr.Button("Tie", elem_id="vote-tie")
        v_bad = gr.Button("Both bad", elem_id="vote-bothbad")
    reveal = gr.Markdown("", elem_id="chat-reveal")
    with gr.Accordion("Generation settings", open=False, elem_id="chat-settings"):
        with gr.Row():
            temp = gr.Slider(0, 1.5, value=0.7, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.1, 1.0, value=0.95, step=0.01, label="Top-p")
            max_new = gr.Slider(16, 1024, value=256, step=16, label="Max new tokens",
                                elem_id="chat-max-new")
            seed = gr.Number(0, precision=0, label="Seed")
        system = gr.Textbox("", label="System prompt (optional)", lines=2)
    with gr.Accordion("Adapters", open=False):
        adapters_table = gr.Dataframe(interactive=False, elem_id="adapters-table")
        with gr.Row():
            ad_pick = gr.Dropdown([], label="Adapter", scale=2, elem_id="adapter-pick",
                                  allow_custom_value=True)  # names are checked by adapters.py
            ad_new = gr.Textbox(label="New name", scale=2)
            ad_rename = gr.Button("Rename", scale=1)
            ad_delete = gr.Button("Delete", variant="stop", scale=1)
        with gr.Row():
            ad_zip = gr.Button("Export adapter (PEFT, zip)")
            ad_merge = gr.Button("Export merged full model (safetensors, zip)")
        ad_file = gr.File(label="Download", interactive=False)

    settings_inputs = [temp, top_p, max_new, seed, system]

    def choices():
        return [BASE] + [a["name"] for a in ctx.store.adapters()]

    def refresh_picks(left, right):
        ctx.sync_adapters()
        names = choices()
        return (gr.update(choices=names, value=left if left in names else BASE),
                gr.update(choices=names, value=right if right in names else names[-1]))

    def submit(msg, left_hist, right_hist, left, right, is_blind, pair, *settings):
        msg = (msg or "").strip()
        if not msg:
            raise gr.Error("type a message first")
        left_hist = list(left_hist or []) + [{"role": "user", "content": msg}]
        right_hist = list(right_hist or []) + [{"role": "user", "content": msg}]
        if is_blind and not pair:
            pair = _blind_pair(ctx)
        # Clear the input once, now: the stream below must not touch it, or a message the
        # user types while answers stream in would be wiped.
        yield left_hist, right_hist, pair, gr.update(visible=False), ""
        yield from _stream(ctx, left_hist, right_hist, left, right, is_blind, pair, settings)

    def regenerate(left_hist, right_hist, left, right, is_blind, pair, *settings):
        left_hist, right_hist = _drop_last_answer(left_hist), _drop_last_answer(right_hist)
        if not left_hist:
            raise gr.Error("nothing to regenerate")
        yield from _stream(ctx, left_hist, right_hist, left, right, is_blind, pair, settings)

    def vote(verdict):
        def handler(left_hist, right_hist, pair, typed, request: gr.Request):
            name = ctx.annotator(request, typed)
            if not pair or not left_hist or not right_hist:
                raise gr.Error("chat in blind mode first, then vote")
            if left_hist[-1]["role"] != "assistant" or right_hist[-1]["role"] != "assistant":
                raise gr.Error("wait for both answers before voting")
            try:
                jid = _store_vote(ctx, left_hist, right_hist, pair, verdict, name)
            except ValueError as err:  # e.g. a full disk, or a message the store refuses
                raise gr.Error(str(err))
            return (f"Saved as judgment #{jid}. **Left was {pair['left']}**, "
                    f"**right was {pair['right']}**.", _tally(ctx), None,
                    gr.update(visible=False))
        return handler

    def toggle_blind(is_blind):
        if not is_blind:
            return (gr.update(visible=True), gr.update(visible=True), None,
                    gr.update(visible=False), "", [], [])
        pair = _blind_pair(ctx)
        return (gr.update(visible=False), gr.update(visible=False), pair,
                gr.update(visible=False), "Blind mode: the two sides are hidden and shuffled. "
                "Chat, then vote; names are revealed after the vote.", [], [])

    def clear_all(is_blind):
        return [], [], (_blind_pair(ctx) if is_blind else None), gr.update(visible=False), ""

    chat_inputs = [left_bot, right_bot, left_pick, right_pick, blind, blind_pair, *settings_inputs]
    chat_outputs = [left_bot, right_bot, blind_pair, vote_row, message]
    send.click(submit, [message, *chat_inputs], chat_outputs, api_name="chat_send",
               concurrency_limit=1, concurrency_id="model")
    message.submit(submit, [message, *chat_inputs], chat_outputs, api_name=False,
                   concurrency_limit=1, concurrency_id="model")
    regen.click(regenerate, chat_inputs, chat_outputs, api_name="chat_regenerate",
                concurrency_limit=1, concurrency_id="model")
    clear.click(clear_all, blind, [left_bot, right_bot, blind_pair, vote_row, reveal],
                api_name="chat_clear")
    blind.change(toggle_blind, blind, [left_pick, right_pick, blind_pair, vote_row, reveal,
                                       left_bot, right_bot], api_name=False)
    for button, verdict in ((v_left, "left"), (v_right, "right"), (v_tie, "tie"),
                            (v_bad, "both_bad")):
        button.click(vote(verdict), [left_bot, right_bot, blind_pair, annotator_box],
                     [reveal, tally, blind_pair, vote_row], api_name=f"chat_vote_{verdict}")
    for pick in (left_pick, right_pick):
        pick.focus(refresh_picks, [left_pick, right_pick], [left_pick, right_pick],
                   api_name=False)

    # -- adapters --------------------------------------------------------------------
    def adapters_view():
        rows = ctx.store.adapters()
        frame = pd.DataFrame([{"name": a["name"], "from run": a["run_id"] or "",
                               "base model": a["base_model"] or "bundled SmolLM2",
                               "path": a["path"]} for a in rows])
        return frame, gr.update(choices=[a["name"] for a in rows])

    def rename(old, new):
        from rpo_app import adapters

        try:
            adapters.rename(ctx.store, ctx.layout, old, new)
            host = ctx.host(timeout=0.01) if ctx.model_status() == "model ready" else None
            if host is not None:
                host.unload_adapter(old)
                host.load_adapter(new, ctx.store.adapter(new)["path"])
        except (ValueError, RuntimeError, OSError) as err:
            raise gr.Error(str(err))
        return adapters_view()

    def delete(name):
        from rpo_app import adapters

        try:
            adapters.delete(ctx.store, ctx.layout, name)
            if ctx.model_status() == "model ready":
                ctx.host().unload_adapter(name)
        except (ValueError, RuntimeError, OSError) as err:
            raise gr.Error(str(err))
        return adapters_view()

    def export_zip(name):
        from rpo_app import adapters

        if not name:
            raise gr.Error("pick an adapter")
        out = Path(tempfile.mkdtemp(prefix="rpo-adapter-")) / f"{name}-peft.zip"
        try:
            adapters.export_zip(ctx.layout, name, out)
        except (ValueError, OSError) as err:
            raise gr.Error(str(err))
        return str(out)

    def export_merged(name, progress=gr.Progress()):
        import shutil

        from rpo_app import adapters

        if not name:
            raise gr.Error("pick an adapter")
        progress(0.1, desc="merging the adapter into the base model")
        work = Path(tempfile.mkdtemp(prefix="rpo-merged-"))
        try:
            adapters.merge(ctx.store.adapter(name)["path"], work / name, base_model=ctx.cfg.model,
                           data_dir=ctx.layout.root)
        except (ValueError, RuntimeError, OSError) as err:
            raise gr.Error(str(err))
        progress(0.8, desc="zipping")
        return shutil.make_archive(str(work / f"{name}-merged"), "zip", work / name)

    ad_rename.click(rename, [ad_pick, ad_new], [adapters_table, ad_pick], api_name="adapter_rename")
    ad_delete.click(delete, ad_pick, [adapters_table, ad_pick], api_name="adapter_delete")
    ad_zip.click(export_zip, ad_pick, ad_file, api_name="adapter_export")
    ad_merge.click(export_merged, ad_pick, ad_file, api_name="adapter_merge",
                   concurrency_limit=1, concurrency_id="model")

    def on_load(left, right):
        return (*refresh_picks(left, right), _tally(ctx), *adapters_view())

    return {"load": on_load, "load_inputs": [left_pick, right_pick],
            "load_outputs": [left_pick, right_pick, tally, adapters_table, ad_pick]}


def _blind_pair(ctx: AppContext) -> dict:
    """Newest adapter against the base model, sides shuffled."""
    adapters = ctx.store.adapters()
    if not adapters:
        raise gr.Error("blind mode needs a trained adapter; train one in the Train tab first")
    names = [adapters[-1]["name"], BASE]
    random.shuffle(names)
    return {"left": names[0], "right": names[1]}


def _stream(ctx, left_hist, right_hist, left, right, is_blind, pair, settings):
    from rpo_app.generate import GenSettings

    temp, top_p, max_new, seed, system = settings
    host = ctx.host()
    if is_blind:
        left, right = pair["left"], pair["right"]
    gen = GenSettings(temperature=float(temp), top_p=float(top_p), max_new_tokens=int(max_new),
                      seed=int(seed or 0), system_prompt=(system or "").strip() or None)
    adapters = [None if left == BASE else left, None if right == BASE else right]
    for name in adapters:
        if name is not None and name not in host.adapter_names():
            raise gr.Error(ctx.adapter_problem(name))
    left_hist = list(left_hist) + [{"role": "assistant", "content": ""}]
    right_hist = list(right_hist) + [{"role": "assistant", "content": ""}]
    convs = [_as_messages(left_hist[:-1]), _as_messages(right_hist[:-1])]
    for texts in host.chat_stream(convs, adapters, gen):
        left_hist[-1] = {"role": "assistant", "content": texts[0]}
        right_hist[-1] = {"role": "assistant", "content": texts[1]}
        yield left_hist, right_hist, pair, gr.update(visible=False), gr.skip()
    yield left_hist, right_hist, pair, gr.update(visible=bool(is_blind)), gr.skip()


def _as_messages(history) -> list[dict]:
    return [{"role": m["role"], "content": _text(m["content"])} for m in history]


def _text(content) -> str:
    """Chatbot messages may come back as lists of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part)
                       for part in content)
    if isinstance(content, dict):
        return content.get("text", "")
    return str(content)


def _drop_last_answer(history):
    history = list(history or [])
    if history and history[-1]["role"] == "assistant":
        history = history[:-1]
    return history


def _store_vote(ctx: AppContext, left_hist, right_hist, pair, verdict, annotator) -> int:
    """The last user turn is the prompt; earlier turns are not part of the judgment."""
    prompt = _text(left_hist[-2]["content"])
    host = ctx.host()
    pid = ctx.store.ensure_prompt(prompt, source="chat")
    ids = {}
    for side, hist in (("left", left_hist), ("right", right_hist)):
        name = pair[side]
        rid, _ = ctx.store.add_response(pid, _text(hist[-1]["content"]), source="chat",
                                        model=host.model_name,
                                        adapter=None if name == BASE else name)
        ids[side] = rid
    if ids["left"] == ids["right"]:
        raise gr.Error("both answers are identical; nothing to compare")
    a, b, stored, a_side = canonical_pair(ids["left"], ids["right"], verdict)
    jid, _ = ctx.store.add_judgment("paired", a, b, stored, annotator,
                                    source=BLIND_SOURCE, a_side=a_side,
                                    request_id=f"blind:{a}:{b}:{annotator}:{int(time.time())}")
    return jid


def _tally(ctx: AppContext) -> str:
    wins = ctx.store.blind_tally(BLIND_SOURCE)
    total = sum(wins.values())
    if not total:
        return "Blind votes so far: none."
    return (f"Blind votes: **tuned {wins['tuned']}** · base {wins['base']} · tie {wins['tie']} "
            f"· both bad {wins['both bad']} (of {total})")
