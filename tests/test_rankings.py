"""Ranking K answers to one prompt: the typed order, its implied pairs and pools, how the
store keeps a ranking (all or nothing, idempotent, retracted as one), the label queue's
ranking items, what training reads from them, and scoring each sequence once."""
from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from types import SimpleNamespace

import pytest

from rpo_app import rankings
from rpo_app.batches import Item as TextItem
from rpo_app.batches import count_examples, judgment_pairs, judgment_pools
from rpo_app.config import TeamSettings
from rpo_app.labelqueue import LabelQueue
from rpo_app.rankings import (
    RankingError,
    format_order,
    implied_pairs,
    labels,
    parse_order,
    pool_sides,
)
from rpo_app.store import RANK_KEY, StoreError, item_key


def _prompt(store, n, name="Prompt", family=None):
    """One prompt with n answers; returns (prompt id, answer ids in id order)."""
    pid, _ = store.add_prompt(f"{name} ({n} answers)", "test", family)
    ids = [store.add_response(pid, f"answer {k} to {name.lower()}", "test")[0] for k in range(n)]
    return pid, ids


def _text(store, rid):
    return store.response(rid)["text"]


def _ranking_rows(store, ranking_id, include_retracted=True):
    return [j for j in store.judgments(include_retracted=include_retracted)
            if j["ranking_id"] == ranking_id]


# -- 1. the typed order --------------------------------------------------------------------
@pytest.mark.parametrize("text, n, tiers", [
    ("C > A = B > D", 4, [[2], [0, 1], [3]]),
    ("  c>a=b>d ", 4, [[2], [0, 1], [3]]),
    ("cabd", 4, [[2], [0], [1], [3]]),
    ("CABD", 4, [[2], [0], [1], [3]]),
    ("c a=b d", 4, [[2], [0, 1], [3]]),
    ("c a = b d", 4, [[2], [0, 1], [3]]),
    ("B, C, A", 3, [[1], [2], [0]]),
    ("A=B=C", 3, [[0, 1, 2]]),
    ("F E D C B A", 6, [[5], [4], [3], [2], [1], [0]]),
    ("ba c", 3, [[1], [0], [2]]),
])
def test_parse_order_reads_places_and_ties(text, n, tiers):
    assert parse_order(text, n) == (tiers, False)


@pytest.mark.parametrize("text", ["none", "None", " NONE ", "none acceptable", "None is acceptable"])
def test_parse_order_none_acceptable_puts_every_answer_in_one_tier(text):
    assert parse_order(text, 4) == ([[0, 1, 2, 3]], True)
    assert parse_order(text, 3) == ([[0, 1, 2]], True)


@pytest.mark.parametrize("text, n, message", [
    ("C > A = B", 4, r"leaves out answer D\b"),
    ("A > B", 4, r"leaves out answers C(, | and )D\b"),
    ("A > B > A > B", 3, r"answers A(, | and )B (is|are) placed more than once"),
    ("A > B > C > A", 3, r"answer A is placed more than once"),
    ("A = B > b > C", 3, r"answer B is placed more than once"),
    ("A > B > C > E", 4, r"no answer E here; the answers are A, B, C, D"),
    ("abcd", 3, r"no answer D here"),
    ("", 4, r"the order is empty"),
    ("   ", 4, r"the order is empty"),
    (None, 4, r"the order is empty"),
    ("A > B; C > D", 4, r"';' is not part of an order"),
    ("A > B > C > 4", 4, r"'4' is not part of an order"),
    ("AB=C", 3, r"one letter on each side of '=' \('AB=C'\)"),
    ("A > B=CD", 4, r"one letter on each side of '='"),
    ("=A B C", 3, r"one letter on each side of '='"),
    ("A > B", 2, r"3 to 6 answers, not 2"),
    ("ABCDEFG", 7, r"3 to 6 answers, not 7"),
])
def test_parse_order_refuses_bad_orders_naming_the_problem(text, n, message):
    with pytest.raises(RankingError, match=message):
        parse_order(text, n)


def test_ranking_error_is_a_value_error_and_labels_follow_the_count():
    assert issubclass(RankingError, ValueError)
    assert labels(3) == "ABC" and labels(6) == "ABCDEF"
    for bad in (0, 2, 7):
        with pytest.raises(RankingError, match=f"not {bad}"):
            labels(bad)


def test_check_tiers_names_the_problem_with_the_given_names():
    name = lambda r: f"#{r}"
    rankings.check_tiers([[10], [11, 12]], [10, 11, 12], name)  # fine: no error
    with pytest.raises(RankingError, match="#13 is not one of the answers shown"):
        rankings.check_tiers([[10], [11, 13]], [10, 11, 12], name)
    with pytest.raises(RankingError, match="#11 is placed more than once"):
        rankings.check_tiers([[11], [10, 11], [12]], [10, 11, 12], name)
    with pytest.raises(RankingError, match="leaves out answer #12"):
        rankings.check_tiers([[11], [10]], [10, 11, 12], name)
    with pytest.raises(RankingError, match="empty place"):
        rankings.check_tiers([[11], [], [10, 12]], [10, 11, 12], name)


def test_format_order_writes_what_parse_order_reads():
    name = lambda p: rankings.LABELS[p]
    assert format_order([[2], [0, 1], [3]], name) == "C > A = B > D"
    assert format_order([[0, 1, 2]], name, none_acceptable=True) == "none acceptable"
    for text in ("C > A = B > D", "D > C > B > A", "A = B = C = D", "B = D > A = C"):
        tiers, none_ok = parse_order(text, 4)
        assert format_order(tiers, name, none_ok) == text


# -- 2. implied pairs ----------------------------------------------------------------------
def test_implied_pairs_hand_worked_example():
    # 7 best, then 3 and 9 tied, then 5 last; lower id is A in each pair.
    assert implied_pairs([[7], [3, 9], [5]]) == [
        (3, 5, "a"),    # 3 (tier 1) above 5 (tier 2)
        (3, 7, "b"),    # 7 (tier 0) above 3
        (3, 9, "tie"),  # same tier
        (5, 7, "b"),
        (5, 9, "b"),
        (7, 9, "a"),
    ]
    assert implied_pairs([[7], [3, 9], [5]], none_acceptable=True) == [
        (3, 5, "both_bad"), (3, 7, "both_bad"), (3, 9, "both_bad"),
        (5, 7, "both_bad"), (5, 9, "both_bad"), (7, 9, "both_bad")]


