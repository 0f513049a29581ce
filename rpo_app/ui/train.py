"""The Train tab: a form with sensible defaults, one-click start, live charts, runs list.

Training runs in a child process (rpo_app.runs); this tab only reads its files on a
timer, so a reload or a closed tab loses nothing. It builds and checks configs with
rpo_app.trainconfig and never imports the training loop (torch-heavy, and not this
process's business).

The form's components are keyed by TrainConfig field name; Gradio hands their values
over by position, and `build` turns them into {field name: value} once, before any
handler sees them.
"""
from __future__ import annotations

import dataclasses
import functools
import html
import os
import re
import statistics
import time

import gradio as gr
import pandas as pd

from rpo_app import lineage, progress
from rpo_app.batches import count_examples, judgment_pairs, judgment_pools
from rpo_app.loss_registry import LOSSES, get_loss
from rpo_app.runestimate import CHECKPOINTING_MEMORY, CHECKPOINTING_STEP_FACTOR
from rpo_app.runfolder import MetricRow
from rpo_app.trainconfig import (LEARNING_RATE_EVERY_LAYER, ConfigError, TrainConfig, batch_note, check_data,
                                 recorded, resolve_for_model)
from rpo_app.ui.context import AppContext
from rpo_app.ui.widgets import progress_bar

LOSS_CHOICES = [(spec.label, name) for name, spec in LOSSES.items()]
KIND_CHOICES = [("paired", "paired"), ("cross-prompt", "cross"), ("thumbs", "unpaired")]
METRIC_HELP = """
**Reading the charts.** *Loss* falls as the tuned model separates chosen from rejected
answers. *Reward margin* is β·(log-ratio of chosen − log-ratio of rejected), measured
against the base model: it starts at 0 and grows. Chosen and rejected *rewards* are often
both negative: the model moves probability away from both, faster from the rejected
one; that is normal. *Accuracy* is the share of pairs whose chosen answer gets the higher
reward; with a tiny batch it jumps between 0 and 1, so read the smoothed line. *Held-out
accuracy* is the same on pairs never trained on: the number that says it generalises.
"""
# The outputs of `watch`, in order.
LIVE = ("status", "bar", "loss_plot", "margin_plot", "acc_plot", "samples", "log", "drawn")
_FIELD_TYPES = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}


# -- the form -> a config ---------------------------------------------------------------

def config_from_form(ctx: AppContext, values: dict) -> TrainConfig:
    """The checked config for the form's {TrainConfig field name: value}.

    Fields the form does not have keep TrainConfig's defaults; a blank optional field is
    None, so dependent settings (lora_alpha, max_prompt_length, a blank beta) follow
    `derive_settings` like everywhere else. Raises ConfigError naming the bad field.
    """
    values = {name: NAMED_VALUES.get(name, {}).get(value, value) if isinstance(value, str) else value
              for name, value in values.items()}
    settings = {name: _setting(name, value) for name, value in values.items()}
    # Gradio shows a blank number box as 0 once the page is up, and sends 0 from then on:
    # 0 steps means what blank means (epochs, with the step floor).
    if settings.get("max_steps") == 0:
        settings["max_steps"] = None
    if settings.get("min_gold_accuracy") == 0:  # the same blank box: no bar
        settings["min_gold_accuracy"] = None
    if settings.get("learning_rate") == 0:  # as blank, from a script: the rate follows the layers
        settings["learning_rate"] = None
    cfg = TrainConfig.from_dict({**settings, "model": ctx.cfg.model, "device": ctx.cfg.device})
    return cfg.validate()


# Boxes that offer named choices (label, value) and take a typed number; the names'
# settings (None: trainconfig.resolve_for_model decides).
LORA_LAYER_CHOICES = [("top half", "half"), ("all", "all")]
RATE_CHOICES = [("auto", "auto")]
NAMED_VALUES = {"lora_layers": {"half": None, "all": 0}, "learning_rate": {"auto": None}}


def _setting(name: str, value):
    """One form value as the TrainConfig field `name` takes it (the field's type says how)."""
    kind = _FIELD_TYPES.get(name)
    if kind is None:
        return value  # TrainConfig.from_dict names the unknown field
    optional = "None" in kind
    if kind == "bool":
        return bool(value)
    if kind.startswith("list"):
        lines = value.splitlines() if isinstance(value, str) else list(value or [])
        items = [str(v).strip() for v in lines if str(v).strip()]
        return items or (None if optional else [])
    if value is None or (isinstance(value, str) and not value.strip()):
        if optional:
            return None
        raise ConfigError(f"{name} is empty; enter a value")
    if kind.startswith(("int", "float")):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
        if kind.startswith("float"):
            return number
        if not number.is_integer():
            raise ConfigError(f"{name} must be a whole number, got {value!r}")
        return int(number)
    return str(value)


