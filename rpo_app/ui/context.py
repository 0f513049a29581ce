"""What every tab shares: the store, the label queue, the model host and the prompt index.

The model and the embedder load in a background thread so the page is up in
seconds; a tab that needs them waits on `host()` / `index()`.
"""
from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import gradio as gr

from rpo_app.active import ScoringJobs
from rpo_app.config import DataLayout, ServeConfig
from rpo_app.cpushare import AppShare
from rpo_app.genjob import GenerationJobs
from rpo_app.labelqueue import LabelQueue
from rpo_app.runs import RunManager
from rpo_app.store import Store
from rpo_app.ui.chat_streams import ChatStreams

log = logging.getLogger(__name__)

RUN_POLL_S = 5.0  # the start-up timing waits this long between looks at a training run


class _Loader:
    """Runs a loader once in a thread; get() waits for it and re-raises its error."""

    def __init__(self, name: str, fn):
        self.name = name
        self._done = threading.Event()
        self._value = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name=f"load-{name}",
                                        daemon=True)
        self._thread.start()

    def _run(self, fn):
        try:
            self._value = fn()
        except BaseException as err:  # surfaced to the user by get()
            log.exception("loading %s failed", self.name)
            self._error = err
        finally:
            self._done.set()

    @property
    def ready(self) -> bool:
        return self._done.is_set() and self._error is None

    def wait(self, timeout: float | None = None) -> bool:
        """Until loaded or failed; False on timeout."""
        return self._done.wait(timeout)

    @property
    def error(self) -> BaseException | None:
        return self._error

    def get(self, timeout: float | None = 600):
        if not self._done.wait(timeout):
            raise gr.Error(f"the {self.name} is still loading; try again in a moment")
        if self._error is not None:
            raise gr.Error(f"the {self.name} failed to load: {self._error}")
        return self._value


class Downloads:
    """The app's download files in one temp folder of their own, removed when the app exits.
    Gradio copies a returned file into its own cache as it serves it, so a download's
    folder is dead weight once served (a merged model's zip is the model's size): each new
    one removes those older than KEEP_S."""

    KEEP_S = 60.0

    def __init__(self):
        self._lock = threading.Lock()
        self._root: Path | None = None
        self._made: list[tuple[Path, float]] = []

    def folder(self, prefix: str) -> Path:
        now = time.time()
        with self._lock:
            if self._root is None:
                self._root = Path(tempfile.mkdtemp(prefix="rpo-downloads-"))
                atexit.register(self.remove)
            for path, made in list(self._made):
                if now - made >= self.KEEP_S:
                    shutil.rmtree(path, ignore_errors=True)
                    self._made.remove((path, made))
            path = Path(tempfile.mkdtemp(prefix=prefix, dir=self._root))
            self._made.append((path, now))
        return path

    def remove(self) -> None:
        """The folder and every download in it, gone (at exit, and on SIGTERM: ui.app)."""
        with self._lock:
            if self._root is not None:
                shutil.rmtree(self._root, ignore_errors=True)
            self._root, self._made = None, []


