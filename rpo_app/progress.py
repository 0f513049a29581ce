"""How long work has left: the one rule for every ETA the app shows.

An ETA comes from the measured speed of the work it describes (its own phase, its own
job), never from another phase's. Before the first unit is done there is no speed to
measure, and once the count reaches its total while work remains (a count that is an
upper bound, or work past the counted part) there is nothing left to count: in both
cases the answer is None, which the UI shows as words ("measuring", "finishing"),
never as "ETA 0 s".
"""
from __future__ import annotations


def eta_seconds(elapsed: float, done: float, total: float) -> float | None:
    """Seconds left at the speed so far; None when that cannot be told."""
    if done <= 0 or total <= 0 or done >= total or elapsed <= 0:
        return None
    return elapsed / done * (total - done)


def human(seconds: float) -> str:
    """12 s, 4 min, 1.5 h."""
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
