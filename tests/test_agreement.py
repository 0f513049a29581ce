"""Agreement, bias and gold-accuracy statistics (rpo_app.agreement)."""
from __future__ import annotations

import itertools
import json
from collections import defaultdict

import krippendorff
import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from rpo_app import agreement as ag
from rpo_app.store import GOLD_CHECK_SOURCE, Store

_ids = itertools.count(1)


def row(annotator, verdict, a=1, b=2, kind="paired", source="label", a_side=None,
        seconds=None, text_a="one", text_b="two", id=None):
    """A judgment row shaped like Store.judgments() output (fields the module reads)."""
    return {"id": id if id is not None else next(_ids), "kind": kind, "response_a": a,
            "response_b": None if kind == "unpaired" else b, "verdict": verdict,
            "annotator": annotator, "source": source, "a_side": a_side,
            "seconds_spent": seconds, "created_at": 0.0, "response_a_text": text_a,
            "response_b_text": None if kind == "unpaired" else text_b}


def pair_items(store: Store, n: int) -> list[tuple[int, int]]:
    """n prompts with two stored answers each (ids ascending within a pair)."""
    out = []
    for i in range(n):
        pid, _ = store.add_prompt(f"prompt {i}", source="test")
        ra, _ = store.add_response(pid, f"short {i}", source="model", model="m")
        rb, _ = store.add_response(pid, f"a longer answer {i}", source="model", model="m")
        out.append((ra, rb))
    return out


def alpha_by_hand(units: list[list]) -> float:
    """Nominal Krippendorff's alpha from the coincidence matrix, written out:
    each unit with m >= 2 values adds 1/(m-1) to o[c,k] for every ordered pair of its
    values; alpha = 1 - (n-1) * sum_{c!=k} o[c,k] / sum_{c!=k} n_c n_k."""
    o = defaultdict(float)
    for values in units:
        values = [v for v in values if v is not None]
        m = len(values)
        if m < 2:
            continue
        for i, c in enumerate(values):
            for j, k in enumerate(values):
                if i != j:
                    o[c, k] += 1 / (m - 1)
    n_c = defaultdict(float)
    for (c, _), w in o.items():
        n_c[c] += w
    n = sum(n_c.values())
    observed = sum(w for (c, k), w in o.items() if c != k)
    expected = sum(n_c[c] * n_c[k] for c in n_c for k in n_c if c != k)
    return 1 - (n - 1) * observed / expected


# -- items and canonical verdicts --------------------------------------------------------
def test_item_key_and_canonical_verdict_mirror_swapped_pairs():
    straight = row("x", "a", a=3, b=7)
    mirrored = row("y", "b", a=7, b=3)
    assert ag.item_key(straight) == ag.item_key(mirrored) == ("pair", 3, 7)
    assert ag.canonical_verdict(straight) == ag.canonical_verdict(mirrored) == "a"
    assert ag.canonical_verdict(row("y", "tie", a=7, b=3)) == "tie"
    assert ag.canonical_verdict(row("y", "both_bad", a=7, b=3)) == "both_bad"
    thumb = row("x", "up", a=5, kind="unpaired")
    assert ag.item_key(thumb) == ("thumb", 5) and ag.canonical_verdict(thumb) == "up"


def test_swapped_store_judgment_agrees_with_mirrored_one(tmp_path):
    store = Store(tmp_path)
    items = pair_items(store, 3)
    for lo, hi in items:
        store.add_judgment("paired", lo, hi, "a", annotator="x")
        store.add_judgment("paired", hi, lo, "b", annotator="y")  # the same opinion, imported swapped
    rows = store.judgments()
    table = ag.ratings(rows)
    assert list(table.columns) == ["x", "y"]
    assert (table["x"] == table["y"]).all() and len(table) == 3
    (k,) = ag.pairwise_kappa(rows)
    assert k["items"] == 3 and k["agree_share"] == 1.0
    store.close()


