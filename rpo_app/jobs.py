"""One background job at a time in a thread of the app, with a status any thread can
read: the shared part of candidate generation (rpo_app.genjob) and the informative
order's scoring (rpo_app.active)."""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)


class BackgroundJob:
    """A status dataclass (with state, error and finished_at fields) under a lock, and the
    thread that runs the job. A job that raises ends "failed" with its message; whatever
    it stored before stays."""

    what = "the job"  # for the log, when it fails

    def __init__(self, status):
        self._lock = threading.Lock()
        self._status = status
        self._thread: threading.Thread | None = None

    def status(self):
        with self._lock:
            return dataclasses.replace(self._status)

    def _set(self, **fields) -> None:
        with self._lock:
            for name, value in fields.items():
                setattr(self._status, name, value)

    def _launch(self, name: str, work: Callable[[], None]) -> None:
        def run() -> None:
            try:
                work()
            except BaseException as err:  # shown on the page
                log.exception("%s failed", self.what)
                self._set(state="failed", error=str(err) or type(err).__name__)
            finally:
                self._set(finished_at=time.time())

        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None):
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.status()
