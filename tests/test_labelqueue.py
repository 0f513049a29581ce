"""The label queue on a real store: what comes next, leases, sides, and how a click
becomes a stored judgment (idempotent, undoable, skip is not a judgment)."""
from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from rpo_app import store as store_module
from rpo_app.labelqueue import LabelQueue


def _seed(store, n_prompts, answers, families=("cooking", "travel", "coding", "health"),
          prefix="Prompt"):
    """n_prompts prompts, each with `answers` fixed answers; returns {prompt_id: [resp ids]}."""
    out = {}
    for i in range(n_prompts):
        fam = families[i % len(families)] if families else None
        pid, _ = store.add_prompt(f"{prefix} {i} ({fam})", "test", fam)
        out[pid] = [store.add_response(pid, f"answer {k} to {prefix.lower()} {i}", "test")[0]
                    for k in range(answers)]
    return out


def _pair(item):
    return tuple(sorted((item.left["id"], item.right["id"])))


def _active(store):
    return store.judgments()


# -- choosing -------------------------------------------------------------------------------
def test_unlabeled_prompts_come_before_second_pairs_of_labeled_ones(store):
    seeded = _seed(store, 4, 3)  # 4 prompts x 3 answers = 12 pairs
    q = LabelQueue(store, seed=1)
    seen_prompts, pairs = [], []
    while (item := q.next_item("ann")) is not None:
        assert item.kind == "paired" and item.right is not None
        assert item.left["prompt_id"] == item.right["prompt_id"]
        seen_prompts.append(item.left["prompt_id"])
        pairs.append(_pair(item))
        q.submit(item.token, "left", "ann")
        assert len(pairs) <= 12
    assert len(pairs) == 12 and len(set(pairs)) == 12  # every pair once, then nothing
    # The first four items cover the four prompts (nothing labeled twice before all once).
    assert sorted(seen_prompts[:4]) == sorted(seeded)
    # A second annotator now gets nothing: every pair has an active judgment.
    assert q.next_item("other") is None


def test_a_second_annotator_also_gets_unlabeled_prompts_first(store):
    _seed(store, 3, 3)
    q = LabelQueue(store, seed=2)
    first = q.next_item("a")
    q.submit(first.token, "tie", "a")
    got = []
    for _ in range(2):
        item = q.next_item("b")
        got.append(item.left["prompt_id"])
        q.submit(item.token, "tie", "b")
    assert first.left["prompt_id"] not in got and len(set(got)) == 2


def test_sides_are_randomised_and_left_right_map_to_stored_a_b(store):
    seeded = _seed(store, 40, 2, families=None)
    q = LabelQueue(store, seed=0)
    orders = Counter()
    winners_shown, verdicts = {}, {}
    for n in range(40):
        item = q.next_item("ann")
        lo = min(item.left["id"], item.right["id"])
        orders["lower-left" if item.left["id"] == lo else "lower-right"] += 1
        verdict = "left" if n % 2 == 0 else "right"
        res = q.submit(item.token, verdict, "ann")
        assert res["created"] is True
        winner = item.left if verdict == "left" else item.right
        winners_shown[res["judgment_id"]] = (winner["id"], item.left["id"])
        verdicts[res["judgment_id"]] = verdict
    assert q.next_item("ann") is None
    # Both orders appear (random sides), neither very rarely.
    assert orders["lower-left"] >= 8 and orders["lower-right"] >= 8, orders
    rows = _active(store)
    assert len(rows) == 40 and {r["prompt_a_id"] for r in rows} == set(seeded)
    for r in rows:
        winner_id, left_id = winners_shown[r["id"]]
        # Canonical order: A is the lower id; a_side is where A was actually shown.
        assert r["response_a"] < r["response_b"]
        assert r["a_side"] == ("left" if r["response_a"] == left_id else "right")
        # The stored verdict names the response that was clicked.
        stored_winner = r["response_a"] if r["verdict"] == "a" else r["response_b"]
        assert r["verdict"] in ("a", "b") and stored_winner == winner_id, (r, verdicts[r["id"]])
        assert r["kind"] == "paired" and r["strength"] is None and r["source"] == "label"
        assert r["seconds_spent"] is not None and r["seconds_spent"] >= 0