# -- ratings -----------------------------------------------------------------------------
def test_ratings_keep_first_judgment_and_ignore_rechecks(tmp_path):
    store = Store(tmp_path)
    (lo, hi), (lo2, hi2) = pair_items(store, 2)
    store.add_judgment("paired", lo, hi, "a", annotator="x")
    store.add_judgment("paired", lo, hi, "b", annotator="x", source=ag.RECHECK_SOURCE)
    store.add_judgment("paired", lo2, hi2, "tie", annotator="x", source=ag.RECHECK_SOURCE)
    store.add_judgment("paired", lo, hi, "tie", annotator="x", source="import")  # later: not first
    store.add_judgment("unpaired", lo, None, "up", annotator="y")
    table = ag.ratings(store.judgments())
    assert table.loc[[("pair", lo, hi)], "x"].item() == "a"
    assert ("pair", lo2, hi2) not in table.index  # only a recheck: not a rating
    assert table.loc[[("thumb", lo)], "y"].item() == "up"
    assert ag.ratings(store.judgments(), "thumbs").columns.tolist() == ["y"]
    store.close()


# -- Cohen's kappa -----------------------------------------------------------------------
# Ten items, two annotators, three categories:
#   P: a a a a b b b   tie tie a
#   Q: a a a b b b tie tie a   a
# Same verdict on items 1-3, 5, 6, 8, 10: p_o = 7/10 = 0.70.
# Marginals P: a 5, b 3, tie 2; Q: a 5, b 3, tie 2.
# p_e = (5*5 + 3*3 + 2*2) / 10^2 = 38/100 = 0.38.
# kappa = (p_o - p_e) / (1 - p_e) = 0.32 / 0.62 = 0.516129...
P = ["a", "a", "a", "a", "b", "b", "b", "tie", "tie", "a"]
Q = ["a", "a", "a", "b", "b", "b", "tie", "tie", "a", "a"]


def test_kappa_matches_hand_computation_and_sklearn():
    rows = [row("p", v, a=2 * i + 1, b=2 * i + 2) for i, v in enumerate(P)]
    rows += [row("q", v, a=2 * i + 1, b=2 * i + 2) for i, v in enumerate(Q)]
    (k,) = ag.pairwise_kappa(rows)
    assert (k["group"], k["annotator_1"], k["annotator_2"], k["items"]) == ("pairs", "p", "q", 10)
    assert k["kappa"] == pytest.approx(0.32 / 0.62)
    assert k["kappa"] == pytest.approx(cohen_kappa_score(P, Q))
    assert k["agree_share"] == pytest.approx(0.7)


def test_kappa_undefined_is_none_and_groups_are_separate():
    rows = [row("p", "a", a=i, b=100 + i) for i in range(4)]
    rows += [row("q", "a", a=i, b=100 + i) for i in range(4)]
    rows += [row("p", "up", a=50, kind="unpaired"), row("q", "down", a=50, kind="unpaired"),
             row("r", "up", a=50, kind="unpaired")]
    out = {(k["group"], k["annotator_1"], k["annotator_2"]): k for k in ag.pairwise_kappa(rows)}
    pairs = out["pairs", "p", "q"]
    assert pairs["kappa"] is None and pairs["agree_share"] == 1.0  # one shared category
    assert set(out) == {("pairs", "p", "q"), ("thumbs", "p", "q"), ("thumbs", "p", "r"),
                        ("thumbs", "q", "r")}
    assert out["thumbs", "p", "r"]["items"] == 1


# -- Krippendorff's alpha ----------------------------------------------------------------
def test_alpha_by_hand_reproduces_krippendorffs_published_example():
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability", nominal data with
    # missing values, 4 observers x 12 units: alpha = 0.743.
    n = None
    data = [[1, 2, 3, 3, 2, 1, 4, 1, 2, n, n, n], [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, n, 3],
            [n, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, n], [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, n]]
    units = [list(u) for u in zip(*data)]
    assert alpha_by_hand(units) == pytest.approx(0.743, abs=5e-4)
    lib = krippendorff.alpha(reliability_data=np.array(data, dtype=float),
                             level_of_measurement="nominal")
    assert alpha_by_hand(units) == pytest.approx(lib)


