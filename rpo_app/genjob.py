"""Candidate generation in the background, one job at a time per app.

A click starts the job and returns: the answers are stored one by one as they end
(`generate.top_up`), so the Label tab can show the first pair while the rest are still
being written, and every tab can show the same job's progress.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from rpo_app.jobs import BackgroundJob
from rpo_app.progress import eta_between_updates, eta_words, human


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
    # (answers, estimated seconds) per batch: an answer's share of the work, since a small
    # first batch costs more per answer than the full ones after it
    plan: list = field(default_factory=list)
    updated_at: float | None = None  # when the last whole batch ended (see work)
    error: str | None = None

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def elapsed_s(self) -> float:
        if self.started_at is None:
            return 0.0
        return (self.finished_at or time.time()) - self.started_at

    def work(self, answers: int) -> float:
        """The planned seconds of the batches that the first `answers` answers complete.
        A batch's rows decode together until its longest ends, so an answer that ends
        early says little of the time left: only whole batches count. No plan yet (the
        decoding not yet timed): nothing counts, since every answer taken at the small
        first batch's cost put the ETA at several times the work left."""
        if not self.plan:
            return 0.0
        out, left = 0.0, answers
        for size, seconds in self.plan:
            if left < size:
                break
            out += seconds
            left -= size
        return out

    def eta_s(self) -> float | None:
        """Seconds left: at the pace of the batches done so far (each weighed by its
        planned cost: a small first batch costs more per answer), counting down while the
        next batch runs; before the first batch ends, the estimate counting down. None
        once either has run out (the line says so)."""
        if not self.running:
            return None
        done = self.work(self.done)
        if done > 0:
            at = (self.updated_at or time.time()) - self.started_at
            return eta_between_updates(at, done, self.work(self.total), self.elapsed_s)
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
        when = (eta_words(eta) if eta is not None else
                "finishing the last answers" if self.done >= self.total else
                "measuring the speed" if not self.work(self.done) else
                "slower than measured so far, still going")
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

            def plan() -> None:  # before any batch or right after one; waits for the timing
                if not self._status.plan and self._status.done < total:
                    batch_ended = time.time()
                    self._planned(host.estimate_batches(total, settings.max_new_tokens, batch_size,
                                                        first_batch), batch_ended)

            # A click before the app has timed the model's decoding (at "model ready";
            # about 10 s on a 2-core AVX2 CPU) sends its first batch at once and waits for
            # the timing after it: the first pair came 35.0 and 33.9 s after such a click
            # when the job waited for the timing first, 23.1 and 20.9 s now. The rest of
            # the job waits, or the timing's calls would take turns with its batches on
            # the model's thread and leave the ETA unknown for most of the job.
            if host.decode_timing(measure=False) is not None:
                plan()
            result = top_up(self.store, host, todo, n, settings, adapter=adapter, batch_size=batch_size,
                            progress=lambda done, _total: self._progress(done),
                            first_batch=first_batch, between_batches=plan)
            self._set(new=result["new"], duplicates=result["duplicates"], state="finished")

        self._launch("generate-candidates", work)
        return self.status()

    def _planned(self, plan: list, batch_ended: float) -> None:
        with self._lock:
            st = self._status
            st.plan, st.estimate_s = plan, sum(sec for _, sec in plan)
            if st.work(st.done):  # the first batch ended before the timing: its end is the pace
                st.updated_at = batch_ended

    def _progress(self, done: int) -> None:
        with self._lock:
            st = self._status
            if st.work(done) != st.work(st.done):  # a batch ended: the pace is measured anew
                st.updated_at = time.time()
            st.done = done
