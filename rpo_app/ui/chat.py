"""The Chat tab: base and tuned side by side in one batched forward, blind votes, adapters.

Both sides get the same user messages; each side answers in its own conversation (its
own earlier answers). A vote is cast on one turn (the turn picker; the last by default)
and stored with the conversation up to that turn: for each side, its messages up to and
including turn t's user message are the prompt (turn 1: a plain prompt), its answer at
turn t the response, which records the model/adapter that wrote it. When the two sides'
prompts are the same (turn 1, or identical earlier answers) the judgment is "paired";
otherwise "cross" (answers to two different prompts).

A blind conversation keeps its pair of models until Clear (or blind mode or its rule
changes). The first vote reveals the pair; other turns of the same conversation can
still be voted on, but those votes are no longer blind: they are stored with source
"chat-revealed" instead of "blind-chat" (trained on like any judgment, left out of the
blind tally). Regenerating turn t drops that turn and every later one on both sides
and answers turn t again: a branch. Votes already stored keep their own copy of the
conversation.
"""
from __future__ import annotations

import functools
import random
import shutil
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from rpo_app.labelqueue import canonical_pair
from rpo_app.adapters import BASE_LABEL
from rpo_app.ui.chat_streams import session_of
from rpo_app.ui.context import AppContext

BLIND_SOURCE = "blind-chat"
REVEALED_SOURCE = "chat-revealed"  # a vote cast after the pair was revealed: not blind

# How blind mode picks its two models.
NEWEST = "newest adapter vs base model"
FEWEST = "the two with the fewest votes"
PICKED = "the two picked above"
PAIRINGS = (NEWEST, FEWEST, PICKED)
# A stream's outputs when it must not write (chat_outputs: both chats, the blind pair,
# the vote row, the message box, the turn picker).
_SKIP_ALL = tuple(gr.skip() for _ in range(6))


# -- the two pickers ----------------------------------------------------------------------

def pick_choices(ctx: AppContext) -> list[str]:
    """The base model, then the adapters oldest to newest."""
    return [BASE_LABEL] + [a["name"] for a in ctx.store.adapters()]


def default_picks(names: list[str], left: str | None, right: str | None,
                  user_picked_right: bool) -> tuple[str, str]:
    """The two sides after the adapter list (`names`, oldest to newest) changed.

    The right side shows the newest adapter, so a run that just finished is what the
    tab compares with the base model, unless the user chose the right side themselves
    and that choice still exists. The left side keeps its pick while it exists.
    """
    left = left if left in names else BASE_LABEL
    if not (user_picked_right and right in names):
        right = names[-1]
    return left, right


def refresh_picks(ctx: AppContext, left: str | None, right: str | None,
                  user_picked_right: bool) -> tuple:
    ctx.sync_adapters()
    names = pick_choices(ctx)
    new_left, new_right = default_picks(names, left, right, user_picked_right)
    return _pick_update(names, left, new_left), _pick_update(names, right, new_right)


def _pick_update(names: list[str], old: str | None, new: str):
    # Send a value only when it changes: this runs when a picker gets the focus, and an
    # echo of the old value could land after the user's own choice and undo it.
    return gr.update(choices=names) if new == old else gr.update(choices=names, value=new)


def load_view(ctx: AppContext, left: str | None, right: str | None,
              user_picked_right: bool) -> tuple:
    """When the page opens or the tab is selected: pickers, tally, adapters, leaderboard."""
    tally, board = votes_view(ctx)
    return (*refresh_picks(ctx, left, right, user_picked_right), tally, *adapters_view(ctx), board)


# -- chatting and voting ------------------------------------------------------------------