def test_tie_both_bad_and_strength(store):
    _seed(store, 4, 2)
    q = LabelQueue(store, seed=3)
    stored = {}
    for verdict, strength in [("tie", "clearly"), ("both_bad", "slightly"),
                              ("right", "slightly"), ("left", None)]:
        item = q.next_item("ann")
        res = q.submit(item.token, verdict, "ann", strength=strength, seconds_spent=2.5)
        stored[verdict] = (store.judgment(res["judgment_id"]), item)
    assert stored["tie"][0]["verdict"] == "tie" and stored["tie"][0]["strength"] is None
    assert stored["both_bad"][0]["verdict"] == "both_bad"
    assert stored["both_bad"][0]["strength"] is None  # strength only for a/b
    right, item = stored["right"]
    assert right["strength"] == "slightly" and right["seconds_spent"] == 2.5
    assert (right["response_a"] if right["verdict"] == "a" else right["response_b"]) == \
        item.right["id"]
    assert stored["left"][0]["strength"] is None
    # A bad strength is refused by the store, and nothing is written.
    _seed(store, 1, 2, prefix="Extra")
    item = q.next_item("ann")
    with pytest.raises(ValueError, match="strength"):
        q.submit(item.token, "left", "ann", strength="very")
    assert store.count_judgments() == 4


def test_double_submit_with_the_same_token_stores_one_judgment(store):
    _seed(store, 2, 2)
    q = LabelQueue(store)
    item = q.next_item("ann")
    first = q.submit(item.token, "left", "ann")
    again = q.submit(item.token, "left", "ann")
    other_verdict = q.submit(item.token, "right", "ann")  # a late second click
    assert first["created"] is True
    assert again == other_verdict == {"judgment_id": first["judgment_id"], "created": False}
    assert store.count_judgments(include_retracted=True) == 1
    assert store.judgment(first["judgment_id"])["request_id"] == item.token


def test_concurrent_double_submit_stores_one_judgment(store):
    _seed(store, 1, 2)
    q = LabelQueue(store)
    item = q.next_item("ann")
    results, barrier = [], threading.Barrier(4)

    def click():
        barrier.wait()
        results.append(q.submit(item.token, "left", "ann"))

    threads = [threading.Thread(target=click) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r["judgment_id"] for r in results}) == 1
    assert sum(r["created"] for r in results) == 1
    assert store.count_judgments(include_retracted=True) == 1


def test_skip_stores_nothing_and_hides_the_item_from_that_annotator_only(store):
    seeded = _seed(store, 2, 2)
    q = LabelQueue(store, seed=4)
    item = q.next_item("ann")
    skipped_prompt = item.left["prompt_id"]
    q.skip(item.token, "ann")
    assert store.count_judgments(include_retracted=True) == 0
    nxt = q.next_item("ann")
    assert nxt is not None and nxt.left["prompt_id"] != skipped_prompt
    q.submit(nxt.token, "tie", "ann")
    assert q.next_item("ann") is None  # the skipped one is not offered again
    # ...but another annotator gets it (the skip also freed the lease).
    other = q.next_item("bob")
    assert other is not None and other.left["prompt_id"] == skipped_prompt
    assert set(seeded) == {skipped_prompt, nxt.left["prompt_id"]}
    # Skipping an unknown or already judged token is a no-op.
    q.skip("no-such-token", "ann")
    q.skip(nxt.token, "ann")
    assert store.count_judgments() == 1


def test_annotators_never_share_a_leased_item(store):
    _seed(store, 3, 2)
    q = LabelQueue(store, seed=5)
    items = {name: q.next_item(name) for name in ("a", "b", "c")}
    assert len({it.left["prompt_id"] for it in items.values()}) == 3
    assert q.next_item("d") is None  # all three prompts are leased
    # The lease holder still resumes their own item.
    assert q.next_item("a").token == items["a"].token


