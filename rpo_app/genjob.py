"""Candidate generation in the background, one job at a time per app.

A click starts the job and returns: the answers are stored one by one as they end
(`generate.top_up`), so the Label tab can show the first pair while the rest are still
being written, and every tab can show the same job's progress.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from rpo_app.jobs import BackgroundJob
from rpo_app.progress import eta_seconds, human


# The first-run path: two answers for each of this many prompts make the first pairs,
# and the first batch is one prompt's two answers (a pair within seconds).
FIRST_RUN_PROMPTS = 16
FIRST_RUN_ANSWERS = 2


@dataclass
class GenJobStatus:
    state: str = "idle"  # idle | running | finished | failed
    done: int = 0
    total: int = 0
    new: int = 0
    duplicates: int = 0
    prompts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    estimate_s: float | None = None  # the up-front estimate, before any answer ends
    error: str | None = None

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def elapsed_s(self) -> float:
        if self.started_at is None:
            return 0.0
        return (self.finished_at or time.time()) - self.started_at

    def eta_s(self) -> float | None:
        """Seconds left: from the answers' own pace, or from the estimate before the first
        one ends (None once the estimate has run out: the UI says "any moment")."""
        if not self.running:
            return None
        if self.done:
            return eta_seconds(self.elapsed_s, self.done, self.total)
        if self.estimate_s is not None and self.estimate_s > self.elapsed_s:
            return self.estimate_s - self.elapsed_s
        return None

    def line(self) -> str:
        """One line for any tab."""
        if self.state == "idle":
            return ""
        if self.state == "failed":
            return f"⚠ Generation failed: {self.error}"
        if self.state == "finished":
            return (f"✔ {self.new} new answers for {self.prompts} prompts in "
                    f"{human(self.elapsed_s)} ({self.duplicates} duplicates not stored).")
        eta = self.eta_s()
        when = (f"ETA {human(eta)}" if eta is not None else
                "measuring the speed" if not self.done else "finishing the last answers")
        return f"Generating answers: {self.done}/{self.total} stored · {when}"


class GenerationJobs(BackgroundJob):
    """Runs `generate.top_up` in a thread; `status()` can be read from any thread."""

    what = "generation"

    def __init__(self, store, host: Callable[[], object]):
        super().__init__(GenJobStatus())
        self.store = store
        self._host = host  # waits for the model to load

    def start(self, todo: list[tuple[int, int]], n: int, settings, adapter: str | None = None,
              first_batch: int | None = None, batch_size: int = 32) -> GenJobStatus:
        """Start topping up `todo` (see generate.backlog) to n answers each. Raises
        RuntimeError when a job is already running."""
        from rpo_app.generate import top_up

        total = sum(max(0, n - have) for _, have in todo)
        with self._lock:
            if self._status.running:
                raise RuntimeError("answers are already being generated "
                                   f"({self._status.done}/{self._status.total}); "
                                   "wait for them to finish")
            self._status = GenJobStatus(state="running", total=total, prompts=len(todo),
                                        started_at=time.time())

        def work() -> None:
            host = self._host()
            self._set(estimate_s=host.estimate_seconds(total, settings.max_new_tokens, batch_size,
                                                       first_batch))
            result = top_up(self.store, host, todo, n, settings, adapter=adapter, batch_size=batch_size,
                            progress=lambda done, _total: self._set(done=done), first_batch=first_batch)
            self._set(new=result["new"], duplicates=result["duplicates"], state="finished")

        self._launch("generate-candidates", work)
        return self.status()
