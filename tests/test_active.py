"""Active selection: the informative scores (pure math), the queue's orders on a real
store, and the scoring job on a real (tiny) model with a real adapter."""
from __future__ import annotations

import math
import random

import pytest

from rpo_app.labelqueue import LabelQueue
from rpo_app.informative import Scored, interleave, near_duplicate, score_answers, score_pairs


# -- the math -----------------------------------------------------------------------------

def test_interleave_takes_each_items_better_rank():
    # item 0 is the most unsure, item 3 the most departing; item 1 and 2 are in the middle
    scores = interleave([4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0])
    assert scores[0] == scores[3] == 1.0
    assert scores[1] == scores[2] == 0.75
    with pytest.raises(ValueError):
        interleave([1.0], [])


def test_pair_margin_is_the_adapters_log_odds_and_both_ends_come_first():
    # r = log pi_adapter - log pi_base per answer
    reward = {1: 2.0, 2: 2.1, 3: -3.0, 4: 0.0, 5: 0.01, 6: 5.0}
    pairs = [(1, 2), (3, 6), (4, 5)]
    rows = {(r.a, r.b): r for r in score_pairs("paired", pairs, reward, beta=1.0)}
    assert rows[(1, 2)].margin == pytest.approx(-0.1)
    assert rows[(3, 6)].margin == pytest.approx(-8.0)
    # (1, 2): unsure and the adapter moved on both; (3, 6): departs most; (4, 5): unsure
    # but the adapter never moved on either (two answers without the learned trait)
    assert rows[(1, 2)].score == rows[(3, 6)].score == 1.0
    assert rows[(4, 5)].score < 1.0
    order = sorted(rows.values(), key=lambda r: -r.score)
    assert order[-1].a == 4


def test_beta_scales_the_margin():
    rows = score_pairs("paired", [(1, 2)], {1: 1.0, 2: 0.0}, beta=0.1)
    assert rows[0].margin == pytest.approx(0.1)


def test_near_duplicates_and_unscored_answers_are_left_out():
    texts = {1: "Paris is the capital of France.", 2: "paris is the capital of france.",
             3: "The capital of France is Paris, a city on the Seine.", 4: "x"}
    assert near_duplicate(texts[1], texts[2])
    assert not near_duplicate(texts[1], texts[3])
    rows = score_pairs("paired", [(1, 2), (1, 3), (3, 9)], {1: 0.0, 2: 1.0, 3: 2.0}, 1.0, texts)
    assert [(r.a, r.b) for r in rows] == [(1, 3)]


def test_single_answers_are_scored_against_the_median():
    rows = {r.a: r for r in score_answers([1, 2, 3, 4, 5], {1: -4.0, 2: 0.0, 3: 0.1, 4: 0.2, 5: 6.0},
                                          beta=1.0)}
    assert rows[3].margin == pytest.approx(0.0)  # the median
    assert rows[3].score == 1.0 and rows[5].score == 1.0  # most unsure, farthest out
    # second in each list: -4.1 (departing) and -0.1 (unsure); then 0.1, third of the unsure
    assert rows[1].score == rows[2].score > rows[4].score
    assert all(r.kind == "unpaired" and r.b is None for r in rows.values())


# -- the queue's orders --------------------------------------------------------------------

WORDS = ("first stir the sauce then taste it and add salt slowly while the pan warms on low heat "
         "before serving with bread").split()


def _seed(store, n_prompts=6, answers=3):
    out = {}
    for i in range(n_prompts):
        pid, _ = store.add_prompt(f"Question {i}: how do I do thing {i}?", "test", f"fam{i % 3}")
        out[pid] = [store.add_response(pid, " ".join(WORDS[(i + k * 7 + j) % len(WORDS)]
                                                     for j in range(4 + 2 * k)), "test")[0]
                    for k in range(answers)]
    return out


def _scores(store, seeded, seed=0):
    """Made-up informative scores over every pair and answer, as the job stores them."""
    rng = random.Random(seed)
    rows = []
    for ids in seeded.values():
        rows += [Scored("paired", a, b, rng.uniform(-3, 3), rng.random())
                 for i, a in enumerate(ids) for b in ids[i + 1:]]
        rows += [Scored("unpaired", a, None, rng.uniform(-3, 3), rng.random()) for a in ids]
    store.replace_item_scores("run:test:fp32:512", rows, {"adapter": "tuned", "answers": 18,
                                                           "complete": True, "updated_at": 0.0})
    return rows


