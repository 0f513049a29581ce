"""The effect benchmark: simulated judges, the family-disjoint split, the judgments
it derives, and one end-to-end run on a tiny model."""
from __future__ import annotations

import json
import sys

import pytest

from rpo_app.bench import effect as be
from rpo_app import judges

PROMPT = "How can I fall asleep faster?"
MEDIUM = "Keep a regular bedtime, avoid screens for an hour before bed, and keep the room cool and dark."
LONG = " ".join([MEDIUM] * 5)


# --- judges ------------------------------------------------------------------------

def test_concise_prefers_shorter_but_not_degenerate():
    c = judges.concise
    assert c(PROMPT, MEDIUM) > c(PROMPT, LONG)
    for degenerate in ("", "Sleep.", "Go to bed", "Just sleep more now"):
        assert c(PROMPT, degenerate) < c(PROMPT, LONG)
    # Below 12 words the score falls again: a 6-word answer is not the best.
    assert c(PROMPT, "Sleep more, and avoid late coffee.") < c(PROMPT, "Keep a regular bedtime and avoid late coffee; it helps.")
    assert c(PROMPT, "one " * 12) == pytest.approx(-12)
    assert c(PROMPT, "one " * 40) == pytest.approx(-40)


def test_numbered_list():
    nl = judges.numbered_list
    listed = "Try these:\n1. Keep a regular bedtime.\n2. Avoid screens late.\n3) Keep it cool."
    assert nl(PROMPT, listed) == pytest.approx(3.5)
    assert nl(PROMPT, MEDIUM) == 0
    assert nl(PROMPT, listed) > nl(PROMPT, MEDIUM)
    # Out-of-order numbers lose the bonus; bare numbers earn nothing.
    assert nl(PROMPT, "Tips:\n2. Keep a regular bedtime.\n5. Avoid screens late.") == pytest.approx(2)
    assert nl(PROMPT, "Here are some:\n1.\n2.\n3.\n4. x") == 0
    assert nl(PROMPT, "1.") < nl(PROMPT, MEDIUM)  # degenerate scores below everything
    many = "List:\n" + "\n".join(f"{i}. Item number {i}" for i in range(1, 10))
    assert nl(PROMPT, many) == pytest.approx(6.5)


def test_caveat():
    cv = judges.caveat
    assert cv(PROMPT, MEDIUM) == 0
    hedged = MEDIUM + " However, it depends on the person; consult a doctor if it persists."
    assert cv(PROMPT, hedged) == 3
    assert cv(PROMPT, MEDIUM + " Note that this may vary.") == 1
    assert cv(PROMPT, "However.") < cv(PROMPT, MEDIUM)
    refusal = ("I'm sorry for any confusion, but as a text-based AI, I don't have the ability to "
               "give medical advice. However, I can share general tips; consult a doctor.")
    assert cv(PROMPT, refusal) == cv(PROMPT, MEDIUM) == 0  # a refusal's caveats qualify no answer


def test_load_judge_specs(tmp_path):
    assert judges.load_judge("concise") == ("concise", judges.concise)
    assert judges.load_judge("rpo_app.judges:caveat")[1] is judges.caveat
    f = tmp_path / "my_judge.py"
    f.write_text("def loud(prompt, response):\n    return response.count('!')\n")
    name, fn = judges.load_judge(f"{f}:loud")
    assert name == "loud" and fn("p", "a! b!") == 2
    for bad in ("nope", "no_such_module_xyz:f", "rpo_app.judges:missing", f"{tmp_path}/none.py:f",
                "rpo_app.judges:not-a-name"):
        with pytest.raises(judges.JudgeError):
            judges.load_judge(bad)
    with pytest.raises(judges.JudgeError):
        judges.score(lambda p, r: "good", "words", "p", "r")
    with pytest.raises(judges.JudgeError):
        judges.score(lambda p, r: float("nan"), "nan", "p", "r")


