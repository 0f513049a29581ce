"""bench-curve's pieces that need no training: the simulated annotator labeling through
the real label queue, the summary over seeds, the targets read off it, and --merge."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rpo_app import judges
from rpo_app.bench import curve
from rpo_app.labelqueue import LabelQueue

REPO = Path(__file__).resolve().parent.parent


def _seed(store, n_prompts=5):
    """Answers of 13, 20 and 27 words per prompt: `concise` prefers the shortest."""
    for i in range(n_prompts):
        pid, _ = store.add_prompt(f"Question {i}: how do I do thing {i}?", "test", f"fam{i % 3}")
        for k in range(3):
            store.add_response(pid, " ".join(f"w{i}x{j}" for j in range(13 + 7 * k)), "test")


def _counts():
    return dict.fromkeys(("labels", "decided", "informative", "skips", "wins", "ties", "ups",
                          "downs"), 0)


def test_the_annotator_labels_what_the_queue_shows(store):
    _seed(store)
    medians = curve.prompt_medians(curve.candidate_scores(store, judges.concise, "concise"))
    assert len(medians) == 5
    q = LabelQueue(store, seed=0)
    counts = _counts()
    assert curve.label_until(q, "judge:concise", "paired", "random", 6, counts,
                             judges.concise, "concise", medians)
    rows = store.judgments()
    assert counts["labels"] == counts["decided"] == len(rows) == 6
    for r in rows:  # every click is the judge's: the shorter answer wins
        assert r["annotator"] == "judge:concise"
    # 15 pairs in all: asking for more than the queue holds stops where it runs out
    assert not curve.label_until(q, "judge:concise", "paired", "random", 100, counts,
                                 judges.concise, "concise", medians)
    assert counts["labels"] == store.count_judgments() == 15


def test_thumbs_skip_the_median_answer(store):
    _seed(store, n_prompts=2)
    medians = curve.prompt_medians(curve.candidate_scores(store, judges.concise, "concise"))
    q = LabelQueue(store, seed=0)
    counts = _counts()
    assert not curve.label_until(q, "judge:concise", "unpaired", "queue", 10, counts,
                                 judges.concise, "concise", medians)
    # per prompt: the short answer up, the long one down, the middle one skipped (nothing stored)
    assert (counts["ups"], counts["downs"], counts["skips"]) == (2, 2, 2)
    assert store.count_judgments() == 4


def test_decidable_counts_what_any_order_could_find(store):
    _seed(store)
    concise = curve.candidate_scores(store, judges.concise, "concise")
    medians = curve.prompt_medians(concise)
    # three answers of different lengths per prompt: every pair decides, and two thumbs
    # per prompt sit off the median
    assert curve.decidable(concise, medians, "pairs") == 5 * 3
    assert curve.decidable(concise, medians, "thumbs") == 5 * 2
    assert curve.decidable(concise, medians, "cross") is None
    # no answer mentions a caveat: every pair ties, every answer is at its median
    none = curve.candidate_scores(store, judges.caveat, "caveat")
    none_medians = curve.prompt_medians(none)
    assert curve.decidable(none, none_medians, "pairs") == curve.decidable(none, none_medians, "thumbs") == 0
    # what the annotator decides over the whole queue is what decidable said
    q = LabelQueue(store, seed=0)
    counts = _counts()
    curve.label_until(q, "judge:concise", "paired", "random", 100, counts, judges.concise, "concise",
                      medians)
    assert counts["decided"] == curve.decidable(concise, medians, "pairs")


def test_with_a_cut_decided_pairs_carry_the_strength_of_their_gap(store):
    """Answers of 13, 20 and 40 words: gaps of 7, 20 and 27 words, median 20. A pair 20 or
    more words apart is "clearly" better, a closer one "slightly"; thumbs carry none."""
    for i in range(4):
        pid, _ = store.add_prompt(f"Question {i}: how do I do thing {i}?", "test", f"fam{i}")
        for n in (13, 20, 40):
            store.add_response(pid, " ".join(f"w{i}x{j}" for j in range(n)), "test")
    cut = curve.strength_cut(curve.candidate_scores(store, judges.concise, "concise"))
    assert cut == 20
    medians = curve.prompt_medians(curve.candidate_scores(store, judges.concise, "concise"))
    q = LabelQueue(store, seed=0)
    counts = _counts()
    assert not curve.label_until(q, "judge:concise", "paired", "random", 100, counts,
                                 judges.concise, "concise", medians, cut)
    rows = store.judgments()
    assert len(rows) == 12
    for r in rows:
        gap = abs(len(r["response_a_text"].split()) - len(r["response_b_text"].split()))
        assert r["strength"] == ("clearly" if gap >= 20 else "slightly"), (gap, r["strength"])
    assert {r["strength"] for r in rows} == {"clearly", "slightly"}
    assert not curve.label_until(q, "judge:concise", "unpaired", "queue", 100, counts,
                                 judges.concise, "concise", medians, cut)
    thumbs = [r for r in store.judgments() if r["kind"] == "unpaired"]
    assert thumbs and all(r["strength"] is None for r in thumbs)


def test_a_negative_strength_margin_is_refused(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rpo_app", "bench-curve", "--strength-margin", "-1",
                          "--out", str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True)
    assert out.returncode != 0 and "--strength-margin must be >= 0" in out.stderr
    assert not (tmp_path / "o").exists()


def _row(judge, regime, order, loss, budget, seed, win=None, error=None):
    r = {"judge": judge, "regime": regime, "order": order, "loss": loss, "budget": budget,
         "seed": seed, "labels": budget, "decided": budget // 2}
    if error:
        r["error"] = error
    else:
        r.update(win_rate=win, mean_words=30.0, short_share=0.0, repeat_share=0.02,
                 base_logp=-1.0, steps=40, train_s=100.0)
    return r


ROWS = [
    _row("caveat", "pairs", "random", "rpo-paired", 64, 0, 0.50),
    _row("caveat", "pairs", "random", "rpo-paired", 128, 0, 0.56),
    _row("caveat", "pairs", "random", "rpo-paired", 128, 1, 0.60),
    _row("caveat", "pairs", "active", "rpo-paired", 32, 0, 0.55),
    _row("caveat", "pairs", "active", "rpo-paired", 64, 0, 0.62),
    _row("concise", "thumbs", "random", "rpo-unpaired", 64, 0, 0.70),
    _row("concise", "thumbs", "random", "kto", 64, 0, 0.60),
    _row("concise", "cross", "random", "rpo-paired", 64, 0, 0.75),
    _row("concise", "cross", "random", "dpo", 64, 0, error="loss dpo has 0 training pairs; x"),
]


def test_summary_and_targets():
    summary = curve.summarize(ROWS)
    ref = next(e for e in summary if e["order"] == "random" and e["budget"] == 128)
    assert ref["seeds"] == 2 and ref["win_rate"] == pytest.approx(0.58)
    assert ref["win_rate_std"] == pytest.approx(0.02) and ref["win_rate_seeds"] == [0.56, 0.6]
    dpo = next(e for e in summary if e["loss"] == "dpo")
    assert dpo["trained"] == 0 and dpo["untrainable"] == 1 and "win_rate" not in dpo
    lines = curve.targets(summary)
    # active at 32 (0.55) is under random's 128 mean (0.58); at 64 (0.62) it is over
    assert "caveat: active reaches random's 128-label win rate (0.58) with 64 labels" in lines
    assert "caveat: active's best win rate within 128 labels: 0.62 at 64 labels" in lines
    assert "concise, thumbs only, 64 labels: rpo-unpaired 0.70 vs kto 0.60 (+10 points)" in lines
    assert "concise, cross-prompt only, 64 labels: rpo-paired 0.75; dpo has nothing to train on" in lines
    table = curve.format_table(summary)
    assert "no data" in table and "0.58 ± 0.02" in table
    assert ref["collapsed"] == 0 and "win_rate_fluent" not in ref
    # without an active run there is nothing to say about the active order
    random_only = curve.targets(curve.summarize([r for r in ROWS if r["order"] != "active"]))
    assert not any("active reaches" in line for line in random_only)


def test_the_targets_say_how_many_decided_pairs_each_order_found():
    rows = [{**_row("caveat", "pairs", order, "rpo-paired", 128, seed, 0.6), "decided": d,
             "decidable": 40 + 2 * seed}
            for order, seed, d in (("random", 0, 12), ("random", 1, 14), ("active", 0, 20), ("active", 1, 24))]
    summary = curve.summarize(rows)
    # the pool's count is a mean over seeds, as the decided counts are
    assert ("caveat: decided pairs found in 128 labels, of the 41 the candidates hold: random 13, active 22"
            in curve.targets(summary))
    assert "41 ± 1" in curve.format_table(summary)
    # rows from before the count existed (a --merge of old files) say nothing about it
    old = [{k: v for k, v in r.items() if k != "decidable"} for r in rows]
    assert not any("decided pairs found" in line for line in curve.targets(curve.summarize(old)))


def test_a_collapsed_seed_is_counted_and_its_win_rate_set_apart():
    """A word-counting judge gave a garbled model its best win rate (docs/benchmarks.md, "Thumbs only
    at 128 labels"): the summary says how many seeds the collapse rule flagged, and the
    target line gives the win rate without them."""
    garbled = {**_row("concise", "thumbs", "random", "rpo-unpaired", 64, 1, 0.94),
               "collapse": "the tuned model may be collapsing: ..."}
    summary = curve.summarize(ROWS + [garbled])
    u = next(e for e in summary if e["loss"] == "rpo-unpaired")
    assert u["collapsed"] == 1 and u["trained"] == 2
    assert u["win_rate"] == pytest.approx(0.82) and u["win_rate_fluent"] == pytest.approx(0.70)
    assert ("concise, thumbs only, 64 labels: rpo-unpaired 0.82 vs kto 0.60 (+22 points); "
            "rpo-unpaired collapsed on 1 of 2 seeds, 0.70 without them") in curve.targets(summary)
    table = curve.format_table(summary)
    assert "collapsed" in table and "1/2" in table


def test_a_budget_the_queue_could_not_fill_says_what_was_labeled():
    """A rare trait leaves most thumbs at the prompt's median (skipped): the queue runs out
    before the budget, and the table and target line say how many labels there were."""
    short = [{**_row("numbered_list", "thumbs", "random", loss, 64, seed, win), "labels": n,
              "decided": n, "exhausted": True}
             for loss, win in (("rpo-unpaired", 0.7), ("kto", 0.65)) for seed, n in ((0, 18), (1, 16))]
    summary = curve.summarize(ROWS + short)
    u = next(e for e in summary if e["judge"] == "numbered_list" and e["loss"] == "rpo-unpaired")
    assert u["exhausted"] == 2 and u["labels"] == pytest.approx(17)
    assert "64 (queue ran out on 2/2: 17 ± 1)" in curve.format_table(summary)
    assert any(line.startswith("numbered_list, thumbs only, 64 labels (the queue ran out at 17 on average)")
               for line in curve.targets(summary))
    full = next(e for e in summary if e["judge"] == "concise" and e["loss"] == "kto")
    assert full["exhausted"] == 0


def test_the_active_target_lines_say_which_seeds_collapsed():
    rows = [dict(r) for r in ROWS]
    rows[2]["collapse"] = "the tuned model may be collapsing: 41% of answers decline the task"
    lines = curve.targets(curve.summarize(rows))
    assert ("caveat: active reaches random's 128-label win rate (0.58) with 64 labels; random "
            "collapsed on 1 of 2 seeds, 0.56 without them") in lines


def test_merge_combines_runs_and_refuses_a_bad_file(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"rows": ROWS[:5], "base_per_seed": []}))
    b.write_text(json.dumps({"rows": ROWS[5:], "base_per_seed": []}))
    out = tmp_path / "merged"
    cmd = [sys.executable, "-m", "rpo_app", "bench-curve", "--merge", str(a), str(b), "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    merged = json.loads((out / "curve.json").read_text())
    assert len(merged["rows"]) == len(ROWS) and len(merged["summary"]) == 8
    assert (out / "curve.png").stat().st_size > 0 and "rpo-unpaired" in (out / "curve.txt").read_text()

    # A file from before the refusal figure: the merge reads it, and the collapse flag by
    # today's rule, off the answers each row stored, against its own file's base answers.
    old = tmp_path / "old.json"
    helpful = "Practise in front of a friend, then ask them what to keep and what to change."
    refusal = ("I'm sorry for any confusion, but as a text-based AI, I don't have the ability "
               "to give advice. However, I can help with other tasks you may have.")
    row = dict(_row("caveat", "pairs", "active", "rpo-paired", 16, 0, 0.61), answers=[refusal, refusal],
               collapse=None)
    old.write_text(json.dumps({"rows": [row], "base_per_seed": [
        {"seed": 0, "answers": [helpful, helpful], "base_logp": -1.0}]}))
    done = subprocess.run(cmd[:5] + [str(old), "--out", str(tmp_path / "m3")], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    m3 = json.loads((tmp_path / "m3" / "curve.json").read_text())
    assert m3["rows"][0]["refusal_share"] == 1.0 and "decline the task" in m3["rows"][0]["collapse"]
    assert m3["summary"][0]["collapsed"] == 1 and m3["base_per_seed"][0]["refusal_share"] == 0.0
    assert "refusals" in (tmp_path / "m3" / "curve.txt").read_text()

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    out2 = tmp_path / "merged2"
    wrong = tmp_path / "effect.json"
    wrong.write_text(json.dumps({"summary": []}))
    for name, says in ((bad, "cannot read"), (wrong, "not a bench-curve curve.json")):
        done = subprocess.run(cmd[:5] + [str(a), str(name), "--out", str(out2)], cwd=REPO,
                              capture_output=True, text=True)
        assert done.returncode != 0 and says in done.stderr and str(name) in done.stderr
        assert not out2.exists()  # nothing half-written
