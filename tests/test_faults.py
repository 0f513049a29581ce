"""Faults that really happen to a real server: SIGKILL while annotators submit, a full
disk (a real 6 MiB tmpfs that fills up), a read-only data folder (a real read-only
mount), and an app restart while a training child runs.

The worst thing the app can do is lose a judgment someone acknowledged, or store one
twice; every test here ends by checking the store against what clients were told.
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from apptools import seed_store, start_app
from rpo_app.config import DataLayout
from rpo_app.embed import EMBEDDER_NAME
from rpo_app.netutil import gradio_client
from rpo_app.runs import RunManager
from rpo_app.store import Store
from rpo_app.trainconfig import TrainConfig

pytestmark = pytest.mark.slow


def _judge_one(client, name: str) -> tuple[str, dict] | None:
    item = client.predict(name, "paired", api_name="/next_item")
    if not item:
        return None
    return item["token"], client.predict(item["token"], "left", name, api_name="/submit_judgment")


def _wait_embeddings(data_dir: Path, n: int, app, timeout: float = 120) -> None:
    """The app caches prompt vectors at start; wait so that no startup write is pending."""
    store = Store(data_dir)
    try:
        deadline = time.monotonic() + timeout
        while len(store.load_embeddings(EMBEDDER_NAME)[0]) < n:
            assert app.alive, app.log_tail()
            assert time.monotonic() < deadline, "prompt vectors never cached:\n" + app.log_tail()
            time.sleep(0.3)
    finally:
        store.close()


# -- SIGKILL while annotators submit ------------------------------------------------------
def test_sigkill_while_annotators_submit_loses_and_duplicates_nothing(data_dir, tiny_model_dir):
    seed_store(data_dir, n_prompts=120, answers_per_prompt=2)
    args = ("--model", str(tiny_model_dir))
    app = start_app(data_dir, extra_args=args)
    acked: dict[str, int] = {}      # token -> judgment id the client was told
    in_flight: set[str] = set()     # tokens sent whose answer never came back
    lock = threading.Lock()
    enough = threading.Event()

    def annotator(i: int) -> None:
        client, name = gradio_client(app.url), f"killer-{i}"
        while True:
            try:
                item = client.predict(name, "paired", api_name="/next_item")
            except Exception:  # the server is gone
                return
            if not item:
                return
            with lock:
                in_flight.add(item["token"])
            try:
                out = client.predict(item["token"], "left", name, api_name="/submit_judgment")
            except Exception:
                return
            with lock:
                in_flight.discard(item["token"])
                acked[item["token"]] = out["judgment_id"]
                if len(acked) >= 40:
                    enough.set()

    threads = [threading.Thread(target=annotator, args=(i,), daemon=True) for i in range(4)]
    try:
        for t in threads:
            t.start()
        assert enough.wait(180), "annotators too slow:\n" + app.log_tail()
        os.kill(app.proc.pid, signal.SIGKILL)  # mid-stream: requests are in flight
        app.proc.wait(10)
        for t in threads:
            t.join(60)
    finally:
        app.stop()
    assert app.proc.returncode == -signal.SIGKILL
    store = Store(data_dir)
    try:
        assert store.integrity_check() == "ok"
        rows = store.judgments(include_retracted=True)
        by_id = {r["id"]: r for r in rows}
        lost = {t: j for t, j in acked.items() if j not in by_id or by_id[j]["request_id"] != t}
        assert not lost, f"acknowledged but not on disk: {lost}"
        assert not [k for k, v in Counter(r["request_id"] for r in rows).items() if v > 1]
        assert not [k for k, v in Counter((r["response_a"], r["response_b"]) for r in rows).items()
                    if v > 1], "a pair was judged twice"
        # Only requests cut off by the kill may be on disk without an answer.
        unacked = {r["request_id"] for r in rows} - set(acked)
        assert unacked <= in_flight, unacked - in_flight
        before = len(rows)
    finally:
        store.close()

    # After a restart, a client retrying the requests the kill cut off gets either the
    # judgment that was stored or a clear "fetch the next one"; nothing is stored twice.
    app = start_app(data_dir, extra_args=args)
    try:
        client = gradio_client(app.url)
        for token in in_flight:
            try:
                out = client.predict(token, "left", "killer-0", api_name="/submit_judgment")
                assert out["created"] is False
            except Exception as err:  # noqa: BLE001 - the message is the check
                assert "no longer open" in str(err)
        for _ in range(5):  # and labeling simply goes on
            token, out = _judge_one(client, "after-restart")
            assert out["created"]
    finally:
        app.stop()
    store = Store(data_dir)
    try:
        assert store.count_judgments(include_retracted=True) == before + 5
        assert store.integrity_check() == "ok"
    finally:
        store.close()


# -- a full disk and a read-only data folder ---------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs: a disk that really fills and can really be remounted read-only."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root with CAP_SYS_ADMIN): "
                    f"{done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _remount(mnt: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mnt)], check=True)


def _fill(mnt: Path) -> Path:
    filler = mnt / "filler.bin"
    chunk = b"\0" * 65536
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(chunk)
                fh.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC
    return filler


def test_full_disk_and_read_only_folder_give_clear_errors_and_lose_nothing(
        small_disk, tmp_path, tiny_model_dir):
    data = small_disk / "data"
    seed_store(data, n_prompts=30, answers_per_prompt=2)
    args = ("--model", str(tiny_model_dir))
    app = start_app(data, extra_args=args, log_dir=tmp_path)
    try:
        _wait_embeddings(data, 30, app)
        client = gradio_client(app.url)
        acked = {}
        for _ in range(3):
            token, out = _judge_one(client, "ada")
            acked[token] = out["judgment_id"]

        # The disk fills while an item is on screen: the click fails with a message that
        # says why, and the same click succeeds once there is space again.
        item = client.predict("ada", "paired", api_name="/next_item")
        filler = _fill(small_disk)
        with pytest.raises(Exception, match="disk is full") as full:
            client.predict(item["token"], "left", "ada", api_name="/submit_judgment")
        assert "Nothing was saved" in str(full.value) and str(data) in str(full.value)
        filler.unlink()
        out = client.predict(item["token"], "left", "ada", api_name="/submit_judgment")
        assert out["created"]
        acked[item["token"]] = out["judgment_id"]

        assert app.alive, app.log_tail()
    finally:
        app.stop()

    store = Store(data)
    try:
        assert store.integrity_check() == "ok"
        rows = store.judgments()
        assert {r["request_id"]: r["id"] for r in rows} == acked
    finally:
        store.close()

    # A read-only folder. Linux refuses to remount a disk read-only while the app holds
    # its database open for writing, so this is the app starting on one (after a remount,
    # a read-only share, a full-disk fsck): one clear line and exit code 2, no traceback.
    _remount(small_disk, "ro")
    try:
        done = subprocess.run([os.sys.executable, "-m", "rpo_app", "serve", "--data-dir",
                               str(data), "--model", str(tiny_model_dir), "--port", "0"],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    finally:
        _remount(small_disk, "rw")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "read-only" in done.stderr and "Traceback" not in done.stderr


# -- the app restarts while a training child runs --------------------------------------------
def test_app_restart_reattaches_a_running_training_run(data_dir, tiny_model_dir):
    seeded = seed_store(data_dir, n_prompts=8, answers_per_prompt=2)
    store = Store(data_dir)
    for pid in seeded["prompts"]:
        a, b = seeded["responses"][pid]
        store.add_judgment("paired", a, b, "a", "tester")
    args = ("--model", str(tiny_model_dir))
    app = start_app(data_dir, extra_args=args)
    # Started through the app's own RunManager code path (what the Start button calls).
    runs = RunManager(store, DataLayout(data_dir))
    cfg = TrainConfig(loss="rpo-paired", model=str(tiny_model_dir), max_steps=100_000,
                      batch_size=2, max_length=64, max_prompt_length=32, save_every=2,
                      eval_every=0, sample_every=0, sample_max_new_tokens=8,
                      preview_prompts=["Say hi."], eval_fraction=0.0, early_stop_patience=0)
    run_id = runs.start(cfg)
    child_pid = store.run(run_id)["pid"]
    try:
        client = gradio_client(app.url)
        deadline = time.monotonic() + 240
        while (client.predict(run_id, api_name="/train_status").get("step") or 0) < 2:
            assert time.monotonic() < deadline, runs.log_tail(run_id)
            time.sleep(0.5)
        os.kill(app.proc.pid, signal.SIGKILL)
        app.proc.wait(10)
        app.stop()
        os.kill(child_pid, 0)  # the trainer outlives the app (its own session)

        app = start_app(data_dir, extra_args=args)
        client = gradio_client(app.url)
        st = client.predict("", api_name="/train_status")
        assert st["run_id"] == run_id and st["state"] == "running", st
        step = st["step"]
        deadline = time.monotonic() + 120
        while client.predict(run_id, api_name="/train_status")["step"] <= step:
            assert time.monotonic() < deadline, "the re-attached run does not advance"
            time.sleep(0.5)
        client.predict(api_name="/train_stop")  # the page's Stop: the latest run
        deadline = time.monotonic() + 120
        while (st := client.predict(run_id, api_name="/train_status"))["state"] == "running":
            assert time.monotonic() < deadline, runs.log_tail(run_id)
            time.sleep(0.5)
        assert st["state"] == "stopped", st
        ckpts = list((DataLayout(data_dir).run_dir(run_id) / "checkpoints").glob("step-*"))
        assert ckpts and not list(ckpts[0].parent.glob("*.tmp*"))
    finally:
        app.stop()
        try:
            os.kill(child_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        store.close()
