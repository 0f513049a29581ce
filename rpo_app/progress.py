"""How long work has left: the one rule for every ETA the app shows.

An ETA comes from the measured speed of the work it describes (its own phase, its own
job), never from another phase's. Before the first unit is done there is no speed to
measure, and once the count reaches its total while work remains (a count that is an
upper bound, or work past the counted part) there is nothing left to count: in both
cases the answer is None, which the UI shows as words ("measuring", "finishing"),
never as "ETA 0 s".
"""
from __future__ import annotations

import math


def eta_seconds(elapsed: float, done: float, total: float) -> float | None:
    """Seconds left at the speed so far; None when that cannot be told."""
    if done <= 0 or total <= 0 or done >= total or elapsed <= 0:
        return None
    return elapsed / done * (total - done)


def eta_between_updates(updated_at: float, done: float, total: float,
                        now: float) -> float | None:
    """Seconds left when progress arrives in steps (a batch of answers at a time): the
    pace up to the last update (`updated_at` seconds into the work, `done` of `total`
    then), counting down in between, so the ETA does not grow while the next step runs.
    None when it cannot be told, or once it has run out."""
    left = eta_seconds(updated_at, done, total)
    if left is None:
        return None
    left -= max(0.0, now - updated_at)
    return left if left > 0 else None


def eta_words(seconds: float) -> str:
    """"ETA 12 s": rounded up, since work remains while there is an ETA at all (0.3 s left
    once read "ETA 0 s" at 97% of a preview)."""
    return "ETA " + human(math.ceil(seconds))


def human(seconds: float) -> str:
    """12 s, 4 min, 1.5 h."""
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
