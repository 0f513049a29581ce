"""Inter-annotator agreement, annotator bias diagnostics and accuracy on gold answers.

Input: active judgment rows as Store.judgments() returns them. Pairs (paired and cross
judgments, verdicts a/b/tie/both_bad) and thumbs (up/down) are measured separately:
their categories cannot be compared with each other.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from itertools import combinations

import krippendorff
import numpy as np
import pandas as pd
from scipy.stats import binomtest
from sklearn.metrics import cohen_kappa_score

from rpo_app.store import RECHECK_SOURCE

# A re-shown item (RECHECK_SOURCE) measures whether an annotator agrees with themself and
# is never counted as a second opinion (it would inflate agreement with their own first
# answer). A gold check is an ordinary judgment here.

PAIR_KINDS = ("paired", "cross")
GROUP_CATEGORIES = {"pairs": ("a", "b", "tie", "both_bad"), "thumbs": ("up", "down")}

# Below these counts a rate says more about luck than about the annotator.
MIN_RATE_N = 10  # decided pairs before a left-side or longer-answer rate is flagged
MIN_TIMED_N = 10  # timed judgments before a median time is flagged
MIN_RECHECK_N = 5  # re-shown items before self-consistency is flagged
P_VALUE_CUT = 0.01  # strict: every annotator is tested, so loose cuts flag someone by chance
TOO_FAST_SECONDS = 2.0  # nobody reads two answers in under two seconds
MIN_SELF_AGREEMENT = 0.75
EVEN = 0.5  # sides are randomised: an unbiased annotator picks left half the time

_SWAP = {"a": "b", "b": "a"}


# -- items and verdicts -----------------------------------------------------------------
def item_key(row: dict) -> tuple:
    """What was judged, whichever way round it was shown or imported."""
    if row["kind"] in PAIR_KINDS:
        a, b = row["response_a"], row["response_b"]
        return ("pair", min(a, b), max(a, b))
    return ("thumb", row["response_a"])


def canonical_verdict(row: dict) -> str:
    """The verdict as if response_a were the lower response id."""
    verdict = row["verdict"]
    if row["kind"] in PAIR_KINDS and row["response_a"] > row["response_b"]:
        return _SWAP.get(verdict, verdict)
    return verdict


def group_of(row: dict) -> str:
    return "pairs" if row["kind"] in PAIR_KINDS else "thumbs"


def _first_judgments(rows: Iterable[dict]) -> dict[tuple[str, tuple], dict]:
    """(annotator, item) -> that annotator's first non-recheck judgment of the item."""
    first: dict[tuple[str, tuple], dict] = {}
    for row in sorted(rows, key=lambda r: r["id"]):
        if row["source"] != RECHECK_SOURCE:
            first.setdefault((row["annotator"], item_key(row)), row)
    return first


def ratings(rows: Iterable[dict], group: str | None = None) -> pd.DataFrame:
    """Items x annotators of canonical first verdicts (missing where not judged);
    `group` ("pairs" or "thumbs") keeps only that group's items."""
    rows = [r for r in rows if group is None or group_of(r) == group]
    first = _first_judgments(rows)
    keys = sorted({key for _, key in first})
    annotators = sorted({annotator for annotator, _ in first})
    cells = {(a, k): canonical_verdict(r) for (a, k), r in first.items()}
    # tupleize_cols=False: keys of different lengths must not become a MultiIndex.
    index = pd.Index(keys, tupleize_cols=False, name="item", dtype=object)
    data = {a: pd.Series([cells.get((a, k)) for k in keys], index=index, dtype=object)
            for a in annotators}
    return pd.DataFrame(data, index=index, columns=annotators)


# -- agreement ---------------------------------------------------------------------------
def _kappa(x: list[str], y: list[str], categories: tuple[str, ...]) -> float | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined kappa (one shared category) is expected
        value = cohen_kappa_score(x, y, labels=list(categories), replace_undefined_by=np.nan)
    return None if value is None or math.isnan(value) else float(value)


def pairwise_kappa(rows: Iterable[dict]) -> list[dict]:
    """Cohen's kappa for every pair of annotators with an item in common, per group."""
    rows = list(rows)
    out = []
    for group, categories in GROUP_CATEGORIES.items():
        table = ratings(rows, group)
        for first, second in combinations(table.columns, 2):
            both = table[[first, second]].dropna()
            if both.empty:
                continue
            x, y = list(both[first]), list(both[second])
            out.append({"group": group, "annotator_1": first, "annotator_2": second,
                        "items": len(both), "kappa": _kappa(x, y, categories),
                        "agree_share": float(np.mean([a == b for a, b in zip(x, y)]))})
    return out