def submit(ctx: AppContext, msg, left_hist, right_hist, left, right, is_blind, pair, how,
           temp, top_p, max_new, seed, system, conv=0, request: gr.Request = None):
    """Send a message to both sides and stream their answers. `conv`: the conversation
    number the page had when the message was sent (chat_streams)."""
    session = session_of(request)
    if not ctx.chat_streams.is_current(session, conv):  # sent before a Clear
        yield _SKIP_ALL
        return
    msg = (msg or "").strip()
    if not msg:
        raise gr.Error("type a message first")
    left_hist = list(left_hist or []) + [{"role": "user", "content": msg}]
    right_hist = list(right_hist or []) + [{"role": "user", "content": msg}]
    if is_blind and not pair:
        pair = blind_pair(ctx, how, left, right)
    # Clear the input once, now: the stream below must not touch it, or a message the
    # user types while answers stream in would be wiped.
    yield (left_hist, right_hist, pair, gr.update(visible=False), "",
           turn_update(left_hist, right_hist))
    yield from _stream(ctx, left_hist, right_hist, left, right, is_blind, pair,
                       (temp, top_p, max_new, seed, system), session, conv)


def regenerate(ctx: AppContext, left_hist, right_hist, left, right, is_blind, pair, how,
               temp, top_p, max_new, seed, system, conv=0, request: gr.Request = None):
    """Answer the last turn again (on both sides)."""
    yield from regenerate_turn(ctx, None, left_hist, right_hist, left, right, is_blind, pair,
                               how, temp, top_p, max_new, seed, system, conv, request)


def regenerate_turn(ctx: AppContext, turn, left_hist, right_hist, left, right, is_blind, pair,
                    how, temp, top_p, max_new, seed, system, conv=0,
                    request: gr.Request = None):
    """Answer turn `turn` again (None: the last) on both sides, dropping every later turn:
    a branch of the conversation. Votes stored already keep their copy of it; this
    conversation forgets its votes on the dropped turns, so they can be voted on again."""
    session = session_of(request)
    if not ctx.chat_streams.is_current(session, conv):  # asked for before a Clear
        yield _SKIP_ALL
        return
    n = len(_turns(left_hist))
    if not n:
        raise gr.Error("nothing to regenerate")
    t = n if turn in (None, "") else _turn_number(turn, n)
    left_hist, right_hist = _until_user(left_hist, t), _until_user(right_hist, t)
    if pair:
        pair = {**pair, **{key: {k: v for k, v in (pair.get(key) or {}).items() if int(k) < t}
                           for key in ("votes", "cut_off")}}
    elif is_blind:
        pair = blind_pair(ctx, how, left, right)
    yield (left_hist, right_hist, pair, gr.update(visible=False), gr.skip(),
           turn_update(left_hist, right_hist))
    # A new draw: the same seed on the same conversation would give the same answers.
    settings = (temp, top_p, max_new, int(seed or 0) + random.randrange(1, 1 << 30), system)
    yield from _stream(ctx, left_hist, right_hist, left, right, is_blind, pair, settings,
                       session, conv)


def vote(ctx: AppContext, verdict: str, left_hist, right_hist, pair, annotator: str,
         turn=None) -> tuple:
    """Store a vote on one turn (None: the last); returns the reveal, the tally, the pair
    (now revealed, with the turns voted on), the vote row (still shown: other turns can
    be voted on) and the leaderboard."""
    if not pair or not left_hist or not right_hist:
        raise gr.Error("chat in blind mode first, then vote")
    if turn in (None, "") and (left_hist[-1]["role"] != "assistant"
                               or right_hist[-1]["role"] != "assistant"):
        raise gr.Error("wait for both answers before voting")
    t = last_answered(left_hist, right_hist) if turn in (None, "") else \
        _turn_number(turn, len(_turns(left_hist)))
    votes = dict(pair.get("votes") or {})
    if str(t) in votes:
        raise gr.Error(f"turn {t} of this conversation has its vote already (judgment "
                       f"#{votes[str(t)]}); pick another turn, or Clear to start a new "
                       "conversation")
    revealed = bool(pair.get("revealed"))
    source = REVEALED_SOURCE if revealed else BLIND_SOURCE
    try:
        jid = store_vote(ctx, left_hist, right_hist, pair, verdict, annotator,
                         ctx.host().model_name, turn=t, source=source)
    except ValueError as err:  # e.g. a full disk, or a message the store refuses
        raise gr.Error(str(err))
    votes[str(t)] = jid
    pair = {**pair, "revealed": True, "votes": votes}
    kind = ctx.store.judgment(jid)["kind"]
    what = "same prompt" if kind == "paired" else "each side's own conversation: cross-prompt"
    after = (f" (after the reveal, so stored as `{REVEALED_SOURCE}`, not as a blind vote)"
             if revealed else "")
    tally, board = votes_view(ctx)
    text = (f"Saved turn {t} as judgment #{jid} ({what}){after}. **Left was {pair['left']}**, "
            f"**right was {pair['right']}**. Other turns can still be voted on, but not "
            f"blind any more (`{REVEALED_SOURCE}`); **Clear** starts a new blind "
            "conversation with a new pair.")
    return text, tally, pair, gr.update(visible=True), board


