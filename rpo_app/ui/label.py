"""The Label tab: paired, cross-prompt and unpaired judgments, keyboard-first.

A judgment is acknowledged ("Saved #id") only after the store has committed it. Each
item carries a token used as the request id, so a double click stores it once.
"""
from __future__ import annotations

import functools
import html
import time

import gradio as gr
import pandas as pd

from rpo_app import rankings
from rpo_app.config import TeamSettings
from rpo_app.labelqueue import MODES, ORDERS
from rpo_app.ui.context import AppContext, start_of_today

MODE_CHOICES = [("Paired (same prompt)", "paired"), ("Cross-prompt (related prompts)", "cross"),
                ("Unpaired (thumbs)", "unpaired"), ("Mixed", "mixed"),
                ("Rank several answers", "ranking")]
ORDER_CHOICES = [("Most informative first", "informative"), ("Queue", "queue"), ("Random", "random")]
STRENGTH_CHOICES = [("no strength", "none"), ("slightly", "slightly"), ("clearly", "clearly")]
VERDICT_WORDS = {"a": "A better", "b": "B better", "tie": "tie", "both_bad": "both bad",
                 "up": "thumbs up", "down": "thumbs down"}

KEYBOARD_JS = """
<script>
(() => {
  const keys = {'1': ['lbl-left', 'lbl-up'], '2': ['lbl-right', 'lbl-down'], '3': ['lbl-tie'],
                '4': ['lbl-bothbad'], 's': ['lbl-skip'], 'z': ['lbl-undo']};
  document.addEventListener('keydown', (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
    const t = e.target;
    const tag = ((t && t.tagName) || '').toLowerCase();
    // Typing in a text box must never judge; read-only answer boxes are fine.
    if ((tag === 'input' || tag === 'textarea' || tag === 'select') && !t.readOnly) return;
    if (t && t.isContentEditable) return;
    const ids = keys[(e.key || '').toLowerCase()];
    if (!ids) return;
    for (const id of ids) {
      const el = document.getElementById(id);
      const btn = el && (el.tagName === 'BUTTON' ? el : el.querySelector('button'));
      if (btn && btn.offsetParent !== null && !btn.disabled) {
        e.preventDefault();
        btn.click();
        return;
      }
    }
  });
})();
</script>
"""


# The ranking panel, in the browser: drag a card to move it; "tied with the one above"
# joins a card to the place above it; keys a-f append that answer to the order, '='
# ties the next one to the last, Backspace takes the last one back, Enter saves and N
# says none is acceptable. The order box is the one source of truth: the cards follow
# what is typed in it, and dragging rewrites it.
RANK_JS = r"""
<script>
(() => {
  const box = () => document.querySelector('#lbl-rank-order textarea, #lbl-rank-order input');
  const list = () => document.querySelector('#lbl-rank-cards .rank-list');
  const visible = (el) => el && el.offsetParent !== null;
  function setBox(value) {
    const b = box();
    if (!b) return;
    b.value = value;
    b.dispatchEvent(new Event('input', {bubbles: true}));
    show(value);
  }
  function fromCards() {
    const places = [];
    for (const card of list().querySelectorAll('.rank-card')) {
      const tie = card.querySelector('.rank-tie');
      if (tie && tie.checked && places.length) places[places.length - 1].push(card.dataset.label);
      else places.push([card.dataset.label]);
    }
    return places.map((p) => p.join(' = ')).join(' > ');
  }
  function parse(text) {  // the typed order as places of labels; unknown letters ignored
    const places = [];
    const norm = (text || '').toUpperCase().replace(/\s*=\s*/g, '=');
    for (const part of norm.split(/[>,\s]+/)) {
      if (!part) continue;
      const names = part.split('=');
      if (names.length === 1) for (const c of names[0]) places.push([c]);
      else places.push(names.filter((n) => n));
    }
    return places;
  }
  function show(text) {  // put the cards in the typed order; unplaced ones last, dimmed
    const l = list();
    if (!l) return;
    const cards = {};
    for (const c of l.querySelectorAll('.rank-card')) cards[c.dataset.label] = c;
    const placed = new Set();
    let n = 0;
    for (const place of parse(text)) {
      n += 1;
      place.forEach((name, i) => {
        const c = cards[name];
        if (!c || placed.has(name)) return;
        placed.add(name);
        l.appendChild(c);
        c.classList.remove('unplaced');
        c.querySelector('.rank-place').textContent = '#' + n;
        const tie = c.querySelector('.rank-tie');
        if (tie) tie.checked = i > 0;
      });
    }
    for (const [name, c] of Object.entries(cards)) {
      if (placed.has(name)) continue;
      l.appendChild(c);
      c.classList.add('unplaced');
      c.querySelector('.rank-place').textContent = '–';
      const tie = c.querySelector('.rank-tie');
      if (tie) tie.checked = false;
    }
  }
  let dragged = null;
  document.addEventListener('dragstart', (e) => {
    const c = e.target.closest && e.target.closest('.rank-card');
    if (c) { dragged = c; e.dataTransfer.effectAllowed = 'move'; }
  });
  document.addEventListener('dragover', (e) => {
    if (dragged && e.target.closest && e.target.closest('.rank-list')) e.preventDefault();
  });
  document.addEventListener('drop', (e) => {
    const target = e.target.closest && e.target.closest('.rank-card');
    if (!dragged || !target || target === dragged) { dragged = null; return; }
    e.preventDefault();
    const r = target.getBoundingClientRect();
    target.parentNode.insertBefore(dragged, e.clientY < r.top + r.height / 2 ? target : target.nextSibling);
    dragged.classList.remove('unplaced');
    dragged = null;
    setBox(fromCards());
  });
  document.addEventListener('change', (e) => {
    if (e.target.classList && e.target.classList.contains('rank-tie')) setBox(fromCards());
  });
  document.addEventListener('input', (e) => {
    const b = box();
    if (b && e.target === b) show(b.value);
  });
  document.addEventListener('keydown', (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
    const l = list();
    if (!visible(l)) return;
    const t = e.target;
    const tag = ((t && t.tagName) || '').toLowerCase();
    if ((tag === 'input' || tag === 'textarea' || tag === 'select') && !t.readOnly) return;
    const key = e.key || '';
    const labels = [...l.querySelectorAll('.rank-card')].map((c) => c.dataset.label);
    const value = (box() && box().value) || '';
    if (labels.includes(key.toUpperCase()) && key.length === 1) {
      e.preventDefault();
      const tied = /=\s*$/.test(value);
      setBox(value.trim() === '' ? key.toUpperCase() :
             value.replace(/\s+$/, '') + (tied ? ' ' : ' > ') + key.toUpperCase());
    } else if (key === '=') {
      e.preventDefault();
      if (value.trim()) setBox(value.replace(/\s+$/, '') + ' = ');
    } else if (key === 'Backspace') {
      e.preventDefault();
      setBox(/=\s*$/.test(value) ? value.replace(/\s*=\s*$/, '')
             : value.replace(/\s*[>=]?\s*[A-Za-z]\s*$/, ''));
    } else if (key === 'Enter' || key.toLowerCase() === 'n') {
      const btn = document.querySelector(key === 'Enter' ? '#lbl-rank-save' : '#lbl-rank-none');
      const b = btn && (btn.tagName === 'BUTTON' ? btn : btn.querySelector('button'));
      if (visible(b)) { e.preventDefault(); b.click(); }
    }
  });
})();
</script>
"""

