"""The Data tab: add and import prompts or judgments, generate candidates, export."""
from __future__ import annotations

import functools
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from rpo_app.adapters import BASE_LABEL
from rpo_app.ui.context import AppContext
from rpo_app.ui.widgets import progress_bar

EXPORT_CHOICES = [("TRL DPO (prompt / chosen / rejected), JSONL", "trl-dpo:jsonl"),
                  ("TRL KTO (prompt / completion / label), JSONL", "trl-kto:jsonl"),
                  ("Full provenance, JSONL", "full:jsonl"),
                  ("Full provenance, CSV", "full:csv"),
                  ("Full provenance, Parquet", "full:parquet"),
                  ("Rankings (prompt / answers / ranks), JSONL", "rankings:jsonl")]


NOTHING_TO_DO = "Every prompt already has that many answers."


def refresh(ctx: AppContext) -> tuple:
    return _stats_frame(ctx), _prompts_frame(ctx)


def add_prompts(ctx: AppContext, text: str | None) -> tuple:
    from rpo_app import io

    try:
        report = io.add_prompt_texts(ctx.store, text or "", source="ui")
    except ValueError as err:
        raise gr.Error(str(err))
    _refresh_index(ctx)
    return ("", f"✔ {report.summary()}", *refresh(ctx))


def import_file(ctx: AppContext, file, annotator: str, gold: bool = False) -> tuple:
    from rpo_app import io

    if file is None:
        raise gr.Error("choose a file to import first")
    try:
        report = io.import_path(ctx.store, Path(file), annotator=annotator, gold=bool(gold))
    except ValueError as err:  # ImportFileError names the file, row and problem
        raise gr.Error(str(err))
    _refresh_index(ctx)
    return (None, f"✔ {report.summary()}", *refresh(ctx))


def export(ctx: AppContext, choice: str, drop_cut: bool = False) -> tuple:
    """`drop_cut`: leave out the TRL rows that hold an answer cut at its token limit
    (io.export's `cut`)."""
    from rpo_app import io

    fmt, ext = choice.split(":")
    ctx.layout.exports.mkdir(parents=True, exist_ok=True)
    out = ctx.layout.exports / f"{fmt}-{time.strftime('%Y%m%d-%H%M%S')}.{ext}"
    try:
        report = io.export(ctx.store, fmt, out, cut="drop" if drop_cut else "keep")
    except ValueError as err:
        raise gr.Error(str(err))
    return str(out), f"✔ {report.summary()}"


def start_generation(ctx: AppContext, adapter, n, limit, temp, top_p, max_new, seed,
                     min_p=None, repetition_penalty=None):
    """Start topping up prompts with fewer than n answers (the same backlog as `rpo_app
    generate`) in the background; answers are stored one by one as they end. Returns
    the job's status (None: nothing to do); `poll` follows it."""
    from rpo_app.generate import GenSettings, backlog

    try:
        default = GenSettings()
        settings = GenSettings(
            temperature=float(temp), top_p=float(top_p), max_new_tokens=int(max_new),
            seed=int(seed or 0),
            min_p=default.min_p if min_p is None else float(min_p),
            repetition_penalty=(default.repetition_penalty if repetition_penalty is None
                                else float(repetition_penalty)))
    except (TypeError, ValueError) as err:
        raise gr.Error(str(err))
    adapter = None if adapter in (None, BASE_LABEL) else adapter
    ctx.host()  # waits for the model (or says it failed)
    ctx.sync_adapters()
    todo = backlog(ctx.store, int(n), int(limit or 20), adapter)
    if not todo:
        return None
    try:
        # One prompt's answers go first: a pair to judge within seconds.
        return ctx.generation.start(todo, int(n), settings, adapter=adapter, first_batch=int(n))
    except RuntimeError as err:
        raise gr.Error(str(err))


def generate_answers(ctx: AppContext, adapter, n, limit, temp, top_p, max_new, seed,
                     min_p=None, repetition_penalty=None, progress=gr.Progress()) -> tuple:
    """The blocking form (the /generate_candidates endpoint): start, then wait."""
    progress(0, desc="waiting for the model")
    if start_generation(ctx, adapter, n, limit, temp, top_p, max_new, seed, min_p,
                        repetition_penalty) is None:
        return NOTHING_TO_DO, *refresh(ctx)
    st = ctx.generation.status()
    while st.running:
        progress(st.done / max(st.total, 1), desc=st.line())
        st = ctx.generation.wait(timeout=0.5)
    if st.state == "failed":
        raise gr.Error(st.line())
    return st.line(), *refresh(ctx)