def beta_for_loss(name: str) -> float:
    """The β a loss starts from: each was measured on its own (RPO spreads β over the batch)."""
    return get_loss(name).default_beta


def usable_line(ctx: AppContext, values: dict) -> str:
    """What the current judgments give, and the trainer's own verdict on them."""
    try:
        cfg = config_from_form(ctx, values)
    except ValueError as err:
        return f"⚠ {err}"
    spec = get_loss(cfg.loss)
    judgments, left_out = lineage.from_store(cfg, ctx.store)
    pairs = judgment_pairs(judgments)
    same = sum(p.kind == "paired" for p in pairs)
    chosen, rejected = (len(pool) for pool in judgment_pools(judgments))
    given = (f"Current judgments give **{len(pairs)} pair{'' if len(pairs) == 1 else 's'}** "
             f"({same} same-prompt, "
             f"{len(pairs) - same} cross-prompt) and **{chosen} chosen / {rejected} rejected items**")
    for name, info in (left_out.get("annotators") or {}).items():
        given += f" (leaving out {name}: {info['judgments']} judgments, {info['why']})"
    if left_out.get("judgments"):
        given += f" (leaving out {left_out['judgments']['removed']} listed judgments)"
    asked = cfg.batch_size
    try:
        train_j, eval_j = check_data(cfg, judgments, world_size=1)
    except ConfigError as err:
        return f"{given}. ⚠ {err}"
    n_chosen, n_rejected = count_examples(train_j, spec)
    trains = (f"{n_chosen} chosen / {n_rejected} rejected items" if spec.pools
              else f"{n_chosen} pairs")
    n_examples = max(n_chosen, n_rejected)
    note = batch_note(cfg, asked, n_examples)
    shrunk = f" {note[0].upper()}{note[1:]}." if note else ""
    caution = cfg.overtraining_caution(n_examples)
    return (f"{given}; {cfg.loss} trains on {trains} of them. ✔ enough to start.{shrunk} "
            f"{_estimate(ctx, cfg, train_j, eval_j, n_examples)}"
            + (f"\n\n⚠ **Measured:** {html.escape(caution)}." if caution else ""))


def _estimate(ctx: AppContext, cfg: TrainConfig, train_j: list[dict], eval_j: list[dict],
              n_examples: int) -> str:
    """Every phase of the run, from this machine's timings and this data (runestimate)."""
    from rpo_app.models import pick_precision
    from rpo_app.runestimate import estimate_run

    if not ctx.model_ready:
        return "(time estimate once the model has loaded)"
    host = ctx.host()
    last = _last_run_timings(ctx, pick_precision(str(host.device), cfg.precision))
    est = estimate_run(host, cfg, train_j, eval_j, n_examples, last)
    parts = [f"{name} {progress.human(sec)}" for name, sec in est.phases.items() if sec >= 0.5]
    return (f"Estimated time on this machine: **~{progress.human(est.total)}** "
            f"({est.shape.steps} steps of ~{est.phases['training'] / max(est.shape.steps, 1):.1f} s; "
            + " · ".join(parts) + ")." + _memory_note(last, est.memory))


def _memory_note(last: dict, memory=None) -> str:
    """A step's predicted memory against what is free now, and what the newest finished
    run here needed: the figures that tell whether to tick "Save memory"."""
    import psutil

    note = ""
    if memory:
        note = (f" Memory: a step needs about {memory.need_gb:.1f} GB beside the model; "
                f"{memory.free_gb:.1f} GB is free.")
        if memory.switched:
            note += (" *Save memory* will switch on by itself (steps about "
                     f"{CHECKPOINTING_STEP_FACTOR:.1f}× as long).")
    peak = last.get("peak_memory_gb")
    if not peak:
        return note
    free = psutil.virtual_memory().available / 1e9
    how = "with" if last.get("checkpointing") else "without"
    note += (f" The last run here ({last['run']}, {how} gradient checkpointing) "
             f"peaked at {peak:.1f} GB" + (f"; {free:.1f} GB is free now." if not memory else "."))
    return note + (" ⚠ Tick *Save memory* or lower the batch size or max length."
                   if peak > free and not last.get("checkpointing") else "")