def test_informative_order_falls_back_to_the_queue_until_scored(store):
    _seed(store)
    q = LabelQueue(store, seed=0)
    item = q.next_item("ann", "paired", "informative")
    assert item is not None and item.order == "queue"
    assert item.public()["order"] == "queue"
    with pytest.raises(ValueError, match="unknown order"):
        q.next_item("ann", "paired", "smart")


@pytest.mark.parametrize("mode", ["paired", "unpaired"])
def test_informative_order_serves_the_highest_scores_first(store, mode):
    seeded = _seed(store)
    rows = [r for r in _scores(store, seeded) if r.kind == mode]
    q = LabelQueue(store, seed=0)
    served = []
    while (item := q.next_item("ann", mode, "informative")) is not None and item.order == "informative":
        key = (min(item.left["id"], item.right["id"]), max(item.left["id"], item.right["id"])) \
            if item.right else (item.left["id"], None)
        served.append(key)
        q.submit(item.token, "left" if item.right else "up", "ann")
    expected = [(r.a, r.b) for r in sorted(rows, key=lambda r: -r.score)]
    assert served == expected  # each scored item once, best first
    # every scored item is judged: the queue order takes over for whatever is left
    assert q.next_item("ann", mode, "informative") is None or item.order == "queue"


def test_informative_order_skips_judged_leased_and_skipped_items(store):
    seeded = _seed(store)
    rows = sorted((r for r in _scores(store, seeded) if r.kind == "paired"), key=lambda r: -r.score)
    top, second, third = rows[0], rows[1], rows[2]
    store.add_judgment("paired", top.a, top.b, "a", annotator="someone", source="label")
    q = LabelQueue(store, seed=0)
    item = q.next_item("ann", "paired", "informative")
    pair = tuple(sorted((item.left["id"], item.right["id"])))
    assert pair != (top.a, top.b)
    # another annotator: the prompt of ann's item is leased, so a pair of another prompt
    other = q.next_item("bob", "paired", "informative")
    assert other.left["prompt_id"] != item.left["prompt_id"]
    q.skip(item.token, "ann")
    again = q.next_item("ann", "paired", "informative")
    assert again.left["prompt_id"] != item.left["prompt_id"]  # a skipped prompt stays skipped
    assert second.a and third.a  # (the list has enough items for the checks above)


def test_random_order_reaches_every_open_pair(store):
    seeded = _seed(store, n_prompts=4, answers=3)
    q = LabelQueue(store, seed=3)
    pairs = set()
    while (item := q.next_item("ann", "paired", "random")) is not None:
        assert item.order == "random"
        pairs.add(tuple(sorted((item.left["id"], item.right["id"]))))
        q.submit(item.token, "tie", "ann")
    assert len(pairs) == sum(math.comb(len(v), 2) for v in seeded.values())


# -- the scoring job on a real model --------------------------------------------------------

@pytest.fixture
def tiny_adapter(tiny_model_dir, tmp_path):
    from apptools import make_lora_adapter

    return make_lora_adapter(tiny_model_dir, tmp_path / "adapter")


