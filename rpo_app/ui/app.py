"""Builds the Gradio app from the tab modules and serves it."""
from __future__ import annotations

import functools
import logging
import os
import signal
import sys
from pathlib import Path

import gradio as gr
from starlette.middleware import Middleware

from rpo_app.config import ServeConfig, resolve_data_dir
from rpo_app.store import StoreError
from rpo_app.ui import chat as chat_tab
from rpo_app.ui import data as data_tab
from rpo_app.ui import label as label_tab
from rpo_app.ui import team as team_tab
from rpo_app.ui import train as train_tab
from rpo_app.ui.context import AppContext
from rpo_app.ui.earlyjs import EarlyScript

log = logging.getLogger(__name__)

CSS = """
#lbl-status, #gen-status, #data-status {min-height: 1.5em}
#lbl-progress {text-align: right; font-size: 0.9em}
footer {display: none !important}
/* Each paragraph takes its direction from its own text: Arabic or Hebrew reads right to
   left, English beside it left to right, whatever the page direction. */
textarea, input[type=text], .message, .prose, td {unicode-bidi: plaintext; text-align: start}
"""


def build_app(ctx: AppContext) -> gr.Blocks:
    with gr.Blocks(title="rpo_app: label, fine-tune, chat") as demo:
        with gr.Row(equal_height=True):
            gr.Markdown("## rpo_app · label preferences → fine-tune with RPO → chat",
                        elem_id="app-title")
            annotator = gr.Textbox(label="Your name (annotator)", scale=0, min_width=220,
                                   placeholder="e.g. ada", elem_id="annotator-name",
                                   interactive=not ctx.cfg.auth)
            model_info = gr.Markdown(_model_line(ctx), elem_id="model-line")
        remembered = gr.BrowserState("", storage_key="rpo_app_annotator")
        with gr.Tabs():
            with gr.Tab("Label", id="label") as label_page:
                label = label_tab.build(ctx, annotator)
            with gr.Tab("Train", id="train") as train_page:
                train = train_tab.build(ctx)
            with gr.Tab("Chat", id="chat") as chat_page:
                chat = chat_tab.build(ctx, annotator)
            with gr.Tab("Data", id="data") as data_page:
                data = data_tab.build(ctx, annotator)
            with gr.Tab("Team", id="team") as team_page:
                team = team_tab.build(ctx, annotator)

        def on_load(saved, request: gr.Request):
            user = getattr(request, "username", None)
            # Never clear a name typed while the page was still loading.
            name = user or saved
            return (name if name else gr.update()), _model_line(ctx)

        demo.load(on_load, remembered, [annotator, model_info], api_name=False).then(
            label["poll"], label["poll_inputs"], label["view"], api_name=False,
            concurrency_id=label_tab.FIRST_ITEM_GROUP, concurrency_limit=1).then(
            data["refresh"], None, data["outputs"], api_name=False).then(
            train["load"], train["load_inputs"], train["load_outputs"], api_name=False).then(
            chat["load"], chat["load_inputs"], chat["load_outputs"], api_name=False,
            concurrency_id=chat_tab.VOTES_GROUP, concurrency_limit=1)
        annotator.change(lambda name: name, annotator, remembered, api_name=False)
        # A tab's timer ticks only while the tab is shown (a timer ticks from the moment
        # its tab is first drawn). Every tick is a request and an update in the browser,
        # answered or skipped: once the Label, Train and Data tabs had been opened, an idle
        # page took 0.16-0.21 cores of chromium's time on 2 cores, and a training run beside
        # it went 2.01-2.11 s a step against 1.73 with the page closed. On arrival the Train
        # and Data tabs draw at once rather than a tick later. These listeners come first:
        # the browser runs one trigger's listeners one after another, each to its end, and
        # the Train tab's estimate below can take seconds (its timer and run view waited).
        timers = {"label": label["timer"], "train": train["timer"], "data": data["timer"]}
        for page, shown_tab in ((label_page, "label"), (train_page, "train"), (chat_page, "chat"),
                                (data_page, "data"), (team_page, "team")):
            page.select(functools.partial(_tab_timers, list(timers), shown_tab), None,
                        list(timers.values()), api_name=False, show_progress="hidden")
        train_page.select(train["watch"], train["watch_inputs"], train["watch_outputs"],
                          api_name=False, show_progress="hidden")
        data_page.select(data["poll"], data["poll_inputs"], data["poll_outputs"], api_name=False,
                         show_progress="hidden")
        # Judgments made since the page loaded: the count, the check and the estimate
        # are the store's now, not those of an empty store at page load.
        train_page.select(train["load"], train["load_inputs"], train["load_outputs"], api_name=False)
        # A run may have finished since the page loaded: offer its adapter at once.
        chat_page.select(chat["load"], chat["load_inputs"], chat["load_outputs"], api_name=False,
                         concurrency_id=chat_tab.VOTES_GROUP, concurrency_limit=1)
        # Back on the Label tab after generating or importing in the Data tab: an empty
        # screen fetches the next item (one on screen stays).
        label_page.select(label["poll"], label["poll_inputs"], label["view"], api_name=False,
                          concurrency_id=label_tab.FIRST_ITEM_GROUP, concurrency_limit=1)
        # Figures are computed when someone looks, not on every page load.
        team_page.select(team["load"], None, team["load_outputs"], api_name=False)
        # Until the model has loaded or failed: after that the line never changes, and
        # every tick is work for the app and the browser beside the model.
        timer = gr.Timer(3.0)
        timer.tick(lambda: (_model_line(ctx), gr.Timer(active=ctx.model_loading)), None,
                   [model_info, timer], api_name=False, show_progress="hidden")
    return demo


