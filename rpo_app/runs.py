"""Training runs as child processes: start, watch, stop, list, delete.

The UI never runs training inside a request: a browser disconnect would kill it. The
child (`python -m rpo_app train`) writes everything to its run folder, and the UI
only reads those files, so a reload or an app restart re-attaches to a live run.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd

from rpo_app.config import DataLayout, check_name
from rpo_app.train import TrainConfig
from rpo_app.store import Store

log = logging.getLogger(__name__)
ACTIVE_STATES = ("queued", "running")


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


class RunManager:
    def __init__(self, store: Store, layout: DataLayout):
        self.store = store
        self.layout = layout
        self._children: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    # -- starting and stopping ---------------------------------------------------------
    def start(self, config: TrainConfig, run_id: str | None = None) -> str:
        """Validate, write the run folder, spawn the trainer. Returns the run id."""
        config.validate()
        with self._lock:
            busy = self.active_run()
            if busy:
                raise RuntimeError(f"run {busy} is still going; stop it or wait for it to finish")
            run_id = check_name(run_id or time.strftime("run-%Y%m%d-%H%M%S"), "run id")
            run_dir = self.layout.run_dir(run_id)
            if run_dir.exists():
                raise RuntimeError(f"a run named {run_id} already exists")
            run_dir.mkdir(parents=True)
            config.to_yaml(run_dir / "config.yaml")
            _write_json(run_dir / "status.json", {"state": "queued", "updated_at": time.time()})
            cmd = [sys.executable, "-m", "rpo_app", "train", "--out", str(run_dir),
                   "--config", str(run_dir / "config.yaml"), "--data-dir", str(self.layout.root)]
            # Output goes to a file, never an undrained pipe (a full pipe stalls the child).
            # A new session keeps the child alive if the app restarts.
            with open(run_dir / "stdout.log", "ab") as out:
                child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         cwd=str(Path(__file__).resolve().parent.parent),
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
            self._children[run_id] = child
            self.store.record_run(run_id, config.to_dict(), str(run_dir), state="queued",
                                  pid=child.pid)
            log.info("started run %s (pid %d)", run_id, child.pid)
            return run_id

    def stop(self, run_id: str) -> bool:
        """SIGTERM: the trainer saves a checkpoint and exits as 'stopped'."""
        st = self.status(run_id)
        pid = st.get("pid") or (self.store.run(run_id) or {}).get("pid")
        if st["state"] not in ACTIVE_STATES or not pid_alive(pid):
            return False
        os.kill(pid, signal.SIGTERM)
        return True

    def wait(self, run_id: str, timeout: float = 600) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            st = self.status(run_id)
            if st["state"] not in ACTIVE_STATES:
                return st
            time.sleep(0.5)
        raise TimeoutError(f"run {run_id} still {self.status(run_id)['state']} after {timeout}s")

    # -- watching ---------------------------------------------------------------------
    def status(self, run_id: str) -> dict:
        """status.json, corrected when the process behind a 'running' run is gone."""
        run_dir = self.layout.run_dir(run_id)
        st = _read_json(run_dir / "status.json") or {"state": "unknown"}
        child = self._children.get(run_id)
        if child is not None and child.poll() is not None:
            self._children.pop(run_id, None)
            st = _read_json(run_dir / "status.json") or st
        if st.get("state") in ACTIVE_STATES:
            pid = st.get("pid") or (self.store.run(run_id) or {}).get("pid")
            if not pid_alive(pid) and (child is None or child.poll() is not None):
                st = {**st, "state": "failed",
                      "error": "the training process died without saying why (killed, out of "
                               "memory, or the machine restarted); see its log. "
                               "It can be resumed from its last checkpoint."}
                _write_json(run_dir / "status.json", st)
        self._sync_store(run_id, st)
        return st

    def _sync_store(self, run_id: str, st: dict) -> None:
        row = self.store.run(run_id)
        if row is None or row["state"] == st.get("state"):
            return
        fields = {"state": st.get("state", "unknown")}
        if st.get("state") == "finished":
            fields["final_metrics"] = self.final_metrics(run_id)
        self.store.update_run(run_id, **fields)
        if st.get("state") == "finished":
            self._register_adapter(run_id)

    def _register_adapter(self, run_id: str) -> None:
        from rpo_app import adapters

        run_dir = self.layout.run_dir(run_id)
        if (run_dir / "adapter" / "adapter_config.json").exists() and \
                self.store.adapter(run_id) is None:
            base = (self.store.run(run_id) or {}).get("config", {}).get("model")
            adapters.register_from_run(self.store, self.layout, run_dir, run_id,
                                       base_model=base, run_id=run_id)

    def active_run(self) -> str | None:
        for row in self.store.runs():
            if row["state"] in ACTIVE_STATES and self.status(row["id"])["state"] in ACTIVE_STATES:
                return row["id"]
        return None

    def metrics(self, run_id: str) -> pd.DataFrame:
        return _read_jsonl(self.layout.run_dir(run_id) / "metrics.jsonl")

    def samples(self, run_id: str) -> list[dict]:
        path = self.layout.run_dir(run_id) / "samples.jsonl"
        frame = _read_jsonl(path)
        return frame.to_dict("records") if len(frame) else []

    def final_metrics(self, run_id: str) -> dict:
        frame = self.metrics(run_id)
        out: dict = {}
        for col in frame.columns:
            series = frame[col].dropna()
            if len(series) and col != "step":
                value = series.iloc[-1]
                out[col] = value.item() if hasattr(value, "item") else value
        return out

    def log_tail(self, run_id: str, lines: int = 40) -> str:
        run_dir = self.layout.run_dir(run_id)
        chunks = []
        for name in ("train.log", "stdout.log"):
            path = run_dir / name
            if path.exists():
                with open(path, "rb") as fh:
                    fh.seek(max(0, path.stat().st_size - 64_000))
                    text = fh.read().decode("utf-8", "replace").splitlines()[-lines:]
                chunks.append(f"--- {name} ---\n" + "\n".join(text))
        return "\n".join(chunks)

    def runs(self) -> list[dict]:
        out = []
        for row in self.store.runs():
            st = self.status(row["id"]) if row["state"] in ACTIVE_STATES else {"state": row["state"]}
            out.append({**row, "state": st["state"]})
        return out

    def delete(self, run_id: str) -> None:
        if self.status(run_id)["state"] in ACTIVE_STATES:
            raise RuntimeError(f"run {run_id} is still going; stop it first")
        self.store.update_run(run_id, deleted_at=time.time())
        if self.store.adapter(run_id) is not None:
            self.store.delete_adapter(run_id)
        shutil.rmtree(self.layout.run_dir(run_id), ignore_errors=True)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> pd.DataFrame:
    """Every complete line; a half-written last line (the trainer is mid-write) is skipped."""
    rows = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.endswith("\n"):
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        continue
    except OSError:
        pass
    return pd.DataFrame(rows)