def test_alpha_thumbs_hand_example(tmp_path):
    # Thumbs, 2 annotators, 4 answers: X up up down down, Y up down down down.
    # Coincidences: o[up,up] = 2, o[up,down] = o[down,up] = 1, o[down,down] = 4;
    # n_up = 3, n_down = 5, n = 8.
    # alpha = 1 - (n-1) * 2 / (2 * n_up * n_down) = 1 - 7 * 2 / 30 = 16/30 = 0.5333...
    store = Store(tmp_path)
    answers = [a for pair in pair_items(store, 2) for a in pair]
    for rid, x, y in zip(answers, ["up", "up", "down", "down"], ["up", "down", "down", "down"]):
        store.add_judgment("unpaired", rid, None, x, annotator="X")
        store.add_judgment("unpaired", rid, None, y, annotator="Y")
    (thumbs,) = ag.overall_alpha(store.judgments())
    assert thumbs["group"] == "thumbs"
    assert thumbs["alpha"] == pytest.approx(16 / 30)
    assert (thumbs["items"], thumbs["annotators"], thumbs["ratings"]) == (4, 2, 8)
    store.close()


def test_alpha_pairs_with_missing_matches_hand_formula_and_library():
    n = None
    table = {"p": ["a", "b", "tie", "a", "both_bad", n, "a"],
             "q": ["a", "b", "a", n, "both_bad", "b", "b"],
             "r": [n, "b", "tie", "a", "tie", "b", n]}
    rows = [row(who, v, a=i, b=100 + i) for who, vs in table.items()
            for i, v in enumerate(vs) if v is not None]
    rows.append(row("r", "a", a=200, b=300))  # judged by one annotator only: not pairable
    pairs = next(a for a in ag.overall_alpha(rows) if a["group"] == "pairs")
    units = [list(u) for u in zip(*table.values())]
    assert pairs["alpha"] == pytest.approx(alpha_by_hand(units))
    codes = {"a": 0, "b": 1, "tie": 2, "both_bad": 3}
    data = np.array([[np.nan if v is None else codes[v] for v in vs] for vs in table.values()])
    assert pairs["alpha"] == pytest.approx(
        krippendorff.alpha(reliability_data=data, level_of_measurement="nominal"))
    assert (pairs["items"], pairs["annotators"], pairs["ratings"]) == (7, 3, 17)


def test_alpha_none_when_too_few_shared_items_or_one_category():
    one_item = [row("p", "a", a=1, b=2), row("q", "b", a=1, b=2), row("q", "a", a=3, b=4)]
    assert ag.overall_alpha(one_item)[0]["alpha"] is None
    same = [row(w, "a", a=i, b=10 + i) for w in "pq" for i in range(3)]
    assert ag.overall_alpha(same)[0]["alpha"] is None


# -- bias --------------------------------------------------------------------------------
def _side_rows(annotator, n, picks_left):
    """n decided pairs with alternating sides; picks_left(i) says whether the left one won."""
    out = []
    for i in range(n):
        side = "left" if i % 2 else "right"
        left = picks_left(i)
        verdict = "a" if left == (side == "left") else "b"
        out.append(row(annotator, verdict, a=1000 + i, b=2000 + i, a_side=side))
    return out


def test_bias_flags_left_picker_not_balanced_annotator():
    rows = _side_rows("lefty", 30, lambda i: True) + _side_rows("fair", 30, lambda i: i < 15)
    out = {b["annotator"]: b for b in ag.bias(rows)}
    lefty, fair = out["lefty"], out["fair"]
    assert (lefty["left_n"], lefty["left_share"]) == (30, 1.0)
    assert lefty["left_p"] == pytest.approx(2 * 0.5 ** 30)
    assert any(f.startswith("picks the left answer in 30 of 30 decided pairs (100%; expected 50%")
               for f in lefty["flags"])
    assert fair["left_share"] == 0.5 and fair["flags"] == []


def test_bias_side_rate_needs_enough_pairs_and_known_side():
    few = _side_rows("x", ag.MIN_RATE_N - 1, lambda i: True)
    assert ag.bias(few)[0]["flags"] == []
    unknown = [row("y", "a", a=i, b=100 + i, a_side=None) for i in range(30)]
    assert ag.bias(unknown)[0]["left_n"] == 0


