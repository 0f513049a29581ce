"""Which unlabeled item would teach the tuned model most: the math of the label queue's
"most informative first" order. Pure functions; rpo_app.active computes the log-probs
and stores the scores, rpo_app.labelqueue reads them.

For an answer y to prompt x, r(y) = log pi_adapter(y|x) - log pi_base(y|x), summed over
the answer's tokens: the newest adapter's implicit reward divided by beta (DPO's reading
of a tuned policy). For two answers a and b the adapter's margin

    m = beta * (r(a) - r(b))

is its log-odds that a is the better one; the base model's margin is 0 for every pair
(it has no preference of its own in these terms). Two kinds of item teach:

- *unsure*: |m| near 0, where the adapter moved away from the base on at least one of
  the two answers (it has an opinion about them, but not which wins). A label there
  teaches the boundary. Pairs the adapter never moved on (two answers without the
  trait it learned) are also near 0; they come after, as they are mostly ties.
- *departing*: |m| largest: the adapter's verdict departs most from the base model's.
  A label there confirms what it learned or, when the adapter is wrong, corrects it at
  once (the largest gradient).

The order interleaves the two lists (each item takes its better rank of the two), so
the first items are the most unsure and the most departing, and the middle comes last.
A single answer (thumbs) is scored the same way on rho = beta * r(y) against the median
rho of the candidates: near the median is unsure, far from it departs. Two near-identical
answers are not worth a label (the verdict is a tie) and are left out.
"""
from __future__ import annotations

import difflib
import functools
import math
import statistics
from dataclasses import dataclass

# Two answers whose words match this much are the same answer to a reader.
NEAR_DUPLICATE = 0.9


@dataclass(frozen=True)
class Scored:
    """One item of the informative order. `b` is None for a single answer."""

    kind: str  # paired | cross | unpaired
    a: int
    b: int | None
    margin: float  # m for a pair; rho minus the median for a single answer
    score: float  # in (0, 1]; higher comes first


@functools.lru_cache(maxsize=1 << 16)  # the scoring job re-ranks the same pairs after each chunk
def near_duplicate(text_a: str, text_b: str, threshold: float = NEAR_DUPLICATE) -> bool:
    """Whether two answers say the same thing in (almost) the same words."""
    a, b = text_a.lower().split(), text_b.lower().split()
    if a == b:
        return True
    if not a or not b:
        return False
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() >= threshold


def _unsure(margin: float) -> float:
    """1 at m = 0, falling to 0 as the adapter becomes sure either way (1 - |2p - 1|)."""
    return 1.0 - abs(math.tanh(margin / 2.0))


def interleave(unsure: list[float], departing: list[float]) -> list[float]:
    """Scores in (0, 1] from two keys per item (higher = earlier in its list): each item
    takes its better rank of the two lists, so the order alternates between them."""
    n = len(unsure)
    if n != len(departing):
        raise ValueError("one unsure and one departing key per item")
    best = [n] * n
    for keys in (unsure, departing):
        order = sorted(range(n), key=lambda i: (-keys[i], i))
        for rank, i in enumerate(order):
            best[i] = min(best[i], rank)
    return [1.0 - best[i] / n for i in range(n)]


def score_pairs(kind: str, pairs: list[tuple[int, int]], reward: dict[int, float], beta: float,
                texts: dict[int, str] | None = None) -> list[Scored]:
    """The informative order's scores for pairs of answers (same prompt: kind 'paired',
    related prompts: 'cross'). `reward` maps answer id -> r(y) (log-prob under the adapter
    minus under the base). Pairs with an unscored answer, or of near-identical texts, are
    left out."""
    kept = [(a, b) for a, b in pairs if a in reward and b in reward and a != b
            and not (texts and near_duplicate(texts.get(a, ""), texts.get(b, "")))]
    if not kept:
        return []
    moved = {i: abs(beta * reward[i]) for pair in kept for i in pair}
    typical = statistics.median(moved.values()) or 1e-9
    margins = [beta * (reward[a] - reward[b]) for a, b in kept]
    unsure = [_unsure(m) * min(1.0, max(moved[a], moved[b]) / typical)
              for (a, b), m in zip(kept, margins)]
    departing = [abs(m) for m in margins]
    return [Scored(kind, a, b, m, s)
            for (a, b), m, s in zip(kept, margins, interleave(unsure, departing))]


def score_answers(ids: list[int], reward: dict[int, float], beta: float) -> list[Scored]:
    """The informative order's scores for single answers (thumbs up / down)."""
    kept = [i for i in ids if i in reward]
    if not kept:
        return []
    rho = {i: beta * reward[i] for i in kept}
    middle = statistics.median(rho.values())
    offsets = [rho[i] - middle for i in kept]
    scores = interleave([_unsure(o) for o in offsets], [abs(o) for o in offsets])
    return [Scored("unpaired", i, None, o, s) for i, o, s in zip(kept, offsets, scores)]
