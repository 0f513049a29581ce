"""Helpers for tests that drive the real app: start the server, seed a store, open a
browser, save screenshots. Shared by the API and browser tests.

Everything stays offline: the server gets HF_HUB_OFFLINE=1 and no analytics, and the
browser is Debian's chromium with background networking off.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rpo_app.netutil import free_port, local_only, local_opener

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "tests" / ".artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking",
                 "--disable-component-update", "--disable-gpu"]


# -- the server ---------------------------------------------------------------------------
@dataclass
class AppProcess:
    proc: subprocess.Popen
    url: str
    port: int
    data_dir: Path
    log_path: Path
    _log_file: object = field(default=None, repr=False)

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in `timeout` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log_file is not None and not self._log_file.closed:
            self._log_file.close()
        return self.proc.returncode

    def wait_for_log(self, text: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if not self.alive:
                raise RuntimeError(f"app exited (rc {self.proc.returncode}) before logging "
                                   f"{text!r}:\n{self.log_tail()}")
            time.sleep(0.25)
        raise TimeoutError(f"app did not log {text!r} in {timeout:.0f} s:\n{self.log_tail()}")

    def __enter__(self) -> "AppProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# At import, so that whatever a test opens on 127.0.0.1 (urllib, gradio_client's httpx,
# the app child that inherits this environment) skips a proxy the environment names.
local_only()
_OPENER = local_opener()


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with _OPENER.open(url, timeout=timeout) as resp:  # noqa: S310 (localhost)
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, OSError, TimeoutError):
        return False


def start_app(data_dir, port: int | None = None, extra_args=(), env: dict | None = None,
              timeout: float = 120.0, wait_model: bool = False, log_dir=None) -> AppProcess:
    """Start `python app.py --data-dir DATA --port PORT`; return once / answers 200.

    stdout and stderr go to DATA/app-test-PORT.log (or LOG_DIR/; never a pipe). If the
    process dies or times out, raise with the tail of that log. The model loads in the
    background after the page is up; `wait_model=True` also waits (in a headless browser)
    until the page's model line says "model ready".
    """
    data_dir = Path(data_dir)
    port = port or free_port()
    log_path = Path(log_dir or data_dir) / f"app-test-{port}.log"
    full_env = dict(os.environ)
    full_env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                     "HF_DATASETS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
                     "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    full_env.pop("GRADIO_SERVER_PORT", None)
    if env:
        full_env.update(env)
    log_file = open(log_path, "ab")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "app.py"), "--data-dir", str(data_dir), "--port", str(port),
         *extra_args],
        cwd=REPO, env=full_env, stdin=subprocess.DEVNULL, stdout=log_file,
        stderr=subprocess.STDOUT)
    app = AppProcess(proc, f"http://127.0.0.1:{port}", port, data_dir, log_path, log_file)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            app.stop()
            raise RuntimeError(f"app exited with rc {proc.returncode} while starting:\n"
                               f"{app.log_tail()}")
        if _http_ok(app.url + "/"):
            break
        if time.monotonic() > deadline:
            app.stop()
            raise TimeoutError(f"app not answering on {app.url} after {timeout:.0f} s:\n"
                               f"{app.log_tail()}")
        time.sleep(0.3)
    if wait_model:
        try:
            wait_model_ready(app, timeout=timeout)
        except BaseException:
            app.stop()
            raise
    return app


def wait_model_ready(app: AppProcess, timeout: float = 180.0) -> str:
    """Open the page in a headless browser and wait for "model ready" on the model line
    (there is no API endpoint for it: the line refreshes through a private timer event)."""
    with chromium_browser() as b:
        page = b.new_page()
        try:
            page.goto(app.url, timeout=60_000)
            return wait_model_ready_in_page(page, timeout)
        finally:
            page.close()


@contextlib.contextmanager
def running_app(data_dir, **kwargs):
    app = start_app(data_dir, **kwargs)
    try:
        yield app
    finally:
        app.stop()


# -- seeding ------------------------------------------------------------------------------
FAMILIES = ("cooking", "travel", "coding", "health")


def seed_store(data_dir, n_prompts: int = 6, answers_per_prompt: int = 2,
               families=FAMILIES, prefix: str = "Test prompt") -> dict:
    """Prompts with fixed synthetic answers (source "test"), written straight to the store
    so no generation is needed. Returns {"prompts": [ids], "responses": {pid: [ids]}}.

    Calling it on a store that is empty also stops the app from loading the seed prompts.
    """
    from rpo_app.store import Store

    store = Store(data_dir)
    try:
        out: dict = {"prompts": [], "responses": {}}
        for i in range(n_prompts):
            family = families[i % len(families)] if families else None
            pid, _ = store.add_prompt(f"{prefix} {i} about {family}: what would you suggest?",
                                      source="test", family=family)
            out["prompts"].append(pid)
            out["responses"][pid] = [
                store.add_response(pid, f"Synthetic answer {k} to {prefix.lower()} {i}. "
                                        f"Option {'ABCDEFGH'[k % 8]} is what I suggest.",
                                   source="test", model="test")[0]
                for k in range(answers_per_prompt)]
        return out
    finally:
        store.close()


# -- the browser --------------------------------------------------------------------------
def require_chromium() -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found (install Debian's chromium to run browser tests)")


@contextlib.contextmanager
def chromium_browser(headless: bool = True):
    """A Playwright chromium (Debian's binary), closed on exit. Skips if it is missing."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=headless,
                                     args=CHROMIUM_ARGS)
        try:
            yield browser
        except BaseException:
            _record_failure(browser)
            raise
        finally:
            browser.close()