RANK_CSS = """
#lbl-rank-cards .rank-list {display: flex; flex-direction: column; gap: 6px}
#lbl-rank-cards .rank-card {border: 1px solid var(--border-color-primary); border-radius: 6px;
  padding: 6px 10px; cursor: grab; background: var(--background-fill-primary)}
#lbl-rank-cards .rank-card.unplaced {opacity: 0.6; border-style: dashed}
#lbl-rank-cards .rank-head {display: flex; gap: 12px; align-items: center; font-size: 0.9em}
#lbl-rank-cards .rank-label {font-weight: bold; font-size: 1.1em}
#lbl-rank-cards .rank-text {white-space: pre-wrap; margin-top: 4px}
#lbl-rank-cards .rank-card:first-child .rank-tie-box {visibility: hidden}
#lbl-rank-cards .rank-tie {appearance: auto; -webkit-appearance: checkbox; width: 14px;
  height: 14px; margin: 0 4px 0 0; vertical-align: middle}
"""

NO_NAME = "Enter your name above to start judging."
# The events that show an item by themselves (the page load, the Label tab's select, which
# Gradio also fires on page load, and the poll timer) run one at a time with the name box's
# Enter and the mode and order pickers, in the order they came. One that read the name box
# empty then either runs before Enter's item or after it and finds the item on the server
# (poll leaves it alone), and Enter's item runs before the picked mode's. The browser may
# still apply the answers in another order; the tab's tick (`sync`) mends that.
FIRST_ITEM_GROUP = "label-first-item"

# The outputs of every handler below, in order.
VIEW = ("token", "prompt", "left_prompt", "left", "right_prompt", "right", "right_col", "question",
        "pair_row", "thumb_row", "strength_col", "related", "history", "progress",
        "first_run", "poll", "answers_row", "rank_col", "rank_cards", "rank_order",
        "order_info", "shown", "status")  # status last: scripts read it as the last output


def render(ctx: AppContext, annotator: str | None, item, message: str = "",
           mode: str | None = None, order: str = "informative") -> list:
    """The tab showing `item` (None: nothing left in `mode`), in VIEW order."""
    hist, prog = _history_and_progress(ctx, annotator)
    if item is None:
        empty, first_run, waiting = _nothing_to_judge(ctx, mode, named=annotator is not None)
        view = {"token": None, "prompt": gr.update(value="", visible=True),
                "left_prompt": gr.update(visible=False), "left": "",
                "right_prompt": gr.update(visible=False), "right": "",
                "right_col": gr.update(visible=True), "question": empty,
                "pair_row": gr.update(visible=False), "thumb_row": gr.update(visible=False),
                "strength_col": gr.update(visible=False), "related": _empty_related(),
                "first_run": gr.update(visible=first_run), "poll": gr.Timer(active=waiting),
                **_rank_view(None)}
    elif item.kind == "ranking":
        view = {"token": item.token, "prompt": _prompt_box(item.left, True),
                "left_prompt": gr.update(visible=False), "left": "",
                "right_prompt": gr.update(visible=False), "right": "",
                "right_col": gr.update(visible=True),
                "question": (f"**Rank these {len(item.answers)} answers, best first.** Ties are "
                             "allowed; if no answer is acceptable, say so."
                             + _conversation_note(item.left)),
                "pair_row": gr.update(visible=False), "thumb_row": gr.update(visible=False),
                "strength_col": gr.update(visible=False),
                "related": _related(ctx, item.left["prompt_id"]),
                "first_run": gr.update(visible=False), "poll": gr.Timer(active=False),
                **_rank_view(item)}
    else:
        cross = item.kind == "cross"
        thumbs = item.kind == "unpaired"
        view = {"token": item.token,
                "prompt": _prompt_box(item.left, not cross),
                "left_prompt": gr.update(value=item.left["prompt"], visible=cross),
                "left": gr.update(value=item.left["text"], label="Answer" if thumbs else "Answer A"),
                "right_prompt": gr.update(value=item.right["prompt"] if cross else "", visible=cross),
                "right": item.right["text"] if item.right else "",
                "right_col": gr.update(visible=not thumbs),
                "question": ("**Which answer answers its own prompt better?**" if cross else
                             "**Is this a good answer?**" if thumbs else "**Which answer is better?**")
                            + ("" if cross else _conversation_note(item.left))
                            + _cut_note(item.left, item.right, thumbs),
                "pair_row": gr.update(visible=not thumbs), "thumb_row": gr.update(visible=thumbs),
                "strength_col": gr.update(visible=not thumbs),
                "related": _related(ctx, item.left["prompt_id"]),
                "first_run": gr.update(visible=False), "poll": gr.Timer(active=False),
                **_rank_view(None)}
    view.update(history=hist, progress=prog, status=message, order_info=order_line(ctx, item, order),
                shown=view["token"] or "")
    return [view[name] for name in VIEW]


