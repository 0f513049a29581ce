"""Judgments -> pairs/pools, held-out split, tokenization masks, batch order."""
from __future__ import annotations

import random

import pytest

from rpo_app.batches import (BatchPlan, Encoder, Item, PreferenceData, Seq, build_data, collate, count_examples,
                             eval_batches, filter_judgments, judgment_pairs, judgment_pools,
                             length_grouped, split_judgments, truncate)
from rpo_app.chat_template import end_of_turn_id


def judgment(jid, kind, verdict, pa, ra, pb=None, rb=None, annotator="ann"):
    if kind == "paired":
        pb = pa
    return {"judgment_id": jid, "kind": kind, "verdict": verdict, "strength": None, "annotator": annotator,
            "prompt_a_text": pa, "response_a_text": ra, "prompt_b_text": pb, "response_b_text": rb,
            "prompt_a_id": jid, "prompt_b_id": None}


ALL_KINDS = [
    judgment(1, "paired", "a", "P1", "good1", rb="bad1"),
    judgment(2, "paired", "b", "P2", "bad2", rb="good2"),
    judgment(3, "paired", "tie", "P3", "x3", rb="y3"),
    judgment(4, "paired", "both_bad", "P4", "bad4a", rb="bad4b"),
    judgment(5, "cross", "a", "P5", "good5", "P6", "bad6"),
    judgment(6, "cross", "b", "P7", "bad7", "P8", "good8"),
    judgment(7, "cross", "both_bad", "P9", "bad9", "P10", "bad10"),
    judgment(8, "cross", "tie", "P11", "x11", "P12", "y12"),
    judgment(9, "unpaired", "up", "P13", "good13"),
    judgment(10, "unpaired", "down", "P14", "bad14", annotator="other"),
]


def test_pairs_per_loss():
    pairs = judgment_pairs(ALL_KINDS)
    got = [(p.chosen.response, p.rejected.response, p.kind) for p in pairs]
    assert got == [("good1", "bad1", "paired"), ("good2", "bad2", "paired"),
                   ("good5", "bad6", "cross"), ("good8", "bad7", "cross")]
    # a cross pair keeps each answer with its own prompt
    assert pairs[2].chosen == Item("P5", "good5") and pairs[2].rejected == Item("P6", "bad6")
    assert pairs[3].chosen == Item("P8", "good8") and pairs[3].rejected == Item("P7", "bad7")
    assert count_examples(ALL_KINDS, "rpo-paired") == (4, 4)
    assert count_examples(ALL_KINDS, "dpo") == (2, 2)  # paired only
    assert count_examples(ALL_KINDS, "ipo") == (2, 2)


def test_pools_use_every_kind():
    chosen, rejected = judgment_pools(ALL_KINDS)
    assert sorted(i.response for i in chosen) == ["good1", "good13", "good2", "good5", "good8"]
    assert sorted(i.response for i in rejected) == sorted(
        ["bad1", "bad2", "bad4a", "bad4b", "bad6", "bad7", "bad9", "bad10", "bad14"])
    assert Item("P10", "bad10") in rejected  # both-bad cross: each answer with its own prompt
    assert count_examples(ALL_KINDS, "kto") == (5, 9)
    assert count_examples(ALL_KINDS, "rpo-unpaired") == (5, 9)
    with pytest.raises(ValueError, match="unknown loss"):
        count_examples(ALL_KINDS, "simpo")


def test_filter_by_kind_and_annotator():
    assert [j["judgment_id"] for j in filter_judgments(ALL_KINDS, kinds=["unpaired"])] == [9, 10]
    assert [j["judgment_id"] for j in filter_judgments(ALL_KINDS, annotators=["other"])] == [10]
    assert len(filter_judgments(ALL_KINDS)) == len(ALL_KINDS)
    with pytest.raises(ValueError, match="unknown judgment kinds"):
        filter_judgments(ALL_KINDS, kinds=["pairwise"])


def many_judgments(n_prompts=40, per_prompt=3, n_cross=10, seed=0):
    rng = random.Random(seed)
    rows, jid = [], 0
    for p in range(n_prompts):
        for k in range(per_prompt):
            jid += 1
            rows.append(judgment(jid, "paired", rng.choice("ab"), f"prompt {p}", f"a{k}", rb=f"b{k}"))
    for _ in range(n_cross):
        a, b = rng.sample(range(n_prompts), 2)
        jid += 1
        rows.append(judgment(jid, "cross", "a", f"prompt {a}", "x", f"prompt {b}", "y"))
    return rows


def prompts_of(rows):
    return {j["prompt_a_text"] for j in rows} | {j["prompt_b_text"] for j in rows if j["prompt_b_text"]}