@pytest.mark.parametrize("k", [3, 4, 5, 6])
def test_implied_pairs_one_per_pair_of_answers(k):
    ids = [40 - 3 * i for i in range(k)]  # best first, ids falling: the higher id always wins
    pairs = implied_pairs([[r] for r in ids])
    assert len(pairs) == math.comb(k, 2) == len({(a, b) for a, b, _ in pairs})
    assert all(a < b and v == "b" for a, b, v in pairs)
    tied = implied_pairs([ids])
    assert len(tied) == math.comb(k, 2) and {v for *_, v in tied} == {"tie"}


# -- 3. pools ------------------------------------------------------------------------------
@pytest.mark.parametrize("place, n_tiers, none_ok, liked, disliked", [
    ({1: 0, 2: 1, 3: 1}, 2, False, [1], [2, 3]),             # 2 tiers: top liked, bottom not
    ({1: 0, 2: 1, 3: 2}, 3, False, [1], [3]),                # 3 tiers: middle says neither
    ({1: 1, 2: 0, 3: 2, 4: 1}, 3, False, [2], [3]),
    ({1: 0, 2: 1, 3: 2, 4: 3}, 4, False, [1, 2], [3, 4]),    # 4 tiers: upper half / lower half
    ({1: 0, 2: 1, 3: 2, 4: 3, 5: 4}, 5, False, [1, 2], [4, 5]),
    ({1: 0, 2: 0, 3: 0}, 1, False, [], []),                  # all tied: nothing learned
    ({1: 0, 2: 0, 3: 0}, 1, True, [], [1, 2, 3]),            # none acceptable: all disliked
])
def test_pool_sides(place, n_tiers, none_ok, liked, disliked):
    got = pool_sides(place, n_tiers, none_ok)
    assert (sorted(got[0]), sorted(got[1])) == (liked, disliked)


# -- 4. the store --------------------------------------------------------------------------
def test_add_ranking_stores_the_ranking_its_items_and_its_implied_pairs(store):
    pid, (a, b, c, d) = _prompt(store, 4)
    assert store.try_lease(item_key(RANK_KEY, pid), "ada")
    rid, created = store.add_ranking([[c], [b, a], [d]], "ada", shown=[b, d, a, c],
                                     seconds_spent=3.5, request_id="req-1")
    assert created
    k = store.ranking(rid)
    assert k["prompt_id"] == pid and k["prompt"] == store.prompt(pid)["text"]
    assert k["tiers"] == [[c], [a, b], [d]] and k["shown"] == [b, d, a, c]
    assert k["answers"] == {r: _text(store, r) for r in (a, b, c, d)}
    assert (k["annotator"], k["source"], k["none_acceptable"], k["seconds_spent"]) == \
        ("ada", "label", False, 3.5)
    assert k["retracted_at"] is None and store.rankings() == [k]
    assert store.ranking_by_request("req-1") == k and store.ranking_by_request("other") is None
    assert store.ranking_places() == {rid: {a: 1, b: 1, c: 0, d: 2}}
    # C(4,2) pairs, canonical (lower id is A); a_side is where A stood on screen
    # (shown order b, d, a, c).
    rows = _ranking_rows(store, rid)
    assert {(j["response_a"], j["response_b"]): (j["verdict"], j["a_side"]) for j in rows} == {
        (a, b): ("tie", "right"),
        (a, c): ("b", "left"),
        (a, d): ("a", "right"),
        (b, c): ("b", "left"),
        (b, d): ("a", "left"),
        (c, d): ("a", "right"),
    }
    assert len(rows) == 6
    assert all((j["kind"], j["annotator"], j["source"], j["retracted_at"]) ==
               ("paired", "ada", "label", None) for j in rows)
    # The lease on the prompt's ranking item is given back.
    assert store.snapshot()["leases"] == []
    stats = store.stats()
    assert stats["rankings"] == 1 and stats["ranking_pairs"] == 6
    assert store.annotator_counts("ada", 0) == {"ranking": 1}


def test_add_ranking_is_idempotent_by_request_id(store):
    _, (a, b, c) = _prompt(store, 3)
    rid, created = store.add_ranking([[a], [b], [c]], "ada", request_id="tok")
    before = store.snapshot()
    # The same request again, even with another order: the first ranking, nothing new.
    assert store.add_ranking([[c], [b], [a]], "ada", request_id="tok") == (rid, False)
    assert store.snapshot() == before
    # Without a request id a second identical ranking is a new one (no overlap asked).
    rid2, created2 = store.add_ranking([[a], [b], [c]], "ada")
    assert created and created2 and rid2 != rid


def test_none_acceptable_and_unknown_screen_order(store):
    _, (a, b, c) = _prompt(store, 3)
    rid, _ = store.add_ranking([[a, b, c]], "ada", none_acceptable=True)
    k = store.ranking(rid)
    assert k["none_acceptable"] is True and k["tiers"] == [[a, b, c]] and k["shown"] == []
    rows = _ranking_rows(store, rid)
    assert sorted((j["response_a"], j["response_b"], j["verdict"], j["a_side"]) for j in rows) == [
        (a, b, "both_bad", None), (a, c, "both_bad", None), (b, c, "both_bad", None)]


def test_annotator_counts_count_a_ranking_once(store):
    _, (x, y) = _prompt(store, 2, "Pair")
    _, ids = _prompt(store, 5, "Five")
    store.add_judgment("paired", x, y, "a", "ada")
    store.add_ranking([[r] for r in ids], "ada")
    assert store.annotator_counts("ada", 0) == {"paired": 1, "ranking": 1}
    assert store.annotator_counts("bob", 0) == {}
    stats = store.stats()
    assert stats["rankings"] == 1 and stats["ranking_pairs"] == 10
    assert store.count_judgments() == 11