ORDER_WORDS = {"informative": "most informative first", "queue": "queue (unlabeled prompts first, "
               "spread over prompt families)", "random": "random"}


def order_line(ctx: AppContext, item, asked: str) -> str:
    """Which order picked the item on screen, and why it is not the one asked for."""
    job = ctx.scoring.status() if ctx.scoring is not None else None
    meta = ctx.store.informative_meta()
    if item is not None and item.order == "informative":
        done = "" if meta.get("complete") else " so far"
        text = (f"Order: **most informative first**: items adapter **{meta['adapter']}** would "
                f"learn most from ({meta['answers']:,} answers scored{done}).")
    elif asked == "informative" and (item is None or item.kind in ("paired", "cross", "unpaired")):
        if job is not None and job.running:
            why = f"until the scores are in. {job.line()}"
        elif job is not None and job.state == "failed":
            why = f"({job.line()})"
        elif meta is None:
            why = ("until a training run has finished: its adapter then scores the unlabeled "
                   "answers")
        elif item is not None and item.shown_at < meta.get("updated_at", 0):
            why = (f"for this item, picked before adapter {meta['adapter']}'s scores were in; "
                   "the next one comes most informative first")
        else:
            why = (f"(every item adapter {meta['adapter']} scored is judged or taken; the next "
                   "run scores more)")
        text = f"Order: **{ORDER_WORDS['queue']}** {why}"
    else:
        text = f"Order: **{ORDER_WORDS[item.order if item is not None else asked]}**."
    if job is not None and job.running and text.find(job.line()) < 0:
        text += f" {job.line()}"
    return text


def _prompt_box(answer: dict, visible: bool):
    """The prompt above the answers; a conversation shows every turn (its transcript).
    The label stays put: changing it with the value redraws the box after the rest of
    the view, and a reader could see the old prompt beside the new answers."""
    return gr.update(value=answer["prompt"], visible=visible)


def _conversation_note(answer: dict) -> str:
    return (" The prompt is a conversation: each answer is its next assistant turn."
            if answer.get("prompt_messages") else "")


def _cut_note(left: dict, right: dict | None, thumbs: bool) -> str:
    """Which answers the model was stopped writing at its token limit: their missing end
    is the limit's doing, which a reader may or may not hold against them."""
    sides = [(name, answer) for name, answer in (("A", left), ("B", right))
             if answer is not None and answer.get("cut_off")]
    if not sides:
        return ""
    limits = {(a.get("gen_settings") or {}).get("max_new_tokens") for _, a in sides}
    limit = f" ({limits.pop()} new tokens)" if len(limits) == 1 and None not in limits else ""
    if thumbs:
        return f" The answer stopped at the model's token limit{limit} before it ended."
    names = " and ".join(f"answer {n}" for n, _ in sides)
    return (f" {names[0].upper() + names[1:]} stopped at the model's token limit{limit} before "
            f"{'they' if len(sides) == 2 else 'it'} ended.")


def _rank_view(item) -> dict:
    """The ranking panel's part of the view: shown with cards for a ranking, else hidden."""
    if item is None or item.kind != "ranking":
        return {"answers_row": gr.update(visible=True), "rank_col": gr.update(visible=False),
                "rank_cards": "", "rank_order": ""}
    return {"answers_row": gr.update(visible=False), "rank_col": gr.update(visible=True),
            "rank_cards": rank_cards_html(item.answers), "rank_order": ""}


def rank_cards_html(answers: list[dict]) -> str:
    """One draggable card per answer, labelled A, B, C... in shown order (texts escaped)."""
    cards = []
    # Every card has the tie box (any card may come first after a move); CSS hides the
    # first one's.
    tie = ('<label class="rank-tie-box"><input type="checkbox" class="rank-tie"> tied with '
           "the one above</label>")
    for label, answer in zip(rankings.LABELS, answers):
        cards.append(
            f'<div class="rank-card unplaced" draggable="true" data-label="{label}">'
            f'<div class="rank-head"><span class="rank-label">{label}</span>'
            f'<span class="rank-place">–</span>{tie}</div>'
            f'<div class="rank-text">{html.escape(answer["text"])}</div></div>')
    return '<div class="rank-list">' + "".join(cards) + "</div>"


def _nothing_to_judge(ctx: AppContext, mode: str | None = None,
                      named: bool = True) -> tuple[str, bool, bool]:
    """(what to say, show the first-run button, keep polling) when no item is on screen:
    none is left in `mode`, or (named=False) nobody has said who is judging."""
    job = ctx.generation.status()
    if job.running:
        return (f"**Answers are being written.** {job.line()}. The next pair shows here "
                "as soon as both of its answers are stored.", False, True)
    no_answers = ctx.store.stats()["responses"] == 0
    if job.state == "failed":
        return f"{job.line()} Try again from the **Data** tab.", no_answers, False
    if no_answers:
        offer, timed = first_run_offer(ctx)
        return f"**Start here.** {offer}", True, not timed  # poll until the estimate is in
    if not named:  # there may be plenty to judge: "nothing left" would be untrue
        return f"**{NO_NAME}**", False, False
    if mode == "ranking":
        return (f"Nothing left to rank. A ranking needs at least {rankings.MIN_ANSWERS} "
                "answers to one prompt that you have not ranked: in the **Data** tab, "
                f"generate answers until prompts have {TeamSettings.load(ctx.store).rank_size} "
                "(the Team tab's answers per ranking), import a ranking file, or switch mode.",
                False, False)
    return ("Nothing left to judge in this mode. Generate more answers in the "
            "**Data** tab, import a file, or switch mode.", False, False)


