"""Training runs as child processes: start, watch, stop, list, delete.

The UI never runs training inside a request: a browser disconnect would kill it. The
child (`python -m rpo_app train`) writes everything to its run folder, and the UI
only reads those files, so a reload or an app restart re-attaches to a live run.

When a child ends, a watcher thread of this process (not a page that happens to be
polling) brings the store's index up to date and registers the finished run's adapter
for chat and generation, linked by run id. `reattach()` does the same for runs that
ended or are still going when the app starts.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from rpo_app.config import DataLayout, check_name
from rpo_app.runfolder import ACTIVE_STATES, RunFolder, RunStatus
from rpo_app.store import Store
from rpo_app.trainconfig import TrainConfig, recorded

log = logging.getLogger(__name__)
DIED = ("the training process died without saying why (killed, out of memory, or the machine "
        "restarted); see its log. It can be resumed from its last checkpoint.")


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
        self._watchers: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._finalize_lock = threading.Lock()
        # Called (run id) after a finished run's adapter is registered: the app scores the
        # unlabeled answers with it there (rpo_app.active).
        self.on_finished = None

    def folder(self, run_id: str) -> RunFolder:
        return RunFolder(self.layout.run_dir(run_id), writable=False)

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
            run = RunFolder(run_dir)
            config.to_yaml(run.config)
            run.write_status(RunStatus(state="queued", updated_at=time.time()))
            child = self._spawn(run, [])
            self.store.record_run(run_id, config.to_dict(), str(run_dir), state="queued", pid=child.pid)
            self._watch(run_id, child)
            log.info("started run %s (pid %d)", run_id, child.pid)
            return run_id

    def train_again(self, run_id: str, exclude_annotators: list[str] | None = None,
                    exclude_judgments: list[int] | None = None) -> str:
        """A new run with an earlier run's settings, leaving out more annotators or
        judgments (on top of what that run left out). Returns the new run's id."""
        row = self.store.run(run_id)
        if row is None:
            raise RuntimeError(f"no run named {run_id}")
        cfg = TrainConfig.from_dict(recorded(row["config"]))
        if exclude_annotators:
            cfg.exclude_annotators = sorted(set(cfg.exclude_annotators or ()) | set(exclude_annotators))
        if exclude_judgments:
            cfg.exclude_judgments = sorted(set(cfg.exclude_judgments or ()) | set(exclude_judgments))
        if not (exclude_annotators or exclude_judgments):
            raise RuntimeError("say which annotators or judgments to leave out")
        return self.start(cfg)

    def resume(self, run_id: str) -> None:
        """Continue a stopped or failed run from its last checkpoint, in a new child."""
        with self._lock:
            st = self.status(run_id)
            if st.active:
                raise RuntimeError(f"run {run_id} is still going")
            if st.state == "finished":
                raise RuntimeError(f"run {run_id} has finished; start a new one")
            run = RunFolder(self.layout.run_dir(run_id))
            run.update_status(state="queued", error=None)
            child = self._spawn(run, ["--resume"])
            self.store.update_run(run_id, state="queued", pid=child.pid)
            self._watch(run_id, child)

    def _spawn(self, run: RunFolder, extra: list[str]) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "rpo_app", "train", "--out", str(run.root),
               "--config", str(run.config), "--data-dir", str(self.layout.root), *extra]
        # Output goes to a file, never an undrained pipe (a full pipe stalls the child).
        # A new session keeps the child alive if the app restarts.
        with open(run.stdout_log, "ab") as out:
            return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    cwd=str(Path(__file__).resolve().parent.parent),
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def stop(self, run_id: str) -> bool:
        """SIGTERM: the trainer saves a checkpoint and exits as 'stopped'."""
        st = self.status(run_id)
        pid = st.pid or (self.store.run(run_id) or {}).get("pid")
        if not st.active or not pid_alive(pid):
            return False
        os.kill(pid, signal.SIGTERM)
        return True

    def wait(self, run_id: str, timeout: float = 600) -> RunStatus:
        """Until the run has ended and its end is recorded (store row, adapter)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            watcher = self._watchers.get(run_id)
            if watcher is not None:
                watcher.join(timeout=0.5)
                if not watcher.is_alive():
                    return self.status(run_id)
                continue
            st = self.status(run_id)
            if not st.active:
                self.finalize(run_id)
                return st
            time.sleep(0.5)
        raise TimeoutError(f"run {run_id} still {self.status(run_id).state} after {timeout}s")

    # -- when a run ends ------------------------------------------------------------------
    def _watch(self, run_id: str, child: subprocess.Popen | None = None) -> None:
        """A thread that waits for the run's process to end, then finalizes the run."""
        if child is not None:
            self._children[run_id] = child

        def wait_for_end():
            try:
                if child is not None:
                    child.wait()
                else:  # not our child (the app restarted): poll its pid
                    pid = self.status(run_id).pid or (self.store.run(run_id) or {}).get("pid")
                    while pid_alive(pid):
                        time.sleep(1.0)
                self.finalize(run_id)
            except Exception:  # noqa: BLE001 - a watcher must never take the app down
                log.exception("finalizing run %s failed", run_id)
            finally:
                self._children.pop(run_id, None)

        thread = threading.Thread(target=wait_for_end, name=f"watch-{run_id}", daemon=True)
        self._watchers[run_id] = thread
        thread.start()

    def finalize(self, run_id: str) -> RunStatus:
        """Record a run that has ended: a run whose process is gone without a final state
        is marked failed; the store's row follows status.json; a finished run's adapter
        is registered (once, linked by run id). Safe to call more than once."""
        with self._finalize_lock:
            run = RunFolder(self.layout.run_dir(run_id))
            st = run.status()
            if st.active and not self._process_alive(run_id, st):
                st = run.update_status(state="failed", error=DIED)
            row = self.store.run(run_id)
            if row is not None and row["state"] != st.state:
                fields: dict = {"state": st.state}
                if st.state == "finished":
                    fields["final_metrics"] = run.final_metrics()
                self.store.update_run(run_id, **fields)
            if st.state == "finished" and row is not None:
                self._register_adapter(run_id, run, row)
                from rpo_app import lineage

                lineage.index(self.store, run_id, run.root)
                if self.on_finished is not None:
                    self.on_finished(run_id)
            return st

    def _register_adapter(self, run_id: str, run: RunFolder, row: dict) -> None:
        from rpo_app import adapters

        if not (run.adapter / "adapter_config.json").exists() or self.store.adapter_for_run(run_id):
            return
        try:
            adapters.register_from_run(self.store, self.layout, run.root, run_id,
                                       base_model=row.get("config", {}).get("model"), run_id=run_id)
        except adapters.AdapterError as err:  # e.g. the user gave another adapter this name
            log.warning("adapter of run %s not registered: %s", run_id, err)

    def _process_alive(self, run_id: str, st: RunStatus) -> bool:
        child = self._children.get(run_id)
        if child is not None:
            return child.poll() is None
        return pid_alive(st.pid or (self.store.run(run_id) or {}).get("pid"))

    def reattach(self) -> None:
        """At app start: watch runs that are still going, finalize those that ended
        while the app was away (an adapter nobody registered yet, a dead process)."""
        for row in self.store.runs():
            st = self.status(row["id"])
            if st.active and self._process_alive(row["id"], st):
                if row["id"] not in self._watchers:
                    self._watch(row["id"])
            else:
                self.finalize(row["id"])

    # -- watching ---------------------------------------------------------------------
    def status(self, run_id: str) -> RunStatus:
        """status.json; a run whose process is gone without saying so is finalized as failed."""
        st = self.folder(run_id).status()
        if st.active and run_id not in self._watchers and not self._process_alive(run_id, st):
            st = self.finalize(run_id)
        return st

    def active_run(self) -> str | None:
        for row in self.store.runs():
            if row["state"] in ACTIVE_STATES and self.status(row["id"]).active:
                return row["id"]
        return None

    def metrics(self, run_id: str):
        """metrics.jsonl as a DataFrame of MetricRow columns."""
        return self.folder(run_id).metrics_frame()

    def samples(self, run_id: str):
        return self.folder(run_id).samples()

    def final_metrics(self, run_id: str) -> dict:
        return self.folder(run_id).final_metrics()

    def log_tail(self, run_id: str, lines: int = 40) -> str:
        return self.folder(run_id).log_tail(lines)

    def runs(self) -> list[dict]:
        """Store rows, newest first, with the state from each run's folder."""
        out = []
        for row in self.store.runs():
            state = self.status(row["id"]).state if row["state"] in ACTIVE_STATES else row["state"]
            adapter = self.store.adapter_for_run(row["id"])
            out.append({**row, "state": state, "adapter": adapter["name"] if adapter else None})
        return out

    def delete(self, run_id: str) -> None:
        if self.status(run_id).active:
            raise RuntimeError(f"run {run_id} is still going; stop it first")
        self.store.update_run(run_id, deleted_at=time.time())
        adapter = self.store.adapter_for_run(run_id)
        if adapter is not None:
            from rpo_app import adapters

            adapters.delete(self.store, self.layout, adapter["name"])
        shutil.rmtree(self.layout.run_dir(run_id), ignore_errors=True)
