"""Suspect labels: every finished run scores the pairs it saw with its final adapter; the
judgments it contradicts with high confidence are listed to look at again."""
from __future__ import annotations

import argparse
import json
import math
import time

import pytest

from apptools import seed_store
from rpo_app import suspects
from rpo_app.config import DataLayout
from rpo_app.labelqueue import LabelQueue
from rpo_app.runfolder import RunFolder
from rpo_app.store import Store


def test_margin_and_confidence_follow_the_bradley_terry_reading():
    policy = [-10.0, -14.0, -9.0, -20.0]
    ref = [-12.0, -12.0, -12.0, -12.0]
    # Pair 1: chosen 0 (reward +2) over 1 (reward -2): margin beta * 4, agrees.
    # Pair 2: chosen 3 (reward -8) over 2 (reward +3): margin beta * -11, contradicts.
    rows = suspects.check_rows([(1, 0, 1, "train"), (2, 3, 2, "held_out"), (None, 0, 1, "train")],
                               policy, ref, beta=0.5)
    assert [r["judgment_id"] for r in rows] == [1, 2]  # no id: nothing to point a person at
    assert rows[0]["margin"] == pytest.approx(2.0)
    assert rows[0]["other_prob"] == pytest.approx(1 / (1 + math.exp(2.0)), abs=1e-4)
    assert rows[1]["margin"] == pytest.approx(-5.5)
    assert rows[1]["other_prob"] == pytest.approx(1 / (1 + math.exp(-5.5)), abs=1e-4)


def test_suspects_are_the_confident_contradictions_surest_first():
    rows = [{"judgment_id": 1, "split": "train", "margin": -3.0, "other_prob": 0.95},
            {"judgment_id": 2, "split": "held_out", "margin": -3.0, "other_prob": 0.95},
            {"judgment_id": 3, "split": "train", "margin": -1.0, "other_prob": 0.73},
            {"judgment_id": 4, "split": "train", "margin": -5.0, "other_prob": 0.99}]
    assert [r["judgment_id"] for r in suspects.suspects(rows)] == [4, 2, 1]
    assert [r["judgment_id"] for r in suspects.suspects(rows, 0.7)] == [4, 2, 1, 3]
    with pytest.raises(ValueError, match="probability"):
        suspects.suspects(rows, 1.0)


@pytest.mark.slow
def test_a_run_checks_its_labels_and_a_suspect_can_be_judged_again(data_dir, tiny_model_dir, capsys):
    from rpo_app.runs import RunManager
    from rpo_app.team import cli_suspects, suspect_labels
    from rpo_app.trainconfig import TrainConfig

    seeded = seed_store(data_dir, n_prompts=10, answers_per_prompt=2)
    store = Store(data_dir)
    ids = []
    for k, pid in enumerate(seeded["prompts"]):
        a, b = seeded["responses"][pid]
        ids.append(store.add_judgment("paired", a, b, "a", "bob" if k == 3 else "ada")[0])
    layout = DataLayout(data_dir)
    runs = RunManager(store, layout)
    cfg = TrainConfig(loss="rpo-paired", model=str(tiny_model_dir), max_steps=1, batch_size=2,
                      max_length=64, max_prompt_length=32, eval_every=0, sample_every=0,
                      sample_max_new_tokens=4, preview_prompts=["Say hi."], eval_fraction=0.2,
                      early_stop_patience=0, save_every=0)
    rid = runs.start(cfg)
    deadline = time.time() + 300
    while store.adapter_for_run(rid) is None:
        assert time.time() < deadline, runs.log_tail(rid)
        time.sleep(0.3)
    folder = RunFolder(layout.run_dir(rid), writable=False)
    rows = folder.label_checks()
    # Every judgment the run saw, training and held out, scored once.
    assert sorted(r["judgment_id"] for r in rows) == sorted(ids)
    assert {r["split"] for r in rows} == {"train", "held_out"}
    assert all(0 < r["other_prob"] < 1 for r in rows)
    assert "checking the labels" in [p["phase"] for p in folder.status().phases]

    # One step on a random tiny model is sure of nothing; make bob's judgment a confident
    # contradiction, as a run that learned from everything else would.
    for r in rows:
        if r["judgment_id"] == ids[3]:
            r.update(margin=-4.0, other_prob=0.982)
    RunFolder(layout.run_dir(rid)).write_label_checks(rows)
    run_id, hits = suspect_labels(store, layout)
    assert run_id == rid and [h["judgment_id"] for h in hits] == [ids[3]]
    assert hits[0]["annotator"] == "bob" and "Option A" in hits[0]["chosen"]
    assert "Option B" in hits[0]["model_prefers"]

    args = argparse.Namespace(data_dir=str(data_dir), run=None, confidence=0.9, json=True)
    assert cli_suspects(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["run"] == rid and out["suspects"][0]["annotator"] == "bob"

    # Judge it again: retracted, and the same pair is on ada's screen.
    queue = LabelQueue(store, seed=0)
    again = queue.rejudge(ids[3], "ada")
    assert store.judgment(ids[3])["retracted_at"] is not None
    item = queue.next_item("ada", "paired")
    assert item.token == again["item"].token
    assert {item.left["id"], item.right["id"]} == set(seeded["responses"][seeded["prompts"][3]])
    # Retracted: no longer a suspect.
    assert suspect_labels(store, layout) == (rid, [])
    with pytest.raises(ValueError, match="no active judgment"):
        queue.rejudge(ids[3], "ada")
    store.close()