def first_run_offer(ctx: AppContext) -> tuple[str, bool]:
    """The first-run step in words, with the time it takes on this machine (and whether
    that time is known yet)."""
    from rpo_app.generate import GenSettings
    from rpo_app.genjob import FIRST_RUN_ANSWERS, FIRST_RUN_PROMPTS
    from rpo_app.progress import human

    n_prompts = min(FIRST_RUN_PROMPTS, ctx.store.count_prompts())
    if n_prompts == 0:
        return "The store has no prompts yet: add some in the **Data** tab.", True
    what = (f"No answers to judge yet. The button below asks the model for "
            f"{FIRST_RUN_ANSWERS} answers to each of {n_prompts} prompts; you judge which is "
            "better while the rest are written")
    timing = ctx.host().decode_timing(measure=False) if ctx.model_ready else None
    if timing is None:
        return what + (" (timing the model for an estimate…)." if ctx.model_ready else
                       " (the time estimate appears once the model has loaded)."), False
    host, max_new = ctx.host(), GenSettings().max_new_tokens
    total = host.estimate_seconds(n_prompts * FIRST_RUN_ANSWERS, max_new, first_batch=FIRST_RUN_ANSWERS)
    first = host.estimate_seconds(FIRST_RUN_ANSWERS, max_new)
    return (what + f": the first pair in about {human(first)}, all {n_prompts * FIRST_RUN_ANSWERS} "
            f"answers in about {human(total)} on this machine."), True


def start_first_run(ctx: AppContext, mode: str, annotator: str | None,
                    order: str = "informative") -> list:
    """Generate the first answers in the background and show the tab waiting for them."""
    from rpo_app.generate import GenSettings, backlog
    from rpo_app.genjob import FIRST_RUN_ANSWERS, FIRST_RUN_PROMPTS

    ctx.host()  # waits for the model, or says why it failed
    todo = backlog(ctx.store, FIRST_RUN_ANSWERS, FIRST_RUN_PROMPTS)
    if todo and not ctx.generation.status().running:
        ctx.generation.start(todo, FIRST_RUN_ANSWERS, GenSettings(), first_batch=FIRST_RUN_ANSWERS)
    return show_next(ctx, mode, annotator, order=order)


# What a waiting tab's timer redraws until an item comes: the line that says how far the
# answers are, and the button and timer. Sending the whole tab every 2 s (two tables and
# the ranking cards) kept the browser redrawing it while the model wrote the first answers.
WAITING_VIEW = ("question", "first_run", "poll")


def poll(ctx: AppContext, token: str | None, mode: str, annotator: str | None,
         order: str = "informative", timer: bool = False) -> list:
    """The next item unless one is on screen: while answers are being written (`timer`:
    the tab already shows the wait, so only its line changes until an item comes), on page
    load, and on coming back to the tab."""
    if token:  # an item is on screen: leave it alone
        return [gr.Timer(active=False) if name == "poll" else gr.skip() for name in VIEW]
    view = show_next(ctx, mode, annotator, order=order)
    if timer and view[VIEW.index("token")] is None:
        return [value if name in WAITING_VIEW else gr.skip() for name, value in zip(VIEW, view)]
    return view


def redraw(ctx: AppContext, token: str | None, mode: str, annotator: str | None,
           order: str = "informative", message: str = "") -> list:
    """The item the server holds for this page again (the next one if it is gone)."""
    item = ctx.queue.item(token) if token else None
    if item is None:
        return show_next(ctx, mode, annotator, message, order)
    return render(ctx, annotator, item, message, mode, order)


def sync(ctx: AppContext, token: str | None, shown: str | None, seen: str | None,
         order: str = "informative") -> tuple[str, str | None, bool]:
    """The tab's tick: (the order line, the mismatch to remember, draw the server's item again).

    The browser can apply one event's answer after a later one's (Gradio's client holds
    back an answer that arrives before the browser has registered its event), so a page-load
    view asking for a name once landed over the item that Enter had shown, with the item's
    token still on the server. The tick compares the token the page shows (`shown`, a
    browser-side value) with the server's: a difference seen on two ticks in a row is a page
    left behind; on one tick it is only an answer still on its way. The order line is kept
    current too (scoring starts when a run ends, and its progress moves)."""
    now = None if (shown or "") == (token or "") else f"{token or ''}|{shown or ''}"
    line = order_line(ctx, ctx.queue.item(token) if token else None, order)
    return line, now, now is not None and now == seen


def _behind(ctx: AppContext, token: str | None, shown: str | None, mode: str,
            annotator: str | None, order: str) -> list | None:
    """The server's item drawn again, when the page showed another one (see `sync`): a
    verdict is stored only for the item the person saw. None when the page is current or
    the caller (a script) did not say what it shows."""
    if not shown or shown == (token or ""):
        return None
    return redraw(ctx, token, mode, annotator, order,
                  "⚠ Not saved: the click was on an earlier item that the page still showed. "
                  "Judge the item shown now.")


def show_next(ctx: AppContext, mode: str, annotator: str | None, message: str = "",
              order: str = "informative") -> list:
    """The annotator's next item in `mode` and `order`; without a name, a request for one."""
    if annotator is None:
        view = render(ctx, None, None, order=order, mode=mode)
        if view[VIEW.index("question")] != f"**{NO_NAME}**":  # said once, not twice
            view[VIEW.index("status")] = NO_NAME
        return view
    return render(ctx, annotator, ctx.queue.next_item(annotator, mode, order), message, mode, order)