@pytest.mark.slow
def test_scoring_job_scores_the_pool_and_orders_the_queue(store, data_dir, tiny_model_dir, tiny_adapter):
    from rpo_app import active
    from rpo_app.batches import Encoder, Item
    from rpo_app.generate import ModelHost

    seeded = _seed(store, n_prompts=5, answers=3)
    store.register_adapter("tuned", str(tiny_adapter), None, str(tiny_model_dir))
    adapter = store.adapter("tuned")
    assert active.needs_scoring(store)["name"] == "tuned"
    host = ModelHost(str(tiny_model_dir), data_dir, device="cpu")
    host.load_adapter("tuned", tiny_adapter)
    seen = []
    info = active.score_store(store, host, adapter, precision="fp32",
                              progress=lambda p: seen.append((p.phase, p.done, p.total)))
    assert info["complete"] and info["answers"] == 15 and info["pool"] == 15
    assert info["items"] == {"paired": 15, "cross": 0, "unpaired": 15}
    assert active.needs_scoring(store) is None  # complete for the newest adapter
    # one phase over both passes' tokens, moving up to its total
    assert {p for p, _, _ in seen} == {"base model and adapter tuned"}
    assert [d for _, d, _ in seen] == sorted(d for _, d, _ in seen)
    assert all(done <= total for _, done, total in seen)
    assert seen[-1][1] == seen[-1][2] > 0
    assert info["first_ranks_s"] <= info["seconds"]
    # the stored log-probs are the trainer's scorer's, one answer checked by hand
    base_lp = store.answer_logps(active.base_scorer(host, "fp32"))
    ad_lp = store.answer_logps(active.adapter_scorer(adapter, "fp32"))
    rid = seeded[min(seeded)][0]
    answer = store.response(rid)
    seq = Encoder(host.tokenizer, 512, 256).encode(Item(answer["prompt"], answer["text"]), 0)
    assert ad_lp[rid] == pytest.approx(host.sequence_logps([seq], adapter="tuned", precision="fp32")[0],
                                       rel=1e-4)
    assert base_lp[rid] == pytest.approx(host.sequence_logps([seq], precision="fp32")[0], rel=1e-4)
    assert ad_lp[rid] != pytest.approx(base_lp[rid], rel=1e-3)  # the adapter changes them
    # the queue's first informative item is a top-scored one
    item = LabelQueue(store, seed=0).next_item("ann", "paired", "informative")
    assert item.order == "informative"
    top = store.next_informative("someone-else", store.informative_meta()["scorer"], "paired", 1)[0]
    assert top["score"] == 1.0
    # a second job for the same adapter scores nothing again (cached), only re-ranks
    seen.clear()
    active.score_store(store, host, adapter, precision="fp32",
                       progress=lambda p: seen.append((p.phase, p.done, p.total)))
    assert all(total == 0 for _, _, total in seen)


def _top_layer_adapters(store, data_dir, tiny_model_dir, tmp_path):
    """A seeded store and a host with two adapters on the tiny model's top layer only,
    "top-1" and "top-2", registered and loaded."""
    from apptools import make_lora_adapter

    from rpo_app.generate import ModelHost

    _seed(store, n_prompts=5, answers=3)
    host = ModelHost(str(tiny_model_dir), data_dir, device="cpu", precision="fp32")
    for n in (1, 2):
        path = make_lora_adapter(tiny_model_dir, tmp_path / f"top-{n}", seed=n, layers=[1])
        store.register_adapter(f"top-{n}", str(path), None, str(tiny_model_dir))
        host.load_adapter(f"top-{n}", path)
    return host