def test_split_is_by_prompt_and_deterministic():
    rows = many_judgments()
    train, held = split_judgments(rows, 0.2, seed=7)
    assert len(train) + len(held) == len(rows)
    assert not prompts_of(train) & prompts_of(held)
    assert 0.1 * len(rows) <= len(held) <= 0.2 * len(rows)
    again_train, again_held = split_judgments(rows, 0.2, seed=7)
    assert again_held == held and again_train == train
    other = split_judgments(rows, 0.2, seed=8)[1]
    assert other != held
    assert split_judgments(rows, 0.0, seed=7) == (rows, [])


def test_split_keeps_cross_linked_prompts_together():
    rows = [judgment(1, "cross", "a", "A", "x", "B", "y"), judgment(2, "paired", "a", "B", "p", rb="q"),
            judgment(3, "paired", "a", "C", "p", rb="q"), judgment(4, "paired", "a", "D", "p", rb="q")]
    for seed in range(10):
        train, held = split_judgments(rows, 0.5, seed)
        assert not prompts_of(train) & prompts_of(held)
        assert len(held) == 2  # either {1, 2} (linked through B) or two of the singletons


def test_split_falls_back_to_smallest_component():
    # four prompts, three judgments each: no component fits a target of 2 judgments
    rows = [judgment(3 * p + k, "paired", "a", f"P{p}", f"r{k}", rb="x") for p in range(4) for k in range(3)]
    train, held = split_judgments(rows, 0.2, seed=0)
    assert len(held) == 3 and len(prompts_of(held)) == 1 and not prompts_of(train) & prompts_of(held)
    assert split_judgments(rows, 0.05, seed=0)[1] == []  # 3 judgments is over twice the 1 asked for


# Tests that take the tokenizer need the converted default model (slow the first time).
@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.mark.slow
def test_end_of_turn_is_im_end(tokenizer):
    assert tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer)) == "<|im_end|>"


@pytest.mark.slow
def test_masks_cover_response_tokens_only(tokenizer):
    enc = Encoder(tokenizer, max_length=256, max_prompt_length=128)
    data = build_data([judgment(1, "paired", "a", "What is 2+2?", "It is 4.", rb="Maybe 5, who knows?")],
                      enc, "rpo-paired")
    seqs = [data.seqs[c] for c, _ in data.pairs] + [data.seqs[r] for _, r in data.pairs]
    batch = collate(seqs, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[1] == max(len(s) for s in seqs)
    labels = batch["input_ids"].roll(-1, dims=1)
    for b, (seq, response) in enumerate(zip(seqs, ["It is 4.", "Maybe 5, who knows?"])):
        scored = labels[b][batch["score_mask"][b]].tolist()
        assert tokenizer.decode(scored) == response + "<|im_end|>"
        prompt_text = tokenizer.decode(list(seq.input_ids[: seq.prompt_len]))
        assert prompt_text == tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True, tokenize=False)
        assert batch["attention_mask"][b].sum().item() == len(seq)
    assert data.prompts == ["What is 2+2?"]
    assert seqs[0].prompt_idx == seqs[1].prompt_idx == 0


@pytest.mark.slow
def test_an_answer_cut_at_its_token_limit_is_scored_without_an_ending(tokenizer):
    """A cut answer did not end: no end-of-turn token is scored after it (training would
    otherwise teach the model to stop mid-sentence); an answer that ended keeps it."""
    enc = Encoder(tokenizer, max_length=256, max_prompt_length=128)
    j = judgment(1, "paired", "a", "Tell me about sleep.", "Sleep is good because", rb="Sleep helps.")
    j["cut_off_a"] = True
    data = build_data([j], enc, "rpo-paired")
    (c, r), = data.pairs
    batch = collate([data.seqs[c], data.seqs[r]], tokenizer.pad_token_id)
    labels = batch["input_ids"].roll(-1, dims=1)
    scored = [tokenizer.decode(labels[b][batch["score_mask"][b]].tolist()) for b in (0, 1)]
    assert scored == ["Sleep is good because", "Sleep helps.<|im_end|>"]
    # the cut flag is part of the item: the same text that ended is another sequence
    ended = build_data([judgment(1, "paired", "a", "Tell me about sleep.", "Sleep is good because",
                                 rb="Sleep helps.")], enc, "rpo-paired")
    assert len(ended.seqs[ended.pairs[0][0]]) == len(data.seqs[c]) + 1