def test_many_threads_never_judge_the_same_pair_twice(store):
    _seed(store, 30, 3, families=("x", "y", "z"))  # 90 pairs
    q = LabelQueue(store)
    done: dict[str, list] = {}
    errors = []

    def annotator(name):
        mine = done.setdefault(name, [])
        try:
            while (item := q.next_item(name)) is not None:
                res = q.submit(item.token, "left" if len(mine) % 2 else "right", name)
                assert res["created"]
                mine.append(_pair(item))
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=annotator, args=(f"t{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    all_pairs = [p for pairs in done.values() for p in pairs]
    assert len(all_pairs) == 90 and len(set(all_pairs)) == 90
    rows = _active(store)
    assert len(rows) == 90
    assert len({(r["response_a"], r["response_b"]) for r in rows}) == 90
    assert store.integrity_check() == "ok"


def test_an_expired_lease_frees_the_item(store, monkeypatch):
    _seed(store, 1, 2)
    q = LabelQueue(store)
    held = q.next_item("a")
    assert q.next_item("b") is None
    later = time.time() + store_module.LEASE_SECONDS + 5
    monkeypatch.setattr(store_module, "_now", lambda: later)
    taken = q.next_item("b")
    assert taken is not None and _pair(taken) == _pair(held)


def test_undo_retracts_and_reoffers_the_same_item_with_the_same_sides(store):
    _seed(store, 3, 2)
    q = LabelQueue(store, seed=6)
    first = q.next_item("ann")
    res = q.submit(first.token, "right", "ann", strength="clearly")
    q.next_item("ann")  # the next item is on screen when the annotator hits undo
    out = q.undo("ann")
    assert out["undone"]["id"] == res["judgment_id"]
    row = store.judgment(res["judgment_id"])
    assert row["retracted_at"] is not None and row["retracted_by"] == "ann"
    assert store.count_judgments() == 0 and store.count_judgments(include_retracted=True) == 1
    back = out["item"]
    assert (back.left["id"], back.right["id"]) == (first.left["id"], first.right["id"])
    assert back.kind == "paired" and back.token != first.token
    # The re-offered item is what next_item (a page reload) shows now.
    assert q.next_item("ann").token == back.token
    # Nobody else can take it while it is back on the annotator's screen.
    other = q.next_item("bob")
    assert other is None or other.left["prompt_id"] != first.left["prompt_id"]
    res2 = q.submit(back.token, "left", "ann")
    again = store.judgment(res2["judgment_id"])
    assert (again["response_a"] if again["verdict"] == "a" else again["response_b"]) == \
        first.left["id"]
    assert store.count_judgments() == 1 and store.count_judgments(include_retracted=True) == 2
    # Undo with nothing left to undo.
    q.undo("ann")
    assert q.undo("ann") is None


def test_undo_of_a_thumb_reoffers_the_single_answer(store):
    _seed(store, 2, 1)
    q = LabelQueue(store)
    item = q.next_item("ann", "unpaired")
    q.submit(item.token, "down", "ann")
    out = q.undo("ann")
    assert out["item"].kind == "unpaired" and out["item"].right is None
    assert out["item"].left["id"] == item.left["id"]
    assert q.next_item("ann", "unpaired").token == out["item"].token


def test_reload_resumes_the_same_item(store):
    _seed(store, 5, 2)
    q = LabelQueue(store)
    a = q.next_item("ann")
    b = q.next_item("ann")
    assert a.token == b.token and q.item(a.token) is a
    # A different mode drops it and shows something of that mode.
    assert q.next_item("ann", "unpaired").kind == "unpaired"


def test_unpaired_thumbs(store):
    seeded = _seed(store, 3, 1)
    q = LabelQueue(store, seed=7)
    assert q.next_item("ann", "paired") is None  # one answer per prompt: no pairs
    seen = []
    for verdict in ("up", "down", "up"):
        item = q.next_item("ann", "unpaired")
        assert item.kind == "unpaired" and item.right is None
        assert item.public()["right"] is None and item.public()["left"]["text"]
        with pytest.raises(ValueError, match="'up' or 'down'"):
            q.submit(item.token, "left", "ann")
        res = q.submit(item.token, verdict, "ann")
        row = store.judgment(res["judgment_id"])
        assert (row["kind"], row["verdict"], row["response_a"], row["response_b"],
                row["a_side"], row["strength"]) == (
            "unpaired", verdict, item.left["id"], None, None, None)
        seen.append(item.left["id"])
    assert sorted(seen) == sorted(r for rs in seeded.values() for r in rs)
    assert q.next_item("ann", "unpaired") is None


def test_a_pair_refuses_thumb_verdicts(store):
    _seed(store, 1, 2)
    q = LabelQueue(store)
    item = q.next_item("ann")
    with pytest.raises(ValueError, match="'left', 'right', 'tie' or 'both_bad'"):
        q.submit(item.token, "up", "ann")
    assert store.count_judgments(include_retracted=True) == 0


def test_mixed_mode_without_an_index_serves_pairs_and_thumbs(store):
    _seed(store, 6, 2, prefix="Paired")
    _seed(store, 6, 1, prefix="Single")
    q = LabelQueue(store, seed=8)
    kinds = Counter()
    for _ in range(14):
        item = q.next_item("ann", "mixed")
        if item is None:
            break
        # Resuming in mixed mode keeps whatever kind is on screen.
        assert q.next_item("ann", "mixed").token == item.token
        kinds[item.kind] += 1
        q.submit(item.token, "up" if item.kind == "unpaired" else "tie", "ann")
    assert set(kinds) == {"paired", "unpaired"}, kinds  # no index: no cross items
    assert q.next_item("ann", "cross") is None


@pytest.mark.parametrize("call, match", [
    (lambda q, t: q.next_item(""), "enter your name"),
    (lambda q, t: q.next_item("   "), "enter your name"),
    (lambda q, t: q.next_item("x" * 65), "longer than 64"),
    (lambda q, t: q.next_item("ann", "sideways"), "unknown mode 'sideways'"),
    (lambda q, t: q.submit(t, "maybe", "ann"), "unknown verdict 'maybe'"),
    (lambda q, t: q.submit(t, "left", ""), "enter your name"),
    (lambda q, t: q.submit("no-such-token", "left", "ann"), "no longer open"),
    (lambda q, t: q.skip(t, " "), "enter your name"),
    (lambda q, t: q.undo(""), "enter your name"),
])
def test_bad_input_raises_a_clear_value_error(store, call, match):
    _seed(store, 1, 2)
    q = LabelQueue(store)
    token = q.next_item("ann").token
    with pytest.raises(ValueError, match=match):
        call(q, token)
    assert store.count_judgments(include_retracted=True) == 0


def test_annotator_names_are_trimmed(store):
    _seed(store, 1, 2)
    q = LabelQueue(store)
    item = q.next_item("  ann ")
    assert q.next_item("ann").token == item.token
    res = q.submit(item.token, "left", " ann")
    assert store.judgment(res["judgment_id"])["annotator"] == "ann"


def test_consecutive_items_spread_over_families(store):
    families = ("cooking", "travel", "coding", "health")
    _seed(store, 16, 2, families=families)
    for seed in range(3):
        q = LabelQueue(store, seed=seed)
        name = f"ann{seed}"
        fams = []
        while (item := q.next_item(name)) is not None:
            fams.append(item.family)
            q.skip(item.token, name)  # skip keeps the data fresh for the next seed
        assert len(fams) == 16
        # The first four items show four different families...
        assert len(set(fams[:4])) == 4, fams
        # ...and no family is shown twice in a row while another one is left.
        repeats = [i for i in range(1, len(fams)) if fams[i] == fams[i - 1]
                   and set(fams[i:]) - {fams[i]}]
        assert not repeats, fams


# -- cross-prompt (needs the real embedder) --------------------------------------------------
CROSS_PROMPTS = {
    "cooking": ["How do I bake sourdough bread at home?", "What is the best way to cook rice?",
                "How long should I boil an egg for a soft yolk?",
                "Give me a simple recipe for tomato soup."],
    "code": ["How do I reverse a list in Python?", "What does a Python decorator do?",
             "How do I read a CSV file with pandas?", "Explain Python list comprehensions."],
    "space": ["Why is Mars red?", "How far away is the Moon from Earth?",
              "What is a black hole?", "How many planets are in the solar system?"],
}


@pytest.fixture(scope="module")
def embedder():
    from rpo_app.embed import Embedder

    return Embedder()


@pytest.fixture
def cross_store(store, embedder):
    from rpo_app.embed import PromptIndex

    for fam, prompts in CROSS_PROMPTS.items():
        for i, text in enumerate(prompts):
            pid, _ = store.add_prompt(text, "test", fam)
            for k in range(1 + i % 2):
                store.add_response(pid, f"Answer {k} to: {text}", "test")
    index = PromptIndex(store, embedder)
    assert index.refresh() == 12
    return store, index


def test_cross_items_pair_answers_to_related_prompts(cross_store):
    store, index = cross_store
    q = LabelQueue(store, index=index, seed=9)
    items = []
    for n in range(8):
        item = q.next_item("ann", "cross")
        assert item is not None and item.kind == "cross"
        lp, rp = item.left["prompt_id"], item.right["prompt_id"]
        assert lp != rp
        # One side's prompt is the nearest related prompt (with answers) of the other.
        near_l = [p for p, _ in index.related(lp, k=3)]
        near_r = [p for p, _ in index.related(rp, k=3)]
        assert rp in near_l or lp in near_r
        assert item.left["family"] == item.right["family"], (item.left, item.right)
        pub = item.public()
        assert pub["left"]["prompt"] != pub["right"]["prompt"]
        res = q.submit(item.token, "left" if n % 2 else "both_bad", "ann", strength="clearly")
        items.append((item, res))
    rows = {r["id"]: r for r in store.judgments()}
    assert len(rows) == 8
    pairs = {(r["response_a"], r["response_b"]) for r in rows.values()}
    assert len(pairs) == 8  # never the same cross pair twice
    for item, res in items:
        r = rows[res["judgment_id"]]
        assert r["kind"] == "cross" and r["prompt_a_id"] != r["prompt_b_id"]
        assert r["a_side"] == ("left" if r["response_a"] == item.left["id"] else "right")
        if r["verdict"] in ("a", "b"):
            assert (r["response_a"] if r["verdict"] == "a" else r["response_b"]) == \
                item.left["id"]
            assert r["strength"] == "clearly"
        else:
            assert r["verdict"] == "both_bad" and r["strength"] is None


def test_cross_undo_reoffers_the_same_two_answers(cross_store):
    store, index = cross_store
    q = LabelQueue(store, index=index, seed=10)
    item = q.next_item("ann", "cross")
    q.submit(item.token, "right", "ann")
    back = q.undo("ann")["item"]
    assert back.kind == "cross"
    assert (back.left["id"], back.right["id"]) == (item.left["id"], item.right["id"])
    assert store.count_judgments() == 0


def test_cross_items_are_leased_to_one_annotator(cross_store):
    store, index = cross_store
    q = LabelQueue(store, index=index, seed=11)
    a = q.next_item("a", "cross")
    for _ in range(5):
        b = q.next_item("b", "cross")
        assert not ({a.left["id"], a.right["id"]} & {b.left["id"], b.right["id"]})
        q.skip(b.token, "b")


def test_cross_skip_hides_the_pair_from_that_annotator(cross_store):
    store, index = cross_store
    q = LabelQueue(store, index=index, seed=0)
    first = q.next_item("ann", "cross")
    q.skip(first.token, "ann")
    for _ in range(20):
        item = q.next_item("ann", "cross")
        if item is None:
            break
        assert _pair(item) != _pair(first), "a skipped cross pair came back"
        q.skip(item.token, "ann")


def test_mixed_mode_with_an_index_serves_all_three_kinds(cross_store):
    store, index = cross_store
    q = LabelQueue(store, index=index, seed=13)
    kinds = Counter()
    for _ in range(15):
        item = q.next_item("ann", "mixed")
        if item is None:
            break
        kinds[item.kind] += 1
        q.submit(item.token, "down" if item.kind == "unpaired" else "tie", "ann")
    assert set(kinds) == {"paired", "cross", "unpaired"}, kinds
    got = Counter(r["kind"] for r in store.judgments())
    assert got == kinds