def _length_rows(annotator, n, longer_wins, start):
    """n decided pairs whose answer a has 1 word and b 3 words."""
    return [row(annotator, "b" if i < longer_wins else "a", a=start + i, b=start + 500 + i,
                text_a="short", text_b="much longer answer") for i in range(n)]


def test_longer_answer_expectation_is_the_other_annotators_rate():
    # Everyone prefers longer answers 90% of the time: no one stands out.
    rows = (_length_rows("x", 50, 45, 0) + _length_rows("y", 50, 45, 1000)
            + _length_rows("z", 40, 36, 2000))
    out = {b["annotator"]: b for b in ag.bias(rows)}
    z = out["z"]
    assert z["longer_expected_from"] == "others"
    assert z["longer_expected"] == pytest.approx(90 / 100)
    assert z["longer_share"] == pytest.approx(0.9) and z["flags"] == []
    # Against an even 50% the same annotator would have been flagged.
    alone = {b["annotator"]: b for b in ag.bias(_length_rows("z", 40, 36, 0))}["z"]
    assert alone["longer_expected_from"] == "even" and alone["longer_expected"] == 0.5
    assert any("prefers the longer answer in 90% of 40 pairs (expected: 50%" in f
               for f in alone["flags"])


def test_longer_answer_flag_against_others_and_equal_lengths_ignored():
    rows = _length_rows("x", 40, 20, 0) + _length_rows("y", 40, 40, 1000)
    rows.append(row("y", "a", a=9000, b=9001, text_a="same length", text_b="equal words"))
    y = {b["annotator"]: b for b in ag.bias(rows)}["y"]
    assert y["longer_n"] == 40 and y["longer_expected"] == 0.5
    assert y["longer_expected_from"] == "others"
    assert any(f.startswith("prefers the longer answer in 100% of 40 pairs (others: 50%")
               for f in y["flags"])


def test_too_fast_flag_names_team_median():
    rows = [row("quick", "a", a=i, b=100 + i, seconds=1.0) for i in range(10)]
    rows += [row("slow", "b", a=i, b=100 + i, seconds=20.0) for i in range(11)]
    out = {b["annotator"]: b for b in ag.bias(rows)}
    assert out["quick"]["median_seconds"] == 1.0
    assert out["quick"]["team_median_seconds"] == 20.0  # pooled over all 21 judgments
    assert "median 1.0 s per judgment (team median 20.0 s)" in out["quick"]["flags"]
    assert out["slow"]["flags"] == []
    no_times = ag.bias([row("n", "a")])[0]
    assert no_times["median_seconds"] is None and no_times["flags"] == []


def test_self_consistency_from_rechecks_in_store(tmp_path):
    store = Store(tmp_path)
    items = pair_items(store, 6)
    for lo, hi in items:
        store.add_judgment("paired", lo, hi, "a", annotator="x", a_side="left")
    # Re-shown: 3 of 6 the same, one of those stored swapped (b on hi,lo == a on lo,hi).
    store.add_judgment("paired", items[0][1], items[0][0], "b", annotator="x",
                       source=ag.RECHECK_SOURCE, a_side="right")
    store.add_judgment("paired", *items[1], "a", annotator="x", source=ag.RECHECK_SOURCE)
    store.add_judgment("paired", *items[2], "a", annotator="x", source=ag.RECHECK_SOURCE)
    for lo, hi in items[3:]:
        store.add_judgment("paired", lo, hi, "b", annotator="x", source=ag.RECHECK_SOURCE)
    # A recheck of an item the annotator never judged is not counted.
    store.add_judgment("unpaired", items[0][0], None, "up", annotator="x",
                       source=ag.RECHECK_SOURCE)
    (x,) = ag.bias(store.judgments())
    assert (x["recheck_n"], x["recheck_same"], x["recheck_share"]) == (6, 3, 0.5)
    assert "agrees with themself on 3 of 6 re-shown items (50%)" in x["flags"]
    assert x["judgments"] == 6 and x["left_n"] == 6  # rechecks are not counted as votes
    store.close()


def test_self_consistency_flag_needs_enough_rechecks():
    rows = [row("x", "a", a=i, b=10 + i) for i in range(4)]
    rows += [row("x", "b", a=i, b=10 + i, source=ag.RECHECK_SOURCE) for i in range(4)]
    (x,) = ag.bias(rows)
    assert x["recheck_n"] == 4 and x["recheck_share"] == 0.0 and x["flags"] == []


