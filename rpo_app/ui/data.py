"""The Data tab: add and import prompts or judgments, generate candidates, export."""
from __future__ import annotations

import functools
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from rpo_app.ui.context import BASE_LABEL, AppContext

EXPORT_CHOICES = [("TRL DPO (prompt / chosen / rejected), JSONL", "trl-dpo:jsonl"),
                  ("TRL KTO (prompt / completion / label), JSONL", "trl-kto:jsonl"),
                  ("Full provenance, JSONL", "full:jsonl"),
                  ("Full provenance, CSV", "full:csv"),
                  ("Full provenance, Parquet", "full:parquet")]


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


def import_file(ctx: AppContext, file, annotator: str) -> tuple:
    from rpo_app import io

    if file is None:
        raise gr.Error("choose a file to import first")
    try:
        report = io.import_path(ctx.store, Path(file), annotator=annotator)
    except ValueError as err:  # ImportFileError names the file, row and problem
        raise gr.Error(str(err))
    _refresh_index(ctx)
    return (None, f"✔ {report.summary()}", *refresh(ctx))


def export(ctx: AppContext, choice: str) -> tuple:
    from rpo_app import io

    fmt, ext = choice.split(":")
    ctx.layout.exports.mkdir(parents=True, exist_ok=True)
    out = ctx.layout.exports / f"{fmt}-{time.strftime('%Y%m%d-%H%M%S')}.{ext}"
    try:
        report = io.export(ctx.store, fmt, out)
    except ValueError as err:
        raise gr.Error(str(err))
    return str(out), f"✔ {report.summary()}"


def generate_answers(ctx: AppContext, adapter, n, limit, temp, top_p, max_new, seed,
                     progress=gr.Progress()) -> tuple:
    """Top up prompts with fewer than n answers (the same backlog as `rpo_app generate`)."""
    from rpo_app.generate import GenSettings, backlog, top_up

    progress(0, desc="waiting for the model")
    host = ctx.host()
    adapter = None if adapter in (None, BASE_LABEL) else adapter
    ctx.sync_adapters()
    todo = backlog(ctx.store, int(n), int(limit or 20), adapter)
    if not todo:
        return "Every prompt already has that many answers.", *refresh(ctx)
    settings = GenSettings(temperature=float(temp), top_p=float(top_p),
                           max_new_tokens=int(max_new), seed=int(seed or 0))
    t0 = time.time()

    def tick(done, total):
        if not done:  # no answer finished yet: nothing to estimate from
            progress(0, desc=f"0/{total} answers · generating the first batch")
            return
        eta = (time.time() - t0) / done * (total - done)
        progress(done / max(total, 1), desc=f"{done}/{total} answers · ETA {eta:.0f}s")

    result = top_up(ctx.store, host, todo, int(n), settings, adapter=adapter, progress=tick)
    return (f"✔ {result['new']} new answers for {len(todo)} prompts in "
            f"{time.time() - t0:.0f}s ({result.get('duplicates', 0)} duplicates not stored).",
            *refresh(ctx))


def adapter_choices(ctx: AppContext):
    return gr.update(choices=[BASE_LABEL] + [a["name"] for a in ctx.store.adapters()])


def build(ctx: AppContext) -> dict:
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
            import_btn = gr.Button("Import", elem_id="data-import")
            data_status = gr.Markdown("", elem_id="data-status")
        with gr.Column():
            gr.Markdown("### Generate candidates to judge\nAnswers are stored as they come, so "
                        "you can label what is ready while the rest is generated.")
            with gr.Row():
                gen_adapter = gr.Dropdown([BASE_LABEL], value=BASE_LABEL, label="Generator",
                                          elem_id="gen-adapter")
                gen_n = gr.Slider(1, 6, value=2, step=1, label="Answers per prompt")
                gen_limit = gr.Number(value=20, precision=0, minimum=1, label="Prompts (max)")
            with gr.Row():
                gen_temp = gr.Slider(0, 1.5, value=0.8, step=0.05, label="Temperature")
                gen_top_p = gr.Slider(0.1, 1.0, value=0.95, step=0.01, label="Top-p")
                gen_max = gr.Slider(16, 512, value=192, step=16, label="Max new tokens")
                gen_seed = gr.Number(value=0, precision=0, label="Seed")
            gen_btn = gr.Button("Generate answers for prompts that have fewer than that many",
                                variant="primary", elem_id="gen-start")
            gen_status = gr.Markdown("", elem_id="gen-status")
            gr.Markdown("### Export")
            with gr.Row():
                export_fmt = gr.Dropdown(EXPORT_CHOICES, value="trl-dpo:jsonl", label="Format",
                                         scale=3, elem_id="export-format")
                export_btn = gr.Button("Export", scale=1, elem_id="export-btn")
            export_file = gr.File(label="Download", interactive=False, elem_id="export-file")
            export_status = gr.Markdown("")
    gr.Markdown("### What is in the store")
    stats_table = gr.Dataframe(interactive=False, elem_id="data-stats")
    prompts_table = gr.Dataframe(interactive=False, wrap=True, max_height=400,
                                 label="Prompts (newest first, 200 shown)", elem_id="data-prompts")

    def on_import(file, request: gr.Request):
        # With --auth the login name is the importer.
        return import_file(ctx, file, getattr(request, "username", None) or "import")

    def on_generate(adapter, n, limit, temp, top_p, max_new, seed, progress=gr.Progress()):
        return generate_answers(ctx, adapter, n, limit, temp, top_p, max_new, seed, progress)

    add_btn.click(functools.partial(add_prompts, ctx), pasted,
                  [pasted, data_status, stats_table, prompts_table], api_name="add_prompts")
    import_btn.click(on_import, upload, [upload, data_status, stats_table, prompts_table],
                     api_name="import_file")
    export_btn.click(functools.partial(export, ctx), export_fmt, [export_file, export_status],
                     api_name="export")
    gen_btn.click(on_generate, [gen_adapter, gen_n, gen_limit, gen_temp, gen_top_p, gen_max, gen_seed],
                  [gen_status, stats_table, prompts_table], api_name="generate_candidates",
                  concurrency_limit=1, concurrency_id="model")
    gen_adapter.focus(functools.partial(adapter_choices, ctx), None, gen_adapter, api_name=False)
    return {"refresh": functools.partial(refresh, ctx), "outputs": [stats_table, prompts_table]}


def _refresh_index(ctx: AppContext) -> None:
    try:
        ctx.index(timeout=0.01).refresh()
    except gr.Error:
        pass  # still loading; the loader embeds everything when it finishes


def _stats_frame(ctx: AppContext) -> pd.DataFrame:
    s = ctx.store.stats()
    rows = [("prompts", "", s["prompts"]), ("responses", "", s["responses"]),
            ("judgments (active)", "", s["judgments"]), ("retracted (undone)", "", s["retracted"])]
    for kind, verdicts in s["by_kind"].items():
        for verdict, n in sorted(verdicts.items()):
            rows.append((f"{kind} judgments", verdict, n))
    for name, n in s["annotators"].items():
        rows.append(("annotator", name, n))
    return pd.DataFrame(rows, columns=["what", "detail", "count"])


def _prompts_frame(ctx: AppContext) -> pd.DataFrame:
    total = ctx.store.count_prompts()
    rows = ctx.store.prompts(limit=200, offset=max(total - 200, 0))[::-1]
    return pd.DataFrame({"id": [r["id"] for r in rows],
                         "family": [r["family"] or "" for r in rows],
                         "source": [r["source"] for r in rows],
                         "prompt": [r["text"][:200] for r in rows]})
