"""The Team tab: how the queue shares items, whether annotators agree, who looks biased,
gold items and each annotator's accuracy on them, and which adapters used a judgment."""
from __future__ import annotations

import functools

import gradio as gr
import pandas as pd

from rpo_app import team
from rpo_app.config import TeamSettings
from rpo_app.store import StoreError
from rpo_app.ui.context import AppContext

RECENT = 200  # judgments listed in the table


def load_settings(ctx: AppContext) -> tuple:
    s = TeamSettings.load(ctx.store)
    return s.overlap, s.gold_rate, s.recheck_rate, s.rank_size


def save_settings(ctx: AppContext, overlap, gold_rate, recheck_rate, who: str,
                  rank_size=TeamSettings.rank_size) -> str:
    try:
        s = TeamSettings(overlap=int(overlap or 0), gold_rate=float(gold_rate),
                         recheck_rate=float(recheck_rate),
                         rank_size=int(rank_size or 0)).save(ctx.store, by=who or None)
    except (TypeError, ValueError) as err:
        raise gr.Error(f"{err}; nothing was changed")
    return (f"✔ Saved: each item goes to **{s.overlap}** annotator(s); "
            f"{s.gold_rate:.0%} gold checks, {s.recheck_rate:.0%} re-shown items; "
            f"{s.rank_size} answers per ranking.")


def view(ctx: AppContext) -> tuple:
    """Summary, α, κ, annotators, flags, gold accuracy, recent judgments."""
    from rpo_app.agreement import tables

    rep = team.agreement_report(ctx.store)
    c = rep["counts"]
    summary = (f"**{c['judgments']} judgments** by **{c['annotators']} annotators**; "
               f"**{c['shared_items']} items** judged by two or more; {c['gold_items']} gold items.")
    if not c["shared_items"]:
        summary += ("  \nNo item has two annotators yet, so there is no agreement figure: "
                    "set **annotators per item** to 2 or more and label.")
    else:
        for a in rep["alpha"]:
            if a["alpha"] is not None:
                summary += (f"  \nAgreement on {a['group']}: **α = {a['alpha']:.2f}** over "
                            f"{a['items']} items.")
            elif a["items"]:
                summary += (f"  \nAgreement on {a['group']}: α cannot be computed yet; it "
                            "needs two shared items and more than one verdict in use.")
    flags = [f"- **{b['annotator']}**: {f}" for b in rep["bias"] for f in b["flags"]]
    flags_md = ("**Flags**\n" + "\n".join(flags)) if flags else \
        "No flags: nothing is far from what is expected (or too few judgments to tell)."
    shown = tables(rep)
    return (summary, shown["alpha"], shown["kappa"], shown["annotators"], flags_md, shown["gold"],
            judgments_frame(ctx))


def judgments_frame(ctx: AppContext) -> pd.DataFrame:
    rows = ctx.store.judgments(limit=RECENT, newest_first=True)
    gold = ctx.store.gold_ids()
    used = ctx.store.runs_using([r["id"] for r in rows])
    return pd.DataFrame([{
        "id": r["id"], "kind": r["kind"], "verdict": r["verdict"], "annotator": r["annotator"],
        "source": r["source"], "gold": "★" if r["id"] in gold else "",
        "used by": ", ".join(f"{u['adapter'] or u['run_id']}"
                             + (" (held out)" if u["role"] == "held_out" else "")
                             for u in used[r["id"]]),
        "prompt": (r["prompt_a"] or "")[:80],
    } for r in rows], columns=["id", "kind", "verdict", "annotator", "source", "gold",
                               "used by", "prompt"])


def mark_gold(ctx: AppContext, ids_text: str, who: str, mark: bool = True) -> tuple:
    try:
        ids = team.parse_ids(ids_text)
        if mark:
            n = ctx.store.mark_gold(ids, by=who or "team")
            line = f"✔ Marked {n} judgment(s) as gold ({len(ids) - n} already were)."
        else:
            line = f"✔ Unmarked {ctx.store.unmark_gold(ids)} judgment(s)."
    except (ValueError, StoreError) as err:
        raise gr.Error(str(err))
    return line, judgments_frame(ctx)


