"""Signs that preference tuning went too far: answers that shrink to a word, balloon,
loop, or decline the task. Pure functions on text, shared by the benchmarks and the
Train tab's collapse warning.

Preference training is easy to overdo on a small model (a "shorter is better" judge
and a high learning rate give one-word answers to everything), and the held-out
preference accuracy does not show it: the reward goes up while the answers collapse.
Labels can also teach a refusal. The bundled model's refusals go on "However, I can
...", and a few labels that prefer hedged answers pull that mode up with the hedges:
with the caveat judge's 4 decided pairs (none of them a refusal) the tuned model
declined 41% of the test prompts, the base model 9% (bench-curve).
"""
from __future__ import annotations

import re
from collections.abc import Sequence

SHORT_WORDS = 3  # answers with fewer words count as degenerate ("", "Yes.", "Sure thing")
NGRAM = 3
# A loop: a unit of 1-8 characters, not starting with a space, repeated at least 4 times
# in a row over at least 16 characters ("1.1.1.1.1.1.1.1.", "no, no, no, no, ", "👉👉👉...").
# Word n-grams miss the loops that stay inside one word ("origin.git.git.git.git...") or
# that are a small part of an answer. An answer loops when loops cover this share of it.
_LOOP = re.compile(r"(\S.{0,7}?)\1{3,}", re.S | re.I)
LOOP_MIN_CHARS = 16
LOOPING_ANSWER = 0.2
# The collapse warning fires when the tuned answers' mean length leaves this band
# around the base model's, or their repeated-n-gram share exceeds the base's by this much.
LENGTH_BAND = (0.4, 2.5)
REPEAT_MARGIN = 0.15
# ... or when this much larger a share of them loops (LOOPING_ANSWER). Measured on the
# test answers of 115 bench-curve runs (32 each) and their base models' 127: no base
# answer loops; 99 runs had at most 1 of 32 answers looping, 12 had 2, and the 4 with 3
# or more (a share of 0.09 or more) include 3 that the other rules let pass.
LOOP_MARGIN = 0.08
# ... or when the base model finds them this much less likely per token (nats). Measured
# with bench-effect: fluent tuned answers score 0.1-0.6 below the base's greedy ones,
# garbled ones ("a poor aarnous spelling") 1.4-2.6 below.
FLUENCY_MARGIN = 1.0

# ... or when this much larger a share of them declines the task. Measured on the test
# answers of 93 bench-curve runs: 53 on the concise and numbered_list judges moved
# -0.09 to +0.03 from the base's share; 40 on caveat -0.06 to +0.44, 10 of them above.
REFUSAL_MARGIN = 0.15

_WORD = re.compile(r"\S+")
# How instruction-tuned models decline: speaking as an AI ("as a chatbot designed to ...,
# I ..."), or saying they cannot do the task. Not "I'm sorry" alone ("I'm sorry to hear
# that" is sympathy), nor "I can't help but ...".
_REFUSAL = re.compile(
    r"\bas an? (?:[\w-]+ ){0,2}?(?:ai|chatbot|language model|assistant)(?:,? i\b|\s+(?:designed|trained)\b)"
    r"|\bi (?:don't|do not) have the (?:ability|capability)\b"
    r"|\bi(?:'m| am) (?:unable|not able) to\b"
    r"|\bi can(?:not|'t) (?:help|assist|provide)\b(?! but)",
    re.IGNORECASE)


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


def looped_char_share(text: str) -> float:
    """Share of the answer's characters inside loops (_LOOP): 0 for prose, near 1 for an
    answer that is one loop."""
    text = text or ""
    looped = sum(len(m.group(0)) for m in _LOOP.finditer(text) if len(m.group(0)) >= LOOP_MIN_CHARS)
    return looped / len(text) if text else 0.0


def first_loop(texts: Sequence[str], width: int = 24) -> str | None:
    """The start of the first loop in the first looping answer, for a message."""
    for text in texts:
        if looped_char_share(text) >= LOOPING_ANSWER:
            for m in _LOOP.finditer(text):
                if len(m.group(0)) >= LOOP_MIN_CHARS:
                    return " ".join(m.group(0)[:width].split()) + "..."
    return None


def is_refusal(text: str) -> bool:
    """Whether the answer declines the task ("as a text-based AI, I don't have the
    ability to ...", "I'm unable to provide ...")."""
    return bool(_REFUSAL.search((text or "").replace("\u2019", "'")))


# What summarize() measures, in the order the benchmarks' tables show them.
FIGURES = ("mean_words", "short_share", "repeat_share", "loop_share", "refusal_share")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def summarize(texts: Sequence[str]) -> dict:
    """Mean words, share of short answers, mean repeated 3-gram share, share of looping
    answers, share of refusals: FIGURES, and n."""
    return {"mean_words": _mean([word_count(t) for t in texts]),
            "short_share": _mean([1.0 if word_count(t) < SHORT_WORDS else 0.0 for t in texts]),
            "repeat_share": _mean([repeated_ngram_share(t) for t in texts]),
            "loop_share": _mean([1.0 if looped_char_share(t) >= LOOPING_ANSWER else 0.0 for t in texts]),
            "refusal_share": _mean([1.0 if is_refusal(t) else 0.0 for t in texts]),
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
    if t["loop_share"] > b["loop_share"] + LOOP_MARGIN:
        problems.append(f"{t['loop_share']:.0%} of answers loop on a few characters "
                        f"(\"{first_loop(tuned)}\") vs {b['loop_share']:.0%} for the base model")
    refusing = t["refusal_share"] > b["refusal_share"] + REFUSAL_MARGIN
    if refusing:
        problems.append(f"{t['refusal_share']:.0%} of answers decline the task (\"as an AI, I don't "
                        f"have the ability ...\") vs {b['refusal_share']:.0%} for the base model")
    if base_logp is not None and tuned_logp is not None and tuned_logp < base_logp - FLUENCY_MARGIN:
        problems.append(f"the base model finds the answers far less likely ({tuned_logp:.2f} vs "
                        f"{base_logp:.2f} log-prob per token): words may be garbled")
    if not problems:
        return None
    advice = " Lower the learning rate or the steps, or raise β."
    if refusing:
        advice += (" If the answers you preferred include refusals, the labels taught it to"
                   " decline: retract those, or prefer answers that do the task.")
    return "the tuned model may be collapsing: " + "; ".join(problems) + "." + advice