@pytest.fixture
def three_prompts(store):
    """Prompts of 4, 3 and 7 answers: {"p": ids, "q": ids, "seven": ids}."""
    return {"p": _prompt(store, 4, "P")[1], "q": _prompt(store, 3, "Q")[1],
            "seven": _prompt(store, 7, "Seven")[1]}


REFUSALS = [
    ("two prompts", lambda s, p: {"tiers": [[p["p"][0]], [p["p"][1]], [p["q"][0]]]},
     "answers to one prompt; these answer different prompts"),
    ("unknown answer", lambda s, p: {"tiers": [[p["p"][0]], [p["p"][1]], [9999]]},
     "answers that do not exist: #9999"),
    ("repeated answer", lambda s, p: {"tiers": [[p["p"][0]], [p["p"][1], p["p"][2]], [p["p"][0]]]},
     "#{a} is placed more than once"),
    ("repeated in one tier", lambda s, p: {"tiers": [[p["p"][1], p["p"][1]], [p["p"][2]]]},
     "placed more than once"),
    ("two answers", lambda s, p: {"tiers": [[p["p"][0]], [p["p"][1]]]}, "3 to 6 answers, not 2"),
    ("seven answers", lambda s, p: {"tiers": [[r] for r in p["seven"]]}, "3 to 6 answers, not 7"),
    ("empty place", lambda s, p: {"tiers": [[p["p"][0]], [], [p["p"][1], p["p"][2]]]},
     "empty place"),
    ("empty annotator", lambda s, p: {"tiers": [[r] for r in p["q"]], "annotator": "  "},
     "needs an annotator"),
    ("no annotator", lambda s, p: {"tiers": [[r] for r in p["q"]], "annotator": ""},
     "needs an annotator"),
    ("shown misses one", lambda s, p: {"tiers": [[r] for r in p["q"]], "shown": p["q"][:2]},
     "leaves out answer #{q2}"),
    ("overlap exceeded", lambda s, p: (
        s.add_ranking([[r] for r in p["p"][:3]], "bob", overlap=1),
        {"tiers": [[r] for r in p["p"][1:]], "annotator": "carol", "overlap": 1})[1],
     "ranked meanwhile by someone else"),
    ("overlap 2 exceeded", lambda s, p: (
        s.add_ranking([[r] for r in p["p"][:3]], "bob", overlap=2),
        s.add_ranking([[r] for r in p["p"][:3]], "carol", overlap=2),
        {"tiers": [[p["p"][2]], [p["p"][3]], [p["p"][0]]], "annotator": "dave", "overlap": 2})[2],
     "ranked meanwhile by someone else"),
    ("same annotator twice", lambda s, p: (
        s.add_ranking([[r] for r in p["p"][:3]], "bob", overlap=2),
        {"tiers": [[r] for r in p["p"][1:]], "annotator": "bob", "overlap": 2})[1],
     "ranked some of these answers already"),
]


@pytest.mark.parametrize("setup, message", [(s, m) for _, s, m in REFUSALS],
                         ids=[name for name, *_ in REFUSALS])
def test_refused_rankings_store_nothing(store, three_prompts, setup, message):
    kwargs = {"annotator": "ada", **setup(store, three_prompts)}
    message = message.format(a=three_prompts["p"][0], q2=three_prompts["q"][2])
    before = store.snapshot()
    with pytest.raises(StoreError, match=message):
        store.add_ranking(**kwargs)
    assert store.snapshot() == before


def test_overlap_allows_k_rankers_of_one_answer(store):
    _, (a, b, c, d) = _prompt(store, 4)
    store.add_ranking([[a], [b], [c]], "bob", overlap=2)
    rid, created = store.add_ranking([[d], [c], [b]], "carol", overlap=2)  # b, c: 2nd ranking
    assert created and len(store.rankings()) == 2
    # A retracted ranking does not count against overlap or against its annotator.
    store.retract_ranking(rid, "carol")
    assert store.add_ranking([[b], [c], [d]], "carol", overlap=2)[1]


def test_next_prompts_and_open_answers_for_ranking(store):
    two, _ = _prompt(store, 2, "Two")
    three, _three_ids = _prompt(store, 3, "Three")
    five, five_ids = _prompt(store, 5, "Five")

    def ids(annotator, start=1, limit=10, min_answers=3, overlap=1, partial=False):
        return [p["id"] for p in store.next_prompts_for_ranking(annotator, start, limit,
                                                                min_answers, overlap, partial)]

    def open_ids(prompt, annotator, overlap=1):
        return [r["id"] for r in store.answers_open_for_ranking(prompt, annotator, overlap)]

    assert ids("bob") == [three, five]  # never the prompt with two answers
    assert ids("bob", min_answers=4) == [five] and ids("bob", start=five) == [five]
    assert ids("bob", limit=1) == [three] and ids("bob", partial=True, overlap=2) == []
    assert open_ids(two, "bob") == sorted(store.responses_for_prompt(two)[i]["id"] for i in (0, 1))
    rid, _ = store.add_ranking([[five_ids[4]], [five_ids[0], five_ids[2]]], "ada")
    # overlap 1: two answers of "Five" are left, too few for a ranking.
    assert ids("bob") == [three] and ids("ada") == [three]
    assert open_ids(five, "bob") == [five_ids[1], five_ids[3]]
    # overlap 2: bob may rank all five, the ones ada ranked first; ada only her two.
    assert ids("bob", overlap=2) == [three, five] and ids("bob", overlap=2, partial=True) == [five]
    assert open_ids(five, "bob", 2) == [five_ids[0], five_ids[2], five_ids[4], five_ids[1],
                                        five_ids[3]]
    assert ids("ada", overlap=2) == [three] and ids("ada", overlap=2, partial=True) == []
    assert open_ids(five, "ada", 2) == [five_ids[1], five_ids[3]]
    # A lease hides a prompt from everyone else; a skip from the one who skipped, and
    # gives the lease back.
    assert store.try_lease(item_key(RANK_KEY, three), "bob")
    assert ids("carol") == [] and ids("bob") == [three]
    store.record_skip("bob", item_key(RANK_KEY, three))
    assert ids("bob") == [] and ids("carol") == [three]
    # A retracted ranking leaves its answers open again.
    store.retract_ranking(rid, "ada")
    assert ids("carol") == [three, five] and open_ids(five, "carol") == five_ids