def _alpha(table: pd.DataFrame, categories: tuple[str, ...]) -> float | None:
    codes = {c: float(i) for i, c in enumerate(categories)}
    data = np.array([[codes.get(v, np.nan) if isinstance(v, str) else np.nan
                      for v in table[a]] for a in table.columns], dtype=float)
    try:
        value = krippendorff.alpha(reliability_data=data, level_of_measurement="nominal")
    except ValueError:  # everyone used one category: agreement beyond chance is undefined
        return None
    return None if math.isnan(value) else float(value)


def overall_alpha(rows: Iterable[dict]) -> list[dict]:
    """Krippendorff's alpha (nominal) per group that has judgments."""
    rows = list(rows)
    out = []
    for group, categories in GROUP_CATEGORIES.items():
        table = ratings(rows, group)
        if table.empty:
            continue
        shared = table[table.notna().sum(axis=1) >= 2]
        rated = shared.notna()
        out.append({"group": group,
                    "alpha": _alpha(shared, categories) if len(shared) >= 2 else None,
                    "items": len(shared), "annotators": int(rated.any(axis=0).sum()),
                    "ratings": int(rated.to_numpy().sum())})
    return out


# -- bias diagnostics --------------------------------------------------------------------
def _decided(row: dict) -> bool:
    return row["kind"] in PAIR_KINDS and row["verdict"] in ("a", "b")


def left_won(row: dict) -> bool | None:
    """Whether the answer shown on the left won; None when undecided or side unknown."""
    if not _decided(row) or row.get("a_side") not in ("left", "right"):
        return None
    return (row["verdict"] == "a") == (row["a_side"] == "left")


def _words(text) -> int | None:
    return len(text.split()) if isinstance(text, str) else None


def longer_won(row: dict) -> bool | None:
    """Whether the longer answer (in words) won; None when undecided or equally long."""
    if not _decided(row):
        return None
    wa, wb = _words(row.get("response_a_text")), _words(row.get("response_b_text"))
    if wa is None or wb is None or wa == wb:
        return None
    return (row["verdict"] == "a") == (wa > wb)


def _binom_p(k: int, n: int, p: float) -> float | None:
    return float(binomtest(k, n, p).pvalue) if n else None


def _share(k: int, n: int) -> float | None:
    return k / n if n else None


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def _seconds(row: dict) -> float | None:
    s = row.get("seconds_spent")
    return float(s) if s is not None and not math.isnan(s) else None


def self_consistency(rows: Iterable[dict]) -> dict[str, tuple[int, int]]:
    """annotator -> (re-shown items, same verdict as their first judgment of the item)."""
    rows = list(rows)
    first = _first_judgments(rows)
    out: dict[str, tuple[int, int]] = {}
    for row in rows:
        if row["source"] != RECHECK_SOURCE:
            continue
        original = first.get((row["annotator"], item_key(row)))
        if original is None:  # nothing to be consistent with
            continue
        n, same = out.get(row["annotator"], (0, 0))
        out[row["annotator"]] = (n + 1, same + (canonical_verdict(row) == canonical_verdict(original)))
    return out


def _fmt_p(p: float) -> str:
    if p < 1e-6:
        return "p<0.000001"
    # Enough decimals for one significant digit: 0.00001 rather than 1e-05.
    decimals = max(2, -math.floor(math.log10(p)))
    return f"p={p:.{decimals}f}"


