"""The label queue with a team's settings: each item to k different annotators (also
under concurrency), gold items and re-shown items mixed in, and what training sees."""
from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict

import pytest

from rpo_app.config import TeamSettings
from rpo_app.labelqueue import LabelQueue
from rpo_app.store import GOLD_CHECK_SOURCE, RECHECK_SOURCE, StoreError


def _seed(store, n_prompts, answers):
    out = {}
    for i in range(n_prompts):
        pid, _ = store.add_prompt(f"Prompt {i}", "test", f"fam{i % 3}")
        out[pid] = [store.add_response(pid, f"answer {k} to prompt {i}", "test")[0]
                    for k in range(answers)]
    return out


def _item_key(item):
    if item.right is None:
        return ("thumb", item.left["id"])
    return ("pair", *sorted((item.left["id"], item.right["id"])))


def _row_key(row):
    if row["response_b"] is None:
        return ("thumb", row["response_a"])
    return ("pair", *sorted((row["response_a"], row["response_b"])))


def _label_until_empty(q, annotators, mode, verdict):
    """Each annotator in their own thread takes items until the queue has none."""
    shown = defaultdict(list)
    errors = []
    busy = {"n": len(annotators)}
    lock = threading.Lock()

    def work(name):
        # "Nothing now" can mean another annotator holds the last items: like a person
        # who reloads, ask again until everyone else has stopped too.
        try:
            idle = False
            while True:
                item = q.next_item(name, mode)
                if item is None:
                    with lock:
                        if not idle:
                            idle, busy["n"] = True, busy["n"] - 1
                        if busy["n"] == 0:
                            return
                    time.sleep(0.005)
                    continue
                if idle:
                    with lock:
                        idle, busy["n"] = False, busy["n"] + 1
                shown[name].append(_item_key(item))
                q.submit(item.token, verdict, name)
        except Exception as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(a,)) for a in annotators]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return shown


@pytest.mark.parametrize("mode,verdict,n_items", [("paired", "left", 8 * 3), ("unpaired", "up", 8 * 3)])
def test_each_item_gets_exactly_k_judgments_from_different_annotators(store, mode, verdict,
                                                                      n_items):
    _seed(store, 8, 3)  # 8 prompts x 3 answers: 24 pairs, 24 single answers
    TeamSettings(overlap=2, gold_rate=0.0).save(store)
    q = LabelQueue(store, seed=3)
    shown = _label_until_empty(q, ["ann1", "ann2", "ann3", "ann4"], mode, verdict)
    for name, keys in shown.items():
        assert len(keys) == len(set(keys)), f"{name} saw an item twice"
    judges = defaultdict(list)
    for row in store.judgments():
        judges[_row_key(row)].append(row["annotator"])
    assert len(judges) == n_items
    assert all(len(v) == 2 and len(set(v)) == 2 for v in judges.values()), judges
    assert sum(len(v) for v in shown.values()) == 2 * n_items


def test_an_item_someone_started_comes_before_a_fresh_one(store):
    _seed(store, 6, 2)
    TeamSettings(overlap=2, gold_rate=0.0).save(store)
    q = LabelQueue(store, seed=5)
    first = q.next_item("alice")
    q.submit(first.token, "left", "alice")
    # Bob gets alice's item (so it has its two annotators) before any of the five others.
    assert _item_key(q.next_item("bob")) == _item_key(first)


def test_overlap_one_keeps_one_judgment_per_item(store):
    _seed(store, 4, 2)
    q = LabelQueue(store, seed=1)  # no team settings saved: the default, one annotator
    shown = _label_until_empty(q, ["a", "b", "c"], "paired", "tie")
    assert sum(len(v) for v in shown.values()) == 4
    assert len(store.judgments()) == 4


def test_the_store_refuses_a_second_judgment_by_one_person_and_one_too_many(store):
    (pid, (a, b)), = _seed(store, 1, 2).items()
    store.add_judgment("paired", a, b, "a", "alice", overlap=2)
    with pytest.raises(StoreError, match="judged this item already"):
        store.add_judgment("paired", b, a, "b", "alice", overlap=2)
    store.add_judgment("paired", a, b, "b", "bob", overlap=2)
    with pytest.raises(StoreError, match="judged meanwhile"):
        store.add_judgment("paired", a, b, "a", "carol", overlap=2)
    assert len(store.judgments()) == 2