# -- gold accuracy -----------------------------------------------------------------------
def test_gold_accuracy_excludes_the_gold_author_on_their_item(tmp_path):
    store = Store(tmp_path)
    items = pair_items(store, 4)
    gold = set()
    for lo, hi in items:
        gid, _ = store.add_judgment("paired", lo, hi, "a", annotator="expert",
                                    source=GOLD_CHECK_SOURCE)
        gold.add(gid)
    (lo0, hi0), (lo1, hi1), (lo2, hi2), (lo3, hi3) = items
    store.add_judgment("paired", hi0, lo0, "b", annotator="ann")  # right, stored swapped
    store.add_judgment("paired", lo1, hi1, "a", annotator="ann")  # right
    store.add_judgment("paired", lo2, hi2, "tie", annotator="ann")  # wrong
    store.add_judgment("paired", lo2, hi2, "a", annotator="ann")  # later: not their answer
    store.add_judgment("paired", lo3, hi3, "a", annotator="ann", source=ag.RECHECK_SOURCE)
    store.add_judgment("paired", lo0, hi0, "b", annotator="expert")  # they wrote the key
    rows = store.judgments()
    acc = ag.gold_accuracy(rows, gold)
    assert acc == [{"annotator": "ann", "gold_items": 3, "correct": 2, "accuracy": 2 / 3}]
    store.close()


def test_gold_items_with_conflicting_answers_are_not_tested():
    rows = [row("e1", "a", a=1, b=2, id=1), row("e2", "b", a=1, b=2, id=2),
            row("x", "a", a=1, b=2, id=3)]
    assert ag.gold_accuracy(rows, {1, 2}) == []


def test_low_accuracy_annotators():
    gold_rows = [row("expert", "a", a=i, b=100 + i, id=1000 + i) for i in range(6)]
    gold = {r["id"] for r in gold_rows}
    good = [row("good", "a", a=i, b=100 + i) for i in range(6)]
    bad = [row("bad", "b" if i < 4 else "a", a=i, b=100 + i) for i in range(6)]
    few = [row("few", "b", a=i, b=100 + i) for i in range(3)]
    rows = gold_rows + good + bad + few
    low = ag.low_accuracy_annotators(rows, gold, min_accuracy=0.7)
    assert list(low) == ["bad"]
    assert low["bad"]["gold_items"] == 6 and low["bad"]["correct"] == 2
    assert list(ag.low_accuracy_annotators(rows, gold, 0.7, min_items=3)) == ["bad", "few"]
    assert ag.low_accuracy_annotators(rows, gold, min_accuracy=0.3) == {}


# -- report ------------------------------------------------------------------------------
def test_report_is_json_and_formats(tmp_path):
    store = Store(tmp_path)
    items = pair_items(store, 12)
    gold = set()
    for i, (lo, hi) in enumerate(items):
        gid, _ = store.add_judgment("paired", lo, hi, "a", annotator="x", a_side="left",
                                    seconds_spent=0.5)
        gold.add(gid)
        store.add_judgment("paired", lo, hi, "a" if i % 3 else "b", annotator="y",
                           a_side="right", seconds_spent=12.0)
    rep = ag.report(store.judgments(), gold)
    text = json.dumps(rep, allow_nan=False)
    assert json.loads(text)["counts"] == {"judgments": 24, "annotators": 2,
                                          "shared_items": 12, "gold_items": 12}
    out = ag.format_report(rep)
    assert "Cohen's kappa" in out and "Krippendorff's alpha" in out
    assert "x: picks the left answer in 12 of 12" in out
    assert "median 0.5 s per judgment" in out
    assert "Gold answers" in out and "67%" in out
    store.close()


def test_format_report_without_shared_items():
    rep = ag.report([row("solo", "a")])
    assert rep["counts"]["shared_items"] == 0
    assert "no items judged by two or more annotators yet" in ag.format_report(rep)
    empty = ag.report([])
    assert "no items judged by two or more annotators yet" in ag.format_report(empty)
    assert json.dumps(empty, allow_nan=False)