def poll(ctx: AppContext, shown=None) -> tuple:
    """The generation line and the store tables (a timer calls this every few seconds).
    The tables are redrawn only when the counts changed; a running job's line every time,
    since its elapsed time and ETA move between answers (a batch of 32 can store nothing
    for a minute, and the line froze at its last answer's "ETA 42 s")."""
    st = ctx.generation.status()
    stats = ctx.store.stats()
    key = [st.state, st.done, stats["responses"], stats["judgments"], stats["prompts"]]
    if key == shown:
        return (_job_view(st) if st.running else gr.skip()), gr.skip(), gr.skip(), shown
    return (_job_view(st), *refresh(ctx), key)


def _job_view(st) -> str:
    """The job's line with a progress bar while it runs."""
    if not st.running:
        return st.line()
    return st.line() + progress_bar(st.done, st.total, st.eta_s(), st.elapsed_s, unit="answers",
                                    running=True, bar_id="gen-progress")


def adapter_choices(ctx: AppContext):
    return gr.update(choices=[BASE_LABEL] + [a["name"] for a in ctx.store.adapters()])


def suspects_view(ctx: AppContext) -> tuple:
    """(a line saying which run checked the labels, the suspects table)."""
    from rpo_app import suspects, team

    run_id, rows = team.suspect_labels(ctx.store, ctx.layout)
    if run_id is None:
        return ("No run has checked its labels yet. Every run that finishes scores each "
                "judgment it saw with its final adapter; train once and look again."), \
            suspects.table([])
    if not rows:
        return (f"**{run_id}** contradicts no judgment with {suspects.CONFIDENCE:.0%} confidence "
                "or more."), suspects.table([])
    return (f"**{run_id}** is at least {suspects.CONFIDENCE:.0%} sure that these "
            f"**{len(rows)}** judgments are the wrong way round (surest first; held-out ones, "
            "which it never trained on, are the stronger sign). Look again: judge it again "
            "or retract it."), suspects.table(rows)


def _judgment_id(text) -> int:
    try:
        return int(str(text).strip().lstrip("#"))
    except ValueError:
        raise gr.Error(f"enter one judgment id from the table, not {text!r}") from None


def rejudge_suspect(ctx: AppContext, text, annotator: str) -> tuple:
    """Retract the judgment and put its item first on this annotator's Label tab."""
    jid = _judgment_id(text)
    try:
        out = ctx.queue.rejudge(jid, annotator)
    except ValueError as err:
        raise gr.Error(str(err)) from None
    kind = out["item"].kind
    mode = {"unpaired": "Unpaired (thumbs)", "cross": "Cross-prompt", "ranking": "Rank several "
            "answers"}.get(kind, "Paired")
    return (f"Judgment #{jid} is retracted (the row stays, marked) and its item is the next "
            f"one on your **Label** tab in the *{mode}* mode.", *suspects_view(ctx))


def retract_suspect(ctx: AppContext, text, annotator: str) -> tuple:
    jid = _judgment_id(text)
    if not ctx.store.retract(jid, annotator):
        raise gr.Error(f"there is no active judgment #{jid}")
    return (f"Judgment #{jid} is retracted; the next run will not train on it.",
            *suspects_view(ctx))


