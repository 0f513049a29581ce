"""The Train tab: a form with sensible defaults, one-click start, live charts, runs list.

Training runs in a child process (rpo_app.runs); this tab only reads its files on a
timer, so a reload or a closed tab loses nothing.
"""
from __future__ import annotations

import html
import time

import gradio as gr
import pandas as pd

from rpo_app.train import DEFAULT_BETA, TrainConfig
from rpo_app.runs import ACTIVE_STATES
from rpo_app.ui.context import AppContext

LOSS_CHOICES = [("RPO, paired (same + related prompts)", "rpo-paired"),
                ("RPO, unpaired (thumbs and every judgment)", "rpo-unpaired"),
                ("DPO (same-prompt pairs)", "dpo"), ("IPO (baseline)", "ipo"),
                ("KTO (baseline, thumbs)", "kto")]
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
                lr = gr.Number(defaults.learning_rate, label="Learning rate", elem_id="train-lr")
                steps = gr.Number(defaults.max_steps, precision=0, minimum=1, label="Steps",
                                  elem_id="train-steps",
                                  info=f"blank: {defaults.epochs} epoch{'s' if defaults.epochs > 1 else ''}, "
                                       f"at least {defaults.min_steps} steps")
                batch = gr.Number(defaults.batch_size, precision=0, minimum=1,
                                  label="Batch size (pairs)", elem_id="train-batch")
            with gr.Row():
                rank = gr.Number(defaults.lora_r, precision=0, minimum=1, label="LoRA rank")
                max_len = gr.Number(defaults.max_length, precision=0, minimum=32,
                                    label="Max length (tokens)")
            kinds = gr.CheckboxGroup(KIND_CHOICES, value=["paired", "cross", "unpaired"],
                                     label="Judgments to use")
            annotators = gr.Dropdown([], multiselect=True, label="Annotators (empty = all)",
                                     elem_id="train-annotators")
            previews = gr.Textbox("\n".join(defaults.preview_prompts), lines=3,
                                  label="Preview prompts (one per line)", elem_id="train-previews")
            usable = gr.Markdown("", elem_id="train-usable")
            with gr.Row():
                start = gr.Button("Start fine-tuning", variant="primary", elem_id="train-start")
                stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
        with gr.Column(scale=3):
            status = gr.Markdown("No run yet.", elem_id="train-status")
            bar = gr.HTML(_bar(0, 0, None), elem_id="train-bar")
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

    form = [loss, beta, temperature, lr, steps, batch, rank, max_len, kinds, annotators, previews]

    def make_config(loss_v, beta_v, temp_v, lr_v, steps_v, batch_v, rank_v, len_v, kinds_v,
                    ann_v, prev_v) -> TrainConfig:
        cfg = TrainConfig(
            loss=loss_v, beta=float(beta_v or 0), temperature=float(temp_v or 0),
            learning_rate=float(lr_v or 0), max_steps=int(steps_v) if steps_v else None,
            batch_size=int(batch_v or 0), lora_r=int(rank_v or 0), max_length=int(len_v or 0),
            kinds=list(kinds_v or []), annotators=list(ann_v or []) or None,
            preview_prompts=[p.strip() for p in (prev_v or "").splitlines() if p.strip()],
            model=ctx.cfg.model, device=ctx.cfg.device)
        cfg.max_prompt_length = min(cfg.max_prompt_length, max(cfg.max_length // 2, 16))
        cfg.lora_alpha = 2 * cfg.lora_r
        return cfg

    def usable_line(*form_values):
        """What the current judgments give, and the trainer's own verdict on them."""
        from rpo_app.batches import count_examples
        from rpo_app.train import check_data

        try:
            cfg = make_config(*form_values)
            cfg.validate()
        except ValueError as err:
            return f"⚠ {err}"
        judgments = ctx.store.training_judgments(cfg.kinds, cfg.annotators)
        pairs = count_examples(judgments, "dpo" if cfg.loss != "rpo-paired" else cfg.loss)[0]
        chosen, rejected = count_examples(judgments, "rpo-unpaired")
        try:
            train_j, _ = check_data(cfg, judgments, world_size=1)
            verdict = "✔ enough to start."
        except ValueError as err:
            return (f"Current judgments give **{pairs} pairs** and **{chosen} chosen / "
                    f"{rejected} rejected items**. ⚠ {err}")
        have = max(count_examples(train_j, cfg.loss))
        return (f"Current judgments give **{pairs} pairs** and **{chosen} chosen / {rejected} "
                f"rejected items**; {cfg.loss} trains on {have} of them. {verdict} "
                f"{_estimate(ctx, cfg, have)}")

    def start_run(*form_values):
        from rpo_app.train import check_data

        try:
            cfg = make_config(*form_values)
            cfg.validate()
            check_data(cfg, ctx.store.training_judgments(cfg.kinds, cfg.annotators), world_size=1)
        except ValueError as err:
            raise gr.Error(str(err))
        try:
            rid = ctx.runs.start(cfg)
        except (RuntimeError, ValueError) as err:
            raise gr.Error(str(err))
        return rid, *watch(rid)

    def current_run(rid):
        if rid and ctx.store.run(rid):
            return rid
        rows = ctx.store.runs()
        return rows[0]["id"] if rows else None

    def watch(rid, drawn=None):
        """Live view of a run. `drawn` is what this page last drew (run, metric rows,
        samples); unchanged charts are skipped so the timer never re-renders them."""
        rid = current_run(rid)
        if rid is None:
            return ("No run yet.", _bar(0, 0, None), _empty_plot(), _empty_plot(), _empty_plot(),
                    _empty_samples(), gr.update(visible=False), None)
        st = ctx.runs.status(rid)
        metrics = ctx.runs.metrics(rid)
        state = st.get("state", "unknown")
        step, total = int(st.get("step") or 0), int(st.get("max_steps") or 0)
        last = metrics.dropna(subset=["loss"]).iloc[-1] if "loss" in metrics and len(
            metrics.dropna(subset=["loss"])) else None
        eta = float(last["eta_s"]) if last is not None and "eta_s" in last and state == "running" else None
        parts = [f"**Run {rid}** · **{state}** · step {step}/{total or '?'}"]
        if last is not None:
            parts.append(f"loss {last['loss']:.4f} · margin {last.get('margin', float('nan')):.3f}"
                         f" · acc {last.get('accuracy', float('nan')):.2f}"
                         f" · {last.get('pairs_per_s', float('nan')):.2f} pairs/s")
        if "eval/accuracy" in metrics and metrics["eval/accuracy"].notna().any():
            parts.append(f"held-out accuracy **{metrics['eval/accuracy'].dropna().iloc[-1]:.2f}**")
        if st.get("early_stopped"):
            parts.append("stopped early: held-out accuracy and loss stopped improving")
        elif st.get("early_stop_note"):
            parts.append(html.escape(st["early_stop_note"]))
        if state == "failed":
            parts.append(f"**failed:** {html.escape(str(st.get('error') or 'failed'))}")
        if st.get("warning"):
            parts.append(f"**warning:** {html.escape(str(st['warning']))}")
        failed = state == "failed"
        sample_rows = ctx.runs.samples(rid)
        collapse = collapse_line(sample_rows)
        if collapse:
            parts.append(collapse)
        key = [rid, len(metrics), len(sample_rows)]
        same = drawn == key
        return (" · ".join(parts), _bar(step, total, eta, st.get("elapsed_s")),
                gr.skip() if same else _series(metrics, "loss", "loss"),
                gr.skip() if same else _series(metrics, "margin", "margin"),
                gr.skip() if same else _accuracy(metrics),
                gr.skip() if same else _samples(sample_rows),
                gr.update(visible=failed, value=ctx.runs.log_tail(rid) if failed else ""), key)

    def stop_run(rid):
        rid = current_run(rid)
        if rid is None or not ctx.runs.stop(rid):
            gr.Info("No running run to stop.")
        else:
            gr.Info(f"Stopping {rid}: it saves a checkpoint and exits.")
        return watch(rid)

    def runs_view():
        rows = ctx.runs.runs()
        frame = pd.DataFrame([{
            "run": r["id"], "state": r["state"],
            "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created_at"])),
            "loss fn": r["config"].get("loss"), "steps": r["config"].get("max_steps"),
            "beta": r["config"].get("beta"), "lr": r["config"].get("learning_rate"),
            "final loss": _fmt((r.get("final_metrics") or {}).get("loss")),
            "held-out acc": _fmt((r.get("final_metrics") or {}).get("eval/accuracy")),
            "adapter": r["id"] if ctx.store.adapter(r["id"]) else "",
        } for r in rows])
        names = [r["id"] for r in rows]
        return (frame, gr.update(choices=names), gr.update(choices=names),
                gr.update(choices=names), gr.update(choices=sorted(ctx.store.stats()["annotators"])))

    def compare(a, b):
        frames = []
        for rid in (a, b):
            if not rid:
                continue
            m = ctx.runs.metrics(rid)
            for col, label in (("loss", "loss"), ("eval/accuracy", "held-out acc")):
                if col in m and m[col].notna().any():
                    s = m[["step", col]].dropna()
                    frames.append(pd.DataFrame({"step": s["step"], "value": _smooth(s[col]),
                                                "series": f"{rid} {label}"}))
        return pd.concat(frames, ignore_index=True) if frames else _empty_plot()

    def delete(rid):
        if not rid:
            raise gr.Error("pick a run to delete")
        try:
            ctx.runs.delete(rid)
        except RuntimeError as err:
            raise gr.Error(str(err))
        gr.Info(f"Deleted {rid}")
        return runs_view()

    live = [status, bar, loss_plot, margin_plot, acc_plot, samples, log_box, drawn]
    runs_outputs = [runs_table, cmp_a, cmp_b, del_pick, annotators]
    # Each loss has its own measured β; picking a loss resets β to it.
    loss.input(lambda name: DEFAULT_BETA.get(name, defaults.beta), loss, beta, api_name=False,
               show_progress="hidden")
    for comp in form:
        comp.change(usable_line, form, usable, api_name=False, show_progress="hidden")
    start.click(start_run, form, [run_id, *live], api_name="train_start").then(
        runs_view, None, runs_outputs, api_name=False)
    stop.click(stop_run, run_id, live, api_name="train_stop")
    timer = gr.Timer(2.0)
    timer.tick(watch, [run_id, drawn], live, api_name=False, show_progress="hidden",
               concurrency_limit=None)
    cmp_btn.click(compare, [cmp_a, cmp_b], cmp_plot, api_name="train_compare")
    del_btn.click(delete, del_pick, runs_outputs, api_name="train_delete")
    def train_status(run: str = "") -> dict:
        """Status, step and last metrics of a run (the latest when empty)."""
        return watch_json(ctx, run or None)

    gr.api(train_status, api_name="train_status")

    def on_load():
        return (_device_line(), usable_line(*[c.value for c in form]), *runs_view())

    return {"load": on_load, "load_outputs": [device_md, usable, *runs_outputs],
            "watch": watch, "live": live, "run_id": run_id}


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
    return f"⚠ **collapse warning:** {html.escape(message)}" if message else None