def _record_failure(browser) -> None:
    """What each open page showed when a browser test failed: a screenshot in
    tests/.artifacts and the page's text (with any error toast) on stdout, which pytest
    prints with the failure. A wait that timed out says nothing of what it saw instead."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "test").split(" ")[0].split("::")[-1]
    pages = [p for ctx in browser.contexts for p in ctx.pages]
    for n, page in enumerate(pages):
        try:
            shot = screenshot(page, f"failure-{test}-{n}.png", full_page=True)
            text = page.evaluate("() => document.body.innerText")
        except Exception as err:  # the page may be gone with the failure
            print(f"page {n}: could not record it ({err})")
            continue
        print(f"--- page {n} at the failure ({page.url}; screenshot {shot}) ---")
        print(text[-6000:])


@pytest.fixture(scope="module")
def browser():
    """Module-wide browser fixture; import it into a test module to use it."""
    with chromium_browser() as b:
        yield b


def wait_model_ready_in_page(page, timeout: float = 180.0) -> str:
    """Wait until the model line on the page says "model ready" (it loads in the
    background and the line refreshes every 3 s). Raises if it says it failed."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = page.locator("#model-line").inner_text()
        if "model ready" in text:
            return text
        if "failed" in text:
            raise RuntimeError(f"model failed to load: {text}")
        page.wait_for_timeout(500)
    raise TimeoutError(f"model not ready after {timeout:.0f} s; model line: {text!r}")


# -- screenshots --------------------------------------------------------------------------
def on_screen(page) -> list[str]:
    """The Label tab's item as the browser shows it: prompt, answer A, answer B."""
    return [page.locator(f"#{box} textarea").first.input_value()
            for box in ("lbl-prompt", "lbl-left-text", "lbl-right-text")]


def wait_item_replaced(page, judged: list[str], timeout: float = 30_000) -> None:
    """Wait until the text boxes no longer show the `judged` item (see on_screen). The
    status line can render before the boxes take the next item's values, so reading them
    right after the status changes can return the item just judged."""
    page.wait_for_function(
        """([p, l, r]) => { const v = id => document.querySelector(id + ' textarea').value;
            return v('#lbl-prompt') !== p || v('#lbl-left-text') !== l
                || v('#lbl-right-text') !== r; }""", arg=judged, timeout=timeout)


def artifacts_dir() -> Path:
    """tests/.artifacts, created with a .gitignore of its own so nothing in it is committed
    (the repository's .gitignore does not need to know about it)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    ignore = ARTIFACTS / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# screenshots and reports from the app tests; never committed\n*\n")
    return ARTIFACTS


def screenshot(page, name: str, **kwargs) -> Path:
    """Save to tests/.artifacts/NAME and, when RPO_SCREENSHOT_DIR is set, copy it there."""
    path = artifacts_dir() / name
    page.screenshot(path=str(path), **kwargs)
    extra = os.environ.get("RPO_SCREENSHOT_DIR")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(extra) / name)
    return path


def make_lora_adapter(base_dir: Path, out: Path, seed: int = 1, layers: list[int] | None = None) -> Path:
    """A LoRA adapter on the tiny model with random (non-zero) B weights, on `layers`
    only (None: every layer)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                     layers_to_transform=layers, init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(out, safe_serialization=True)
    return out