def judge(ctx: AppContext, verdict: str, token: str | None, mode: str, strength: str,
          annotator: str, order: str = "informative", shown: str | None = None) -> list:
    """Store the verdict on the item with `token`, then show the next one."""
    if (late := _behind(ctx, token, shown, mode, annotator, order)) is not None:
        return late
    if not token:
        return show_next(ctx, mode, annotator, "Nothing on screen to judge.", order)
    try:
        result = ctx.queue.submit(token, verdict, annotator,
                                  strength=None if strength == "none" else strength)
    except ValueError as err:  # nothing was stored; say why and move on
        return show_next(ctx, mode, annotator, f"⚠ Not saved: {err}", order)
    msg = (f"Saved judgment #{result['judgment_id']} ({_verdict_word(verdict)})."
           if result["created"] else
           f"Already saved as #{result['judgment_id']} (not stored twice).")
    return show_next(ctx, mode, annotator, msg, order)


def save_ranking(ctx: AppContext, token: str | None, ranked: str, mode: str,
                 annotator: str, order: str = "informative", shown: str | None = None) -> list:
    """Store the typed order of the ranking on screen, then show the next item. An order
    that does not rank every answer once keeps the item and the typed text on screen."""
    if (late := _behind(ctx, token, shown, mode, annotator, order)) is not None:
        return late
    if not token:
        return show_next(ctx, mode, annotator, "Nothing on screen to rank.", order)
    try:
        result = ctx.queue.submit_ranking(token, ranked, annotator)
    except rankings.RankingError as err:
        view = render(ctx, annotator, ctx.queue.item(token), f"⚠ Not saved: {err}", order=order)
        keep = {"rank_cards": gr.skip(), "rank_order": gr.skip()}  # the person's work stays
        return [keep.get(name, part) for name, part in zip(VIEW, view)]
    except ValueError as err:  # refused by the store: nothing stored; move on
        return show_next(ctx, mode, annotator, f"⚠ Not saved: {err}", order)
    msg = (f"Saved ranking #{result['ranking_id']} ({result['order']}): {result['pairs']} "
           f"pairs, {result['decided']} with a winner." if result["created"] else
           f"Already saved as ranking #{result['ranking_id']} (not stored twice).")
    return show_next(ctx, mode, annotator, msg, order)


def skip(ctx: AppContext, token: str | None, mode: str, annotator: str,
         order: str = "informative", shown: str | None = None) -> list:
    if (late := _behind(ctx, token, shown, mode, annotator, order)) is not None:
        return late
    if token:
        ctx.queue.skip(token, annotator)
    return show_next(ctx, mode, annotator, "Skipped (nothing stored).", order)


def undo(ctx: AppContext, mode: str, annotator: str, order: str = "informative") -> list:
    out = ctx.queue.undo(annotator)
    if out is None:
        return show_next(ctx, mode, annotator, "Nothing to undo.", order)
    j = out["undone"]
    what = (f"ranking #{out['ranking']['id']}" if out.get("ranking") else
            f"judgment #{j['id']} ({shown_verdict(j)})")
    return render(ctx, annotator, out["item"],
                  f"Undid {what}; it is back on screen. The retracted row stays in the "
                  "history of the store.", order=order)