# The tab's load (page open, tab select) and the votes write the tally and the leaderboard.
# One at a time, so a load that read the votes before a vote was stored cannot finish
# after it and put the old tally back (CI saw "Blind votes: 3" after the fourth).
VOTES_GROUP = "chat-votes"


BLIND_NOTE = ("Blind mode: the two sides are hidden and shuffled, and stay the same two "
              "models for the whole conversation. Chat, pick a turn, then vote; names are "
              "revealed after the first vote. Later votes in the same conversation are "
              "kept apart as not blind; Clear starts a new blind conversation.")


def toggle_blind(ctx: AppContext, is_blind: bool, how: str = NEWEST, left: str | None = None,
                 right: str | None = None, conv=0, request: gr.Request = None) -> tuple:
    """Blind mode on or off (or its rule changed): a new conversation. The last output is
    its number, returned once the old conversation's answers stopped streaming."""
    pair = blind_pair(ctx, how, left, right) if is_blind else None
    conv = ctx.chat_streams.start_new(session_of(request), conv)
    if not is_blind:
        return (gr.update(visible=True), gr.update(visible=True), None,
                gr.update(visible=False), "", [], [], turn_update([], []), conv)
    return (gr.update(visible=False), gr.update(visible=False), pair,
            gr.update(visible=False), BLIND_NOTE, [], [], turn_update([], []), conv)


def clear_all(ctx: AppContext, is_blind: bool, how: str = NEWEST, left: str | None = None,
              right: str | None = None, conv=0, request: gr.Request = None) -> tuple:
    """A new conversation (the last output: its number, as in toggle_blind)."""
    pair = blind_pair(ctx, how, left, right) if is_blind else None
    conv = ctx.chat_streams.start_new(session_of(request), conv)
    return [], [], pair, gr.update(visible=False), "", turn_update([], []), conv


# -- turns --------------------------------------------------------------------------------

def turn_update(left_hist, right_hist):
    """The turn picker for these histories: the turns both sides have answered, the last
    of them picked."""
    done = answered_turns(left_hist, right_hist)
    return gr.update(choices=done, value=done[-1] if done else "")


def branch_button(turn, left_hist, right_hist):
    """The "regenerate turn t" button: shown when the picked turn is not the last."""
    n = len(_turns(left_hist))
    try:
        t = _turn_number(turn, n)
    except gr.Error:
        t = n
    if t >= n:
        return gr.update(visible=False)
    later = f"turn {n}" if t + 1 == n else f"turns {t + 1}–{n}"
    return gr.update(visible=True, value=f"Regenerate turn {t} (drops {later})")


def answered_turns(left_hist, right_hist) -> list[int]:
    """The turns (1-based) that have an answer on both sides."""
    left, right = _turns(left_hist), _turns(right_hist)
    return [t for t in range(1, min(len(left), len(right)) + 1)
            if left[t - 1][1] is not None and right[t - 1][1] is not None]


def last_answered(left_hist, right_hist) -> int:
    done = answered_turns(left_hist, right_hist)
    if not done:
        raise gr.Error("wait for both answers before voting")
    return done[-1]


def _turns(history) -> list[tuple[int, int | None]]:
    """(index of the user message, index of its answer or None) for each turn."""
    out: list[list] = []
    for i, m in enumerate(history or []):
        if m["role"] == "user":
            out.append([i, None])
        elif m["role"] == "assistant" and out:
            out[-1][1] = i
    return [tuple(t) for t in out]


def _turn_number(turn, n: int) -> int:
    try:
        t = int(float(turn))
    except (TypeError, ValueError):
        raise gr.Error(f"pick a turn (1 to {n})") from None
    if not 1 <= t <= n:
        raise gr.Error(f"there is no turn {t}; this conversation has "
                       f"{n} turn{'s' if n != 1 else ''}")
    return t


