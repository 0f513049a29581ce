"""A word-level diff of an answer and its edited version, as safe HTML for the UI."""
from __future__ import annotations

import difflib
import html
import re

_TOKENS = re.compile(r"\s+|[^\s]+")


def diff_html(old: str, new: str) -> str:
    """Removed words struck through, added words underlined; everything escaped, so the
    texts' own HTML shows as text."""
    a, b = _TOKENS.findall(old or ""), _TOKENS.findall(new or "")
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op in ("replace", "delete"):
            out.append(f'<del style="color:#b91c1c">{html.escape("".join(a[i1:i2]))}</del>')
        if op in ("replace", "insert"):
            out.append(f'<ins style="color:#15803d">{html.escape("".join(b[j1:j2]))}</ins>')
        if op == "equal":
            out.append(html.escape("".join(a[i1:i2])))
    return '<div class="rpo-diff" style="white-space:pre-wrap">' + "".join(out) + "</div>"


def counts(old: str, new: str) -> tuple[int, int]:
    """(words removed, words added)."""
    a, b = (old or "").split(), (new or "").split()
    removed = added = 0
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op in ("replace", "delete"):
            removed += i2 - i1
        if op in ("replace", "insert"):
            added += j2 - j1
    return removed, added