def test_bad_judge_exits_2(capsys):
    from rpo_app.cli import main

    assert main(["bench-effect", "--judge", "foo:bar"]) == 2
    assert "cannot import module 'foo'" in capsys.readouterr().err
    assert main(["bench-effect", "--losses", "nope"]) == 2
    assert main(["bench-effect", "--candidates", "1"]) == 2
    assert main(["bench-effect", "--epochs", "0"]) == 2
    assert main(["bench-effect", "--steps", "0"]) == 2
    assert main(["bench-effect", "--min-steps", "-1"]) == 2
    assert main(["bench-effect", "--beta", "0"]) == 2


def test_parser_does_not_import_torch():
    import subprocess

    code = ("import sys; from rpo_app.cli import build_parser; "
            "build_parser('bench-effect').parse_args(['bench-effect']); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- pure pieces of the harness ------------------------------------------------------

def _rows():
    return [{"prompt": f"{fam} question {k}", "family": fam}
            for fam in ("a", "b", "c", "d", "e", "f", "g") for k in range(3)] + [{"prompt": "lonely"}]


def test_split_is_family_disjoint_and_seeded():
    rows = _rows()
    for seed in range(5):
        train, test = be.split_by_family(rows, 8, 6, seed)
        assert len(train) == 8 and len(test) == 6
        fam = lambda r: r.get("family") or r["prompt"]  # noqa: E731
        assert not {fam(r) for r in train} & {fam(r) for r in test}
        assert be.split_by_family(rows, 8, 6, seed) == (train, test)
    assert be.split_by_family(rows, 8, 6, 0) != be.split_by_family(rows, 8, 6, 1)
    with pytest.raises(be.BenchError, match="disjoint families"):
        be.split_by_family(rows, 20, 6, 0)


def test_judge_candidates():
    out = be.judge_candidates([(1, 3.0), (2, 1.0), (3, 3.0), (4, 0.0)])
    paired = [j for j in out if j[0] == "paired"]
    assert len(paired) == 6
    assert ("paired", 1, 2, "a") in paired and ("paired", 1, 3, "tie") in paired
    assert ("paired", 2, 3, "b") in paired
    thumbs = {j[1]: j[3] for j in out if j[0] == "unpaired"}
    assert thumbs == {1: "up", 3: "up", 2: "down", 4: "down"}  # median 2.0
    # At the median: no thumb.
    assert [j for j in be.judge_candidates([(1, 1.0), (2, 2.0), (3, 3.0)]) if j[0] == "unpaired"] == [
        ("unpaired", 1, None, "down"), ("unpaired", 3, None, "up")]


SCORED = [(1, 3.0), (2, 1.0), (3, 3.0), (4, 0.0)]


def test_rank_candidates_orders_by_score_and_ties_equal_scores():
    assert be.rank_candidates(SCORED) == [[1, 3], [2], [4]]
    assert be.rank_candidates([(7, -12.0), (5, -30.0), (9, -1000.0)]) == [[7], [5], [9]]
    assert be.rank_candidates([(1, 2.0), (2, 2.0), (3, 2.0)]) == [[1, 2, 3]]
    # The implied pairs agree with judging every pair.
    from rpo_app.rankings import implied_pairs

    assert sorted(implied_pairs(be.rank_candidates(SCORED))) == sorted(
        (a, b, v) for _, a, b, v in be.judge_candidates(SCORED) if b is not None)


def test_sample_pairs_is_seeded_distinct_and_judged():
    import random

    every = {(a, b): v for _, a, b, v in be.judge_candidates(SCORED) if b is not None}
    for m in range(1, 7):
        got = be.sample_pairs(SCORED, m, be.pair_rng(0, 11))
        assert len(got) == m and len({(a, b) for _, a, b, _ in got}) == m
        assert all(kind == "paired" and every[(a, b)] == v for kind, a, b, v in got)
        assert got == be.sample_pairs(SCORED, m, be.pair_rng(0, 11))
    assert {(a, b) for _, a, b, _ in be.sample_pairs(SCORED, 6, random.Random(3))} == set(every)
    # seed and prompt id both change the draw
    draws = {tuple(be.sample_pairs(SCORED, 2, be.pair_rng(s, p))) for s in range(4) for p in range(4)}
    assert len(draws) > 1
    # two identical samples are one candidate: a prompt gives the pairs it has
    assert len(be.sample_pairs(SCORED[:2], 3, random.Random(0))) == 1
    with pytest.raises(be.BenchError):
        be.sample_pairs(SCORED, 0, random.Random(0))


def _labeled_store(tmp_path, annotation, m=1):
    from rpo_app.store import Store

    store = Store(tmp_path / f"data-{annotation}-{m}")
    ids, _ = store.add_prompts([{"prompt": f"question {k}?"} for k in range(3)], "bench-effect")
    answers = ["one two three four five six seven eight nine ten eleven twelve",
               " ".join(["word"] * 20), " ".join(["word"] * 30), "too short"]
    for pid in ids:
        for text in answers:
            store.add_response(pid, text, source="model")
    counts = be.label_prompts(store, ids, judges.concise, "concise", "judge:concise", annotation, m, seed=0)
    return store, counts


def test_label_prompts_counts_annotator_actions(tmp_path):
    store, counts = _labeled_store(tmp_path, "all")
    assert counts["actions"] == 3 * (6 + 4) and counts["paired"] == 3 * 6 and counts["rankings"] == 0

    store, counts = _labeled_store(tmp_path, "ranking")
    assert counts["actions"] == counts["rankings"] == 3 and counts["paired"] == 3 * 6
    rankings = store.rankings()
    assert len(rankings) == 3 and {r["annotator"] for r in rankings} == {"judge:concise"}
    assert all(len(r["tiers"]) == 4 for r in rankings)  # 12 < 20 < 30 words < "too short"
    train = store.training_judgments(annotators=["judge:concise"])
    assert len(train) == 3 * 6 and all(j["kind"] == "paired" for j in train)
    assert {j["source"] for j in store.judgments()} == {"bench-effect"}

    store, counts = _labeled_store(tmp_path, "pairs", 2)
    assert counts["actions"] == 3 * 2 and counts["paired"] == 3 * 2 and not counts["up"]
    assert len(store.training_judgments(annotators=["judge:concise"])) == 6


def test_annotation_options_are_checked(capsys):
    from rpo_app.cli import main

    def err(*argv):
        assert main(["bench-effect", *argv]) == 2
        return capsys.readouterr().err

    assert "--candidates must be in that range, got 2" in err("--annotation", "ranking", "--candidates", "2")
    assert "got 7" in err("--annotation", "ranking", "--candidates", "7")
    assert "--pairs-per-prompt must be between 1 and 6" in err("--annotation", "pairs", "--pairs-per-prompt", "7")
    assert "got 0" in err("--annotation", "pairs", "--pairs-per-prompt", "0")
    assert "between 1 and 3" in err("--annotation", "pairs", "--candidates", "3", "--pairs-per-prompt", "4")
    assert "--sft-weight must be >= 0, got -1.0" in err("--sft-weight", "-1")
    with pytest.raises(SystemExit):
        main(["bench-effect", "--annotation", "thumbs"])
    capsys.readouterr()


def test_win_rate_and_aggregate():
    assert be.win_rate([2, 1, 0, 5], [1, 1, 1, 5]) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    with pytest.raises(ValueError):
        be.win_rate([], [])
    rows = [{"judge": "j", "loss": "dpo", "win_rate": w, "train_s": 10.0} for w in (0.6, 0.8)]
    (s,) = be.aggregate(rows)
    assert s["win_rate"] == pytest.approx(0.7) and s["win_rate_std"] == pytest.approx(0.1)
    assert s["seeds"] == 2 and "heldout_acc" not in s and s["collapsed"] == 0
    assert "0.70 ± 0.10" in be.format_table([s])
    (s,) = be.aggregate([*rows, {**rows[0], "collapse": "the tuned model may be collapsing: ..."}])
    assert s["collapsed"] == 1 and "1/3" in be.format_table([s])
    rows = [{"judge": "j", "loss": "dpo", "win_rate": 0.5, "human_judgments": n, "pairs_trained": 5 * n}
            for n in (24, 24)]
    (s,) = be.aggregate(rows)
    assert s["human_judgments"] == 24 and s["pairs_trained"] == 120 and s["pairs_trained_std"] == 0
    table = be.format_table([{**s, "annotation": "ranking"}])
    assert "annotation" in table and "ranking" in table and "120 ± 0" in table


# --- end to end on a tiny model ------------------------------------------------------

@pytest.mark.slow
def test_end_to_end_tiny_model(tiny_model_dir, tmp_path, capsys):
    from rpo_app.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    out = tmp_path / "effect"
    rc = main(["bench-effect", "--model", str(tiny_model_dir), "--data-dir", str(tmp_path / "src"),
               "--prompts", str(prompts), "--out", str(out), "--judge", "concise",
               "--judge", "rpo_app.judges:caveat", "--losses", "rpo-paired", "dpo",
               "--train-prompts", "6", "--test-prompts", "3", "--candidates", "3", "--steps", "2",
               "--batch-size", "2", "--max-new-tokens", "6", "--eval-fraction", "0.2",
               "--cpu-threads", "1", "--max-length", "96"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "win rate" in printed and "base model, greedy test answers:" in printed
    assert "base model, sampled candidates (T=0.8):" in printed
    result = json.loads((out / "effect.json").read_text())
    assert (out / "effect.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "effect.txt").exists()
    assert {(e["judge"], e["loss"]) for e in result["summary"]} == {
        ("concise", "rpo-paired"), ("concise", "dpo"), ("caveat", "rpo-paired"), ("caveat", "dpo")}
    for e in result["summary"]:
        assert 0 <= e["win_rate"] <= 1
        assert 0 <= e["short_share"] <= 1 and 0 <= e["repeat_share"] <= 1
        assert e["base_logp"] <= 0 and e["train_s"] > 0
        assert e.get("heldout_acc") is None or 0 <= e["heldout_acc"] <= 1
    (row,) = [r for r in result["per_seed"] if r["judge"] == "concise" and r["loss"] == "dpo"]
    assert len(row["answers"]) == 3 and row["judgments"]["paired"] + row["judgments"]["tie"] == 6 * 3
    assert (out / "seed-0" / "concise" / "dpo" / "adapter").is_dir()
    assert result["failed"] == []
    # the collapse rule ran on every row's test answers (a message, or None when fluent)
    assert all("collapse" in r for r in result["per_seed"])
    assert all(e["collapsed"] == sum(bool(r["collapse"]) for r in result["per_seed"]
                                     if (r["judge"], r["loss"]) == (e["judge"], e["loss"]))
               for e in result["summary"])
    base = result["base_per_seed"][0]
    assert not set(base["train_prompts"]) & set(base["test_prompts"])
    # the sampled reference covers every candidate (6 prompts x 3) and is a real log-prob
    assert result["base"]["sampled"]["base_logp"] < 0
    assert 0 <= base["sampled"]["short_share"] <= 1


def test_without_steps_each_judge_trains_the_default_epochs(tiny_model_dir, tmp_path):
    """Like the Train tab: no step count, so a run lasts --epochs over its own pairs,
    raised to --min-steps when the judge decides only a few pairs."""
    import yaml

    from rpo_app.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    out = tmp_path / "effect"
    assert main(["bench-effect", "--model", str(tiny_model_dir), "--data-dir", str(tmp_path / "src"),
                 "--prompts", str(prompts), "--out", str(out), "--judge", "concise", "--losses", "dpo",
                 "--train-prompts", "6", "--test-prompts", "3", "--candidates", "3", "--epochs", "1",
                 "--min-steps", "7", "--batch-size", "4", "--max-new-tokens", "6", "--eval-fraction", "0.2",
                 "--cpu-threads", "1", "--max-length", "96", "--small-set", "0",
                 "--sft-weight", "0.5"]) == 0
    run = out / "seed-0" / "concise" / "dpo"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["max_steps"] is None and cfg["epochs"] == 1 and cfg["min_steps"] == 7
    assert cfg["sft_weight"] == 0.5
    assert cfg["small_set"] == 0  # the small-set schedule off: the floor decides
    status = json.loads((run / "status.json").read_text())
    # 18 candidate pairs less ties and the held-out prompt, 4 per batch: at most 5 steps
    # an epoch, so the floor sets the length
    assert status["step"] == status["max_steps"] == 7
    (row,) = json.loads((out / "effect.json").read_text())["per_seed"]
    assert row["steps"] == status["step"]
    assert row["beta"] == cfg["beta"] == 0.1  # DPO's own default, not RPO's
    assert row["loss"] == "dpo +sft 0.5"  # its own curve, apart from plain DPO


@pytest.mark.slow
@pytest.mark.parametrize("annotation, extra, per_prompt", [("ranking", [], 1), ("pairs", ["--pairs-per-prompt", "2"], 2)])
def test_end_to_end_ranking_and_pairs(tiny_model_dir, tmp_path, capsys, annotation, extra, per_prompt):
    from rpo_app.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    out = tmp_path / "effect"
    assert main(["bench-effect", "--model", str(tiny_model_dir), "--data-dir", str(tmp_path / "src"),
                 "--prompts", str(prompts), "--out", str(out), "--judge", "concise", "--losses", "rpo-paired",
                 "--annotation", annotation, *extra, "--train-prompts", "6", "--test-prompts", "3",
                 "--candidates", "3", "--steps", "2", "--batch-size", "2", "--max-new-tokens", "6",
                 "--eval-fraction", "0.2", "--cpu-threads", "1", "--max-length", "96"]) == 0
    printed = capsys.readouterr().out
    assert "judgments" in printed and "annotation" in printed
    result = json.loads((out / "effect.json").read_text())
    (row,) = result["per_seed"]
    assert row["annotation"] == annotation
    # identical samples collapse, so a prompt may hold fewer than 3 candidates
    assert 0 < row["human_judgments"] <= 6 * per_prompt
    assert row["pairs_trained"] == row["judgments"]["paired"]
    assert row["judgments"]["up"] == row["judgments"]["down"] == 0
    (s,) = result["summary"]
    assert s["human_judgments"] == row["human_judgments"] and s["annotation"].startswith(annotation)


def test_a_seeds_store_is_the_same_whether_its_candidates_were_sampled_or_cached(tiny_model_dir, tmp_path):
    """Answer ids decide what bench-curve's random order shows, so a seed's first
    invocation (sampling, answers finishing longest prompt first) and a later one
    (reading the cache) must give the same ids, or one seed labels two different sets."""
    import argparse

    p = be.add_args(argparse.ArgumentParser())
    # prompts of growing length: the generator runs the longest first, unlike prompt order
    rows = [{"prompt": "word " * (k + 1) + f"question {k}", "family": f"f{k}"} for k in range(8)]
    args = p.parse_args(["--model", str(tiny_model_dir), "--train-prompts", "5", "--test-prompts", "2",
                         "--candidates", "3", "--max-new-tokens", "4", "--max-length", "64"])
    args.source_data_dir = str(tmp_path / "src")

    def answers_by_id(prep):
        store = prep["store"]
        found = sorted((r["id"], r["prompt_id"], r["text"]) for pid in prep["ids"]
                       for r in store.responses_for_prompt(pid))
        store.close()
        return found

    out = tmp_path / "bench"
    sampled = answers_by_id(be.prepare_seed(args, 0, rows, out))
    assert len({(pid, text) for _, pid, text in sampled}) == len(sampled) >= 5
    assert (out / "cache").is_dir() and not (out / "seed-0" / "candidates-scratch").exists()
    # the answers are stored prompt by prompt, in the order of the training prompts
    prompt_ids = [pid for _, pid, _ in sampled]
    assert prompt_ids == sorted(prompt_ids)
    cached = answers_by_id(be.prepare_seed(args, 0, rows, out))
    assert cached == sampled