def _until_user(history, t: int) -> list:
    """The messages up to and including turn t's user message."""
    turns = _turns(history)
    return list(history)[:turns[t - 1][0] + 1] if len(turns) >= t else list(history or [])


def side_turn(history, t: int, side: str) -> tuple[list[dict], str]:
    """(the conversation up to and including turn t's user message, turn t's answer) of
    one side, as plain messages; gr.Error when turn t has no answer on this side or an
    earlier answer is empty (a conversation turn must have text)."""
    turns = _turns(history)
    if len(turns) < t or turns[t - 1][1] is None:
        raise gr.Error(f"turn {t} has no answer on the {side} yet; wait for it, or "
                       "regenerate it")
    messages = _as_messages(list(history)[:turns[t - 1][0] + 1])
    for k, (_, answer) in enumerate(turns[:t - 1], 1):
        if not _text(history[answer]["content"]).strip():
            raise gr.Error(f"the {side} answer to turn {k} is empty, so the conversation up "
                           f"to turn {t} cannot be a prompt; vote on turn {k}, or "
                           f"regenerate it")
    return messages, _text(history[turns[t - 1][1]]["content"])


def blind_pair(ctx: AppContext, how: str = NEWEST, left: str | None = None,
               right: str | None = None) -> dict:
    """Two of the base model and the adapters, by the chosen rule, sides shuffled; the
    pair records the rule that drew it."""
    adapters = ctx.store.adapters()
    if not adapters:
        raise gr.Error("blind mode needs a trained adapter; train one in the Train tab first")
    if how == PICKED:
        if not left or not right or left == right:
            raise gr.Error("pick two different models on the left and the right first, "
                           "then turn blind mode on")
        names = [left, right]
    elif how == FEWEST:
        names = list(_fewest_voted(ctx, [BASE_LABEL] + [a["name"] for a in adapters]))
    else:
        names = [adapters[-1]["name"], BASE_LABEL]
    random.shuffle(names)
    return {"left": names[0], "right": names[1], "how": how}


def _fewest_voted(ctx: AppContext, names: list[str]) -> tuple[str, str]:
    """The pair of models with the fewest head-to-head votes (ties at random), so the
    leaderboard's intervals narrow everywhere, not only for the newest adapter."""
    from collections import Counter
    from itertools import combinations

    from rpo_app import leaderboard

    votes = leaderboard.votes(ctx.store.judgments())
    seen = Counter(frozenset(p) for p in zip(votes["model_a"], votes["model_b"]))
    pairs = list(combinations(names, 2))
    random.shuffle(pairs)
    return min(pairs, key=lambda p: seen[frozenset(p)])


def votes_view(ctx: AppContext) -> tuple[str, pd.DataFrame]:
    """The tally line and the leaderboard, from one read of the judgments."""
    from rpo_app import leaderboard, team

    rows = ctx.store.judgments()
    board = leaderboard.leaderboard(leaderboard.votes(rows), bootstrap=team.BOOTSTRAP)
    return _tally(leaderboard.votes(rows, [BLIND_SOURCE])), leaderboard.display(board)


# -- adapters -----------------------------------------------------------------------------

def adapters_view(ctx: AppContext) -> tuple:
    rows = ctx.store.adapters()
    frame = pd.DataFrame([{"name": a["name"], "from run": a["run_id"] or "",
                           "base model": a["base_model"] or "bundled SmolLM2",
                           "path": a["path"]} for a in rows])
    return frame, gr.update(choices=[a["name"] for a in rows])


def lineage_view(ctx: AppContext, name) -> tuple:
    """What trained the picked adapter, and who can be left out of a new run."""
    from rpo_app import lineage

    rec = _lineage_of(ctx, name)
    who = sorted((rec or {}).get("counts", {}).get("by_annotator", {}))
    return (lineage.describe(rec) if name else ""), gr.update(choices=who, value=[])


def _lineage_of(ctx: AppContext, name) -> dict | None:
    from rpo_app import lineage

    adapter = ctx.store.adapter(name) if name else None
    if adapter is None:
        return None
    rec = lineage.read_adapter(adapter["path"])
    if rec is None and adapter["run_id"]:
        rec = lineage.read(ctx.layout.run_dir(adapter["run_id"]))
    return rec