def watch_json(ctx: AppContext, rid: str | None) -> dict:
    rows = ctx.store.runs()
    rid = rid or (rows[0]["id"] if rows else None)
    if not rid:
        return {}
    st = ctx.runs.status(rid)
    return {"run_id": rid, **st, "final_metrics": ctx.runs.final_metrics(rid)}


def _device_line() -> str:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return (f"**GPU:** {props.name}, {props.total_memory / 2**30:.0f} GiB "
                f"({torch.cuda.device_count()} visible) · training uses bf16")
    import os

    return (f"**No GPU found:** training runs on the CPU ({os.cpu_count()} cores), fp32. "
            "Fine for the bundled 135M model and a few hundred steps.")


def _estimate(ctx: AppContext, cfg: TrainConfig, n_examples: int) -> str:
    """Seconds per step from a timed forward pass of the loaded model (x3 for backward)."""
    try:
        host = ctx.host(timeout=0.01)
    except gr.Error:
        return "(time estimate once the model has loaded)"
    spf = _seconds_per_token(ctx, host)
    tokens = cfg.batch_size * 2 * min(cfg.max_length, 256)
    per_step = spf * tokens * 3.0
    steps = cfg.planned_steps(max(1, -(-n_examples // cfg.batch_size)))
    total = per_step * steps + spf * n_examples * 2 * min(cfg.max_length, 256)
    return f"Estimated time on this machine: ~{_human(total)} ({per_step:.1f} s/step)."


def _seconds_per_token(ctx: AppContext, host) -> float:
    """Time one real forward pass of the loaded model, once per app start."""
    cached = getattr(ctx, "_seconds_per_token", None)
    if cached is None:
        import torch

        ids = torch.randint(0, host.tokenizer.vocab_size, (4, 128), device=host.device)
        with host.lock, torch.no_grad():
            host.base(input_ids=ids)  # warm-up
            t0 = time.perf_counter()
            host.base(input_ids=ids)
            cached = (time.perf_counter() - t0) / ids.numel()
        ctx._seconds_per_token = cached
    return cached


def _human(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _fmt(value) -> str:
    return "" if value is None else f"{value:.3f}"


def _bar(step: int, total: int, eta: float | None, elapsed: float | None = None) -> str:
    pct = 100.0 * step / total if total else 0.0
    extra = []
    if elapsed:
        extra.append(f"elapsed {_human(float(elapsed))}")
    if eta is not None:
        extra.append(f"ETA {_human(eta)}")
    return (f'<div style="width:100%"><progress id="train-progress" max="100" value="{pct:.1f}" '
            f'style="width:100%;height:14px"></progress>'
            f'<div style="font-size:0.85em">{pct:.0f}% {" · ".join(extra)}</div></div>')


def _smooth(series: pd.Series, alpha: float = 0.3) -> pd.Series:
    return series.ewm(alpha=alpha, adjust=False).mean()


def _empty_plot() -> None:
    # None, not an empty frame: a chart first drawn from an empty frame keeps an empty
    # colour domain and then draws no lines at all.
    return None


def _series(metrics: pd.DataFrame, col: str, label: str) -> pd.DataFrame:
    if col not in metrics or not metrics[col].notna().any():
        return _empty_plot()
    s = metrics[["step", col]].dropna()
    return pd.concat([pd.DataFrame({"step": s["step"], "value": s[col], "series": label}),
                      pd.DataFrame({"step": s["step"], "value": _smooth(s[col]),
                                    "series": f"{label} (smoothed)"})], ignore_index=True)


def _accuracy(metrics: pd.DataFrame) -> pd.DataFrame:
    frames = [f for f in [_series(metrics, "accuracy", "train acc")] if f is not None]
    if "eval/accuracy" in metrics and metrics["eval/accuracy"].notna().any():
        s = metrics[["step", "eval/accuracy"]].dropna()
        frames.append(pd.DataFrame({"step": s["step"], "value": s["eval/accuracy"],
                                    "series": "held-out acc"}))
    return pd.concat(frames, ignore_index=True) if frames else None


def _empty_samples() -> pd.DataFrame:
    return pd.DataFrame(columns=["step", "prompt", "tuned", "base"])


def _samples(rows: list[dict]) -> pd.DataFrame:
    if not rows:
        return _empty_samples()
    frame = pd.DataFrame(rows)
    keep = [c for c in ("step", "prompt", "tuned", "base") if c in frame]
    return frame[keep].sort_values("step", ascending=False, kind="stable")