@pytest.mark.slow
def test_a_later_adapter_scores_from_the_hidden_states_the_first_job_kept(store, data_dir, tiny_model_dir,
                                                                          tmp_path, monkeypatch):
    """Adapters on the top layer only: the first job's base pass keeps each answer's
    input to that layer and its adapter pass starts there; so does the next adapter's
    (the bottom layer never runs), with the log-probs a whole pass gives."""
    import torch

    from rpo_app import active
    from rpo_app.frozen_prefix import FrozenPrefixScorer, _decoder
    from rpo_app.scoring import keeps_logits_by_mask

    host = _top_layer_adapters(store, data_dir, tiny_model_dir, tmp_path)
    assert host.adapter_first_layer("top-1") == 1
    kept: dict = {}
    from_states, real_call = [], FrozenPrefixScorer.__call__

    def counting(self, model, seqs, *args, **kwargs):
        from_states.extend(tuple(q.input_ids) for q in seqs)
        return real_call(self, model, seqs, *args, **kwargs)

    monkeypatch.setattr(FrozenPrefixScorer, "__call__", counting)
    active.score_store(store, host, store.adapter("top-1"), precision="fp32", kept=kept)
    (states,) = kept.values()
    assert states.first == 1 and len(states.hidden) == 15 and states.usable is True
    assert set(states.hidden) <= set(from_states)  # the first adapter pass ran from them too
    first = store.answer_logps(active.adapter_scorer(store.adapter("top-1"), "fp32"))
    encoder = active.scoring_encoder(host.tokenizer)
    for a in store.answers_to_score():
        seq = active.answer_sequence(encoder, a["prompt"], None, a["text"], False)
        assert first[a["id"]] == pytest.approx(host.sequence_logps([seq], adapter="top-1", precision="fp32")[0],
                                               rel=1e-4, abs=1e-3)
    bottom = _decoder(host.model).layers[0]
    calls = []
    hook = bottom.register_forward_hook(lambda *_: calls.append(1))
    try:
        active.score_store(store, host, store.adapter("top-2"), precision="fp32", kept=kept)
    finally:
        hook.remove()
    assert calls == []  # every answer ran from the kept states
    from_kept = store.answer_logps(active.adapter_scorer(store.adapter("top-2"), "fp32"))
    store.forget_answer_logps(active.adapter_scorer(store.adapter("top-2"), "fp32"))
    active.score_store(store, host, store.adapter("top-2"), precision="fp32")  # nothing kept: whole passes
    whole = store.answer_logps(active.adapter_scorer(store.adapter("top-2"), "fp32"))
    assert from_kept.keys() == whole.keys() and len(whole) == 15
    assert all(from_kept[i] == pytest.approx(whole[i], rel=1e-4, abs=1e-3) for i in whole)
    # kept through the shared-prompt scorer (the app's default), pieced together from its
    # passes: the states a whole pass keeps, up to rounding, bar the never-fed last token
    encoder = active.scoring_encoder(host.tokenizer)
    seqs = [active.answer_sequence(encoder, a["prompt"], None, a["text"], False)
            for a in store.answers_to_score()]
    whole_kept = FrozenPrefixScorer(1)
    with torch.inference_mode():
        whole_kept.capture(host.model, seqs, host.pad_id, host.device, keeps_logits_by_mask(host.model))
    assert whole_kept.hidden.keys() == states.hidden.keys()
    for key, h in whole_kept.hidden.items():
        assert states.hidden[key].shape == h.shape
        assert torch.allclose(states.hidden[key][:-1], h[:-1], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_kept_states_stay_within_their_budget_and_skip_adapters_on_every_layer(
        store, data_dir, tiny_model_dir, tiny_adapter, tmp_path, monkeypatch):
    from apptools import make_lora_adapter

    from rpo_app import active
    from rpo_app.generate import ModelHost

    _seed(store, n_prompts=5, answers=3)
    host = ModelHost(str(tiny_model_dir), data_dir, device="cpu")
    host.load_adapter("every", tiny_adapter)
    store.register_adapter("every", str(tiny_adapter), None, str(tiny_model_dir))
    assert host.adapter_first_layer("every") is None
    kept: dict = {}
    active.score_store(store, host, store.adapter("every"), precision="fp32", kept=kept)
    assert kept == {}  # LoRA on the bottom layer too: nothing below it to keep
    path = make_lora_adapter(tiny_model_dir, tmp_path / "top", layers=[1])
    store.register_adapter("top", str(path), None, str(tiny_model_dir))
    host.load_adapter("top", path)
    monkeypatch.setattr(active, "KEPT_STATES_SHARE", 0.0)  # no memory to spare: the first batch only
    monkeypatch.setattr(active, "BATCH_TOKENS", 200)
    active.score_store(store, host, store.adapter("top"), precision="fp32", kept=kept)
    (states,) = kept.values()
    assert 0 < len(states.hidden) < 15
    got = store.answer_logps(active.adapter_scorer(store.adapter("top"), "fp32"))
    assert len(got) == 15  # the rest scored by whole passes


@pytest.mark.slow
def test_the_apps_scoring_jobs_keep_states_in_the_host(store, data_dir, tiny_model_dir, tmp_path):
    """The app's background jobs keep their states where its generation keeps the states
    of the answers it writes (ModelHost.kept_states), and keep none on a host that keeps
    none."""
    from rpo_app import active
    from rpo_app.models import pick_precision

    host = _top_layer_adapters(store, data_dir, tiny_model_dir, tmp_path)
    jobs = active.ScoringJobs(store, lambda: host)
    jobs.start(store.adapter("top-1"))
    assert jobs.wait(120).state == "finished"
    assert host.kept_states is None
    host.kept_states = {}
    jobs.start(store.adapter("top-2"))
    assert jobs.wait(120).state == "finished"
    (key, states), = host.kept_states.items()
    # the job's precision: the machine's (bf16 autocast on a CPU with bf16 instructions)
    assert key == (host.model_name, 1, pick_precision(str(host.device))) and len(states.hidden) == 15


def test_kept_states_room_and_pruning():
    import torch

    from rpo_app.batches import Seq
    from rpo_app.frozen_prefix import FrozenPrefixScorer

    def seq(*ids):
        return Seq(tuple(ids), 1, 0)

    states = FrozenPrefixScorer(1, budget_mb=None)
    a, b, c = seq(1, 2, 3), seq(1, 4), seq(5, 6, 7, 8)
    assert states.room([a, b, c])  # no budget, and nothing kept yet
    states.hidden = {tuple(a.input_ids): torch.zeros(3, 1000), tuple(b.input_ids): torch.zeros(2, 1000)}
    states.budget_mb = 5 * 4000 / 1e6 + 4 * 4000 / 1e6  # what is kept and c's 4 tokens, exactly
    assert states.room([c, a]) and not states.room([c, seq(9, 9)])
    assert states.has([a, b]) and not states.has([a, c])
    states.keep_only([b, c])
    assert list(states.hidden) == [tuple(b.input_ids)]


@pytest.mark.slow
def test_first_ranks_come_after_the_first_chunk(store, data_dir, tiny_model_dir, tiny_adapter, monkeypatch):
    """The queue gets an order after the first small chunk (both passes), not after a
    base pass over the whole pool; later chunks re-rank, and the last completes it."""
    from rpo_app import active
    from rpo_app.generate import ModelHost

    _seed(store, n_prompts=5, answers=3)
    monkeypatch.setattr(active, "FIRST_CHUNK", 3)
    monkeypatch.setattr(active, "LARGEST_CHUNK", 6)
    store.register_adapter("tuned", str(tiny_adapter), None, str(tiny_model_dir))
    host = ModelHost(str(tiny_model_dir), data_dir, device="cpu")
    host.load_adapter("tuned", tiny_adapter)
    orders = []

    def progress(p):
        meta = store.informative_meta()
        orders.append((p.done, p.total, meta and meta["answers"], meta and meta["complete"],
                       dict(p.seconds)))

    info = active.score_store(store, host, store.adapter("tuned"), precision="fp32", progress=progress)
    assert info["complete"] and info["answers"] == 15
    published = [(answers, complete) for done, total, answers, complete, _ in orders
                 if answers is not None and done < total]
    # chunks of 3, 6 and 6 answers: ranks over 3, then 9, before the work is done
    assert published[0] == (3, False) and (9, False) in published
    last = orders[-1][4]
    assert last["base model pass"] > 0 and last["adapter pass"] > 0 and last["ranking"] >= 0


def test_chunks_are_whole_prompts_doubling_up_to_the_largest():
    from rpo_app.active import chunks

    pool = [{"id": 10 * p + k, "prompt_id": p} for p in range(20) for k in range(4)]
    parts = chunks(pool, first=8, largest=16)
    assert [len(c) for c in parts] == [8, 16, 16, 16, 16, 8]
    assert [i for c in parts for i in c] == [a["id"] for a in pool]  # pool order, each once
    for c in parts:  # whole prompts
        assert all(len([i for i in c if i // 10 == i0 // 10]) == 4 for i0 in c)
    # a prompt with more answers than a chunk is not split
    big = [{"id": k, "prompt_id": 0} for k in range(10)] + [{"id": 99, "prompt_id": 1}]
    assert chunks(big, first=4, largest=4) == [list(range(10)), [99]]


def test_pool_takes_whole_prompts_with_the_fewest_judgments_first():
    from rpo_app.active import pick_pool

    answers = [{"id": 10 * p + k, "prompt_id": p, "judged": 3 if p < 3 else 0}
               for p in range(6) for k in range(2)]
    pool = pick_pool(answers, 6, seed=1)
    assert len(pool) == 6
    prompts = {a["prompt_id"] for a in pool}
    assert prompts == {3, 4, 5}  # the unjudged prompts, whole
    assert pick_pool(answers, 6, seed=1) == pool  # seeded
    assert len(pick_pool(answers, 100, seed=1)) == 12



def test_scoring_status_line_never_says_eta_zero_while_work_remains():
    import time

    from rpo_app.active import ScoreJobStatus

    st = ScoreJobStatus(state="running", adapter="run-1", phase="adapter run-1", done=0, total=1000,
                        phase_started_at=time.time() - 5, started_at=time.time() - 5)
    assert "measuring the speed" in st.line() and "ETA" not in st.line()
    st.done = 250
    assert "25% of 1,000 tokens" in st.line()
    assert "ETA 15 s" in st.line() or "ETA 16 s" in st.line()  # 15 s and a moment, rounded up
    st.done = 1000  # every token scored, the items are being ranked and stored
    assert "ranking the items" in st.line() and "ETA" not in st.line()
    st.state, st.answers, st.finished_at = "finished", 40, st.started_at + 90
    assert st.line().startswith("✔ Informative order ready: 40 answers") and "in 2 min" in st.line()