def train_again(ctx: AppContext, name, without, ids_text) -> str:
    """One click: the adapter's run again, leaving out annotators and/or judgments."""
    from rpo_app import team

    adapter = ctx.store.adapter(name) if name else None
    if adapter is None or not adapter["run_id"]:
        raise gr.Error("pick an adapter that a run here trained")
    try:
        ids = team.parse_ids(ids_text) if (ids_text or "").strip() else []
        rid = ctx.runs.train_again(adapter["run_id"], list(without or []), ids)
    except (RuntimeError, ValueError) as err:
        raise gr.Error(str(err))
    left_out = ", ".join(list(without or []) + [f"#{i}" for i in ids])
    return (f"✔ Started **{rid}** with {adapter['run_id']}'s settings, leaving out {left_out}. "
            "Follow it in the Train tab.")


def rename_adapter(ctx: AppContext, old, new) -> tuple:
    from rpo_app import adapters

    try:
        adapters.rename(ctx.store, ctx.layout, old, new)
        if ctx.model_ready:
            host = ctx.host()
            host.unload_adapter(old)
            host.load_adapter(new, ctx.store.adapter(new)["path"])
    except (ValueError, RuntimeError, OSError) as err:
        raise gr.Error(str(err))
    return adapters_view(ctx)


def delete_adapter(ctx: AppContext, name) -> tuple:
    from rpo_app import adapters

    try:
        adapters.delete(ctx.store, ctx.layout, name)
        if ctx.model_ready:
            ctx.host().unload_adapter(name)
    except (ValueError, RuntimeError, OSError) as err:
        raise gr.Error(str(err))
    return adapters_view(ctx)


def export_zip(ctx: AppContext, name) -> str:
    from rpo_app import adapters

    if not name:
        raise gr.Error("pick an adapter")
    out = ctx.downloads.folder("adapter-") / f"{name}-peft.zip"
    try:
        adapters.export_zip(ctx.layout, name, out)
    except (ValueError, OSError) as err:
        raise gr.Error(str(err))
    return str(out)


def export_merged(ctx: AppContext, name, progress=gr.Progress()) -> str:
    from rpo_app import adapters

    if not name:
        raise gr.Error("pick an adapter")
    progress(0.1, desc="merging the adapter into the base model")
    work = ctx.downloads.folder("merged-")
    try:
        with ctx.loading():
            adapters.merge(ctx.store.adapter(name)["path"], work / name, base_model=ctx.cfg.model,
                           data_dir=ctx.layout.root)
    except (ValueError, RuntimeError, OSError) as err:
        raise gr.Error(str(err))
    progress(0.8, desc="zipping")
    archive = shutil.make_archive(str(work / f"{name}-merged"), "zip", work / name)
    shutil.rmtree(work / name)  # the zip is what the page downloads
    return archive


# -- layout and wiring --------------------------------------------------------------------

