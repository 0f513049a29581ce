"""Lineage: which judgments a run trains on (one selection for the Train tab, the
trainer and "train again without..."), the run's record of it, and the store's index
from a judgment to the adapters it made."""
from __future__ import annotations

import json
import time

import pytest

from apptools import seed_store
from rpo_app import lineage
from rpo_app.config import DataLayout
from rpo_app.runs import RunManager
from rpo_app.store import CUT_UNCHECKED_KEY, GOLD_CHECK_SOURCE, Store
from rpo_app.trainconfig import ConfigError, TrainConfig


def _rows(n=6):
    return [{"judgment_id": i, "kind": "paired" if i % 3 else "unpaired",
             "annotator": "alice" if i % 2 else "bob"} for i in range(1, n + 1)]


def test_select_leaves_out_annotators_and_ids_and_says_why():
    cfg = TrainConfig(exclude_annotators=["bob"], exclude_judgments=[1, 99])
    kept, left_out = lineage.select(cfg, _rows())
    assert [j["judgment_id"] for j in kept] == [3, 5]
    assert left_out["annotators"] == {"bob": {"judgments": 3, "why": "excluded"}}
    assert left_out["judgments"] == {"ids": [1, 99], "removed": 1}
    # Kinds and annotators asked for apply first, as before.
    kept, left_out = lineage.select(TrainConfig(kinds=["unpaired"]), _rows())
    assert [j["judgment_id"] for j in kept] == [3, 6] and left_out == {}


def test_min_gold_accuracy_leaves_out_an_annotator_who_fails_the_gold_items(store):
    gold, wrong = [], []
    for i in range(6):
        pid, _ = store.add_prompt(f"p{i}", "test")
        a, _ = store.add_response(pid, "good", "test")
        b, _ = store.add_response(pid, "bad", "test")
        gold.append(store.add_judgment("paired", a, b, "a", "lead", source="import")[0])
        store.add_judgment("paired", a, b, "b", "careless", source=GOLD_CHECK_SOURCE)
        store.add_judgment("paired", a, b, "a", "careful", source=GOLD_CHECK_SOURCE)
        wrong.append(store.add_judgment("paired", a, b, "b", "careless")[0])
    store.mark_gold(gold, by="lead")
    kept, left_out = lineage.from_store(TrainConfig(min_gold_accuracy=0.6), store)
    assert {j["annotator"] for j in kept} == {"lead"}
    info = left_out["annotators"]["careless"]
    assert info["why"] == "below the gold-accuracy bar" and info["judgments"] == 6
    assert info["gold"]["accuracy"] == 0.0 and info["gold"]["gold_items"] == 6
    assert "careful" not in left_out["annotators"]
    # Without the bar nobody is left out.
    kept, left_out = lineage.from_store(TrainConfig(), store)
    assert {j["annotator"] for j in kept} == {"lead", "careless"} and left_out == {}


def test_id_ranges_and_describe():
    assert lineage.id_ranges([9, 1, 2, 3, 7, 10, 2]) == "1-3, 7, 9-10"
    text = lineage.describe(lineage.record([{"judgment_id": 1, "kind": "paired", "annotator": "a"},
                                            {"judgment_id": 2, "kind": "paired", "annotator": "a"}],
                                           [{"judgment_id": 5, "kind": "unpaired", "annotator": "b"}],
                                           {}, None, "the store"))
    assert "Trained on: #1-2." in text and "Held out: #5." in text and "paired 2, unpaired 1" in text
    assert "No lineage recorded" in lineage.describe(None)


@pytest.mark.parametrize("values, message", [
    ({"min_gold_accuracy": 1.5}, "min_gold_accuracy"),
    ({"exclude_judgments": ["x"]}, "exclude_judgments")])
def test_bad_exclusions_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**values).validate()


@pytest.mark.slow
def test_a_run_records_its_judgments_and_train_again_leaves_an_annotator_out(data_dir, tiny_model_dir):
    seeded = seed_store(data_dir, n_prompts=10, answers_per_prompt=2)
    store = Store(data_dir)
    ids = {}
    for k, pid in enumerate(seeded["prompts"]):
        a, b = seeded["responses"][pid]
        who = "alice" if k < 6 else "bob"
        ids.setdefault(who, []).append(store.add_judgment("paired", a, b, "a", who)[0])
    runs = RunManager(store, DataLayout(data_dir))
    cfg = TrainConfig(loss="rpo-paired", model=str(tiny_model_dir), max_steps=1, batch_size=2,
                      max_length=64, max_prompt_length=32, eval_every=0, sample_every=0,
                      sample_max_new_tokens=4, preview_prompts=["Say hi."], eval_fraction=0.2,
                      early_stop_patience=0, save_every=0)

    def finished(rid):
        deadline = time.time() + 300
        while store.adapter_for_run(rid) is None or not store.has_lineage(rid):
            assert time.time() < deadline, runs.log_tail(rid)
            time.sleep(0.3)

    # A store from before the cut flag, not yet checked: the run says so and records it.
    store.put_setting(CUT_UNCHECKED_KEY, {"answers": 2}, by="migration")
    first = runs.start(cfg)
    finished(first)
    warning = json.loads(runs.layout.run_dir(first).joinpath("status.json").read_text())["warning"]
    assert "2 generated answers were stored before" in warning and "mark-cut" in warning
    store.mark_cut_off([], unchecked_left=0)
    rec = json.loads(runs.layout.run_dir(first).joinpath("lineage.json").read_text())
    assert rec["store"]["answers_unchecked_for_cut"] == 2
    assert sorted(rec["train_ids"] + rec["held_out_ids"]) == sorted(ids["alice"] + ids["bob"])
    assert rec["held_out_ids"] and rec["counts"]["by_annotator"] == {"alice": 6, "bob": 4}
    assert rec["store"]["active_judgments"] == 10 and rec["left_out"] == {}
    used = store.runs_using([ids["bob"][0]])[ids["bob"][0]]
    assert [(u["run_id"], u["adapter"]) for u in used] == [(first, first)]

    second = runs.train_again(first, exclude_annotators=["bob"])
    finished(second)
    rec2 = lineage.read(runs.layout.run_dir(second))
    assert rec2["counts"]["by_annotator"] == {"alice": 6}
    assert rec2["left_out"]["annotators"]["bob"]["judgments"] == 4
    assert store.run(second)["config"]["exclude_annotators"] == ["bob"]
    # Bob's judgment was used by the first adapter only; alice's by both.
    assert [u["run_id"] for u in store.runs_using([ids["bob"][0]])[ids["bob"][0]]] == [first]
    assert {u["run_id"] for u in store.runs_using([ids["alice"][0]])[ids["alice"][0]]} == {first, second}
    runs.delete(first)
    assert [u["run_id"] for u in store.runs_using([ids["alice"][0]])[ids["alice"][0]]] == [second]
    store.close()
