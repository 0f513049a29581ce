"""How the app and its training runs share the CPU cores.

The app process holds a model (chat, candidate generation) and every training run is a
child process with a model of its own. Left to torch, each process runs one thread per
core; when both compute, twice as many threads as cores compete, and each process's
OpenMP workers spin at every barrier for a thread the other one took away. Measured on
2 cores (issue 17): a 2-prompt greedy preview ran at 0.7 tok/s with 2 threads beside
another 2-thread process, and at 9.8 tok/s with 1. So the split is decided here, for
any core count:

- no run: the app uses every core;
- a run while the app is idle: the run uses every core (the app's threads sleep);
- a run while the app computes: the app keeps `app_share(cores)` threads, the run the rest.

The app says it is computing by holding a marker file in the data dir (`AppShare.busy`);
a run looks at the marker before each step (`RunShare.adjust`) and every half second
inside long work (`RunShare.follow`), so it hands cores back within a step. The marker
names the app's process: one left behind by an app stopped or killed in the middle of a
job (a scoring job after a run, a chat turn) counts for nothing once that process is
gone (`app_busy`). Before, such a marker held every later run in that data dir to the
run's share of the cores: a default run over 32 pairs on 2 cores took 3.2 s a step
against 2.0 with both.

torch's thread count is per OS thread under OpenMP (set in one thread, it does not
change another's), so each side sets it in the thread that is about to compute, and
again between the steps of long work (`AppShare.rebalance`, `RunShare.follow`): a run
that starts while the app decodes a batch, or the app that starts computing while a run
scores its answers, is followed within a step rather than at the end of the work. A run
started 3 s into a batch of 32 answers of 192 tokens (2 cores, twice each): the batch
took 34.0-34.2 s and the run's first 12 steps 47.3-48.7 s; with the app keeping both
threads to the end of the batch, 119.8-119.9 s and 71.6-75.4 s.
Everything the app computes holds the marker, its timings included. The Train tab's
forward timing once did not, and a run started from the page while the app's start-up
timings ran kept both cores beside the app's two threads (2 cores, a default run over 32
pairs): its reference pass took 92.0 s, its base previews 19.2 s; 16.4 and 4.8 s now, 8.6
and 3.5 s with the app idle.

Cores are also shared with whatever else runs on the machine, which no marker covers.
OpenMP's workers spin at every barrier by default, and a spinning thread wastes the
time a descheduled one needs. Measured on 2 cores (2-row greedy decode, tok/s): beside
a 2-thread job, 2.9 with spinning waits (OMP_WAIT_POLICY=ACTIVE) and 17.9 with PASSIVE; on a quiet
machine, 41.8 and 26.4. Passive waiting costs a third of the speed when nothing else
runs, so it is left to the user (README) rather than set here.

Threads inside one process count too. Each OS thread that has computed keeps OpenMP
workers of its own while it lives, and libgomp spin-waits only while it manages no more
threads than there are cores; past that every wait is nearly passive. Measured on a
2-core Xeon with AMX (bf16, 2-row decode of the bundled model): 40 ms a step in a thread
alone, 70 ms once another living thread had decoded. So the app's model computes on one
thread of its own (ModelHost.use_own_thread), whichever thread asked.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger(__name__)

MARKER_NAME = ".app-busy"
# How often long work looks at the share again (a run's status is read from its folder).
REBALANCE_EVERY_S = 0.5


class _Looks:
    """When long work last looked at the share again: at most every REBALANCE_EVERY_S."""

    def __init__(self):
        self._last = 0.0

    def due(self) -> bool:
        now = time.monotonic()
        if now - self._last < REBALANCE_EVERY_S:
            return False
        self._last = now
        return True


def available_cores() -> int:
    """Cores this process may run on (a container or taskset may allow fewer than exist)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def app_share(cores: int) -> int:
    """Threads the app keeps for chat and generation while a run trains: a quarter of
    the cores, at least one."""
    return max(1, cores // 4)


def app_threads(cores: int, run_active: bool) -> int:
    return app_share(cores) if run_active else cores


def run_threads(cores: int, app_busy: bool) -> int:
    return max(1, cores - app_share(cores)) if app_busy else cores


def marker_path(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / MARKER_NAME


def app_busy(marker: Path) -> bool:
    """Whether the marker is there and its process alive. A marker without a readable
    process id (an older app's, an empty file) counts as busy, as markers always did."""
    try:
        pid = int(marker.read_text().strip())
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return marker.exists()
    import psutil

    return psutil.pid_exists(pid)


def _set_torch_threads(n: int) -> None:
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


class AppShare:
    """The app's side: wrap every use of the app's model in `busy()`."""

    def __init__(self, data_dir: str | os.PathLike, run_active: Callable[[], bool],
                 cores: int | None = None):
        self.marker = marker_path(data_dir)
        self.run_active = run_active
        self.cores = cores or available_cores()
        self._lock = threading.Lock()
        self._users = 0
        self._looks = _Looks()
        if self.marker.exists() and not app_busy(self.marker):
            self.marker.unlink(missing_ok=True)  # an earlier app's, gone

    def threads(self) -> int:
        """What the app may use right now."""
        return app_threads(self.cores, self.run_active())

    @contextmanager
    def busy(self) -> Iterator[int]:
        """The app computes inside this block (in the calling thread); yields its threads."""
        with self._lock:
            self._users += 1
            if self._users == 1:
                try:
                    self.marker.write_text(str(os.getpid()))
                except OSError as err:  # a read-only data dir: runs just keep every core
                    log.warning("cannot write %s: %s", self.marker, err)
        n = self.threads()
        _set_torch_threads(n)
        try:
            yield n
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self.marker.unlink(missing_ok=True)

    def rebalance(self) -> None:
        """Between two steps of work inside `busy()`, in its thread: the threads the share
        allows now (a run may have started or ended since the work began). Looks at most
        every REBALANCE_EVERY_S."""
        if self._users and self._looks.due():
            _set_torch_threads(self.threads())


class Unshared:
    """The share of a model that has the cores to itself (the trainer's previews, the
    benchmarks, scripts): computes with torch's threads as they are, never beside a run."""

    def busy(self):
        return nullcontext()

    def rebalance(self) -> None:
        pass

    def run_active(self) -> bool:
        return False


class RunShare:
    """A training run's side: call `adjust()` before each step, `follow()` inside long
    work (the reference pass, previews, evaluation)."""

    def __init__(self, data_dir: str | os.PathLike, fixed: int | None = None,
                 cores: int | None = None):
        self.marker = marker_path(data_dir)
        self.fixed = fixed  # --cpu-threads: the user decided, nothing adapts
        self.cores = cores or available_cores()
        self.current: int | None = None
        self._looks = _Looks()

    def adjust(self) -> int:
        n = self.fixed or run_threads(self.cores, app_busy(self.marker))
        if n != self.current:
            if self.current is not None:
                log.info("cpu threads %d -> %d (%s)", self.current, n,
                         "the app is computing" if n < self.cores else "the app is idle")
            self.current = n
            _set_torch_threads(n)
        return n

    def follow(self) -> None:
        """Between two steps of long work, in its thread: `adjust()`, at most every
        REBALANCE_EVERY_S (a preview decodes a token every few tens of milliseconds)."""
        if self._looks.due():
            self.adjust()