def build(ctx: AppContext, annotator_box: gr.Textbox) -> dict:
    """Lay out the tab inside the current Blocks; return components others wire to."""
    token = gr.State(None)
    with gr.Row():
        mode = gr.Radio(MODE_CHOICES, value="paired", label="What to judge", scale=3,
                        elem_id="lbl-mode")
        order = gr.Radio(ORDER_CHOICES, value="informative", label="Order", scale=2,
                         elem_id="lbl-order")
        progress = gr.Markdown("", elem_id="lbl-progress")
    order_info = gr.Markdown("", elem_id="lbl-order-info")
    with gr.Row():
        with gr.Column(scale=4):
            prompt = gr.Textbox(label="Prompt", interactive=False, lines=2, max_lines=8,
                                elem_id="lbl-prompt")
            with gr.Row(equal_height=True) as answers_row:
                with gr.Column():
                    left_prompt = gr.Textbox(label="Prompt A", interactive=False, lines=2,
                                             visible=False, elem_id="lbl-left-prompt")
                    left = gr.Textbox(label="Answer A", interactive=False, lines=10,
                                      max_lines=24, elem_id="lbl-left-text")
                with gr.Column() as right_col:
                    right_prompt = gr.Textbox(label="Prompt B", interactive=False, lines=2,
                                              visible=False, elem_id="lbl-right-prompt")
                    right = gr.Textbox(label="Answer B", interactive=False, lines=10,
                                       max_lines=24, elem_id="lbl-right-text")
            question = gr.Markdown("**Which answer is better?**", elem_id="lbl-question")
            # Right under the words that offer it ("the button below"), not past Skip, Undo
            # and the edit box, which do nothing on an empty store.
            first_run = gr.Button("Generate the first answers", variant="primary", visible=False,
                                  elem_id="lbl-first-run")
            with gr.Column(visible=False) as rank_col:
                rank_cards = gr.HTML("", elem_id="lbl-rank-cards")
                with gr.Row(equal_height=True):
                    rank_order = gr.Textbox(label="Order, best first", scale=4,
                                            placeholder="e.g. C > A = B > D (or type the "
                                            "letters; drag the cards)", elem_id="lbl-rank-order")
                    rank_save = gr.Button("Save ranking  [Enter]", variant="primary", scale=1,
                                          elem_id="lbl-rank-save")
                    rank_none = gr.Button("None is acceptable  [N]", variant="stop", scale=1,
                                          elem_id="lbl-rank-none")
            with gr.Row(visible=True) as pair_row:
                b_left = gr.Button("A is better  [1]", variant="primary", elem_id="lbl-left")
                b_right = gr.Button("B is better  [2]", variant="primary", elem_id="lbl-right")
                b_tie = gr.Button("Tie  [3]", elem_id="lbl-tie")
                b_bad = gr.Button("Both bad  [4]", elem_id="lbl-bothbad")
            with gr.Row(visible=False) as thumb_row:
                b_up = gr.Button("Good answer  [1]", variant="primary", elem_id="lbl-up")
                b_down = gr.Button("Bad answer  [2]", variant="stop", elem_id="lbl-down")
            with gr.Row():
                with gr.Column(scale=3, min_width=200) as strength_col:
                    strength = gr.Radio(STRENGTH_CHOICES, value="none", label="Strength (optional)",
                                        elem_id="lbl-strength")
                b_skip = gr.Button("Skip  [S]", size="sm", elem_id="lbl-skip")
                b_undo = gr.Button("Undo last  [Z]", size="sm", elem_id="lbl-undo")
            status = gr.Markdown("", elem_id="lbl-status")
            # The token of the item on the page, as the browser has it (see `sync`).
            shown = gr.Textbox("", visible="hidden", interactive=False, elem_id="lbl-shown")
            with gr.Accordion("Write a better answer", open=False, elem_id="lbl-edit-box"):
                with gr.Row():
                    edit_side = gr.Radio(EDIT_SIDES, value="left", label="Start from",
                                         scale=3, elem_id="lbl-edit-side")
                    edit_load = gr.Button("Load it", size="sm", scale=1, elem_id="lbl-edit-load")
                edit_text = gr.Textbox(label="Your better answer", lines=6, max_lines=24,
                                       elem_id="lbl-edit-text")
                edit_diff = gr.HTML("", elem_id="lbl-edit-diff")
                edit_save = gr.Button("Save as a better answer", elem_id="lbl-edit-save")
                edit_status = gr.Markdown("", elem_id="lbl-edit-status")
                edit_token = gr.State(None)
            poll_timer = gr.Timer(2.0, active=False)
        with gr.Column(scale=2):
            related = gr.Dataframe(headers=["sim.", "related prompt"], label="Related prompts",
                                   interactive=False, wrap=True, column_widths=["64px", "auto"],
                                   elem_id="lbl-related")
            history = gr.Dataframe(headers=["#", "kind", "verdict", "prompt"],
                                   label="Your last judgments", interactive=False, wrap=True,
                                   elem_id="lbl-history")
            gr.Markdown("Keys: **1** A or good · **2** B or bad · **3** tie · **4** both bad · "
                        "**S** skip · **Z** undo. Ranking: **A–F** place that answer next · "
                        "**=** tie it with the last one · **Backspace** take the last back · "
                        "**Enter** save · **N** none is acceptable. Keys are ignored while "
                        "typing in a box. Skip stores nothing; tie and both-bad are judgments.")

    parts = {"token": token, "prompt": prompt, "left_prompt": left_prompt, "left": left,
             "right_prompt": right_prompt, "right": right, "right_col": right_col,
             "question": question, "pair_row": pair_row, "thumb_row": thumb_row,
             "strength_col": strength_col, "related": related, "history": history,
             "progress": progress, "status": status, "first_run": first_run, "poll": poll_timer,
             "answers_row": answers_row, "rank_col": rank_col, "rank_cards": rank_cards,
             "rank_order": rank_order, "order_info": order_info, "shown": shown}
    view = [parts[name] for name in VIEW]

    # The wrappers' parameter names are the endpoints' API (tests/test_label_api.py). The
    # order comes last, so scripts that leave it out get the Order box's default.
    def on_show(mode_value, typed, order_value, request: gr.Request):
        return show_next(ctx, mode_value, _maybe_annotator(ctx, request, typed), order=order_value)

    # shown_value: the token of the item the page shows; scripts leave it out (no check).
    def judge_as(verdict):
        def on_judge(tok, mode_value, strength_value, typed, order_value, shown_value,
                     request: gr.Request):
            return judge(ctx, verdict, tok, mode_value, strength_value,
                         ctx.annotator(request, typed), order_value, shown_value)
        return on_judge

    def on_rank(tok, ranked, mode_value, typed, order_value, shown_value, request: gr.Request):
        return save_ranking(ctx, tok, ranked, mode_value, ctx.annotator(request, typed),
                            order_value, shown_value)

    def on_rank_none(tok, mode_value, typed, order_value, shown_value, request: gr.Request):
        return save_ranking(ctx, tok, "none", mode_value, ctx.annotator(request, typed),
                            order_value, shown_value)

    def on_skip(tok, mode_value, typed, order_value, shown_value, request: gr.Request):
        return skip(ctx, tok, mode_value, ctx.annotator(request, typed), order_value, shown_value)

    def on_undo(mode_value, typed, order_value, request: gr.Request):
        return undo(ctx, mode_value, ctx.annotator(request, typed), order_value)

    def on_first_run(mode_value, typed, order_value, request: gr.Request):
        return start_first_run(ctx, mode_value, _maybe_annotator(ctx, request, typed), order_value)

    def on_poll(tok, mode_value, typed, order_value, request: gr.Request):
        return poll(ctx, tok, mode_value, _maybe_annotator(ctx, request, typed), order_value)

    def on_wait(tok, mode_value, typed, order_value, request: gr.Request):
        return poll(ctx, tok, mode_value, _maybe_annotator(ctx, request, typed), order_value,
                    timer=True)

    def on_tick(tok, shown_value, seen, order_value):
        line, now, behind = sync(ctx, tok, shown_value, seen, order_value)
        # Only a page left behind is drawn again (in an event of its own), so the tick
        # leaves the rest of the tab alone.
        return line, (None if behind else now), (time.time() if behind else gr.skip())

    def on_redraw(tok, mode_value, typed, order_value, request: gr.Request):
        return redraw(ctx, tok, mode_value, _maybe_annotator(ctx, request, typed), order_value)

    def on_save_edit(tok, etok, side, text, typed, request: gr.Request):
        return save_edit(ctx, tok, etok, side, text, ctx.annotator(request, typed))

    edit_load.click(functools.partial(load_for_edit, ctx), [token, edit_side],
                    [edit_text, edit_token, edit_diff, edit_status], api_name=False)
    edit_text.input(functools.partial(preview_edit, ctx), [edit_token, edit_side, edit_text],
                    edit_diff, api_name=False, show_progress="hidden",
                    trigger_mode="always_last")  # the diff of the text as it ends up
    edit_save.click(on_save_edit, [token, edit_token, edit_side, edit_text, annotator_box],
                    [edit_diff, edit_status], api_name=False)

    base_inputs = [mode, annotator_box, order]
    first_run.click(on_first_run, base_inputs, view, api_name="first_run")
    poll_timer.tick(on_wait, [token, *base_inputs], view, api_name=False, show_progress="hidden",
                    concurrency_id=FIRST_ITEM_GROUP, concurrency_limit=1)
    mismatch = gr.State(None)  # what `sync` saw on the tick before
    behind = gr.Number(visible="hidden")  # set when the page was left behind: draw it again
    tick_timer = gr.Timer(2.0)  # the app ticks it only while this tab is shown (ui.app)
    tick_timer.tick(on_tick, [token, shown, mismatch, order], [order_info, mismatch, behind],
                    api_name=False, show_progress="hidden")
    behind.change(on_redraw, [token, *base_inputs], view, api_name=False, show_progress="hidden")
    for button, verdict, api in [(b_left, "left", "label_left"), (b_right, "right", "label_right"),
                                 (b_tie, "tie", "label_tie"), (b_bad, "both_bad", "label_both_bad"),
                                 (b_up, "up", "label_up"), (b_down, "down", "label_down")]:
        button.click(judge_as(verdict), [token, mode, strength, annotator_box, order, shown], view,
                     api_name=api, concurrency_limit=None)
    rank_save.click(on_rank, [token, rank_order, *base_inputs, shown], view, api_name="label_rank",
                    concurrency_limit=None)
    rank_order.submit(on_rank, [token, rank_order, *base_inputs, shown], view, api_name=False,
                      concurrency_limit=None)
    rank_none.click(on_rank_none, [token, *base_inputs, shown], view, api_name="label_rank_none",
                    concurrency_limit=None)
    b_skip.click(on_skip, [token, *base_inputs, shown], view, api_name="label_skip",
                 concurrency_limit=None)
    b_undo.click(on_undo, base_inputs, view, api_name="label_undo", concurrency_limit=None)
    mode.change(on_show, base_inputs, view, api_name="label_mode",
                concurrency_id=FIRST_ITEM_GROUP, concurrency_limit=1)
    order.change(on_show, base_inputs, view, api_name="label_order",
                 concurrency_id=FIRST_ITEM_GROUP, concurrency_limit=1)
    annotator_box.submit(on_show, base_inputs, view, api_name=False,
                         concurrency_id=FIRST_ITEM_GROUP, concurrency_limit=1)
    _register_api(ctx)
    return {"view": view, "poll": on_poll, "poll_inputs": [token, *base_inputs], "timer": tick_timer}