def build(ctx: AppContext, annotator_box: gr.Textbox) -> dict:
    blind_pair_state = gr.State(None)  # {"left": name, "right": name} while blind
    # The conversation number (chat_streams). A page field, not a State: an event carries
    # the value the page had when it was triggered, which tells a stale one apart.
    conversation = gr.Number(0, precision=0, visible=False, elem_id="chat-conversation")
    right_picked = gr.State(False)  # the user chose the right side: refreshes keep it
    with gr.Row():
        blind = gr.Checkbox(False, label="Blind mode: hide which model is which, then vote",
                            elem_id="chat-blind")
        blind_how = gr.Radio(list(PAIRINGS), value=NEWEST, label="Blind mode compares",
                             elem_id="chat-blind-how")
        tally = gr.Markdown("", elem_id="chat-tally")
    with gr.Row():
        with gr.Column():
            left_pick = gr.Dropdown([BASE_LABEL], value=BASE_LABEL, label="Left",
                                    elem_id="chat-left-pick",
                                    allow_custom_value=True)  # adapters appear after load
            left_bot = gr.Chatbot(label="Left", height=420, buttons=["copy"], elem_id="chat-left")
        with gr.Column():
            right_pick = gr.Dropdown([BASE_LABEL], value=BASE_LABEL, label="Right",
                                     elem_id="chat-right-pick", allow_custom_value=True)
            right_bot = gr.Chatbot(label="Right", height=420, buttons=["copy"],
                                   elem_id="chat-right")
    with gr.Row():
        message = gr.Textbox(placeholder="Ask both models something…", show_label=False,
                             scale=5, elem_id="chat-input")
        send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
    with gr.Row():
        regen = gr.Button("Regenerate", size="sm", elem_id="chat-regen")
        branch = gr.Button("Regenerate the picked turn", size="sm", visible=False,
                           elem_id="chat-regen-turn")
        clear = gr.Button("Clear", size="sm", elem_id="chat-clear")
    with gr.Row(equal_height=True):
        # Turns appear as both sides finish answering; the last is picked by default.
        # Free values are let through (and checked by the handlers), so a stale pick
        # sent while the choices change is a clear message, not a schema error. The
        # blank start value is also the API's default: API callers that leave the turn
        # out vote on (or regenerate) the last turn.
        turn_pick = gr.Dropdown([], value="", label="Turn",
                                info="votes, and a regenerate of an earlier turn, act on it",
                                scale=1, min_width=150, allow_custom_value=True,
                                elem_id="chat-turn")
        with gr.Row(visible=False, scale=4) as vote_row:
            v_left = gr.Button("Left is better", elem_id="vote-left")
            v_right = gr.Button("Right is better", elem_id="vote-right")
            v_tie = gr.Button("Tie", elem_id="vote-tie")
            v_bad = gr.Button("Both bad", elem_id="vote-bothbad")
    gr.Markdown("Each vote is on the turn picked: for each side, the conversation up to that "
                "turn's message is stored as the prompt and that side's answer as the response "
                "(a cross-prompt pair when the two sides answered earlier turns differently). "
                "Regenerating an earlier turn drops the turns after it on both sides (a "
                "branch); votes stored already keep their own copy of the conversation.",
                elem_id="chat-turn-help")
    reveal = gr.Markdown("", elem_id="chat-reveal")
    with gr.Accordion("Generation settings", open=False, elem_id="chat-settings"):
        with gr.Row():
            # The sampling defaults measured for this model (GenSettings; min-p and the
            # repetition penalty come with them).
            from rpo_app.generate import GenSettings

            temp = gr.Slider(0, 1.5, value=GenSettings().temperature, step=0.05,
                             label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.1, 1.0, value=GenSettings().top_p, step=0.01, label="Top-p")
            max_new = gr.Slider(16, 1024, value=256, step=16, label="Max new tokens",
                                elem_id="chat-max-new")
            seed = gr.Number(0, precision=0, label="Seed")
        system = gr.Textbox("", label="System prompt (optional)", lines=2)
    with gr.Accordion("Leaderboard", open=False, elem_id="chat-leaderboard-box"):
        gr.Markdown("A Bradley-Terry fit over every judgment between answers of two of the "
                    "app's models (blind votes here, votes cast here after a reveal, and "
                    "Label-tab pairs whose answers two models wrote); a tie or \"both bad\" "
                    "counts half a win each. Ratings are on an Elo-like scale with the base "
                    "model at 1000; the interval is a 95% bootstrap over the votes, and means "
                    "little until a model has ten or more.")
        board = gr.Dataframe(interactive=False, elem_id="chat-leaderboard")
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
        lineage_md = gr.Markdown("", elem_id="adapter-lineage")
        with gr.Row():
            again_who = gr.Dropdown([], multiselect=True, label="Train again without annotators",
                                    scale=2, elem_id="again-annotators")
            again_ids = gr.Textbox(label="…and without these judgment ids", scale=2,
                                   placeholder="e.g. 12, 15", elem_id="again-ids")
            again = gr.Button("Train again", scale=1, elem_id="again-start")
        again_status = gr.Markdown("", elem_id="again-status")

    settings_inputs = [temp, top_p, max_new, seed, system]
    chat_inputs = [left_bot, right_bot, left_pick, right_pick, blind, blind_pair_state,
                   blind_how, *settings_inputs, conversation]
    chat_outputs = [left_bot, right_bot, blind_pair_state, vote_row, message, turn_pick]
    model_queue = {"concurrency_limit": 1, "concurrency_id": "model"}
    send.click(functools.partial(submit, ctx), [message, *chat_inputs], chat_outputs,
               api_name="chat_send", **model_queue)
    message.submit(functools.partial(submit, ctx), [message, *chat_inputs], chat_outputs,
                   api_name=False, **model_queue)
    regen.click(functools.partial(regenerate, ctx), chat_inputs, chat_outputs,
                api_name="chat_regenerate", **model_queue)
    branch.click(functools.partial(regenerate_turn, ctx), [turn_pick, *chat_inputs],
                 chat_outputs, api_name="chat_regenerate_turn", **model_queue)
    turn_pick.change(branch_button, [turn_pick, left_bot, right_bot], branch, api_name=False,
                     show_progress="hidden")
    # Clearing or switching blind mode starts a new conversation: answers still streaming
    # into the old one stop before the chats are emptied (chat_streams).
    blind_inputs = [blind, blind_how, left_pick, right_pick, conversation]
    clear.click(functools.partial(clear_all, ctx), blind_inputs,
                [left_bot, right_bot, blind_pair_state, vote_row, reveal, turn_pick,
                 conversation], api_name="chat_clear")
    blind_outputs = [left_pick, right_pick, blind_pair_state, vote_row, reveal, left_bot,
                     right_bot, turn_pick, conversation]
    blind.change(functools.partial(toggle_blind, ctx), blind_inputs, blind_outputs,
                 api_name=False)
    # A new rule starts a new blind conversation (when blind mode is on).
    blind_how.change(functools.partial(toggle_blind, ctx), blind_inputs, blind_outputs,
                     api_name=False)

    def voter(verdict):
        def on_vote(left_hist, right_hist, pair, typed, turn, request: gr.Request):
            return vote(ctx, verdict, left_hist, right_hist, pair, ctx.annotator(request, typed),
                        turn)
        return on_vote

    for button, verdict in ((v_left, "left"), (v_right, "right"), (v_tie, "tie"),
                            (v_bad, "both_bad")):
        # The turn comes last, so API callers that leave it out vote on the last turn.
        button.click(voter(verdict),
                     [left_bot, right_bot, blind_pair_state, annotator_box, turn_pick],
                     [reveal, tally, blind_pair_state, vote_row, board],
                     api_name=f"chat_vote_{verdict}", concurrency_id=VOTES_GROUP,
                     concurrency_limit=1)
    picks = [left_pick, right_pick, right_picked]
    for pick in (left_pick, right_pick):
        pick.focus(functools.partial(refresh_picks, ctx), picks, [left_pick, right_pick],
                   api_name=False)
    right_pick.input(lambda: True, None, right_picked, api_name=False)

    ad_pick.change(functools.partial(lineage_view, ctx), ad_pick, [lineage_md, again_who],
                   api_name=False)
    again.click(functools.partial(train_again, ctx), [ad_pick, again_who, again_ids],
                again_status, api_name="train_again")
    adapter_outputs = [adapters_table, ad_pick]
    ad_rename.click(functools.partial(rename_adapter, ctx), [ad_pick, ad_new], adapter_outputs,
                    api_name="adapter_rename")
    ad_delete.click(functools.partial(delete_adapter, ctx), ad_pick, adapter_outputs,
                    api_name="adapter_delete")
    ad_zip.click(functools.partial(export_zip, ctx), ad_pick, ad_file, api_name="adapter_export")
    ad_merge.click(functools.partial(export_merged, ctx), ad_pick, ad_file,
                   api_name="adapter_merge", **model_queue)
    return {"load": functools.partial(load_view, ctx), "load_inputs": picks,
            "load_outputs": [left_pick, right_pick, tally, adapters_table, ad_pick, board]}