def build(ctx: AppContext, annotator_box: gr.Textbox | None = None) -> dict:
    from rpo_app.generate import GenSettings

    dflt = GenSettings()  # chosen by `bench --only sampling` (README)
    with gr.Row():
        with gr.Column():
            gr.Markdown("### Add prompts\nOne prompt per line, or a JSON list of strings.")
            pasted = gr.Textbox(lines=6, label="Prompts", placeholder="How do I ...?\nWrite a ...",
                                elem_id="data-paste")
            add_btn = gr.Button("Add prompts", elem_id="data-add")
            gr.Markdown("### Import a file\nJSONL, JSON, CSV or Parquet: prompts only, TRL "
                        "preference (prompt/chosen/rejected), TRL unpaired "
                        "(prompt/completion/label) or Anthropic-HH (chosen/rejected "
                        "transcripts). A file with any bad row is refused whole.")
            upload = gr.File(label="File to import", file_types=[".jsonl", ".json", ".csv", ".parquet"],
                             elem_id="data-upload")
            import_gold = gr.Checkbox(False, label="Import as gold items (known answers the "
                                      "queue tests annotators on; see the Team tab)",
                                      elem_id="data-import-gold")
            import_btn = gr.Button("Import", elem_id="data-import")
            data_status = gr.Markdown("", elem_id="data-status")
        with gr.Column():
            gr.Markdown("### Generate candidates to judge\nAnswers are stored as they come, so "
                        "you can label what is ready while the rest is generated.")
            with gr.Row():
                gen_adapter = gr.Dropdown([BASE_LABEL], value=BASE_LABEL, label="Generator",
                                          elem_id="gen-adapter")
                gen_n = gr.Slider(1, 8, value=2, step=1, label="Answers per prompt")
                gen_limit = gr.Number(value=20, precision=0, minimum=1, label="Prompts (max)")
            with gr.Row():
                gen_temp = gr.Slider(0, 1.5, value=dflt.temperature, step=0.05, label="Temperature")
                gen_top_p = gr.Slider(0.1, 1.0, value=dflt.top_p, step=0.01, label="Top-p")
                gen_min_p = gr.Slider(0, 0.5, value=dflt.min_p, step=0.01, label="Min-p (0 = off)")
                gen_rep = gr.Slider(1.0, 1.5, value=dflt.repetition_penalty, step=0.01,
                                    label="Repetition penalty (1 = off)")
            with gr.Row():
                gen_max = gr.Slider(16, 512, value=dflt.max_new_tokens, step=16, label="Max new tokens")
                gen_seed = gr.Number(value=0, precision=0, label="Seed")
            gen_btn = gr.Button("Generate answers for prompts that have fewer than that many",
                                variant="primary", elem_id="gen-start")
            gen_status = gr.Markdown("", elem_id="gen-status")
            shown = gr.State(None)
            gr.Markdown("### Export")
            with gr.Row():
                export_fmt = gr.Dropdown(EXPORT_CHOICES, value="trl-dpo:jsonl", label="Format",
                                         scale=3, elem_id="export-format")
                export_btn = gr.Button("Export", scale=1, elem_id="export-btn")
            export_drop_cut = gr.Checkbox(
                False, label="TRL formats: leave out answers cut at their token limit (TRL would "
                             "train an ending the model never wrote)", elem_id="export-drop-cut")
            export_file = gr.File(label="Download", interactive=False, elem_id="export-file")
            export_status = gr.Markdown("")
    gr.Markdown("### What is in the store")
    stats_table = gr.Dataframe(interactive=False, wrap=True, column_widths=["25%", "60%", "15%"],
                               elem_id="data-stats")
    prompts_table = gr.Dataframe(interactive=False, wrap=True, max_height=400,
                                 label="Prompts (newest first, 200 shown)", elem_id="data-prompts")
    with gr.Accordion("Suspect labels", open=False, elem_id="data-suspects-box") as suspects_box:
        gr.Markdown("Judgments the newest tuned model contradicts with high confidence: a slip "
                    "of the key, a side mix-up, or a real disagreement worth a second look.")
        suspects_refresh = gr.Button("Refresh", size="sm", elem_id="suspects-refresh")
        suspects_info = gr.Markdown("", elem_id="suspects-info")
        suspects_table = gr.Dataframe(interactive=False, wrap=True, max_height=400,
                                      elem_id="suspects-table")
        with gr.Row():
            suspect_id = gr.Textbox(label="Judgment id", scale=2, elem_id="suspects-id")
            rejudge_btn = gr.Button("Judge it again (Label tab)", scale=1,
                                    elem_id="suspects-rejudge")
            retract_btn = gr.Button("Retract", variant="stop", scale=1, elem_id="suspects-retract")
        suspects_status = gr.Markdown("", elem_id="suspects-status")

    def on_import(file, gold, request: gr.Request):
        # With --auth the login name is the importer.
        return import_file(ctx, file, getattr(request, "username", None) or "import", gold)

    def on_start(*values):
        if start_generation(ctx, *values) is None:
            return NOTHING_TO_DO, *refresh(ctx), None
        return poll(ctx)

    def on_generate_api(adapter: str = BASE_LABEL, n: int = 2, limit: int = 20,
                        temperature: float = dflt.temperature, top_p: float = dflt.top_p,
                        max_new_tokens: int = dflt.max_new_tokens, seed: int = 0,
                        min_p: float = dflt.min_p,
                        repetition_penalty: float = dflt.repetition_penalty) -> dict:
        """Top up prompts with fewer than n answers; returns when they are stored:
        {status, new, duplicates, prompts, seconds}."""
        line = generate_answers(ctx, adapter, n, limit, temperature, top_p, max_new_tokens, seed,
                                min_p, repetition_penalty, progress=lambda *a, **k: None)[0]
        st = ctx.generation.status()
        if line == NOTHING_TO_DO:
            return {"status": line, "new": 0, "duplicates": 0, "prompts": 0, "seconds": 0.0}
        return {"status": line, "new": st.new, "duplicates": st.duplicates,
                "prompts": st.prompts, "seconds": round(st.elapsed_s, 1)}

    add_btn.click(functools.partial(add_prompts, ctx), pasted,
                  [pasted, data_status, stats_table, prompts_table], api_name="add_prompts")
    import_btn.click(on_import, [upload, import_gold], [upload, data_status, stats_table, prompts_table],
                     api_name="import_file")
    export_btn.click(functools.partial(export, ctx), [export_fmt, export_drop_cut], [export_file, export_status],
                     api_name="export")
    gen_inputs = [gen_adapter, gen_n, gen_limit, gen_temp, gen_top_p, gen_max, gen_seed, gen_min_p,
                  gen_rep]
    # The button starts a background job and returns; the timer follows it. Scripts call
    # /generate_candidates, which returns when the answers are stored.
    gen_btn.click(on_start, gen_inputs, [gen_status, stats_table, prompts_table, shown],
                  api_name=False)
    gr.api(on_generate_api, api_name="generate_candidates", concurrency_limit=1,
           concurrency_id="model")
    polling, poll_outputs = functools.partial(poll, ctx), [gen_status, stats_table, prompts_table, shown]
    timer = gr.Timer(2.0, active=False)  # ticking while this tab is shown (ui.app)
    timer.tick(polling, shown, poll_outputs, api_name=False,
               show_progress="hidden")
    gen_adapter.focus(functools.partial(adapter_choices, ctx), None, gen_adapter, api_name=False)
    suspect_views = [suspects_info, suspects_table]
    suspects_box.expand(functools.partial(suspects_view, ctx), None, suspect_views, api_name=False)
    suspects_refresh.click(functools.partial(suspects_view, ctx), None, suspect_views,
                           api_name="suspects")
    if annotator_box is not None:
        def on_rejudge(text, typed, request: gr.Request):
            return rejudge_suspect(ctx, text, ctx.annotator(request, typed))

        def on_retract(text, typed, request: gr.Request):
            return retract_suspect(ctx, text, ctx.annotator(request, typed))

        rejudge_btn.click(on_rejudge, [suspect_id, annotator_box],
                          [suspects_status, *suspect_views], api_name="suspect_rejudge")
        retract_btn.click(on_retract, [suspect_id, annotator_box],
                          [suspects_status, *suspect_views], api_name="suspect_retract")
    return {"refresh": functools.partial(refresh, ctx), "outputs": [stats_table, prompts_table],
            "timer": timer, "poll": polling, "poll_inputs": [shown],
            "poll_outputs": poll_outputs}