def _last_run_timings(ctx: AppContext, precision: str) -> dict:
    """The newest finished run's phase times (what loading and saving take here), its
    steps' seconds per token and its other phases' (those that count tokens) if it
    trained in the same arithmetic, whether those steps
    ran with gradient checkpointing, on how many top layers its LoRA was (0: all), and its
    peak memory. Empty: no finished run."""
    for row in ctx.store.runs():
        # The run folder, not the store's row: the row learns of the end a moment later.
        st = ctx.runs.status(row["id"])
        if st.state == "finished":
            past = st.phase_seconds()
            if not past:
                return {}
            metrics = ctx.runs.metrics(row["id"])
            speeds = [v for v in metrics.get("tokens_per_s", pd.Series(dtype=float)).dropna() if v > 0]
            same = row["config"].get("precision", "auto") in ("auto", precision)
            # its precision "auto" resolved on this machine as ours does
            return {"past": past,
                    "step_s_per_token": 1.0 / statistics.median(speeds) if speeds and same else None,
                    "rates": st.phase_rates() if same else {},
                    "checkpointing": bool(st.gradient_checkpointing if st.gradient_checkpointing is not None
                                          else row["config"].get("gradient_checkpointing")),
                    "lora_layers": recorded(row["config"])["lora_layers"],
                    "peak_memory_gb": st.peak_memory_gb, "run": row["id"]}
    return {}


# -- runs -------------------------------------------------------------------------------

def start_run(ctx: AppContext, values: dict) -> tuple:
    """Start a run from the form; returns its id and its live view (LIVE)."""
    from rpo_app.frozen_prefix import decoder_layers

    try:
        cfg = config_from_form(ctx, values)
        check_data(cfg, lineage.from_store(cfg, ctx.store)[0], world_size=1)
        # The run's record then holds the layers and the rate the trainer will use; a
        # click before the model has loaded leaves them to the trainer (its config.yaml).
        if ctx.model_ready:
            resolve_for_model(cfg, decoder_layers(ctx.host().model.config))
        rid = ctx.runs.start(cfg)
    except (RuntimeError, ValueError) as err:
        raise gr.Error(str(err))
    return rid, *watch(ctx, rid)


def current_run(ctx: AppContext, rid: str | None) -> str | None:
    """The run this page shows: its own while it exists, else the newest."""
    if rid and ctx.store.run(rid):
        return rid
    rows = ctx.store.runs()
    return rows[0]["id"] if rows else None


def watch(ctx: AppContext, rid: str | None, drawn=None) -> tuple:
    """Live view of a run, in LIVE order. `drawn` is what this page last drew (run, metric
    rows, samples); unchanged charts are skipped so the timer never re-renders them."""
    rid = current_run(ctx, rid)
    if rid is None:
        # Drawn once: a newcomer's page has no run for minutes, and three charts and a
        # table sent again every tick kept the browser redrawing them.
        if drawn == [None]:
            return (gr.skip(),) * (len(LIVE) - 1) + ([None],)
        return ("No run yet.", progress_bar(0, 0, None), _empty_plot(), _empty_plot(), _empty_plot(),
                _empty_samples(), gr.update(visible=False), [None])
    st = ctx.runs.status(rid)
    metrics = ctx.runs.metrics(rid)
    sample_rows = [s.to_record() for s in ctx.runs.samples(rid)]
    parts = [f"**Run {rid}** · **{st.state}** · step {st.step}/{st.max_steps or '?'}"]
    # Before the first step and after the last one the run is busy with something else;
    # the step ETA says nothing about that, so name it instead.
    busy = st.phase if st.state == "running" and st.phase not in (None, "training") else None
    if busy:
        parts.append(f"*{html.escape(busy)}…*")
    trained = metrics.dropna(subset=["loss"])
    if len(trained):
        last = trained.iloc[-1]
        parts.append(f"loss {_fmt(last['loss'], 4)} · margin {_fmt(last['margin'])}"
                     f" · acc {_fmt(last['accuracy'], 2)} · {_fmt(last['pairs_per_s'], 2)} pairs/s")
    held_out = metrics["eval_accuracy"].dropna()
    if len(held_out):
        parts.append(f"held-out accuracy **{held_out.iloc[-1]:.2f}**")
    if st.peak_memory_gb:
        parts.append(f"peak memory {st.peak_memory_gb:.1f} GB")
    if st.early_stopped:
        parts.append("stopped early: held-out accuracy and loss stopped improving")
    elif st.early_stop_note:
        parts.append(html.escape(st.early_stop_note))
    failed = st.state == "failed"
    if failed:
        parts.append(f"**failed:** {html.escape(str(st.error or 'failed'))}")
    if st.warning:
        parts.append(f"**warning:** {html.escape(str(st.warning))}")
    collapse = collapse_line(sample_rows)
    if collapse:
        parts.append(collapse)
    key = [rid, len(metrics), len(sample_rows)]
    same = drawn == key
    return (" · ".join(parts), run_bar(st),
            gr.skip() if same else _series(metrics, "loss", "loss"),
            gr.skip() if same else _series(metrics, "margin", "margin"),
            gr.skip() if same else _accuracy(metrics),
            gr.skip() if same else _samples(sample_rows),
            gr.update(visible=failed, value=ctx.runs.log_tail(rid) if failed else ""), key)