# -- 5. retracting -------------------------------------------------------------------------
def _one_pair_and_one_ranking(store):
    _, (x, y) = _prompt(store, 2, "Pair")
    _, ids = _prompt(store, 4, "Rank")
    jid, _ = store.add_judgment("paired", x, y, "a", "ada")
    rid, _ = store.add_ranking([[ids[2]], [ids[0], ids[1]], [ids[3]]], "ada", shown=ids)
    return jid, rid


def _assert_ranking_retracted(store, rid, jid, by):
    k = store.ranking(rid)
    assert k["retracted_at"] is not None and k["retracted_by"] == by
    rows = _ranking_rows(store, rid)
    assert len(rows) == 6 and all(j["retracted_at"] is not None and j["retracted_by"] == by
                                  for j in rows)
    assert store.rankings() == [] and store.ranking_places() == {}
    assert [j["id"] for j in store.judgments()] == [jid]  # the other judgment is untouched
    assert [j["judgment_id"] for j in store.training_judgments()] == [jid]
    stats = store.stats()
    assert stats["rankings"] == 0 and stats["ranking_pairs"] == 0
    assert store.annotator_counts("ada", 0) == {"paired": 1}


def test_retracting_one_implied_pair_retracts_the_whole_ranking(store):
    jid, rid = _one_pair_and_one_ranking(store)
    pairs = [j["id"] for j in _ranking_rows(store, rid)]
    assert store.retract(pairs[2], "lead") is True
    _assert_ranking_retracted(store, rid, jid, "lead")
    assert store.retract(pairs[0], "lead") is False  # already gone with its ranking
    assert store.retract_ranking(rid, "lead") is False
    assert store.ranking(rid)["retracted_by"] == "lead"


def test_retract_ranking(store):
    jid, rid = _one_pair_and_one_ranking(store)
    assert store.retract_ranking(rid, "ada") is True
    _assert_ranking_retracted(store, rid, jid, "ada")
    assert store.retract_ranking(rid, "ada") is False


def test_undo_last_undoes_a_whole_ranking_then_the_judgment_before(store):
    jid, rid = _one_pair_and_one_ranking(store)
    undone = store.undo_last("ada")
    assert undone["ranking_id"] == rid and undone["retracted_at"] is not None
    _assert_ranking_retracted(store, rid, jid, "ada")
    again = store.undo_last("ada")  # the ranking is one step: the next undo is the pair
    assert again["id"] == jid and again["ranking_id"] is None
    assert store.judgments() == [] and store.undo_last("ada") is None


def test_queue_undo_puts_the_ranking_item_back(store):
    pid, _ids = _prompt(store, 4)
    q = LabelQueue(store, seed=3)
    item = q.next_item("ada", "ranking")
    shown = [r["id"] for r in item.answers]
    first = q.submit_ranking(item.token, "B > A = C > D", "ada")
    assert q.next_item("ada", "ranking") is None and q.next_item("bob", "ranking") is None
    out = q.undo("ada")
    assert out["undone"]["ranking_id"] == first["ranking_id"]
    assert out["ranking"]["id"] == first["ranking_id"]
    back = out["item"]
    assert back.kind == "ranking" and back.right is None and back.source == "label"
    assert [r["id"] for r in back.answers] == shown  # same answers, same screen order
    assert back.left["id"] == shown[0] and back.lease_keys == [item_key(RANK_KEY, pid)]
    assert store.rankings() == [] and store.judgments() == []
    # It is on ada's screen again, and held for her: bob does not get it.
    assert q.next_item("ada", "ranking").token == back.token
    assert q.next_item("bob", "ranking") is None
    res = q.submit_ranking(back.token, "D > C > B > A", "ada")
    assert res["created"] and res["ranking_id"] != first["ranking_id"]
    assert res["order"] == "D > C > B > A"
    assert store.ranking(res["ranking_id"])["tiers"] == [[shown[3]], [shown[2]], [shown[1]],
                                                         [shown[0]]]


# -- 6. the label queue --------------------------------------------------------------------
def _rank_all(q, annotator, order_for=lambda n: " > ".join(labels(n))):
    """Take and rank items until none is left; returns the items."""
    items = []
    while (item := q.next_item(annotator, "ranking")) is not None:
        items.append(item)
        q.submit_ranking(item.token, order_for(len(item.answers)), annotator)
        assert len(items) <= 20
    return items


def test_ranking_items_hold_up_to_rank_size_answers_of_one_prompt(store):
    _two, _ = _prompt(store, 2, "Two")
    three, three_ids = _prompt(store, 3, "Three")
    six, six_ids = _prompt(store, 6, "Six")
    TeamSettings(gold_rate=0.0).save(store)  # rank_size: the default, 4
    q = LabelQueue(store, seed=1)
    items = _rank_all(q, "ada")
    by_prompt = {it.left["prompt_id"]: it for it in items}
    assert len(items) == 2 and set(by_prompt) == {three, six}  # never the 2-answer prompt
    for it in items:
        assert it.kind == "ranking" and it.right is None and it.left == it.answers[0]
        assert len({r["prompt_id"] for r in it.answers}) == 1
        assert len({r["id"] for r in it.answers}) == len(it.answers)
    assert {r["id"] for r in by_prompt[three].answers} == set(three_ids)
    assert len(by_prompt[six].answers) == 4 and {r["id"] for r in by_prompt[six].answers} < set(six_ids)
    # Ranked answers are not offered again (overlap 1): the 2 left of "Six" are too few.
    assert q.next_item("bob", "ranking") is None and q.next_item("ada", "ranking") is None
    assert len(store.rankings()) == 2 and store.stats()["ranking_pairs"] == 3 + 6


@pytest.mark.parametrize("rank_size", [3, 5, 6])
def test_rank_size_sets_how_many_answers_an_item_holds(store, rank_size):
    _, ids = _prompt(store, 6)
    TeamSettings(gold_rate=0.0, rank_size=rank_size).save(store)
    item = LabelQueue(store, seed=2).next_item("ada", "ranking")
    assert len(item.answers) == rank_size and {r["id"] for r in item.answers} <= set(ids)