def build(ctx: AppContext, annotator_box: gr.Textbox) -> dict:
    gr.Markdown("### How items are shared\nWith two or more annotators per item, the queue "
                "gives an item someone started to the next person before a fresh one, and "
                "never shows one person the same item twice. Checks are not announced: a "
                "**gold** item has a known answer (mark judgments as gold below, or import "
                "with `--gold`); a **re-shown** item is one of your own, sides swapped.")
    with gr.Row():
        overlap = gr.Number(1, precision=0, minimum=1, maximum=10, label="Annotators per item",
                            elem_id="team-overlap")
        gold_rate = gr.Slider(0, 0.5, value=0.1, step=0.01, label="Share of gold checks",
                              elem_id="team-gold-rate")
        recheck_rate = gr.Slider(0, 0.5, value=0.0, step=0.01,
                                 label="Share of re-shown items (self-consistency)",
                                 elem_id="team-recheck-rate")
        rank_size = gr.Number(TeamSettings.rank_size, precision=0, minimum=3, maximum=6,
                              label="Answers per ranking", elem_id="team-rank-size")
        save = gr.Button("Save", scale=0, elem_id="team-save")
    saved = gr.Markdown("", elem_id="team-saved")
    gr.Markdown("### Agreement")
    refresh = gr.Button("Refresh", size="sm", elem_id="team-refresh")
    summary = gr.Markdown("", elem_id="team-summary")
    alpha = gr.Dataframe(interactive=False, label="Over everyone (Krippendorff's α, nominal)",
                         elem_id="team-alpha")
    kappa = gr.Dataframe(interactive=False, label="Between pairs of annotators (Cohen's κ)",
                         elem_id="team-kappa")
    gr.Markdown("### Annotators\nSides are shuffled, so the left answer should win about half "
                "the time; the longer answer's share is compared with everyone else's.")
    people = gr.Dataframe(interactive=False, elem_id="team-people")
    flags = gr.Markdown("", elem_id="team-flags")
    gold = gr.Dataframe(interactive=False, label="Accuracy on gold items", elem_id="team-gold")
    gr.Markdown("### Judgments\nThe newest judgments, whether each is gold, and the adapters "
                "that trained on it.")
    with gr.Row():
        ids = gr.Textbox(label="Judgment ids", placeholder="e.g. 12, 15, 18", scale=3,
                         elem_id="team-gold-ids")
        mark = gr.Button("Mark as gold", scale=1, elem_id="team-mark-gold")
        unmark = gr.Button("Unmark", scale=1, elem_id="team-unmark-gold")
    gold_status = gr.Markdown("", elem_id="team-gold-status")
    table = gr.Dataframe(interactive=False, wrap=True, max_height=400, elem_id="team-judgments",
                         column_widths=["6%", "8%", "8%", "11%", "10%", "6%", "19%", "32%"])

    outputs = [summary, alpha, kappa, people, flags, gold, table]

    def who(request: gr.Request, typed: str) -> str:
        return getattr(request, "username", None) or (typed or "").strip()

    def on_save(o, g, r, typed, k, request: gr.Request):
        return save_settings(ctx, o, g, r, who(request, typed), k)

    def on_mark(text, typed, request: gr.Request):
        return mark_gold(ctx, text, who(request, typed), True)

    def on_unmark(text, typed, request: gr.Request):
        return mark_gold(ctx, text, who(request, typed), False)

    save.click(on_save, [overlap, gold_rate, recheck_rate, annotator_box, rank_size], saved,
               api_name="team_settings")
    refresh.click(functools.partial(view, ctx), None, outputs, api_name="team_view")
    mark.click(on_mark, [ids, annotator_box], [gold_status, table], api_name="mark_gold")
    unmark.click(on_unmark, [ids, annotator_box], [gold_status, table], api_name="unmark_gold")

    def load():
        return (*load_settings(ctx), *view(ctx))

    return {"load": load, "load_outputs": [overlap, gold_rate, recheck_rate, rank_size, *outputs]}