def test_gold_items_are_mixed_in_for_others_and_answers_are_kept_apart(store):
    seeded = _seed(store, 10, 2)
    (pid, (a, b)), *_ = seeded.items()
    gold_id, _ = store.add_judgment("paired", a, b, "a", "expert", source="import")
    assert store.mark_gold([gold_id], by="lead") == 1
    assert store.gold_ids() == {gold_id}
    TeamSettings(gold_rate=0.5).save(store)
    q = LabelQueue(store, seed=11)
    sources = []
    while (item := q.next_item("bob")) is not None:
        res = q.submit(item.token, "left", "bob")
        sources.append(store.judgment(res["judgment_id"])["source"])
    # The gold item came up once (bob never sees an item twice); the 9 open items too.
    assert Counter(sources) == {"label": 9, GOLD_CHECK_SOURCE: 1}
    # The expert is not tested on their own gold item.
    TeamSettings(gold_rate=0.5, overlap=2).save(store)
    q2 = LabelQueue(store, seed=12)
    for _ in range(12):
        item = q2.next_item("expert")
        if item is None:
            break
        assert item.source != GOLD_CHECK_SOURCE
        q2.skip(item.token, "expert")
    # A check answer is not trained on; the gold judgment itself is.
    trained = {j["judgment_id"] for j in store.training_judgments()}
    checks = {r["id"] for r in store.judgments() if r["source"] == GOLD_CHECK_SOURCE}
    assert gold_id in trained and not trained & checks


def test_gold_marking_refuses_unknown_or_retracted_judgments(store):
    (pid, (a, b)), = _seed(store, 1, 2).items()
    jid, _ = store.add_judgment("paired", a, b, "a", "x")
    with pytest.raises(StoreError, match="no judgment #999"):
        store.mark_gold([jid, 999], by="lead")
    assert store.gold_ids() == set()  # all or nothing
    store.retract(jid, by="x")
    with pytest.raises(StoreError, match="retracted"):
        store.mark_gold([jid], by="lead")


def test_rechecks_show_an_old_item_again_with_the_sides_swapped(store):
    _seed(store, 12, 2)
    q = LabelQueue(store, seed=4)
    originals = {}
    for _ in range(8):  # eight judgments with rechecks off
        item = q.next_item("ann")
        res = q.submit(item.token, "left", "ann")
        originals[_item_key(item)] = (item.left["id"], res["judgment_id"])
    TeamSettings(recheck_rate=0.5, gold_rate=0.0).save(store)
    rechecks = 0
    while (item := q.next_item("ann")) is not None:
        if item.source == RECHECK_SOURCE:
            rechecks += 1
            left_before, jid = originals[_item_key(item)]
            assert item.left["id"] != left_before  # shown the other way round
            # Not among the last five judged: those are still in mind.
            assert jid not in [r["id"] for r in store.judgments(annotator="ann")][-5:]
        q.submit(item.token, "right", "ann")
    assert rechecks >= 1
    stored = [r for r in store.judgments() if r["source"] == RECHECK_SOURCE]
    assert len(stored) == rechecks
    # Each item is re-shown once at most, and rechecks are not counted towards overlap.
    assert len({_row_key(r) for r in stored}) == rechecks
    assert not {j["judgment_id"] for j in store.training_judgments()} & {r["id"] for r in stored}


def test_team_settings_are_checked_and_kept_in_the_store(store):
    assert TeamSettings.load(store) == TeamSettings()
    TeamSettings(overlap=3, gold_rate=0.2, recheck_rate=0.05).save(store, by="lead")
    assert TeamSettings.load(store) == TeamSettings(3, 0.2, 0.05)
    for bad, match in ((dict(overlap=0), "overlap"), (dict(overlap=2.5), "overlap"),
                       (dict(gold_rate=0.9), "gold rate"), (dict(recheck_rate=-1), "recheck")):
        with pytest.raises(ValueError, match=match):
            TeamSettings(**bad).save(store)
    assert TeamSettings.load(store) == TeamSettings(3, 0.2, 0.05)  # unchanged