def watch_json(ctx: AppContext, rid: str | None) -> dict:
    """A run's status fields with "run_id" and "final_metrics" (the latest run when empty)."""
    rows = ctx.store.runs()
    rid = rid or (rows[0]["id"] if rows else None)
    if not rid:
        return {}
    st = ctx.runs.status(rid)
    return {"run_id": rid, **dataclasses.asdict(st), "final_metrics": ctx.runs.final_metrics(rid)}


def stop_run(ctx: AppContext, rid: str | None) -> tuple:
    rid = current_run(ctx, rid)
    if rid is None or not ctx.runs.stop(rid):
        gr.Info("No running run to stop.")
    else:
        gr.Info(f"Stopping {rid}: it saves a checkpoint and exits.")
    return watch(ctx, rid)


def runs_view(ctx: AppContext) -> tuple:
    """The runs table, the run pickers' choices and the annotators' choices."""
    rows = ctx.runs.runs()
    frame = pd.DataFrame([_run_row(r) for r in rows])
    names = [r["id"] for r in rows]
    return (frame, gr.update(choices=names), gr.update(choices=names),
            gr.update(choices=names), gr.update(choices=sorted(ctx.store.stats()["annotators"])))


def _run_row(run: dict) -> dict:
    # Runs recorded before the metrics had attribute names keep TRL's ("eval/accuracy");
    # MetricRow reads either.
    final = MetricRow.from_record({**(run.get("final_metrics") or {}), "step": 0})
    return {
        "run": run["id"], "state": run["state"],
        "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(run["created_at"])),
        "loss fn": run["config"].get("loss"), "steps": run["config"].get("max_steps"),
        "beta": run["config"].get("beta"), "lr": run["config"].get("learning_rate"),
        "final loss": _fmt(final.loss), "held-out acc": _fmt(final.eval_accuracy),
        "adapter": run.get("adapter") or "",
    }


def compare(ctx: AppContext, a: str | None, b: str | None):
    frames = []
    for rid in (a, b):
        if not rid:
            continue
        m = ctx.runs.metrics(rid)
        for col, label in (("loss", "loss"), ("eval_accuracy", "held-out acc")):
            s = m[["step", col]].dropna()
            if len(s):
                frames.append(pd.DataFrame({"step": s["step"], "value": _smooth(s[col]),
                                            "series": f"{rid} {label}"}))
    return pd.concat(frames, ignore_index=True) if frames else _empty_plot()


def delete_run(ctx: AppContext, rid: str | None) -> tuple:
    if not rid:
        raise gr.Error("pick a run to delete")
    try:
        ctx.runs.delete(rid)
    except RuntimeError as err:
        raise gr.Error(str(err))
    gr.Info(f"Deleted {rid}")
    return runs_view(ctx)


def load_view(ctx: AppContext, values: dict) -> tuple:
    """What the tab shows when the page opens: device, usable line, runs."""
    return (_device_line(), usable_line(ctx, values), *runs_view(ctx))