# -- helpers ------------------------------------------------------------------------------

def _stream(ctx, left_hist, right_hist, left, right, is_blind, pair, settings, session=None,
            conv=0):
    """Both sides' answers as they come, until they end or the session starts a new
    conversation (then nothing more is written: chat_streams)."""
    from rpo_app.generate import GenSettings

    temp, top_p, max_new, seed, system = settings
    host = ctx.host()
    if is_blind:
        left, right = pair["left"], pair["right"]
    gen = GenSettings(temperature=float(temp), top_p=float(top_p), max_new_tokens=int(max_new),
                      seed=int(seed or 0), system_prompt=(system or "").strip() or None)
    adapters = [None if left == BASE_LABEL else left, None if right == BASE_LABEL else right]
    for name in adapters:
        if name is not None and name not in host.adapter_names():
            raise gr.Error(ctx.adapter_problem(name))
    left_hist = list(left_hist) + [{"role": "assistant", "content": ""}]
    right_hist = list(right_hist) + [{"role": "assistant", "content": ""}]
    convs = [_as_messages(left_hist[:-1]), _as_messages(right_hist[:-1])]
    cut_off: list[bool] = []
    with ctx.chat_streams.streaming(session, conv) as live:
        answers = host.chat_stream(convs, adapters, gen, on_end=cut_off.extend)
        try:
            for texts in answers:
                if not live():
                    return
                left_hist[-1] = {"role": "assistant", "content": texts[0]}
                right_hist[-1] = {"role": "assistant", "content": texts[1]}
                yield left_hist, right_hist, pair, gr.update(visible=False), gr.skip(), gr.skip()
        finally:
            answers.close()  # stops generating when the stream ends early
        if not live():
            return
        if pair and cut_off:  # a vote on this turn stores whether each answer was cut
            turn = str(len(_turns(left_hist)))
            pair = {**pair, "cut_off": {**(pair.get("cut_off") or {}), turn: cut_off}}
        yield (left_hist, right_hist, pair, gr.update(visible=bool(is_blind)), gr.skip(),
               turn_update(left_hist, right_hist))


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