@pytest.mark.slow
def test_truncation_left_prompt_right_response(tokenizer):
    assert truncate(list(range(10)), [100, 101, 102, 103], max_length=8, max_prompt_length=5) == (
        [5, 6, 7, 8, 9], [100, 101, 102])
    enc = Encoder(tokenizer, max_length=48, max_prompt_length=32)
    long_prompt = "Please answer. " + "word " * 200 + "FINAL QUESTION?"
    long_answer = "Start of the answer. " + "more " * 200
    seq = enc.encode(Item(long_prompt, long_answer), 0)
    assert seq.prompt_len == 32 and len(seq) == 48
    prompt_text = tokenizer.decode(list(seq.input_ids[:32]))
    assert prompt_text.endswith("FINAL QUESTION?<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(list(seq.input_ids[32:])).startswith("Start of the answer.")
    with pytest.raises(ValueError, match="max_prompt_length"):
        Encoder(tokenizer, max_length=32, max_prompt_length=32)


@pytest.mark.slow
def test_shared_sequences_are_stored_once(tokenizer):
    enc = Encoder(tokenizer, 128, 64)
    rows = [judgment(1, "paired", "a", "P", "good", rb="bad"), judgment(2, "unpaired", "up", "P", "good")]
    data = build_data(rows, enc, "kto")
    assert len(data.seqs) == 2 and data.chosen == [0, 0] and data.rejected == [1]
    assert data.pairs == []  # training data for a pool loss holds only pools
    held = build_data(rows, enc, "kto", for_eval=True)
    assert held.pairs == [(0, 1)]  # held-out accuracy is measured on pairs


def test_length_grouped_batches():
    rng_lengths = random.Random(0)
    lengths = [rng_lengths.randint(1, 500) for _ in range(200)]
    batches = length_grouped(lengths, 8, random.Random(1))
    assert all(len(b) == 8 for b in batches) and len(batches) == 25
    assert sorted(i for b in batches for i in b) == list(range(200))
    # grouping pads less than a random batching would
    pad = lambda bs: sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)  # noqa
    order = list(range(200))
    random.Random(1).shuffle(order)
    assert pad(batches) < pad([order[k:k + 8] for k in range(0, 200, 8)]) / 2
    assert length_grouped(lengths, 8, random.Random(1)) == batches
    assert len(length_grouped(lengths[:20], 8, random.Random(1))) == 2  # drop_last
    assert len(length_grouped(lengths[:20], 8, random.Random(1), drop_last=False)) == 3


def fake_data(n_pairs=10, n_chosen=0, n_rejected=0):
    data = PreferenceData(prompts=["p"])
    data.seqs = [Seq(tuple(range(3 + k % 7)), 2, 0) for k in range(2 * n_pairs + n_chosen + n_rejected)]
    data.pairs = [(2 * k, 2 * k + 1) for k in range(n_pairs)]
    data.chosen = list(range(2 * n_pairs, 2 * n_pairs + n_chosen))
    data.rejected = list(range(2 * n_pairs + n_chosen, len(data.seqs)))
    return data


def test_batch_plan_is_a_function_of_seed_and_position():
    data = fake_data(10)
    plan = BatchPlan(data, batch_size=4, seed=3, pool=False)
    assert plan.batches_per_epoch == 2
    run = [plan.batch(k) for k in range(6)]
    # a fresh plan (as after --resume) gives the same batches from any position
    fresh = BatchPlan(data, batch_size=4, seed=3, pool=False)
    assert [fresh.batch(k) for k in (5, 2, 0)] == [run[5], run[2], run[0]]
    for chosen, rejected in run:
        assert len(chosen) == 4 and [(c, r) for c, r in zip(chosen, rejected)] == [
            data.pairs[c // 2] for c in chosen]
    assert run[0:2] != run[2:4]  # each epoch is reshuffled
    other_seed = BatchPlan(data, 4, seed=4, pool=False)
    assert [other_seed.batch(k) for k in range(6)] != run
    with pytest.raises(ValueError, match="fewer training examples"):
        BatchPlan(data, batch_size=11, seed=0, pool=False)


def test_pool_plan_cycles_the_smaller_pool():
    data = fake_data(0, n_chosen=9, n_rejected=3)
    plan = BatchPlan(data, batch_size=4, seed=0, pool=True)
    assert plan.batches_per_epoch == 2
    seen_chosen, seen_rejected = [], []
    for k in range(2):
        chosen, rejected = plan.batch(k)
        assert len(chosen) == 4 and len(rejected) == 4
        seen_chosen += chosen
        seen_rejected += rejected
    assert set(seen_chosen) <= set(data.chosen) and len(set(seen_chosen)) == 8
    assert set(seen_rejected) == set(data.rejected)
    with pytest.raises(ValueError):
        BatchPlan(fake_data(0, n_chosen=9, n_rejected=0), batch_size=4, seed=0, pool=True)


def test_eval_batches_cover_everything():
    data = fake_data(5, n_chosen=3, n_rejected=7)
    pairs = eval_batches(data, 2, pool=False)
    assert [len(c) for c, _ in pairs] == [2, 2, 1]
    assert [(c, r) for cs, rs in pairs for c, r in zip(cs, rs)] == data.pairs
    pools = eval_batches(data, 2, pool=True)
    assert sorted({i for c, _ in pools for i in c}) == data.chosen
    assert sorted(i for _, r in pools for i in r) == data.rejected