def collapse_line(sample_rows: list[dict]) -> str | None:
    """A warning when the newest preview answers drift far from the base model's.

    Held-out accuracy keeps rising while a small model collapses to one-word or
    looping answers, so the previews are checked against the base answers that the
    trainer stores next to them (from base_samples.json) at every preview step.
    """
    from rpo_app.degeneration import collapse_warning

    steps = [r.get("step") for r in sample_rows if r.get("step") is not None]
    if not steps:
        return None
    newest = [r for r in sample_rows if r.get("step") == max(steps)]

    def text(value) -> str:  # a missing cell comes back from pandas as NaN
        return value if isinstance(value, str) else ""

    def mean_logp(key: str) -> float | None:  # absent in runs from before it was recorded
        values = [r.get(key) for r in newest]
        if not values or not all(isinstance(v, (int, float)) and v == v for v in values):
            return None
        return sum(values) / len(values)

    message = collapse_warning([text(r.get("base")) for r in newest],
                               [text(r.get("tuned")) for r in newest],
                               mean_logp("base_logp"), mean_logp("tuned_logp"))
    if not message:
        return None
    # The message quotes the model's own text ("1. **1. **1. ..."): shown as written, not
    # read as Markdown.
    quoted = html.escape(re.sub(r"([\\`*_\[\]#|~])", r"\\\1", message))
    return f"⚠ **collapse warning:** {quoted}"


# -- layout and wiring --------------------------------------------------------------------