def _refresh_index(ctx: AppContext) -> None:
    try:
        ctx.index(timeout=0.01).refresh()
    except gr.Error:
        pass  # still loading; the loader embeds everything when it finishes


def _stats_frame(ctx: AppContext) -> pd.DataFrame:
    s = ctx.store.stats()
    rows = [("prompts", "", s["prompts"]), ("responses", "", s["responses"]),
            ("judgments (active)", "", s["judgments"]), ("retracted (undone)", "", s["retracted"]),
            ("rankings (active)", f"{s['ranking_pairs']} implied pairs", s["rankings"])]
    for kind, verdicts in s["by_kind"].items():
        for verdict, n in sorted(verdicts.items()):
            rows.append((f"{kind} judgments", verdict, n))
    for name, n in s["annotators"].items():
        rows.append(("annotator", name, n))
    if s["answers_unchecked_for_cut"]:
        from rpo_app.cut_backfill import unchecked_advice

        rows.append(("responses not checked for a cut", unchecked_advice(s["answers_unchecked_for_cut"]),
                     s["answers_unchecked_for_cut"]))
    return pd.DataFrame(rows, columns=["what", "detail", "count"])


def _prompts_frame(ctx: AppContext) -> pd.DataFrame:
    total = ctx.store.count_prompts()
    rows = ctx.store.prompts(limit=200, offset=max(total - 200, 0))[::-1]
    return pd.DataFrame({"id": [r["id"] for r in rows],
                         "family": [r["family"] or "" for r in rows],
                         "source": [r["source"] for r in rows],
                         "prompt": [r["text"][:200] for r in rows]})
