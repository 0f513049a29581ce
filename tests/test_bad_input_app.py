"""Bad input and access against the real server: each refusal is a clear message, and
the store is byte-for-byte what it was. Also: where the app listens, the warning for an
open bind, an unknown model with no network, and a corrupt adapter on disk."""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest

from apptools import make_lora_adapter, seed_store, start_app
from rpo_app.netutil import gradio_client
from rpo_app.store import Store

pytestmark = pytest.mark.slow

RTL = "كيف أتعلم الطبخ؟ ‏How do I learn to cook? איך ללמוד לבשל?"


def _snapshot(data) -> dict:
    """What a user wrote: every table but the caches the app fills in the background (the
    prompt embeddings; the informative order's log-probs, scores and their description,
    which its adapter writes after start) and leases (the queue takes them)."""
    from rpo_app.store import INFORMATIVE_KEY

    store = Store(data)
    try:
        tables = store.snapshot()
    finally:
        store.close()
    tables["settings"] = [row for row in tables["settings"] if row[0] != INFORMATIVE_KEY]
    return {k: v for k, v in tables.items()
            if k not in ("prompt_embeddings", "leases", "answer_logps", "item_scores")}


@pytest.fixture(scope="module")
def app_on_tiny(tmp_path_factory, tiny_model_dir):
    from rpo_app import adapters
    from rpo_app.config import DataLayout

    data = tmp_path_factory.mktemp("bad-input") / "data"
    seed_store(data, n_prompts=4, answers_per_prompt=2)
    run = tmp_path_factory.mktemp("bad-input-run")
    make_lora_adapter(Path(tiny_model_dir), run / "adapter")
    store = Store(data)
    adapters.register_from_run(store, DataLayout(data), run, "keep-me",
                               base_model=str(tiny_model_dir))
    store.close()
    app = start_app(data, extra_args=("--model", str(tiny_model_dir)))
    try:
        yield app, data
    finally:
        app.stop()


@pytest.mark.parametrize("text,message", [
    ("", "no prompts given"),
    ("   \n\t ", "no prompts given"),
    ("x" * (1 << 20), "1,048,576 characters long; the limit is 100,000"),
    ("A prompt with an escape \x1b[31m inside", "control character U+001B"),
    ("fine prompt\nbell \x07 prompt", "line 2: 'prompt' contains the control character U+0007"),
    ('[{"prompt": "ok", "script": "rm -rf /"}]', "unknown key"),
])
def test_pasted_prompts_refused_with_a_reason(app_on_tiny, text, message):
    app, data = app_on_tiny
    before = _snapshot(data)
    with pytest.raises(Exception, match=re.escape(message)):
        gradio_client(app.url).predict(text, api_name="/add_prompts")
    assert _snapshot(data) == before


def test_right_to_left_and_html_prompts_are_kept_as_written(app_on_tiny):
    app, data = app_on_tiny
    html = '<img src=x onerror="alert(1)"> and <script>alert(2)</script>'
    gradio_client(app.url).predict(f"{RTL}\n{html}", api_name="/add_prompts")
    store = Store(data)
    try:
        texts = {p["text"] for p in store.prompts()}
    finally:
        store.close()
    assert RTL in texts and html in texts


@pytest.mark.parametrize("name,content,message", [
    ("evil.py", "import os; open('/tmp/rpo-pwned', 'w')\n", "Invalid file type"),
    ("evil.pkl", "not really a pickle", "Invalid file type"),
    ("broken.jsonl", '{"prompt": "fine"}\n{"prompt": \n', "line 2"),
    ("empty.jsonl", "", "empty"),
    ("huge.jsonl", json.dumps({"prompt": "y" * 200_000}) + "\n", "line 1.*200,000 characters"),
    ("pairs.jsonl", json.dumps({"prompt": "p", "chosen": "a", "rejected": ""}) + "\n",
     "line 1.*'rejected' is empty"),
    ("garbage.parquet", "PAR1 this is not parquet", "parquet"),
])
def test_uploaded_files_are_read_never_run_and_bad_ones_refused(app_on_tiny, tmp_path, name,
                                                                 content, message):
    from gradio_client import handle_file

    app, data = app_on_tiny
    marker = Path("/tmp/rpo-pwned")
    marker.unlink(missing_ok=True)
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    before = _snapshot(data)
    with pytest.raises(Exception, match=message):
        gradio_client(app.url).predict(handle_file(str(path)), api_name="/import_file")
    assert _snapshot(data) == before
    assert not marker.exists()