def build(ctx: AppContext) -> dict:
    defaults = TrainConfig()
    run_id = gr.State(None)
    drawn = gr.State(None)
    with gr.Row():
        with gr.Column(scale=2):
            device_md = gr.Markdown(_device_line(), elem_id="train-device")
            loss = gr.Dropdown(LOSS_CHOICES, value=defaults.loss, label="Loss",
                               info="RPO contrasts every chosen answer with every rejected one in "
                                    "the batch, weighted by how similar their prompts are.",
                               elem_id="train-loss")
            with gr.Row():
                beta = gr.Number(defaults.beta, label="β (beta)", minimum=0.001, elem_id="train-beta",
                                 info="how far the model may move from the base; smaller = further. "
                                      "Set per loss: RPO spreads β over the batch, so it needs more")
                temperature = gr.Number(defaults.temperature, label="τ (RPO temperature)",
                                        minimum=0.01,
                                        info="low: only near-identical prompts are contrasted")
            with gr.Row():
                lr = gr.Dropdown(RATE_CHOICES, value="auto", allow_custom_value=True,
                                 label="Learning rate", elem_id="train-lr",
                                 info=f"or type one. auto follows the layers: {_rate(LEARNING_RATE_EVERY_LAYER)} "
                                      f"on all, {_rate(2 * LEARNING_RATE_EVERY_LAYER)} on the top half")
                steps = gr.Number(defaults.max_steps, precision=0, minimum=0, label="Steps",
                                  elem_id="train-steps",
                                  info=f"0 or blank: {defaults.epochs} epoch{'s' if defaults.epochs > 1 else ''}, "
                                       f"at least {defaults.min_steps} steps; a small set "
                                       f"({_small_sets()}): {defaults.small_set_steps} steps "
                                       f"in batches of {defaults.small_set_batch}")
                batch = gr.Number(defaults.batch_size, precision=0, minimum=1,
                                  label="Batch size (pairs)", elem_id="train-batch")
            with gr.Row():
                rank = gr.Number(defaults.lora_r, precision=0, minimum=1, label="LoRA rank")
                max_len = gr.Number(defaults.max_length, precision=0, minimum=32,
                                    label="Max length (tokens)")
                lora_layers = gr.Dropdown(LORA_LAYER_CHOICES, value="half", allow_custom_value=True,
                                          label="LoRA layers", elem_id="train-lora-layers",
                                          info="or type N for the top N. The top half ran 1.6x "
                                               "as fast as all, and won as often")
            kinds = gr.CheckboxGroup(KIND_CHOICES, value=["paired", "cross", "unpaired"],
                                     label="Judgments to use")
            annotators = gr.Dropdown([], multiselect=True, label="Annotators (empty = all)",
                                     elem_id="train-annotators")
            # 0, not blank: scripts calling /train_start may leave it out (0 means no bar).
            gold_bar = gr.Number(0, minimum=0, maximum=1, label="Leave out annotators below "
                                 "this accuracy on gold items (0 or blank: keep everyone)",
                                 elem_id="train-gold-bar")
            previews = gr.Textbox("\n".join(defaults.preview_prompts), lines=3,
                                  label="Preview prompts (one per line)", elem_id="train-previews")
            save_memory = gr.Checkbox(defaults.gradient_checkpointing, elem_id="train-save-memory",
                                      label="Save memory (gradient checkpointing)",
                                      info=f"recompute activations in the backward pass: a step "
                                           f"needs about {CHECKPOINTING_MEMORY:.0%} of the memory "
                                           f"and {CHECKPOINTING_STEP_FACTOR:.2f}x the time; a run "
                                           "switches it on by itself when a step would not fit")
            usable = gr.Markdown("", elem_id="train-usable")
            with gr.Row():
                start = gr.Button("Start fine-tuning", variant="primary", elem_id="train-start")
                stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
        with gr.Column(scale=3):
            status = gr.Markdown("No run yet.", elem_id="train-status")
            bar = gr.HTML(progress_bar(0, 0, None), elem_id="train-bar")
            with gr.Row():
                loss_plot = gr.LinePlot(x="step", y="value", color="series", title="Loss",
                                        height=220, elem_id="plot-loss")
                margin_plot = gr.LinePlot(x="step", y="value", color="series",
                                          title="Reward margin", height=220, elem_id="plot-margin")
            acc_plot = gr.LinePlot(x="step", y="value", color="series",
                                   title="Preference accuracy (train, held-out)", height=220,
                                   elem_id="plot-acc")
            samples = gr.Dataframe(headers=["step", "prompt", "tuned", "base"], wrap=True,
                                   interactive=False, label="Previews (newest step first)",
                                   column_widths=["48px", "20%", "40%", "40%"],
                                   max_height=420, elem_id="train-samples")
            log_box = gr.Textbox(label="Log (end)", lines=10, visible=False, interactive=False,
                                 elem_id="train-log")
            gr.Markdown(METRIC_HELP)
    with gr.Accordion("Runs", open=False):
        runs_table = gr.Dataframe(interactive=False, wrap=True, elem_id="runs-table")
        with gr.Row():
            cmp_a = gr.Dropdown([], label="Compare run", scale=2)
            cmp_b = gr.Dropdown([], label="with run", scale=2)
            cmp_btn = gr.Button("Compare", scale=1)
        cmp_plot = gr.LinePlot(x="step", y="value", color="series", height=260,
                               title="Smoothed loss and held-out accuracy")
        with gr.Row():
            del_pick = gr.Dropdown([], label="Run to delete", scale=3)
            del_btn = gr.Button("Delete run (and its adapter)", variant="stop", scale=1)

    # TrainConfig field -> component. The order is the positional order of the
    # train_start API (param_0 = loss, ...): append, never reorder.
    form = {"loss": loss, "beta": beta, "temperature": temperature, "learning_rate": lr,
            "max_steps": steps, "batch_size": batch, "lora_r": rank, "max_length": max_len,
            "kinds": kinds, "annotators": annotators, "preview_prompts": previews,
            "min_gold_accuracy": gold_bar, "gradient_checkpointing": save_memory,
            "lora_layers": lora_layers}
    form_inputs = list(form.values())

    def by_name(handler):
        """Gradio passes the form by position; handlers take {field name: value}."""
        def call(*values):
            return handler(ctx, dict(zip(form, values)))
        return call

    components = {"status": status, "bar": bar, "loss_plot": loss_plot,
                  "margin_plot": margin_plot, "acc_plot": acc_plot, "samples": samples,
                  "log": log_box, "drawn": drawn}
    live = [components[name] for name in LIVE]
    runs_outputs = [runs_table, cmp_a, cmp_b, del_pick, annotators]
    loss.input(beta_for_loss, loss, beta, api_name=False, show_progress="hidden")
    for comp in form_inputs:
        comp.change(by_name(usable_line), form_inputs, usable, api_name=False,
                    show_progress="hidden")
    start.click(by_name(start_run), form_inputs, [run_id, *live], api_name="train_start").then(
        functools.partial(runs_view, ctx), None, runs_outputs, api_name=False)
    stop.click(functools.partial(stop_run, ctx), run_id, live, api_name="train_stop")
    watching = functools.partial(watch, ctx)
    timer = gr.Timer(2.0, active=False)  # ticking while this tab is shown (ui.app)
    timer.tick(watching, [run_id, drawn], live, api_name=False,
               show_progress="hidden", concurrency_limit=None)
    cmp_btn.click(functools.partial(compare, ctx), [cmp_a, cmp_b], cmp_plot,
                  api_name="train_compare")
    del_btn.click(functools.partial(delete_run, ctx), del_pick, runs_outputs,
                  api_name="train_delete")

    def train_status(run: str = "") -> dict:
        """Status, step and last metrics of a run (the latest when empty)."""
        return watch_json(ctx, run or None)

    gr.api(train_status, api_name="train_status")
    return {"load": by_name(load_view), "load_inputs": form_inputs,
            "load_outputs": [device_md, usable, *runs_outputs], "timer": timer,
            "watch": watching, "watch_inputs": [run_id, drawn],
            "watch_outputs": live}