class AppContext:
    def __init__(self, cfg: ServeConfig, load_model: bool = True):
        from rpo_app import io

        self.cfg = cfg
        self.layout = DataLayout(cfg.data_dir)
        self.store = Store(self.layout.db)
        seeded = io.seed_if_empty(self.store)
        if seeded:
            log.info("loaded %d seed prompts", seeded)
        self.queue = LabelQueue(self.store)
        self.chat_streams = ChatStreams()  # which chat answers may still write to a page
        self.runs = RunManager(self.store, self.layout)
        # After each finished run, its adapter scores the unlabeled answers in the
        # background: the Label tab's "most informative first" order.
        self.scoring = ScoringJobs(self.store, self.host, self.index, before=self._ready_to_score) \
            if load_model else None
        self.runs.reattach()  # runs that ended (or go on) while the app was down
        # The app's model and a training run share the cores by rule (cpushare).
        self.cpu = AppShare(self.layout.root, run_active=lambda: self.runs.active_run() is not None)
        self.generation = GenerationJobs(self.store, self.host)
        # transformers resolves its classes lazily, and two threads importing through it
        # at once can fail ("cannot import name AutoModelForCausalLM"): import up front.
        import sentence_transformers  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
        # transformers cannot load two models in two threads at once ("Cannot copy out
        # of meta tensor"), so the loaders take turns.
        self._load_lock = threading.Lock()
        self._adapter_errors: dict[str, str] = {}  # adapter name -> why it did not load
        self.downloads = Downloads()  # the Chat tab's exports
        self._index = _Loader("prompt embedder", self._load_index)
        self._host = _Loader("model", self._load_host) if load_model else None
        if self.scoring is not None:
            self.runs.on_finished = lambda _run_id: self.scoring.start_if_needed()
            self.scoring.start_if_needed()  # an adapter whose scores were never completed

    def loading(self):
        """Held while this app loads a model with transformers (the embedder, the app's
        model, a merge for download): two loads at once fail ("Cannot copy out of meta
        tensor")."""
        return self._load_lock

    def _ready_to_score(self) -> None:
        """Before a scoring job: the model and the new adapter loaded, and the start-up
        timing done (scoring beside it would make the quoted times too long)."""
        self.host()
        self._index.wait(600)
        self.host().decode_timing()
        self.sync_adapters()

    def _load_index(self):
        from rpo_app.embed import Embedder, PromptIndex

        with self._load_lock:
            index = PromptIndex(self.store, Embedder())
        index.refresh()
        self.queue.index = index
        return index

    def _load_host(self):
        from rpo_app.generate import ModelHost

        with self._load_lock:
            host = ModelHost(self.cfg.model, data_dir=self.layout.root, device=self.cfg.device,
                             trust_remote_code=self.cfg.trust_remote_code)
        host.share = self.cpu
        host.use_own_thread()  # chat, jobs and timings arrive on many threads
        # Hidden states below the adapters, for the informative order's scoring jobs: kept
        # from one job to the next and from the answers as the app writes them.
        host.kept_states = {}
        for adapter in self.store.adapters():
            self._load_adapter(host, adapter)
        # The first-run time estimate needs the decoding speed, the Train tab's the
        # forward speed of a run's arithmetic: time both now, in the background, so the
        # tabs quote them without a wait (a newcomer's Train tab waited a minute for the
        # model behind the first answers); after the embedder has indexed the prompts,
        # which would otherwise share the cores and make the quoted time 4x too long,
        # and when no run trains (a timing beside one is not kept: ModelHost._timed).
        def time_model():
            from rpo_app.models import pick_precision

            self._index.wait(600)
            while self.cpu.run_active():
                time.sleep(RUN_POLL_S)
            host.decode_timing()
            host.seconds_per_token(pick_precision(str(host.device), "auto"))

        threading.Thread(target=time_model, name="model-timing", daemon=True).start()
        return host

    def _load_adapter(self, host, adapter: dict) -> None:
        try:
            host.load_adapter(adapter["name"], adapter["path"])
            self._adapter_errors.pop(adapter["name"], None)
        except Exception as err:  # one broken adapter must not take the app down
            log.warning("adapter %s not loaded: %s", adapter["name"], err)
            self._adapter_errors[adapter["name"]] = str(err)

    def adapter_problem(self, name: str) -> str:
        """Why an adapter cannot be used, for the user."""
        if name in self._adapter_errors:
            return f"adapter {name!r} could not be loaded: {self._adapter_errors[name]}"
        return f"no adapter named {name!r}; pick one from the list"

    def index(self, timeout: float | None = 600):
        return self._index.get(timeout)

    def host(self, timeout: float | None = 600):
        if self._host is None:
            raise gr.Error("this app was started without a model")
        return self._host.get(timeout)

    def sync_adapters(self) -> None:
        """Load adapters that appeared in the store (a run just finished) into the host."""
        if not self.model_ready:
            return
        host = self._host.get()
        loaded = set(host.adapter_names())
        for adapter in self.store.adapters():
            if adapter["name"] not in loaded and adapter["name"] not in self._adapter_errors:
                self._load_adapter(host, adapter)

    @property
    def model_ready(self) -> bool:
        """The model has loaded: host() returns at once."""
        return self._host is not None and self._host.ready

    def model_status(self) -> str:
        """The model line's words."""
        if self._host is None:
            return "no model"
        if self._host.error is not None:
            return f"model failed to load: {self._host.error}"
        return "model loading..." if self.model_loading else "model ready"

    @property
    def model_loading(self) -> bool:
        """The model line will change: the model is neither loaded nor failed yet."""
        return self._host is not None and self._host.error is None and not self.model_ready

    def annotator(self, request: gr.Request | None, typed: str | None) -> str:
        """The login name when --auth is on, else the name typed in the page."""
        user = getattr(request, "username", None) if request is not None else None
        name = (user or typed or "").strip()
        if not name:
            raise gr.Error("Enter your name (top of the Label tab) before judging.")
        return name


def start_of_today() -> float:
    now = datetime.now()
    return now.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
