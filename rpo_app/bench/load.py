"""Many annotators at once through the real server: N gradio_client annotators submit
while a training run and a chat are going. Checks that every judgment is stored exactly
once and reports the round-trip latency of next_item and submit_judgment.

Gradio's own cost is measured in the same run: the same N clients call an endpoint
that does nothing on a bare Gradio server, under the same training and chat load, so
the report separates what rpo_app adds from what any Gradio app pays.

    python -m rpo_app bench --only load [--quick]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from rpo_app.netutil import free_port, gradio_client, local_opener

REPO = Path(__file__).resolve().parents[2]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summary_ms(values: list[float]) -> dict:
    return {"n": len(values), "p50_ms": round(percentile(values, 0.5) * 1000, 1),
            "p95_ms": round(percentile(values, 0.95) * 1000, 1),
            "max_ms": round(max(values) * 1000, 1) if values else None,
            "mean_ms": round(statistics.mean(values) * 1000, 1) if values else None}


# A call the client itself cancelled is made again, at most this many times in a row.
CLIENT_RETRIES = 3


def predict(client, *args, api_name: str, retried: list | None = None):
    """`client.predict`, made again when gradio_client cancels it on its own side.

    gradio_client 2.7.2 can raise an empty CancelledError for a call made right after the
    previous one on the same client: the server closes the session's event stream once
    nothing is pending, and when the client's reader thread is slow to read that close
    (20 annotator threads and their readers on a loaded 2-core machine), the new call is
    registered on the stream that is closing and is cancelled with it. The server still
    receives the call. Every endpoint called here may be repeated: a repeated
    submit_judgment token returns the first judgment and stores nothing new, and a
    repeated next_item gives an item again. `retried` collects the api names retried."""
    for attempt in range(CLIENT_RETRIES + 1):
        try:
            return client.predict(*args, api_name=api_name)
        except concurrent.futures.CancelledError:
            if attempt == CLIENT_RETRIES:
                raise
            if retried is not None:
                retried.append(api_name)


def annotate(url: str, annotators: int, per_annotator: int, modes=("paired", "unpaired"),
             prefix: str = "load") -> dict:
    """`annotators` threads, each a gradio_client annotator judging `per_annotator` items.
    Returns the acknowledged judgments (token -> judgment id), latencies, errors and the
    calls the client cancelled on its side and made again (`predict`)."""
    clients = [gradio_client(url) for _ in range(annotators)]
    acked: dict[str, dict] = {}
    t_next: list[float] = []
    t_submit: list[float] = []
    errors: list[str] = []
    retried: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(annotators)

    def work(i: int) -> None:
        c, name, mode = clients[i], f"{prefix}-{i}", modes[i % len(modes)]
        try:
            start.wait()
            for n in range(per_annotator):
                t0 = time.perf_counter()
                item = predict(c, name, mode, api_name="/next_item", retried=retried)
                t1 = time.perf_counter()
                if not item:
                    break
                verdict = (["left", "right", "tie", "both_bad"][n % 4] if item["kind"] != "unpaired"
                           else ["up", "down"][n % 2])
                out = predict(c, item["token"], verdict, name, api_name="/submit_judgment",
                              retried=retried)
                t2 = time.perf_counter()
                with lock:
                    t_next.append(t1 - t0)
                    t_submit.append(t2 - t1)
                    acked[item["token"]] = {**out, "annotator": name}
        except Exception as err:  # noqa: BLE001 - reported, and the check fails on it
            with lock:
                errors.append(f"{name}: {err.__class__.__name__}: {err}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(annotators)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"acked": acked, "next_s": t_next, "submit_s": t_submit, "errors": errors,
            "retried": dict(Counter(retried)), "wall_s": time.perf_counter() - t0}


def check_exactly_once(store, acked: dict[str, dict], prefix: str = "load") -> dict:
    """Compare the store with what the clients were told: lost, duplicated, unexpected."""
    rows = [r for r in store.judgments(include_retracted=True)
            if (r["annotator"] or "").startswith(prefix + "-")]
    by_token = Counter(r["request_id"] for r in rows)
    stored = {r["request_id"]: r["id"] for r in rows}
    lost = [t for t, a in acked.items() if stored.get(t) != a["judgment_id"]]
    pairs = Counter((r["response_a"], r["response_b"]) for r in store.judgments())
    return {"acknowledged": len(acked), "stored": len(rows),
            "lost": len(lost), "duplicated_requests": sum(v - 1 for v in by_token.values()),
            "unacknowledged_stored": len(set(stored) - set(acked)),
            "items_judged_twice": sum(v - 1 for v in pairs.values() if v > 1),
            "integrity": store.integrity_check()}


def chat_loop(url: str, stop: threading.Event) -> dict:
    """A chat user: sends messages one after another until `stop` (the model generates)."""
    c = gradio_client(url)
    sent, errors = 0, []
    while not stop.is_set():
        try:
            c.predict(f"Give me one tip about topic {sent}.", api_name="/chat_send")
            sent += 1
        except Exception as err:  # noqa: BLE001
            errors.append(str(err))
            time.sleep(1)
    return {"messages": sent, "errors": errors[:3]}


# -- the bare-Gradio baseline --------------------------------------------------------------
def _noop_server(port: int) -> None:
    import gradio as gr

    with gr.Blocks() as demo:
        def next_item(annotator: str, mode: str = "paired") -> dict:
            return {}

        def submit_judgment(token: str, verdict: str, annotator: str) -> dict:
            return {"judgment_id": 0, "created": False}

        for fn in (next_item, submit_judgment):
            gr.api(fn, api_name=fn.__name__, concurrency_limit=None)
    demo.queue(default_concurrency_limit=4)
    demo.launch(server_name="127.0.0.1", server_port=port)


def baseline(annotators: int, calls: int, port: int) -> dict:
    """Latency of the same N clients calling endpoints that do nothing (bare Gradio)."""
    proc = _spawn([sys.executable, "-m", "rpo_app.bench.load", "--noop-server", str(port)])
    try:
        url = _wait_http(f"http://127.0.0.1:{port}", proc)
        clients = [gradio_client(url) for _ in range(annotators)]
        times: list[float] = []
        lock = threading.Lock()
        start = threading.Barrier(annotators)

        def work(c):
            start.wait()
            for _ in range(calls):
                t0 = time.perf_counter()
                predict(c, "x", "paired", api_name="/next_item")
                t1 = time.perf_counter()
                predict(c, "t", "left", "x", api_name="/submit_judgment")
                with lock:
                    times.append(time.perf_counter() - t1)
                    times.append(t1 - t0)

        threads = [threading.Thread(target=work, args=(c,), daemon=True) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return summary_ms(times)
    finally:
        proc.terminate()
        proc.wait(20)


# -- the whole benchmark ------------------------------------------------------------------
def _spawn(cmd: list[str], log: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    if log is None:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    with open(log, "ab") as out:  # the child keeps its own copy of the handle
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 180) -> str:
    opener = local_opener()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with rc {proc.returncode}")
        try:
            with opener.open(url + "/", timeout=2) as resp:  # noqa: S310 (localhost)
                if resp.status == 200:
                    return url
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"no answer from {url}")


def seed_items(store, n_prompts: int) -> None:
    """Prompts with two fixed answers each: items to judge without generating any."""
    with store.transaction():
        for i in range(n_prompts):
            pid, _ = store.add_prompt(f"Load prompt {i}: what would you suggest for case {i}?",
                                      "bench", family=f"load/{i % 50}")
            for k in range(2):
                store.add_response(pid, f"Answer {k} to case {i}: option {'AB'[k]}.", "bench",
                                   model="bench")


def run(annotators: int = 20, per_annotator: int = 50, data_dir: str | Path = "data",
        model: str | None = None, with_training: bool = True, with_chat: bool = True) -> dict:
    """Start the app on a fresh data dir (the model folder linked in), a training run and
    a chat, then the annotators; return the report (also checks exactly-once)."""
    from rpo_app.config import DataLayout
    from rpo_app.models import link_model_cache
    from rpo_app.runs import RunManager
    from rpo_app.store import Store
    from rpo_app.trainconfig import TrainConfig

    with tempfile.TemporaryDirectory(prefix="rpo-bench-load-") as tmp:
        data = Path(tmp) / "data"
        layout = DataLayout(data)
        layout.models.mkdir(parents=True)
        if model is None:
            link_model_cache(data_dir, data)
        store = Store(layout.db)
        seed_items(store, n_prompts=annotators * per_annotator // 2 + 150)  # 64 go to training
        trainer = None
        if with_training:
            for row in store.prompts(limit=64):
                a, b = [r["id"] for r in store.responses_for_prompt(row["id"])][:2]
                store.add_judgment("paired", a, b, "a", "seed")
        port = free_port()
        args = [sys.executable, str(REPO / "app.py"), "--data-dir", str(data), "--port", str(port)]
        if model:
            args += ["--model", model]
        app = _spawn(args, Path(tmp) / "app.log")
        stop_chat = threading.Event()
        chat_result: dict = {}
        try:
            url = _wait_http(f"http://127.0.0.1:{port}", app)
            if with_training:
                runs = RunManager(store, layout)
                trainer = runs.start(TrainConfig(
                    model=model, max_steps=100_000, batch_size=4, max_length=128,
                    max_prompt_length=64, eval_fraction=0.0, eval_every=0, sample_every=0,
                    save_every=0, early_stop_patience=0, preview_prompts=["Hi"], cpu_threads=1))
            chat_thread = None
            if with_chat:
                chat_thread = threading.Thread(
                    target=lambda: chat_result.update(chat_loop(url, stop_chat)), daemon=True)
                chat_thread.start()
            result = annotate(url, annotators, per_annotator)
            stop_chat.set()
            if chat_thread:
                chat_thread.join(300)
            base = baseline(annotators, max(5, per_annotator // 5), free_port())
            checks = check_exactly_once(store, result["acked"])
            training = runs.status(trainer) if trainer else None
        finally:
            stop_chat.set()
            if trainer:
                RunManager(store, layout).stop(trainer)
            app.terminate()
            app.wait(30)
            store.close()
    return {
        "annotators": annotators, "per_annotator": per_annotator,
        "judgments_per_s": round(len(result["acked"]) / result["wall_s"], 1),
        "wall_s": round(result["wall_s"], 1),
        "next_item": summary_ms(result["next_s"]), "submit_judgment": summary_ms(result["submit_s"]),
        "bare_gradio_noop": base, "checks": checks, "errors": result["errors"][:5],
        "client_cancelled_and_retried": result["retried"],
        "training_during": {"state": training.state, "step": training.step}
        if training else None,
        "chat_during": chat_result or None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--noop-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.noop_server:
        _noop_server(args.noop_server)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
