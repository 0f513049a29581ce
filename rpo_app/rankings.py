"""What a ranking of several answers to one prompt says: the one home of its rules.

A ranking orders K answers (MIN_ANSWERS..MAX_ANSWERS) into tiers, best first; answers
in one tier are tied. "None is acceptable" is a ranking too: every answer is bad and
no order among them is claimed. From a ranking follow:

- its implied pairs, one per pair of answers (C(K,2)): the better tier wins, one tier
  is a tie, and "none is acceptable" makes every pair "both bad". The store writes them
  with the ranking, so everything that reads pairs (training, agreement, lineage,
  export) reads a ranking without knowing what one is;
- its pools for the unpaired losses: the upper tiers are liked and the lower ones
  disliked, each answer once. With an odd number of tiers the middle tier says neither,
  and with one tier (all tied) nothing is learned. "None is acceptable" puts every
  answer in the disliked pool.

Tiers hold whatever identifies an answer (response ids in the store, screen positions
in the order typed by a person); the functions here only compare them.

Pure functions: no store, no torch.
"""
from __future__ import annotations

import re
from collections.abc import Hashable, Sequence

MIN_ANSWERS = 3
MAX_ANSWERS = 6
LABELS = "ABCDEF"  # answer labels on screen, in shown order
NONE_WORDS = ("none", "none acceptable", "none is acceptable")
ORDER_HELP = ("best first, '>' or a space between places, '=' for a tie, e.g. 'C > A = B > D'; "
              "or 'none' if no answer is acceptable")


class RankingError(ValueError):
    """A ranking that cannot be stored; the message names the problem."""


def labels(n: int) -> str:
    if not MIN_ANSWERS <= n <= MAX_ANSWERS:
        raise RankingError(f"a ranking takes {MIN_ANSWERS} to {MAX_ANSWERS} answers, not {n}")
    return LABELS[:n]


def parse_order(text: str, n: int) -> tuple[list[list[int]], bool]:
    """A typed order over n shown answers -> (tiers of 0-based screen positions, none
    acceptable). Every answer must be placed exactly once (ORDER_HELP has the syntax)."""
    names = labels(n)
    raw = " ".join((text or "").split()).strip()
    if not raw:
        raise RankingError(f"the order is empty; type it {ORDER_HELP}")
    if raw.lower() in NONE_WORDS:
        return [list(range(n))], True
    if re.search(r"[^A-Za-z=>,\s]", raw):
        bad = re.search(r"[^A-Za-z=>,\s]", raw).group(0)
        raise RankingError(f"{bad!r} is not part of an order; type it {ORDER_HELP}")
    # Spaces around '=' bind a tie, not a new place: "A = B" is "A=B".
    raw = re.sub(r"\s*=\s*", "=", raw)
    tiers: list[list[int]] = []
    for place in re.split(r"[>,\s]+", raw):
        if not place:
            continue
        names_here = place.upper().split("=")
        if len(names_here) == 1:  # "CABD": one place per letter, as typed key by key
            names_here = [[c] for c in names_here[0]]
        elif any(len(x) != 1 for x in names_here):
            raise RankingError(f"write one letter on each side of '=' ({place!r})")
        else:
            names_here = [names_here]
        for tier in names_here:
            for letter in tier:
                if letter not in names:
                    raise RankingError(f"there is no answer {letter} here; the answers are "
                                       f"{', '.join(names)}")
            tiers.append([names.index(letter) for letter in tier])
    check_tiers(tiers, range(n), lambda p: names[p])
    return tiers, False


def check_tiers(tiers: Sequence[Sequence[Hashable]], answers: Sequence[Hashable] | range,
                name=str) -> None:
    """Every answer exactly once, nothing else; raises RankingError naming the problem."""
    seen: list = [a for tier in tiers for a in tier]
    for a in seen:
        if a not in answers:
            raise RankingError(f"answer {name(a)} is not one of the answers shown")
    repeated = sorted({a for a in seen if seen.count(a) > 1}, key=list(answers).index)
    if repeated:
        raise RankingError(f"{_answers(repeated, name)} {'is' if len(repeated) == 1 else 'are'} "
                           "placed more than once")
    missing = [a for a in answers if a not in seen]
    if missing:
        raise RankingError(f"the order leaves out {_answers(missing, name)}: rank every "
                           "answer (ties are allowed), or choose 'none is acceptable'")
    if any(not tier for tier in tiers):
        raise RankingError("a ranking cannot have an empty place")


def _answers(items, name) -> str:
    """'answer C' / 'answers C and D'."""
    names = [name(a) for a in items]
    if len(names) == 1:
        return f"answer {names[0]}"
    return f"answers {', '.join(names[:-1])} and {names[-1]}"


def format_order(tiers: Sequence[Sequence[Hashable]], name=str, none_acceptable: bool = False) -> str:
    """'C > A = B > D' (or 'none acceptable')."""
    if none_acceptable:
        return "none acceptable"
    return " > ".join(" = ".join(name(a) for a in tier) for tier in tiers)


def tier_of(tiers: Sequence[Sequence[Hashable]]) -> dict:
    return {a: t for t, tier in enumerate(tiers) for a in tier}


def implied_pairs(tiers: Sequence[Sequence[int]], none_acceptable: bool = False
                  ) -> list[tuple[int, int, str]]:
    """(lower id, higher id, verdict) for every pair of ranked answers; verdict a|b|tie|
    both_bad in the store's canonical form (the lower id is A)."""
    place = tier_of(tiers)
    ids = sorted(place)
    out = []
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            if none_acceptable:
                verdict = "both_bad"
            elif place[a] == place[b]:
                verdict = "tie"
            else:
                verdict = "a" if place[a] < place[b] else "b"
            out.append((a, b, verdict))
    return out


def pool_sides(place: dict, n_tiers: int, none_acceptable: bool = False) -> tuple[list, list]:
    """(liked, disliked) answers of one ranking, given each answer's tier (0 = best)."""
    if none_acceptable:
        return [], list(place)
    liked = [a for a, t in place.items() if t < n_tiers // 2]
    disliked = [a for a, t in place.items() if t >= (n_tiers + 1) // 2]
    return liked, disliked


def in_letters(ranking: dict) -> str:
    """A stored ranking (Store.ranking: tiers, shown, none_acceptable) in the letters its
    annotator saw: 'C > A = B > D'."""
    label = dict(zip(ranking["shown"], LABELS))
    return format_order(ranking["tiers"], lambda r: label.get(r, f"#{r}"),
                        ranking["none_acceptable"])
