"""Signs that preference tuning went too far: answers that shrink to a word, balloon,
or loop. Pure functions on text, shared by the effect benchmark and the Train tab's
collapse warning.

Preference training is easy to overdo on a small model (a "shorter is better" judge
and a high learning rate give one-word answers to everything), and the held-out
preference accuracy does not show it: the reward goes up while the answers collapse.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

SHORT_WORDS = 3  # answers with fewer words count as degenerate ("", "Yes.", "Sure thing")
NGRAM = 3
# The collapse warning fires when the tuned answers' mean length leaves this band
# around the base model's, or their repeated-n-gram share exceeds the base's by this much.
LENGTH_BAND = (0.4, 2.5)
REPEAT_MARGIN = 0.15
# ... or when the base model finds them this much less likely per token (nats). Measured
# with bench-effect: fluent tuned answers score 0.1-0.6 below the base's greedy ones,
# garbled ones ("a poor aarnous spelling") 1.4-2.6 below.
FLUENCY_MARGIN = 1.0

_WORD = re.compile(r"\S+")


def words(text: str) -> list[str]:
    return _WORD.findall((text or "").lower())


def word_count(text: str) -> int:
    return len(words(text))


def repeated_ngram_share(text: str, n: int = NGRAM) -> float:
    """Share of the answer's word n-grams that already occurred earlier in it
    (0: no n-gram repeats; near 1: the answer loops)."""
    w = words(text)
    grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def summarize(texts: Sequence[str]) -> dict:
    """Mean words, share of short answers, mean repeated 3-gram share."""
    return {"mean_words": _mean([word_count(t) for t in texts]),
            "short_share": _mean([1.0 if word_count(t) < SHORT_WORDS else 0.0 for t in texts]),
            "repeat_share": _mean([repeated_ngram_share(t) for t in texts]),
            "n": len(texts)}


def collapse_warning(base: Sequence[str], tuned: Sequence[str], base_logp: float | None = None,
                     tuned_logp: float | None = None) -> str | None:
    """A sentence saying how the tuned answers drifted from the base's, or None.

    base_logp / tuned_logp: the base model's mean log-prob per token of each set of
    answers, when known."""
    if not base or not tuned:
        return None
    b, t = summarize(base), summarize(tuned)
    problems = []
    if b["mean_words"] > 0:
        ratio = t["mean_words"] / b["mean_words"]
        if ratio < LENGTH_BAND[0]:
            problems.append(f"answers shrank to {ratio:.0%} of the base model's length "
                            f"({t['mean_words']:.0f} vs {b['mean_words']:.0f} words)")
        elif ratio > LENGTH_BAND[1]:
            problems.append(f"answers grew to {ratio:.0%} of the base model's length "
                            f"({t['mean_words']:.0f} vs {b['mean_words']:.0f} words)")
    if t["short_share"] > b["short_share"] + 0.25:
        problems.append(f"{t['short_share']:.0%} of answers have fewer than {SHORT_WORDS} words")
    if t["repeat_share"] > b["repeat_share"] + REPEAT_MARGIN:
        problems.append(f"answers repeat themselves ({t['repeat_share']:.0%} repeated "
                        f"{NGRAM}-grams vs {b['repeat_share']:.0%} for the base model)")
    if base_logp is not None and tuned_logp is not None and tuned_logp < base_logp - FLUENCY_MARGIN:
        problems.append(f"the base model finds the answers far less likely ({tuned_logp:.2f} vs "
                        f"{base_logp:.2f} log-prob per token): words may be garbled")
    if not problems:
        return None
    return ("the tuned model may be collapsing: " + "; ".join(problems)
            + ". Lower the learning rate or the steps, or raise β.")