@pytest.mark.parametrize("bad", [2, 7, 0, True, 4.0, "4"])
def test_rank_size_outside_3_to_6_is_refused(store, bad):
    with pytest.raises(ValueError, match="answers per ranking"):
        TeamSettings(rank_size=bad).validate()
    before = store.snapshot()
    with pytest.raises(ValueError, match="answers per ranking"):
        TeamSettings(rank_size=bad).save(store)
    assert store.snapshot() == before


def test_rank_size_default_and_kept_in_the_store(store):
    assert TeamSettings().rank_size == 4 and TeamSettings.load(store).rank_size == 4
    TeamSettings(rank_size=6).save(store)
    assert TeamSettings.load(store).rank_size == 6


def test_the_answers_are_shuffled_on_screen(store):
    _, ids = _prompt(store, 4)
    orders = set()
    for seed in range(12):
        item = LabelQueue(store, seed=seed).next_item(f"ann{seed}", "ranking")
        orders.add(tuple(r["id"] for r in item.answers))
        store.release_leases(f"ann{seed}")
    assert len(orders) > 3 and all(sorted(o) == ids for o in orders)


def test_with_overlap_two_a_second_annotator_ranks_the_same_answers_first(store):
    p, _p_ids = _prompt(store, 6, "Six", "cooking")
    TeamSettings(overlap=2, gold_rate=0.0).save(store)
    q = LabelQueue(store, seed=0)
    first = q.next_item("ada", "ranking")
    ada_set = {r["id"] for r in first.answers}
    assert first.left["prompt_id"] == p and len(ada_set) == 4
    q.submit_ranking(first.token, "A > B > C > D", "ada")
    f, f_ids = _prompt(store, 4, "Fresh", "travel")  # a fresh prompt comes in
    # bob gets ada's four answers (partial first), not the fresh prompt nor the other two.
    second = q.next_item("bob", "ranking")
    assert {r["id"] for r in second.answers} == ada_set
    q.submit_ranking(second.token, "D > C = B > A", "bob")
    # carol: those four have their two rankings, and two answers left are too few; the
    # fresh prompt is what is left for her.
    third = q.next_item("carol", "ranking")
    assert third.left["prompt_id"] == f
    q.submit_ranking(third.token, "none", "carol")
    # Now dave completes the fresh prompt (partial), and then nobody gets anything.
    fourth = q.next_item("dave", "ranking")
    assert {r["id"] for r in fourth.answers} == set(f_ids)
    q.submit_ranking(fourth.token, "A = B > C = D", "dave")
    for name in ("ada", "bob", "carol", "dave", "eve"):
        assert q.next_item(name, "ranking") is None, name
    per_answer = {}
    for k in store.rankings():
        for r in k["answers"]:
            per_answer.setdefault(r, []).append(k["annotator"])
    assert all(len(v) == 2 and len(set(v)) == 2 for v in per_answer.values()), per_answer
    assert set(per_answer) == ada_set | set(f_ids)


def test_two_annotators_at_once_never_get_the_same_prompt_and_skip_works(store):
    p1, _ = _prompt(store, 3, "One")
    p2, _ = _prompt(store, 3, "Two")
    TeamSettings(gold_rate=0.0).save(store)
    q = LabelQueue(store, seed=4)
    a = q.next_item("ada", "ranking")
    b = q.next_item("bob", "ranking")
    assert {a.left["prompt_id"], b.left["prompt_id"]} == {p1, p2}
    assert q.next_item("carol", "ranking") is None  # both held
    assert q.next_item("ada", "ranking").token == a.token  # a reload keeps ada's item
    q.skip(a.token, "ada")
    assert q.item(a.token) is None
    assert store.judgments() == [] and store.rankings() == []  # a skip is not a ranking
    # The skipped prompt is not offered to ada again, but is free for others at once.
    assert q.next_item("ada", "ranking") is None
    c = q.next_item("carol", "ranking")
    assert c.left["prompt_id"] == a.left["prompt_id"]
    q.submit_ranking(c.token, "C > B > A", "carol")
    q.submit_ranking(b.token, "A = B = C", "bob")
    assert q.next_item("ada", "ranking") is None and q.next_item("dave", "ranking") is None
    assert {k["annotator"] for k in store.rankings()} == {"carol", "bob"}