# -- writing a better answer -------------------------------------------------------------

EDIT_SIDES = [("Answer A", "left"), ("Answer B", "right")]


def load_for_edit(ctx: AppContext, token: str | None, side: str) -> tuple:
    """The chosen answer into the edit box, remembering which item it came from."""
    item = ctx.queue.item(token) if token else None
    if item is None:
        raise gr.Error("there is no answer on screen to edit")
    original = item.left if side == "left" or item.right is None else item.right
    return original["text"], token, "", "Edit the text, then save it as a better answer."


def preview_edit(ctx: AppContext, edit_token: str | None, side: str, text: str) -> str:
    from rpo_app.textdiff import diff_html

    item = ctx.queue.item(edit_token) if edit_token else None
    if item is None:
        return ""
    original = item.left if side == "left" or item.right is None else item.right
    return diff_html(original["text"], text or "")


def save_edit(ctx: AppContext, token: str | None, edit_token: str | None, side: str, text: str,
              annotator: str) -> tuple:
    """Store the rewrite and "rewrite ≻ original"; returns (diff, status)."""
    from rpo_app.textdiff import counts, diff_html

    if not edit_token:
        raise gr.Error("load the answer into the box first")
    if edit_token != token:
        raise gr.Error("the item on screen changed since you loaded that answer; load the "
                       "answer again")
    item = ctx.queue.item(token)
    if item is not None and item.right is None:
        side = "left"
    try:
        out = ctx.queue.submit_edit(token, side, text, annotator)
    except ValueError as err:  # StoreError included: nothing was stored
        raise gr.Error(str(err))
    removed, added = counts(out["original_text"], text)
    word = "Saved" if out["created"] else "Already saved"
    return (diff_html(out["original_text"], text),
            f"{word}: your answer is answer #{out['response_id']} (−{removed} / +{added} "
            f"words), and judgment #{out['judgment_id']} says it is better than answer "
            f"#{out['original_id']}. You can still judge the answers shown.")


def _maybe_annotator(ctx, request, typed) -> str | None:
    try:
        return ctx.annotator(request, typed)
    except gr.Error:
        return None


def shown_verdict(judgment: dict) -> str:
    """The verdict as the annotator saw it: A is whatever was on the left."""
    verdict, a_side = judgment["verdict"], judgment.get("a_side")
    if verdict in ("a", "b") and a_side:
        left_won = (verdict == "a") == (a_side == "left")
        return "A better" if left_won else "B better"
    return VERDICT_WORDS[verdict]


def _verdict_word(verdict: str) -> str:
    return {"left": "A better", "right": "B better", "tie": "tie", "both_bad": "both bad",
            "up": "thumbs up", "down": "thumbs down"}[verdict]


def _empty_related() -> pd.DataFrame:
    return pd.DataFrame({"sim.": [], "related prompt": []})


def _related(ctx: AppContext, prompt_id: int) -> pd.DataFrame:
    try:
        index = ctx.index(timeout=0.01)
    except gr.Error:
        return pd.DataFrame({"sim.": ["..."], "related prompt": ["(embedder loading)"]})
    hits = index.related(prompt_id, k=6)
    texts = {p["id"]: p["text"] for p in ctx.store.prompts(ids=[h[0] for h in hits])}
    return pd.DataFrame({"sim.": [round(s, 2) for _, s in hits],
                         "related prompt": [texts.get(i, "") for i, _ in hits]})