def _flags(e: dict) -> list[str]:
    flags = []
    if e["left_n"] >= MIN_RATE_N and e["left_p"] < P_VALUE_CUT:
        side, k = ("left", e["left_wins"]) if e["left_share"] > EVEN else (
            "right", e["left_n"] - e["left_wins"])
        flags.append(f"picks the {side} answer in {k} of {e['left_n']} decided pairs "
                     f"({k / e['left_n']:.0%}; expected 50%, {_fmt_p(e['left_p'])})")
    if e["longer_n"] >= MIN_RATE_N and e["longer_p"] < P_VALUE_CUT:
        label = "others" if e["longer_expected_from"] == "others" else "expected"
        share, expected, which = e["longer_share"], e["longer_expected"], "longer"
        if share < expected:
            share, expected, which = 1 - share, 1 - expected, "shorter"
        flags.append(f"prefers the {which} answer in {share:.0%} of {e['longer_n']} pairs "
                     f"({label}: {expected:.0%}, {_fmt_p(e['longer_p'])})")
    if (e["timed_n"] >= MIN_TIMED_N and e["median_seconds"] is not None
            and e["median_seconds"] < TOO_FAST_SECONDS):
        team = e["team_median_seconds"]
        flags.append(f"median {e['median_seconds']:.1f} s per judgment "
                     f"(team median {team:.1f} s)")
    if e["recheck_n"] >= MIN_RECHECK_N and e["recheck_share"] < MIN_SELF_AGREEMENT:
        flags.append(f"agrees with themself on {e['recheck_same']} of {e['recheck_n']} "
                     f"re-shown items ({e['recheck_share']:.0%})")
    return flags


def _tally(values: list[bool | None]) -> tuple[int, int]:
    """(cases where the question applies, cases where it was True)."""
    known = [v for v in values if v is not None]
    return len(known), sum(known)


def bias(rows: Iterable[dict]) -> list[dict]:
    """Per annotator: left-side and longer-answer preference, speed, self-consistency,
    and plain-English flags where the data are enough to say so."""
    rows = list(rows)
    counted = [r for r in rows if r["source"] != RECHECK_SOURCE]
    by_annotator: dict[str, list[dict]] = {}
    for row in counted:
        by_annotator.setdefault(row["annotator"], []).append(row)
    longer = {a: _tally([longer_won(r) for r in rs]) for a, rs in by_annotator.items()}
    all_longer_n = sum(n for n, _ in longer.values())
    all_longer_k = sum(k for _, k in longer.values())
    all_seconds = [s for r in counted if (s := _seconds(r)) is not None]
    consistency = self_consistency(rows)
    out = []
    for annotator in sorted({r["annotator"] for r in rows}):
        mine = by_annotator.get(annotator, [])
        left_n, left_k = _tally([left_won(r) for r in mine])
        longer_n, longer_k = longer.get(annotator, (0, 0))
        # Long answers are often simply better, so the fair yardstick is the rest of the team.
        others_n, others_k = all_longer_n - longer_n, all_longer_k - longer_k
        from_others = others_n >= MIN_RATE_N
        expected = others_k / others_n if from_others else EVEN
        seconds = [s for r in mine if (s := _seconds(r)) is not None]
        recheck_n, recheck_same = consistency.get(annotator, (0, 0))
        entry = {
            "annotator": annotator, "judgments": len(mine),
            "left_n": left_n, "left_wins": left_k, "left_share": _share(left_k, left_n),
            "left_p": _binom_p(left_k, left_n, EVEN),
            "longer_n": longer_n, "longer_wins": longer_k,
            "longer_share": _share(longer_k, longer_n), "longer_expected": expected,
            "longer_expected_from": "others" if from_others else "even",
            "longer_p": _binom_p(longer_k, longer_n, expected),
            "timed_n": len(seconds), "median_seconds": _median(seconds),
            "team_median_seconds": _median(all_seconds),
            "recheck_n": recheck_n, "recheck_same": recheck_same,
            "recheck_share": _share(recheck_same, recheck_n),
        }
        entry["flags"] = _flags(entry)
        out.append(entry)
    return out


# -- gold answers ------------------------------------------------------------------------
def gold_answers(rows: Iterable[dict], gold_ids: set[int]) -> dict[tuple, tuple[str, set[str]]]:
    """item -> (gold verdict, authors of the gold rows). Items whose gold rows disagree
    are left out: they have no answer to test anyone against."""
    verdicts: dict[tuple, set[str]] = {}
    authors: dict[tuple, set[str]] = {}
    for row in rows:
        if row["id"] in gold_ids:
            key = item_key(row)
            verdicts.setdefault(key, set()).add(canonical_verdict(row))
            authors.setdefault(key, set()).add(row["annotator"])
    return {k: (next(iter(v)), authors[k]) for k, v in verdicts.items() if len(v) == 1}


def gold_accuracy(rows: Iterable[dict], gold_ids: set[int]) -> list[dict]:
    """Per annotator: first judgments of gold items that match the gold verdict. The
    author of an item's gold answer is not tested on that item: they wrote the key."""
    rows = list(rows)
    answers = gold_answers(rows, set(gold_ids))
    tally: dict[str, list[int]] = {}
    for (annotator, key), row in _first_judgments(rows).items():
        if key not in answers or annotator in answers[key][1]:
            continue
        counts = tally.setdefault(annotator, [0, 0])
        counts[0] += 1
        counts[1] += canonical_verdict(row) == answers[key][0]
    return [{"annotator": a, "gold_items": n, "correct": k, "accuracy": k / n}
            for a, (n, k) in sorted(tally.items())]