# -- formatting ---------------------------------------------------------------------------

def _small_sets() -> str:
    """The losses' small-set bounds as the Steps box explains them: "fewer than 64 pairs,
    or liked or disliked items: rpo-unpaired 128, kto 96"."""
    pairs = sorted({spec.small_set for spec in LOSSES.values() if not spec.pools})
    pooled = ", ".join(f"{spec.name} {spec.small_set}" for spec in LOSSES.values() if spec.pools)
    return f"fewer than {'/'.join(map(str, pairs))} pairs, or liked or disliked items: {pooled}"


def _device_line() -> str:
    import torch

    from rpo_app.models import pick_precision

    # What a run with the default precision computes in (its config's "auto").
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return (f"**GPU:** {props.name}, {props.total_memory / 2**30:.0f} GiB "
                f"({torch.cuda.device_count()} visible) · training uses {pick_precision('cuda')}")
    arithmetic = ("bf16 autocast (this CPU has bf16 instructions)" if pick_precision("cpu") == "bf16"
                  else "fp32")
    return (f"**No GPU found:** training runs on the CPU ({os.cpu_count()} cores), {arithmetic}. "
            "Fine for the bundled 135M model and a few hundred steps.")


def _rate(value: float) -> str:
    """A learning rate as people write it: 3e-4."""
    mantissa, exponent = f"{value:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _fmt(value, digits: int = 3) -> str:
    if pd.isna(value):  # missing, or NaN from a DataFrame
        return ""
    return f"{float(value):.{digits}f}"


def run_bar(st) -> str:
    """The bar of the phase under way: its own count and its own ETA."""
    running = st.state == "running"
    if st.state == "queued":
        return progress_bar(None, None, None, label="starting the trainer", running=True)
    if running and st.phase and st.phase != "training":
        elapsed = time.time() - st.phase_started_at if st.phase_started_at else None
        return progress_bar(st.phase_done if st.phase_total else None, st.phase_total,
                            st.phase_eta_s(), elapsed, label=st.phase, unit=st.phase_unit,
                            running=True)
    return progress_bar(st.step, st.max_steps or 0, st.phase_eta_s() if running else None,
                        st.elapsed_s, label="training" if running else None, unit="steps",
                        running=running)


def _smooth(series: pd.Series, alpha: float = 0.3) -> pd.Series:
    return series.ewm(alpha=alpha, adjust=False).mean()


def _empty_plot() -> None:
    # None, not an empty frame: a chart first drawn from an empty frame keeps an empty
    # colour domain and then draws no lines at all.
    return None


def _series(metrics: pd.DataFrame, col: str, label: str) -> pd.DataFrame | None:
    s = metrics[["step", col]].dropna()
    if not len(s):
        return _empty_plot()
    return pd.concat([pd.DataFrame({"step": s["step"], "value": s[col], "series": label}),
                      pd.DataFrame({"step": s["step"], "value": _smooth(s[col]),
                                    "series": f"{label} (smoothed)"})], ignore_index=True)


def _accuracy(metrics: pd.DataFrame) -> pd.DataFrame | None:
    frames = [f for f in [_series(metrics, "accuracy", "train acc")] if f is not None]
    s = metrics[["step", "eval_accuracy"]].dropna()
    if len(s):
        frames.append(pd.DataFrame({"step": s["step"], "value": s["eval_accuracy"],
                                    "series": "held-out acc"}))
    return pd.concat(frames, ignore_index=True) if frames else None


def _empty_samples() -> pd.DataFrame:
    return pd.DataFrame(columns=["step", "prompt", "tuned", "base"])


def _samples(rows: list[dict]) -> pd.DataFrame:
    if not rows:
        return _empty_samples()
    frame = pd.DataFrame(rows)
    return frame[["step", "prompt", "tuned", "base"]].sort_values("step", ascending=False,
                                                                  kind="stable")