def _history_and_progress(ctx: AppContext, annotator: str | None):
    if not annotator:
        return pd.DataFrame(columns=["#", "kind", "verdict", "prompt"]), ""
    # Enough rows that a few rankings (C(6,2) = 15 pairs each) still leave 8 lines.
    rows = ctx.store.judgments(annotator=annotator, limit=48, newest_first=True)
    lines, seen = [], set()
    for r in rows:
        if r["ranking_id"] is None:
            lines.append((r["id"], r["kind"], shown_verdict(r) + (
                f" ({r['strength']})" if r["strength"] else ""), _short(r["prompt_a"])))
        elif r["ranking_id"] not in seen:  # a ranking is one line, not its pairs
            seen.add(r["ranking_id"])
            lines.append((r["id"], "ranking", rankings.in_letters(ctx.store.ranking(r["ranking_id"])),
                          _short(r["prompt_a"])))
    hist = pd.DataFrame(lines[:8], columns=["#", "kind", "verdict", "prompt"])
    today = ctx.store.annotator_counts(annotator, start_of_today())
    stats = ctx.store.stats()
    total_by_kind = {k: sum(v.values()) for k, v in stats["by_kind"].items()}
    prog = (f"**{annotator}** · today: **{sum(today.values())}** judged "
            f"(paired {today.get('paired', 0)} · cross {today.get('cross', 0)} · "
            f"thumbs {today.get('unpaired', 0)} · rankings {today.get('ranking', 0)}) · "
            f"all annotators: {stats['judgments']} judgments "
            f"(paired {total_by_kind['paired']} · cross {total_by_kind['cross']} · "
            f"thumbs {total_by_kind['unpaired']}; {stats['ranking_pairs']} of them from "
            f"{stats['rankings']} ranking{'' if stats['rankings'] == 1 else 's'}) on {stats['prompts']} prompts")
    return hist, prog


def _short(text: str | None, n: int = 60) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _register_api(ctx: AppContext) -> None:
    """Plain-JSON endpoints for scripts and LLM-as-judge annotators (gradio_client)."""

    def who(annotator: str, request: gr.Request | None) -> str:
        # With --auth the login name is the annotator, whatever the script says.
        return getattr(request, "username", None) or annotator

    def next_item(annotator: str, mode: str = "paired", order: str = "queue",
                  request: gr.Request = None) -> dict:
        """The next item for this annotator: {kind, token, left, right, order}; {} when none.
        mode "ranking" gives {kind: "ranking", token, answers: [{label, response_id, text,
        ...}], ...}: rank it with submit_ranking. order: informative (the newest adapter's
        scores; "queue" where there are none, and the item's "order" says which picked
        it), queue or random."""
        annotator = who(annotator, request)
        if mode not in MODES:
            raise gr.Error(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        if order not in ORDERS:
            raise gr.Error(f"unknown order {order!r}; use one of {', '.join(ORDERS)}")
        try:
            item = ctx.queue.next_item(annotator, mode, order)
        except ValueError as err:
            raise gr.Error(str(err))
        return item.public() if item else {}

    def submit_judgment(token: str, verdict: str, annotator: str, strength: str = "",
                        seconds_spent: float = -1.0, request: gr.Request = None) -> dict:
        """Judge the item with this token. verdict: left|right|tie|both_bad (pairs), up|down
        (single answers). Returns {judgment_id, created}; repeating a token stores nothing new."""
        annotator = who(annotator, request)
        try:
            return ctx.queue.submit(token, verdict, annotator, strength=strength or None,
                                    seconds_spent=None if seconds_spent < 0 else seconds_spent)
        except ValueError as err:
            raise gr.Error(str(err))

    def skip_item(token: str, annotator: str, request: gr.Request = None) -> dict:
        """Skip the item (nothing stored; it leaves this annotator's queue)."""
        annotator = who(annotator, request)
        try:
            ctx.queue.skip(token, annotator)
        except ValueError as err:
            raise gr.Error(str(err))
        return {"skipped": token}

    def undo_last(annotator: str, request: gr.Request = None) -> dict:
        """Retract this annotator's last judgment; returns it and the item to re-judge."""
        annotator = who(annotator, request)
        try:
            out = ctx.queue.undo(annotator)
        except ValueError as err:
            raise gr.Error(str(err))
        if out is None:
            return {}
        return {"undone_id": out["undone"]["id"], "item": out["item"].public()}

    def submit_ranking(token: str, order: str, annotator: str, seconds_spent: float = -1.0,
                       request: gr.Request = None) -> dict:
        """Rank the answers of the ranking item with this token, by their labels, best
        first: "C > A = B > D" ('=' ties; spaces or '>' between places), or "none" when no
        answer is acceptable. Returns {ranking_id, created, pairs, decided, order} (pairs:
        implied pairs; decided: those with a winner); repeating a token
        stores nothing new. A bad order is refused and the item stays open."""
        annotator = who(annotator, request)
        try:
            return ctx.queue.submit_ranking(token, order, annotator,
                                            seconds_spent=None if seconds_spent < 0 else seconds_spent)
        except ValueError as err:
            raise gr.Error(str(err))

    def label_stats() -> dict:
        """Counts of prompts, responses and judgments by kind, verdict and annotator."""
        return ctx.store.stats(since=time.time() - 86400)

    def submit_edit(token: str, side: str, text: str, annotator: str,
                    request: gr.Request = None) -> dict:
        """Store a better version of the item's left or right answer, with the judgment
        that it beats the original: {response_id, judgment_id, original_id, created}. The
        item stays open; the same text sent twice is stored once."""
        annotator = who(annotator, request)
        try:
            out = ctx.queue.submit_edit(token, side, text, annotator)
        except ValueError as err:
            raise gr.Error(str(err))
        return {k: out[k] for k in ("response_id", "judgment_id", "original_id", "created")}

    for fn in (next_item, submit_judgment, skip_item, undo_last, label_stats, submit_edit,
               submit_ranking):
        gr.api(fn, api_name=fn.__name__, concurrency_limit=None)