def test_concurrent_annotators_rank_each_answer_exactly_overlap_times(store):
    seeded = dict(_prompt(store, 4, f"P{i}", f"fam{i % 3}") for i in range(6))
    TeamSettings(overlap=2, gold_rate=0.0).save(store)
    q = LabelQueue(store, seed=11)
    holders: dict[int, str] = {}  # prompt -> who has it on screen now
    clashes, errors, seen = [], [], {}
    lock = threading.Lock()
    busy = {"n": 4}

    def work(name):
        try:
            idle = False
            while True:
                item = q.next_item(name, "ranking")
                if item is None:  # maybe someone holds the last items: ask again
                    with lock:
                        if not idle:
                            idle, busy["n"] = True, busy["n"] - 1
                        if busy["n"] == 0:
                            return
                    time.sleep(0.005)
                    continue
                pid = item.left["prompt_id"]
                with lock:
                    if idle:
                        idle, busy["n"] = False, busy["n"] + 1
                    if pid in holders:
                        clashes.append((pid, holders[pid], name))
                    holders[pid] = name
                    seen.setdefault(name, []).append(pid)
                time.sleep(0.002)
                with lock:  # before the lease is given back, so no false clash
                    holders.pop(pid, None)
                q.submit_ranking(item.token, " > ".join(labels(len(item.answers))), name)
        except Exception as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)
            with lock:  # nobody waits for a thread that failed
                if not idle:
                    busy["n"] -= 1

    threads = [threading.Thread(target=work, args=(f"ann{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and not clashes, (errors, clashes)
    assert all(len(v) == len(set(v)) for v in seen.values()), seen
    rankers: dict[int, list[str]] = {}
    for k in store.rankings():
        for r in k["answers"]:
            rankers.setdefault(r, []).append(k["annotator"])
    assert set(rankers) == {r for ids in seeded.values() for r in ids}
    assert all(len(v) == 2 and len(set(v)) == 2 for v in rankers.values()), rankers
    assert len(store.rankings()) == 12 and store.stats()["ranking_pairs"] == 12 * 6


def test_bad_order_keeps_the_item_open_then_a_good_one_stores_it(store):
    _pid, _ids = _prompt(store, 4)
    q = LabelQueue(store, seed=5)
    item = q.next_item("ada", "ranking")
    shown = [r["id"] for r in item.answers]
    before = store.snapshot()
    for bad, message in [("A > B > C", "leaves out answer D"), ("A > B > C > E", "no answer E"),
                         ("A > A > B > C", "A is placed more than once"), ("", "empty"),
                         ("1 > 2 > 3 > 4", "'1' is not part of an order")]:
        with pytest.raises(RankingError, match=message):
            q.submit_ranking(item.token, bad, "ada")
        assert q.item(item.token) is item
    assert store.snapshot() == before
    assert q.next_item("ada", "ranking").token == item.token
    assert q.next_item("bob", "ranking") is None  # still held for ada
    res = q.submit_ranking(item.token, "d > b=c > a", "ada", seconds_spent=4.0)
    assert res["created"] and res["pairs"] == 6 and res["order"] == "D > B = C > A"
    k = store.ranking(res["ranking_id"])
    assert k["tiers"] == [[shown[3]], sorted(shown[1:3]), [shown[0]]]
    assert k["shown"] == shown and k["seconds_spent"] == 4.0 and k["request_id"] == item.token
    assert q.item(item.token) is None
    # A double click: the first ranking, nothing new.
    after = store.snapshot()
    again = q.submit_ranking(item.token, "A > B > C > D", "ada")
    assert again == {**res, "created": False}
    assert store.snapshot() == after
    with pytest.raises(ValueError, match="no longer open"):
        q.submit_ranking("no-such-token", "A > B > C > D", "ada")


def test_none_acceptable_through_the_queue(store):
    _, ids = _prompt(store, 3)
    q = LabelQueue(store, seed=6)
    item = q.next_item("ada", "ranking")
    res = q.submit_ranking(item.token, "None is acceptable", "ada")
    assert res["order"] == "none acceptable" and res["pairs"] == 3
    k = store.ranking(res["ranking_id"])
    assert k["none_acceptable"] is True and k["tiers"] == [sorted(ids)]
    assert {j["verdict"] for j in store.judgments()} == {"both_bad"}


def test_a_verdict_is_refused_on_a_ranking_item_and_an_order_on_a_pair(store):
    _, _ = _prompt(store, 3, "Rank")
    q = LabelQueue(store, seed=7)
    item = q.next_item("ada", "ranking")
    for verdict in ("left", "tie", "up"):
        with pytest.raises(ValueError, match="submit_ranking"):
            q.submit(item.token, verdict, "ada")
    assert q.item(item.token) is item and store.judgments() == []
    q.skip(item.token, "ada")
    _prompt(store, 2, "Pair")
    pair = q.next_item("ada", "paired")
    assert pair.kind == "paired"
    with pytest.raises(ValueError, match="judge it with a verdict"):
        q.submit_ranking(pair.token, "A > B", "ada")
    assert q.item(pair.token) is pair and store.rankings() == []


def test_ranked_meanwhile_by_someone_else_drops_the_item(store):
    _, ids = _prompt(store, 3)
    q = LabelQueue(store, seed=8)
    item = q.next_item("ada", "ranking")
    store.add_ranking([[r] for r in ids], "bob", overlap=1)  # e.g. after ada's lease expired
    before = store.snapshot()
    with pytest.raises(StoreError, match="ranked meanwhile"):
        q.submit_ranking(item.token, "A > B > C", "ada")
    assert store.snapshot()["rankings"] == before["rankings"]
    assert q.item(item.token) is None and q.next_item("ada", "ranking") is None


def test_public_shows_labelled_answers_in_screen_order(store):
    pid, ids = _prompt(store, 5)
    TeamSettings(gold_rate=0.0, rank_size=5).save(store)
    item = LabelQueue(store, seed=9).next_item("ada", "ranking")
    pub = json.loads(json.dumps(item.public()))  # also: plain JSON
    assert pub["kind"] == "ranking" and pub["token"] == item.token and pub["right"] is None
    assert [x["label"] for x in pub["answers"]] == ["A", "B", "C", "D", "E"]
    assert [x["response_id"] for x in pub["answers"]] == [r["id"] for r in item.answers]
    assert sorted(x["response_id"] for x in pub["answers"]) == ids
    assert all(x["text"] == _text(store, x["response_id"]) and x["prompt_id"] == pid
               and x["prompt"] == store.prompt(pid)["text"] for x in pub["answers"])
    assert pub["left"]["response_id"] == pub["answers"][0]["response_id"]
    # Other kinds carry no answers list.
    _prompt(store, 2, "Pair")
    pair = LabelQueue(store, seed=9).next_item("bob", "paired")
    assert "answers" not in pair.public()


# -- 7. what training reads ----------------------------------------------------------------
def _training_store(store):
    """Four rankings and two single judgments; returns texts by name."""
    t = {}
    _p1, (a, b, c, d) = _prompt(store, 4, "Tiers3")       # C > A = B > D: 3 tiers
    store.add_ranking([[c], [a, b], [d]], "ada")
    _p2, (e, f, g, h) = _prompt(store, 4, "Strict")       # H > E > G > F: 4 tiers
    store.add_ranking([[h], [e], [g], [f]], "bob")
    _p3, (i, j, k) = _prompt(store, 3, "Nothing")         # none acceptable
    store.add_ranking([[i, j, k]], "ada", none_acceptable=True)
    _p4, (l, m, n) = _prompt(store, 3, "AllTied")         # one tier: nothing to learn
    store.add_ranking([[l, m, n]], "ada")
    _p5, (x, y) = _prompt(store, 2, "Pair")
    store.add_judgment("paired", x, y, "b", "ada")
    store.add_judgment("unpaired", x, None, "down", "ada")
    named = {"a": a, "b": b, "c": c, "d": d, "e": e, "f": f, "g": g, "h": h, "i": i, "j": j,
             "k": k, "l": l, "m": m, "n": n, "x": x, "y": y}
    for name, rid in named.items():
        r = store.response(rid)
        t[name] = TextItem(r["prompt"], r["text"])
    return t


def test_training_judgments_carry_each_sides_tier(store):
    _training_store(store)
    rows = store.training_judgments()
    assert len(rows) == 6 + 6 + 3 + 3 + 2
    ranked = [j for j in rows if "ranking_id" in j]
    assert len(ranked) == 18 and all(j["kind"] == "paired" for j in ranked)
    places = store.ranking_places()
    by_id = {r["id"]: r for r in store.judgments()}
    for j in ranked:
        row = by_id[j["judgment_id"]]
        place = places[j["ranking_id"]]
        assert (j["tier_a"], j["tier_b"]) == (place[row["response_a"]], place[row["response_b"]])
        assert j["ranking_tiers"] == len(set(place.values()))
    assert sorted({(j["ranking_id"], j["ranking_tiers"]) for j in ranked}) == [
        (1, 3), (2, 4), (3, 1), (4, 1)]
    # Filters still apply to ranking pairs.
    assert all("ranking_id" not in j for j in store.training_judgments(kinds=["unpaired"]))
    assert {j["ranking_id"] for j in store.training_judgments(annotators=["bob"])} == {2}


def _key(pair):
    return (pair.chosen, pair.rejected)


def test_pairs_from_rankings_are_the_strict_ones_only(store):
    t = _training_store(store)
    pairs = judgment_pairs(store.training_judgments())
    assert sorted(map(_key, pairs), key=repr) == sorted([
        (t["c"], t["a"]), (t["c"], t["b"]), (t["c"], t["d"]), (t["a"], t["d"]), (t["b"], t["d"]),
        (t["h"], t["e"]), (t["h"], t["g"]), (t["h"], t["f"]), (t["e"], t["g"]), (t["e"], t["f"]),
        (t["g"], t["f"]),
        (t["y"], t["x"]),  # the plain pair
    ], key=repr)
    assert all(p.kind == "paired" for p in pairs)
    assert count_examples(store.training_judgments(), "rpo-paired") == (12, 12)
    assert count_examples(store.training_judgments(), "dpo") == (12, 12)


def test_pools_take_each_ranked_answer_once_by_its_tier(store):
    t = _training_store(store)
    chosen, rejected = judgment_pools(store.training_judgments())
    # Tiers3: C liked, D disliked, the tied middle (A, B) says neither.
    # Strict: H, E liked; G, F disliked. Nothing: I, J, K disliked. AllTied: nothing.
    # The pair: y liked, x disliked; the thumb: x disliked.
    assert sorted(chosen, key=repr) == sorted([t["c"], t["h"], t["e"], t["y"]], key=repr)
    assert sorted(rejected, key=repr) == sorted(
        [t["d"], t["g"], t["f"], t["i"], t["j"], t["k"], t["x"], t["x"]], key=repr)
    for loss in ("kto", "rpo-unpaired"):
        assert count_examples(store.training_judgments(), loss) == (4, 8)


def test_pools_of_a_ranking_follow_pool_sides_for_any_order(store):
    """Every order of 5 answers that the typed syntax allows a few of: the pools are
    exactly what pool_sides says for the stored tiers, each answer at most once."""
    _, ids = _prompt(store, 5)
    texts = {r: TextItem(store.response(r)["prompt"], _text(store, r)) for r in ids}
    for n, order in enumerate(["A > B > C > D > E", "A = B > C > D = E", "E > A = B = C = D",
                               "A = B = C = D > E", "C > B = D > A = E", "B > A > C = D = E"]):
        tiers, _ = parse_order(order, 5)
        rid, _ = store.add_ranking([[ids[p] for p in tier] for tier in tiers], f"ann{n}")
        rows = [j for j in store.training_judgments() if j["ranking_id"] == rid]
        chosen, rejected = judgment_pools(rows)
        liked, disliked = pool_sides(store.ranking_places()[rid], len(tiers))
        assert sorted(chosen, key=repr) == sorted((texts[r] for r in liked), key=repr), order
        assert sorted(rejected, key=repr) == sorted((texts[r] for r in disliked), key=repr), order
        assert len(set(chosen) | set(rejected)) == len(chosen) + len(rejected)
        assert count_examples(rows, "kto") == (len(liked), len(disliked))


def test_retracted_rankings_are_not_trained_on(store):
    _training_store(store)
    for k in store.rankings():
        store.retract_ranking(k["id"], "lead")
    rows = store.training_judgments()
    assert len(rows) == 2 and all("ranking_id" not in j for j in rows)
    assert count_examples(rows, "kto") == (1, 2)


# -- 8. a real (tiny) run on rankings alone ------------------------------------------------
def _ranking_only_store(store):
    topics = ["cats", "the ocean", "bread", "the moon", "coffee", "chess"]
    for n, topic in enumerate(topics):
        pid, _ = store.add_prompt(f"Tell me one short fact about {topic}.", "test")
        ids = [store.add_response(pid, text, "test")[0] for text in (
            f"A short fact: {topic} appear in many old stories.", "I do not know.",
            f"{topic.capitalize()} exist.", "asdf qwerty")]
        if n == 5:
            store.add_ranking([ids[:3]], "tester", none_acceptable=True)
        else:
            store.add_ranking([[ids[0]], [ids[2]], [ids[1], ids[3]]] if n % 2 else
                              [[ids[0]], [ids[2]], [ids[1]], [ids[3]]], "tester")


@pytest.mark.slow
@pytest.mark.parametrize("loss, start", [("rpo-paired", math.log(2)), ("kto", 0.5)])
def test_training_on_rankings_only(tmp_path, store, data_dir, tiny_model_dir, loss, start):
    from rpo_app.runfolder import RunFolder, read_jsonl
    from rpo_app.train import main

    _ranking_only_store(store)
    rows = store.training_judgments()
    assert rows and all("ranking_id" in j for j in rows)
    out = tmp_path / loss
    settings = {"loss": loss, "max-steps": 2, "batch-size": 4, "max-length": 96,
                "max-prompt-length": 48, "eval-every": 0, "sample-every": 0, "save-every": 0,
                "sample-max-new-tokens": 4, "weighting": "uniform", "cpu-threads": 1,
                "eval-fraction": 0}
    argv = ["--out", str(out), "--model", str(tiny_model_dir), "--data-dir", str(data_dir),
            "--device", "cpu"]  # no --judgments: the store
    for k, v in settings.items():
        argv += [f"--{k}", str(v)]
    assert main(argv) == 0
    st = RunFolder(out, writable=False).status().to_dict()
    assert st["state"] == "finished" and st["step"] == 2 and st["error"] is None
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(math.isfinite(m["loss"]) for m in metrics)
    # Step 1 sees the untouched model: the loss is its value at zero reward.
    assert metrics[0]["loss"] == pytest.approx(start, rel=1e-4)
    # The run's copy of its judgments keeps the ranking fields (a resume reads them).
    saved = read_jsonl(out / "judgments.jsonl")
    assert len(saved) == len(rows) and all("tier_a" in j and "ranking_tiers" in j for j in saved)


# -- 9. each sequence scored once ----------------------------------------------------------
@pytest.fixture(scope="module")
def small_lm():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _seqs():
    from rpo_app.batches import Seq

    return [Seq(tuple(range(3, 15)), 5, 0),              # 12 tokens, 7 scored
            Seq((4, 9, 11, 30, 31, 32, 33), 3, 0),       # shorter: padded in a batch
            Seq(tuple(range(40, 60)), 6, 0),             # the longest
            Seq((7, 8, 9, 50, 51, 52, 53, 54, 55), 4, 0)]


@pytest.mark.parametrize("by_mask", [False, True])
def test_scoring_a_sequence_twice_gives_what_scoring_it_once_gives(small_lm, by_mask):
    import torch

    from rpo_app.scoring import keeps_logits_by_mask, sequence_logps

    if by_mask and not keeps_logits_by_mask(small_lm):
        pytest.skip("this transformers' Llama has no boolean logits_to_keep")
    s = _seqs()
    with torch.no_grad():
        dup = sequence_logps(small_lm, [s[0], s[0], s[1], s[2], s[1]], 0, "cpu", by_mask)
        once = sequence_logps(small_lm, [s[0], s[1], s[2]], 0, "cpu", by_mask)
        alone = torch.stack([sequence_logps(small_lm, [q], 0, "cpu", by_mask)[0] for q in s[:3]])
    assert torch.allclose(dup, once[[0, 0, 1, 2, 1]], atol=1e-4)
    assert torch.allclose(once, alone, atol=1e-4)
    assert (once < 0).all() and len(set(once.tolist())) == 3  # real, distinct scores


def _fake_trainer(model, seqs, loss):
    import torch

    from rpo_app import scoring
    from rpo_app.batches import PreferenceData
    from rpo_app.loss_registry import get_loss
    from rpo_app.train import Trainer
    from rpo_app.trainconfig import TrainConfig

    t = Trainer.__new__(Trainer)  # only what batch_loss reads
    t.step_scorer = scoring.sequence_logps  # the trainer's
    t.acc = SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"),
                            autocast=contextlib.nullcontext)
    t.world, t.model, t.pad_id, t.keep_by_mask = 1, model, 0, False
    t.train_data = PreferenceData(seqs=list(seqs))
    t.spec = get_loss(loss)
    t.pool = t.spec.pools
    t.cfg = TrainConfig(loss=loss, weighting="uniform", beta=1.0)
    return t


@pytest.mark.parametrize("loss", ["rpo-paired", "dpo", "kto"])
def test_batch_loss_scores_each_sequence_once_with_the_same_loss_and_gradient(
        small_lm, monkeypatch, loss):
    import torch

    from rpo_app import scoring

    seqs = _seqs()
    # A ranking 0 > 1 > 2 > 3 in one batch: answer 0 chosen three times, 1 and 2 both
    # chosen and rejected.
    chosen, rejected = [0, 0, 0, 1, 1, 2], [1, 2, 3, 2, 3, 3]
    torch.manual_seed(1)
    ref = -20 + torch.randn(len(seqs))
    trainer = _fake_trainer(small_lm, seqs, loss)

    calls = []
    real = scoring.sequence_logps

    def spy(model, batch, *args, **kwargs):
        calls.append(list(batch))
        return real(model, batch, *args, **kwargs)

    monkeypatch.setattr(scoring, "sequence_logps", spy)
    trainer.step_scorer = spy
    small_lm.zero_grad()
    got, _metrics = trainer.batch_loss(chosen, rejected, ref=ref, emb=None)
    got.backward()
    grad = small_lm.model.embed_tokens.weight.grad.clone()
    assert len(calls) == 1 and calls[0] == seqs  # 4 unique sequences, not 12

    # The same loss with every side scored separately (no sharing at all).
    small_lm.zero_grad()
    pc = torch.stack([real(small_lm, [seqs[i]], 0, "cpu", False)[0] for i in chosen])
    pr = torch.stack([real(small_lm, [seqs[i]], 0, "cpu", False)[0] for i in rejected])
    keep = None
    if trainer.spec.contrasts_batch:  # the same contrasts: a sequence is never its own rival
        from rpo_app.batches import contrast_keep

        keep = contrast_keep(chosen, rejected, trainer.train_data.beats, aligned=True)
        assert not keep[3, 0] and not keep[5, 3]  # 1 over 1, 2 over 2
    want = trainer.spec.compute(pc, pr, ref[chosen], ref[rejected], beta=1.0,
                                settings=trainer.cfg, keep=keep)
    want.backward()
    assert torch.isfinite(got) and torch.allclose(got, want, atol=1e-4), (got, want)
    assert grad.abs().sum() > 0
    assert torch.allclose(grad, small_lm.model.embed_tokens.weight.grad, atol=1e-4)
    small_lm.zero_grad()