def _tab_timers(names: list[str], shown: str) -> tuple:
    """The tabs' timers as `shown` is selected: its own ticks, the others stop."""
    return tuple(gr.Timer(active=name == shown) for name in names)


def _model_line(ctx: AppContext) -> str:
    name = ctx.cfg.model or "SmolLM2-135M-Instruct (bundled)"
    return f"**Model:** {name} · {ctx.model_status()}"


def parse_auth(values: list[str]) -> list[tuple[str, str]]:
    """--auth user:pass (repeatable) or --auth FILE with one user:pass per line."""
    pairs = []
    for value in values or []:
        path = Path(value)
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else [value]
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, password = line.partition(":")
            if not sep or not user or not password:
                raise SystemExit(f"--auth: expected user:password, got {line!r}")
            pairs.append((user, password))
    return pairs


# How often Gradio's queue looks for work when it has none. Gradio 6 looks every 1 ms on
# Linux (10 ms for progress updates): an idle app with no page open spent 9% of a core
# on it (2.7 CPU s per 30 s on a 2-core AVX2 EPYC, 0.5 s at 20 ms), cores the model and
# a training run need. 20 ms is below what any of our events takes to answer.
QUEUE_IDLE_POLL_S = 0.02
QUEUE_PROGRESS_POLL_S = 0.1


def quiet_queue(demo: gr.Blocks) -> bool:
    """Slow Gradio's idle polling (private attributes: False when a Gradio release has
    renamed them, and the queue then polls as Gradio wants)."""
    queue = getattr(demo, "_queue", None)
    if not all(hasattr(queue, name) for name in ("sleep_when_free", "progress_update_sleep_when_free")):
        return False
    queue.sleep_when_free = QUEUE_IDLE_POLL_S
    queue.progress_update_sleep_when_free = QUEUE_PROGRESS_POLL_S
    return True


def remove_downloads_on_sigterm(downloads) -> None:
    """On SIGTERM (`kill`, a service manager stopping the app) the app still ends at once,
    as the signal's default does, but removes its download folder first: Python runs no
    exit handler on a signal, and a merged model's zip is the model's size."""
    def on_term(signum, _frame):
        downloads.remove()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, on_term)


def main_from_args(args) -> int:
    cfg = ServeConfig(data_dir=resolve_data_dir(args.data_dir), model=args.model,
                      device=args.device, host=args.host, port=args.port,
                      auth=parse_auth(args.auth), trust_remote_code=args.trust_remote_code)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.auth:
        print(f"WARNING: serving on {cfg.host} without --auth: anyone who can reach this "
              "machine can read and change your data. Add --auth user:password.",
              file=sys.stderr)
    try:
        ctx = AppContext(cfg)
    except StoreError as err:  # e.g. a read-only or full data folder: say so, start nothing
        print(f"error: {err}", file=sys.stderr)
        return 2
    remove_downloads_on_sigterm(ctx.downloads)
    demo = build_app(ctx)
    demo.queue(default_concurrency_limit=4)
    quiet_queue(demo)
    demo.launch(server_name=cfg.host, server_port=cfg.port, auth=cfg.auth or None,
                theme=gr.themes.Soft(), css=CSS + label_tab.RANK_CSS,
                head=label_tab.KEYBOARD_JS + label_tab.RANK_JS,
                app_kwargs={"middleware": [Middleware(EarlyScript)]},
                show_error=True, footer_links=[])
    return 0