def store_vote(ctx: AppContext, left_hist, right_hist, pair, verdict, annotator,
               model_name: str, turn: int | None = None, source: str = BLIND_SOURCE) -> int:
    """Store a vote on turn `turn` (None: the last both sides answered).

    Each side's prompt is its own conversation up to and including turn t's user message
    (turn 1: the plain message); its response is its answer at turn t. The same prompt on
    both sides gives a "paired" judgment, two different ones a "cross" judgment."""
    t = last_answered(left_hist, right_hist) if turn in (None, "") else int(turn)
    sides = {side: side_turn(hist, t, side)
             for side, hist in (("left", left_hist), ("right", right_hist))}
    if sides["left"][1] == sides["right"][1]:
        raise gr.Error(f"both answers to turn {t} are identical; nothing to compare")
    prompt_ids, _ = ctx.store.add_prompts(
        [{"messages": sides[side][0]} for side in ("left", "right")], "chat")
    # Which answers hit the token limit (recorded by _stream; none in older pairs).
    cut_off = (pair.get("cut_off") or {}).get(str(t)) or [False, False]
    ids = {}
    for side, pid, cut in zip(("left", "right"), prompt_ids, cut_off):
        name = pair[side]
        rid, _ = ctx.store.add_response(pid, sides[side][1], source="chat",
                                        model=model_name,
                                        adapter=None if name == BASE_LABEL else name,
                                        cut_off=bool(cut))
        ids[side] = rid
    kind = "paired" if prompt_ids[0] == prompt_ids[1] else "cross"
    a, b, stored, a_side = canonical_pair(ids["left"], ids["right"], verdict)
    jid, _ = ctx.store.add_judgment(kind, a, b, stored, annotator,
                                    source=source, a_side=a_side,
                                    request_id=f"blind:{a}:{b}:{annotator}:{int(time.time())}")
    return jid


def _tally(votes: pd.DataFrame) -> str:
    """The blind votes in one line (`votes`: leaderboard.votes of the blind-chat source)."""
    from rpo_app import leaderboard

    if not len(votes):
        return "Blind votes so far: none."
    board = leaderboard.leaderboard(votes, bootstrap=0)
    top = board.iloc[0]
    return (f"Blind votes: **{len(votes)}** · ahead: **{top['model']}** "
            f"({top['wins']} wins, {top['losses']} losses, {top['ties']} ties); "
            "the leaderboard below counts every head-to-head judgment")
