"""Small HTML pieces more than one tab draws."""
from __future__ import annotations

import html

from rpo_app import progress


def progress_bar(done: float | None, total: float | None, eta: float | None,
                 elapsed: float | None = None, label: str | None = None, unit: str | None = None,
                 running: bool = False, bar_id: str = "train-progress") -> str:
    """A bar with what it counts, its elapsed time and its ETA. done=None: a phase that
    cannot count its work (loading) gets a moving bar and no percentage. A running bar
    without an ETA says why rather than showing 0 s (progress.eta_seconds)."""
    extra = [html.escape(label)] if label else []
    if done is None or not total:
        bar = f'<progress id="{bar_id}" style="width:100%;height:14px"></progress>'
        if not running and done is not None:
            extra.append("0%")
    else:
        pct = min(100.0, 100.0 * done / total)
        bar = (f'<progress id="{bar_id}" max="100" value="{pct:.1f}" '
               f'style="width:100%;height:14px"></progress>')
        counted = f"{done:.0f}/{total:.0f} {unit}" if unit else ""
        extra.append(f"{pct:.0f}%" + (f" ({counted})" if counted else ""))
    if elapsed:
        extra.append(f"elapsed {progress.human(float(elapsed))}")
    if eta is not None:
        extra.append(progress.eta_words(eta))
    elif running and done:
        extra.append("ETA: measuring" if done < (total or 0) else "finishing")
    return (f'<div style="width:100%">{bar}'
            f'<div style="font-size:0.85em" id="{bar_id}-text">{" · ".join(extra)}</div></div>')