def low_accuracy_annotators(rows: Iterable[dict], gold_ids: set[int], min_accuracy: float,
                            min_items: int = 5) -> dict[str, dict]:
    """Annotators below min_accuracy on at least min_items gold items (training leaves
    them out), with their figures."""
    return {e["annotator"]: e for e in gold_accuracy(rows, gold_ids)
            if e["gold_items"] >= min_items and e["accuracy"] < min_accuracy}


# -- report ------------------------------------------------------------------------------
def report(rows: Iterable[dict], gold_ids: Iterable[int] = frozenset()) -> dict:
    """Everything above in one JSON-serialisable dict."""
    rows = list(rows)
    gold_ids = set(gold_ids)
    table = ratings(rows)
    return {
        "counts": {"judgments": len(rows),
                   "annotators": len({r["annotator"] for r in rows}),
                   "shared_items": int((table.notna().sum(axis=1) >= 2).sum()),
                   "gold_items": len(gold_answers(rows, gold_ids))},
        "kappa": pairwise_kappa(rows),
        "alpha": overall_alpha(rows),
        "bias": bias(rows),
        "gold": gold_accuracy(rows, gold_ids),
    }


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _of(share, n) -> str:
    return "-" if not n else f"{share:.0%} of {n}"


# The report's tables as people read them; the Team tab and format_report both show these.
TABLE_COLUMNS = {
    "kappa": ["group", "annotator 1", "annotator 2", "items", "Cohen's κ", "same verdict"],
    "alpha": ["group", "Krippendorff's α", "items", "annotators", "ratings"],
    "annotators": ["annotator", "judgments", "left answer won", "longer answer won",
                   "longer expected", "median s", "same on re-shown"],
    "gold": ["annotator", "gold items", "correct", "accuracy"],
}


def tables(rep: dict) -> dict[str, pd.DataFrame]:
    """report() as display tables (figures formatted, "-" where there is none)."""
    records = {
        "kappa": [[k["group"], k["annotator_1"], k["annotator_2"], k["items"],
                   _num(k["kappa"], ".2f"), _num(k["agree_share"], ".0%")] for k in rep["kappa"]],
        "alpha": [[a["group"], _num(a["alpha"], ".2f"), a["items"], a["annotators"], a["ratings"]]
                  for a in rep["alpha"]],
        "annotators": [[b["annotator"], b["judgments"], _of(b["left_share"], b["left_n"]),
                        _of(b["longer_share"], b["longer_n"]), _num(b["longer_expected"], ".0%"),
                        _num(b["median_seconds"], ".1f"), _of(b["recheck_share"], b["recheck_n"])]
                       for b in rep["bias"]],
        "gold": [[g["annotator"], g["gold_items"], g["correct"], f"{g['accuracy']:.0%}"]
                 for g in rep["gold"]],
    }
    return {name: pd.DataFrame(rows, columns=TABLE_COLUMNS[name]) for name, rows in records.items()}


def format_report(rep: dict) -> str:
    """The report as plain-text tables for a terminal."""
    c = rep["counts"]
    shown = {name: t.to_string(index=False) for name, t in tables(rep).items()}
    lines = [(f"{c['judgments']} judgments by {c['annotators']} annotators; "
              f"{c['shared_items']} items judged by two or more annotators."), ""]
    if not c["shared_items"]:
        lines += ["Agreement: no items judged by two or more annotators yet.", ""]
    else:
        lines += ["Agreement between pairs of annotators (Cohen's kappa)", shown["kappa"], ""]
        lines += ["Agreement over everyone (Krippendorff's alpha, nominal)", shown["alpha"], ""]
    if rep["bias"]:
        lines += ["Annotators", shown["annotators"], ""]
        flags = [f"  {b['annotator']}: {f}" for b in rep["bias"] for f in b["flags"]]
        lines += ["Flags"] + (flags or ["  none"]) + [""]
    if rep["gold"]:
        lines += [f"Gold answers ({c['gold_items']} items)", shown["gold"], ""]
    return "\n".join(lines).rstrip() + "\n"