@pytest.mark.parametrize("overrides,message", [
    ({"param_3": -1e-4}, "learning_rate must be > 0"),
    ({"param_5": 0}, "batch_size|minimum"),
    ({"param_1": -0.5}, "beta|minimum"),
    ({"param_4": -1}, "max_steps|minimum"),
])
def test_training_settings_out_of_range_start_nothing(app_on_tiny, overrides, message):
    app, data = app_on_tiny
    store = Store(data)
    store.add_judgment("paired", *[r["id"] for r in store.responses_for_prompt(
        store.prompts()[0]["id"])][:2], "a", "tester", request_id=f"bad-train-{message}")
    store.close()
    before = _snapshot(data)
    with pytest.raises(Exception, match=message):
        gradio_client(app.url).predict(**{"param_4": 10, **overrides}, api_name="/train_start")
    assert _snapshot(data)["runs"] == before["runs"] == []
    assert not (data / "runs").exists() or not any((data / "runs").iterdir())


@pytest.mark.parametrize("bad", ["../escape", "a/b", "..", "/etc/passwd", "x\\y", ".hidden"])
def test_names_with_paths_never_leave_the_data_dir(app_on_tiny, bad):
    app, data = app_on_tiny
    before = sorted(p.name for p in data.parent.iterdir())
    adapters_before = sorted(p.name for p in (data / "adapters").iterdir())
    with pytest.raises(Exception, match="invalid adapter name"):
        gradio_client(app.url).predict("keep-me", bad, api_name="/adapter_rename")
    with pytest.raises(Exception, match="invalid adapter name"):
        gradio_client(app.url).predict(bad, "fine-name", api_name="/adapter_rename")
    assert sorted(p.name for p in data.parent.iterdir()) == before
    assert sorted(p.name for p in (data / "adapters").iterdir()) == adapters_before


# -- the model and adapters -----------------------------------------------------------------
def test_unknown_model_without_network_keeps_the_app_running(data_dir):
    seed_store(data_dir, n_prompts=4, answers_per_prompt=2)
    with start_app(data_dir, extra_args=("--model", "no-such-org/no-such-model-1234")) as app:
        client = gradio_client(app.url)
        deadline = time.monotonic() + 120
        while "loading model failed" not in app.log():
            assert time.monotonic() < deadline, app.log_tail()
            time.sleep(0.5)
        with pytest.raises(Exception, match="model failed to load.*no-such-org/no-such-model-1234"):
            client.predict("Hello?", api_name="/chat_send")
        # Labeling does not need the model: it goes on.
        item = client.predict("ada", "paired", api_name="/next_item")
        out = client.predict(item["token"], "left", "ada", api_name="/submit_judgment")
        assert out["created"] and app.alive


def test_corrupt_adapter_on_disk_is_skipped_and_named(data_dir, tiny_model_dir, tmp_path):
    from rpo_app import adapters
    from rpo_app.config import DataLayout

    seed_store(data_dir, n_prompts=4, answers_per_prompt=2)
    layout = DataLayout(data_dir)
    store = Store(data_dir)
    for name in ("good-one", "broken-one"):
        run = tmp_path / name
        make_lora_adapter(Path(tiny_model_dir), run / "adapter")
        adapters.register_from_run(store, layout, run, name, base_model=str(tiny_model_dir))
    store.close()
    (layout.adapters / "broken-one" / "adapter_model.safetensors").write_bytes(b"\0garbage")
    with start_app(data_dir, extra_args=("--model", str(tiny_model_dir))) as app:
        deadline = time.monotonic() + 120
        while "adapter broken-one not loaded" not in app.log():
            assert time.monotonic() < deadline, app.log_tail()
            time.sleep(0.5)
        client = gradio_client(app.url)
        settings = (0.7, 0.95, 16, 0, "")  # temperature, top-p, max new tokens, seed, system
        out = client.predict("Say hi.", [], [], "good-one", "base model", False,
                             "newest adapter vs base model", *settings,
                             api_name="/chat_send")
        assert out[0][-1]["role"] == "assistant" and out[1][-1]["role"] == "assistant"
        with pytest.raises(Exception, match="broken-one"):
            client.predict("Say hi.", [], [], "broken-one", "base model", False,
                           "newest adapter vs base model", *settings,
                           api_name="/chat_send")
        assert app.alive
    shutil.rmtree(layout.adapters)


# -- where the app listens ------------------------------------------------------------------
def _listen_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on `port`, from /proc/net/tcp{,6}."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.split(":")
            if state == "0A" and int(hexport, 16) == port:  # 0A = LISTEN
                found.add(addr)
    return found


def test_binds_loopback_by_default_and_warns_for_an_open_bind(data_dir, tiny_model_dir):
    seed_store(data_dir, n_prompts=2, answers_per_prompt=2)
    model = ("--model", str(tiny_model_dir))
    with start_app(data_dir, extra_args=model) as app:
        assert _listen_addresses(app.port) == {"0100007F"}  # 127.0.0.1 only
        assert "WARNING" not in app.log()
    with start_app(data_dir, extra_args=(*model, "--host", "0.0.0.0")) as app:
        assert "00000000" in _listen_addresses(app.port)
        app.wait_for_log("without --auth")
    with start_app(data_dir, extra_args=(*model, "--host", "0.0.0.0", "--auth", "ada:pw")) as app:
        assert "without --auth" not in app.log()
