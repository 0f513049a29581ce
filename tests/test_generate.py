"""Batched generation, seeding, padding correctness, mixed-adapter streaming chat, CLI.

No test compares the texts of two different batch shapes or prefill paths: float
sums depend on the shape (and on the CPU), so those texts may legitimately differ.
Texts are compared only for the same batch plan; across shapes the tests check the
exact parts (row seeds, sampler draws) or check, within a float tolerance, that each
answer is the greedy continuation of its prompt alone."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from apptools import make_lora_adapter
from rpo_app.adapters import AdapterError
from rpo_app.generate import (BASE, GenerationError, GenSettings, ModelHost,
                              generate_candidates, row_seed)

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Hi.",
    "How can I fall asleep faster when my mind keeps racing at night?",
    "Name a colour.",
]
# Plain greedy decoding (the default repetition penalty would change which token is
# best, and _assert_greedy_continuation checks plain greedy).
GREEDY = GenSettings(temperature=0, max_new_tokens=16, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama with untied, larger random weights. With tied embeddings it
    answers "\n" to every prompt, so a padding, prefill or adapter mix-up would change
    nothing; this one's greedy answers follow the prompt."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_pretrained(tiny_model_dir)
    cfg.tie_word_embeddings = False
    cfg.initializer_range = 0.2
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("lively-llama")
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def _tiny_host(model_dir) -> ModelHost:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    return ModelHost.from_loaded(model, tok, "tiny-llama")


@pytest.fixture(scope="module")
def tiny_host(model_dir) -> ModelHost:
    return _tiny_host(model_dir)


@pytest.fixture(scope="module")
def tiny_adapter(model_dir, tmp_path_factory) -> Path:
    return make_lora_adapter(model_dir, tmp_path_factory.mktemp("adapter") / "tuned")


@pytest.fixture
def host_with_adapter(model_dir, tiny_adapter) -> ModelHost:
    host = _tiny_host(model_dir)
    host.load_adapter("tuned", tiny_adapter)
    return host


def _assert_greedy_continuation(host: ModelHost, prompt: list[int], new: list[int],
                                max_new_tokens: int, adapter: str | None = None,
                                tol: float = 1e-4, rel_tol: float = 0.0) -> None:
    """`new`, generated in a padded batch, is greedy decoding of `prompt` alone up to
    float rounding: run unpadded with the tokens before it, every token is within
    `tol + rel_tol * |best|` of the best logit, and an answer that ended early ended where
    a stop token is best. `rel_tol` is for bf16 weights: every layer rounds to 2^-8 of
    a value's size, so a batch of another shape moves a logit by a few such steps (3 at
    a logit of 10.75 on an AVX-512 BF16 EPYC), while a padding fault picks tokens whole
    nats below the best."""
    import torch

    ids = torch.tensor([prompt + new], device=host.device)
    with host._adapter_mode([adapter]), torch.inference_mode():
        logits = host.model(input_ids=ids).logits[0, len(prompt) - 1:].float()
    best = logits.max(-1).values
    slack = tol + rel_tol * best.abs()
    for step, tok in enumerate(new):
        assert logits[step, tok] >= best[step] - slack[step], f"token {step} is not the greedy one"
    if len(new) < max_new_tokens:
        stop = max(logits[len(new), t] for t in host.stop_ids)
        assert stop >= best[len(new)] - slack[len(new)], \
            "the answer stopped where no stop token is best"


# -- settings ----------------------------------------------------------------------------
def test_settings_dict_and_validation():
    s = GenSettings(temperature=0.5, top_p=0.9, max_new_tokens=10, seed=3, system_prompt="Be brief.")
    assert s.to_dict() == {"temperature": 0.5, "top_p": 0.9, "max_new_tokens": 10, "seed": 3,
                           "system_prompt": "Be brief.", "min_p": GenSettings.min_p,
                           "repetition_penalty": GenSettings.repetition_penalty}
    assert GenSettings(temperature=0).greedy and not s.greedy
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"max_new_tokens": 0}):
        with pytest.raises(ValueError):
            GenSettings(**bad)


# -- batched generation --------------------------------------------------------------------
def test_returns_n_answers_per_prompt_in_order(tiny_host):
    calls = []
    out = tiny_host.generate(PROMPTS, n=2, settings=GenSettings(max_new_tokens=8),
                             batch_size=4, progress=lambda d, t: calls.append((d, t)))
    assert len(out) == len(PROMPTS)
    assert all(len(answers) == 2 and all(isinstance(a, str) for a in answers) for answers in out)
    assert calls[0] == (0, 6) and calls[-1] == (6, 6)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_same_seed_and_batch_size_reproduce_the_answers(tiny_host):
    s = GenSettings(temperature=1.0, top_p=0.95, max_new_tokens=8, seed=7)
    for batch_size in (4, 16):
        first = tiny_host.generate(PROMPTS, n=2, settings=s, batch_size=batch_size)
        assert tiny_host.generate(PROMPTS, n=2, settings=s, batch_size=batch_size) == first


def test_row_seed_depends_on_seed_prompt_and_index_only():
    # Pinned: sha256, not Python's per-process hash(), so reruns on any machine draw alike.
    assert row_seed(0, "Hi.", 0) == 5617831815975402769
    assert row_seed(7, "Hi.", 1) == 7979349729568600653
    seeds = {row_seed(s, t, i) for s in (0, 1) for t in ("Hi.", "Hi!") for i in (0, 1)}
    assert len(seeds) == 8 and all(0 <= x < 2 ** 63 for x in seeds)


def test_each_answer_gets_its_row_seed_whatever_the_batching(tiny_host, monkeypatch):
    """Batch size, batch order and the other prompts of a run do not change which
    seed an answer's sampler gets."""
    real, seen = tiny_host._run, []

    def recording(rows, seeds, *args, **kwargs):
        seen.extend(zip(map(tuple, rows), seeds))
        return real(rows, seeds, *args, **kwargs)

    monkeypatch.setattr(tiny_host, "_run", recording)
    settings = GenSettings(max_new_tokens=1, seed=7)
    want = sorted((tuple(tiny_host.encode_prompt(p)), row_seed(7, p, k))
                  for p in PROMPTS for k in range(2))
    for batch_size in (1, 4, 16):
        seen.clear()
        tiny_host.generate(PROMPTS, n=2, settings=settings, batch_size=batch_size)
        assert sorted(seen) == want
    seen.clear()
    tiny_host.generate(PROMPTS[1:2], n=2, settings=settings)
    assert sorted(seen) == [w for w in want if w[0] == tuple(tiny_host.encode_prompt(PROMPTS[1]))]


def test_row_sampler_draws_do_not_depend_on_the_batch():
    """Each row samples with its own generator: alone or between other rows, a seed
    draws the same tokens. Uniform logits over 8 tokens make every probability exactly
    1/8, so the token follows from the random draw alone, with no rounding involved."""
    import torch

    from rpo_app.generate import _row_sampler

    vocab = 8

    def draw(seeds: list[int], steps: int = 12) -> list[list[int]]:
        sampler = _row_sampler(seeds, 0.7, 1.0)
        rows: list[list[int]] = [[] for _ in seeds]
        for _ in range(steps):
            out = sampler(None, torch.zeros(len(seeds), vocab))
            assert (out == 0).sum(-1).tolist() == [1] * len(seeds)  # one token left per row
            for row, tok in zip(rows, out.argmax(-1).tolist()):
                row.append(tok)
        return rows

    alone = draw([11])[0]
    assert len(set(alone)) > 1
    assert draw([5, 11, 9])[1] == alone
    assert draw([11, 11]) == [alone, alone]
    assert draw([12])[0] != alone


def test_different_seed_gives_different_samples(tiny_host):
    a = tiny_host.generate(PROMPTS, n=2, settings=GenSettings(max_new_tokens=12, seed=1))
    b = tiny_host.generate(PROMPTS, n=2, settings=GenSettings(max_new_tokens=12, seed=2))
    assert a != b
    # The n samples of one prompt differ from each other too.
    assert any(x != y for x, y in a)


@pytest.mark.parametrize("share_prefill", [True, False], ids=["shared-prefill", "plain-padding"])
def test_greedy_padded_rows_decode_like_each_prompt_alone(tiny_host, share_prefill):
    """Left padding + attention mask, and the shared prefill (one prefix, each distinct
    prompt once): every row sees exactly its own prompt."""
    mixed = [tiny_host.encode_prompt(p) for p in PROMPTS for _ in range(2)]
    same = [tiny_host.encode_prompt(PROMPTS[0])] * 3  # nothing but the shared prefix differs
    tiny_host.share_prefill = share_prefill
    try:
        for rows in (mixed, same):
            with tiny_host.lock:
                new = tiny_host._run(rows, [0] * len(rows), GREEDY, [None] * len(rows))
            assert tiny_host.share_prefill is share_prefill  # no silent fallback
            for prompt, toks in zip(rows, new):
                _assert_greedy_continuation(tiny_host, prompt, toks, GREEDY.max_new_tokens)
    finally:
        tiny_host.share_prefill = True


def test_system_prompt_changes_the_input(tiny_host):
    plain = tiny_host.encode_prompt("Hi.")
    system = tiny_host.encode_prompt("Hi.", system_prompt="Answer in French.")
    assert "Answer in French." in tiny_host.tokenizer.decode(system)
    assert plain != system


@pytest.mark.slow
@pytest.mark.parametrize("precision,rel_tol", [("fp32", 0.0), ("bf16", 8 * 2 ** -8)])
def test_greedy_padding_on_default_model(default_model_dir, precision, rel_tol):
    # Both weight dtypes the app loads (ModelHost: bf16 where the CPU has bf16
    # instructions); on a CPU without them torch emulates bf16, slower but the same rule.
    host = ModelHost(str(default_model_dir), data_dir=default_model_dir.parent.parent,
                     device="cpu", precision=precision)
    rows = [host.encode_prompt(p) for p in PROMPTS[:2]]  # a short and a long one: padding
    settings = GREEDY
    for share_prefill in (True, False):
        host.share_prefill = share_prefill
        new = host._run(rows, [0, 0], settings, [None, None])
        for prompt, toks in zip(rows, new):
            assert toks  # the real model says something
            _assert_greedy_continuation(host, prompt, toks, 16, tol=1e-3, rel_tol=rel_tol)


# -- writing to the store ------------------------------------------------------------------
def test_generate_candidates_writes_with_provenance(store, tiny_host):
    ids, _ = store.add_prompts(PROMPTS, source="test")
    settings = GenSettings(max_new_tokens=8, seed=5)
    seen = []
    stats = generate_candidates(store, tiny_host, ids, n=2, settings=settings, batch_size=4,
                                progress=lambda d, t: seen.append((d, t)))
    assert stats["generated"] == 6 and stats["new"] + stats["duplicates"] == 6
    assert stats["tokens"] > 0 and stats["seconds"] > 0
    assert seen[-1] == (6, 6)
    assert store.count_responses() == stats["new"]
    for pid in ids:
        rows = store.responses_for_prompt(pid)
        assert 1 <= len(rows) <= 2
        for r in rows:
            assert r["source"] == "model" and r["model"] == "tiny-llama"
            assert r["adapter"] is None
            assert r["gen_settings"] == settings.to_dict()
    # Same seed and batch size again: the same texts, so nothing new is stored.
    again = generate_candidates(store, tiny_host, ids, n=2, settings=settings, batch_size=4)
    assert again["new"] == 0 and again["duplicates"] == 6


def _written(host, monkeypatch) -> list:
    """Every answer (Generated) the host's generate_batches yields from now on."""
    seen, real = [], host.generate_batches

    def collecting(*args, **kwargs):
        for batch in real(*args, **kwargs):
            seen.extend(batch)
            yield batch

    monkeypatch.setattr(host, "generate_batches", collecting)
    return seen


def test_base_answers_carry_the_log_prob_of_the_tokens_written(tiny_host, host_with_adapter):
    """Generated.logp is the scorer's log-prob of exactly the tokens written (the answer's
    and the stop token that ended it), under the model's own logits: before the
    repetition penalty and the temperature. Adapter answers carry none."""
    from rpo_app.batches import Seq

    settings = GenSettings(max_new_tokens=8, seed=4, repetition_penalty=1.3, temperature=0.7)
    answers = [a for b in tiny_host.generate_batches(PROMPTS, 2, settings, batch_size=4) for a in b]
    assert len(answers) == 6
    for a in answers:
        prompt = tiny_host.encode_prompt(PROMPTS[a.prompt])
        assert a.sequence[:len(prompt)] == tuple(prompt)
        assert len(a.sequence) - len(prompt) == a.tokens
        scored = tiny_host.sequence_logps([Seq(a.sequence, len(prompt), 0)], precision="fp32")[0]
        assert a.logp == pytest.approx(scored, rel=1e-4, abs=1e-3)
    tuned = [a for b in host_with_adapter.generate_batches(PROMPTS, 1, settings, adapter="tuned")
             for a in b]
    assert [a.logp for a in tuned] == [None] * 3


def test_generate_candidates_keeps_the_base_log_prob_where_the_scorer_scores_those_tokens(
        store, tiny_host, monkeypatch):
    from rpo_app import active

    ids, _ = store.add_prompts(PROMPTS + ["Say yes.", "Count to three."], source="test")
    written = _written(tiny_host, monkeypatch)
    stats = generate_candidates(store, tiny_host, ids, n=3, settings=GenSettings(max_new_tokens=6, seed=7))
    key = active.base_scorer(tiny_host, "fp32")
    kept = store.answer_logps(key)
    encoder = active.scoring_encoder(tiny_host.tokenizer)
    by_text = {(ids[a.prompt], a.text): a for a in written}
    same = set()
    for pid in ids:
        prompt = store.prompts([pid])[0]
        for r in store.responses_for_prompt(pid):
            a = by_text[(pid, r["text"])]
            seq = active.answer_sequence(encoder, prompt["text"], None, r["text"], r["cut_off"])
            if tuple(seq.input_ids) == a.sequence:
                same.add(r["id"])
                assert kept[r["id"]] == pytest.approx(
                    tiny_host.sequence_logps([seq], precision="fp32")[0], rel=1e-4, abs=1e-3)
    assert set(kept) == same and stats["base_logps"] == len(same)
    assert same, "no answer of this run decodes and encodes back to its tokens"
    # With a system prompt the answers were written to another input: nothing is kept.
    more = generate_candidates(store, tiny_host, ids, n=1, start_index=3,
                               settings=GenSettings(max_new_tokens=6, seed=7, system_prompt="Be brief."))
    assert more["new"] > 0 and more["base_logps"] == 0
    assert store.answer_logps(key) == kept


def test_the_first_scoring_job_skips_the_base_pass_over_the_answers_kept(store, model_dir, tiny_adapter,
                                                                          monkeypatch):
    from rpo_app import active

    host = _tiny_host(model_dir)
    host.load_adapter("tuned", tiny_adapter)
    ids, _ = store.add_prompts(PROMPTS + ["Say yes.", "Count to three."], source="test")
    stats = generate_candidates(store, host, ids, n=3, settings=GenSettings(max_new_tokens=6, seed=7))
    key = active.base_scorer(host, "fp32")
    kept = store.answer_logps(key)
    assert stats["base_logps"] == len(kept) > 0
    store.register_adapter("tuned", str(tiny_adapter), None, str(model_dir))
    scored = []
    real = host.sequence_logps

    def counting(seqs, adapter=None, precision="auto", **kw):
        scored.extend((adapter, len(s)) for s in seqs)
        return real(seqs, adapter=adapter, precision=precision, **kw)

    monkeypatch.setattr(host, "sequence_logps", counting)
    info = active.score_store(store, host, store.adapter("tuned"), precision="fp32")
    assert info["complete"] and info["answers"] == store.count_responses()
    # the base pass ran over the other answers only, and left the kept values alone
    assert sum(a is None for a, _ in scored) == store.count_responses() - len(kept)
    assert sum(a == "tuned" for a, _ in scored) == store.count_responses()
    assert {i: v for i, v in store.answer_logps(key).items() if i in kept} == kept


def test_generate_candidates_keeps_the_states_below_the_adapters_as_written(store, model_dir, monkeypatch,
                                                                           tmp_path):
    """A host that keeps states keeps each kept answer's input to the lowest layer the
    default adapter adapts, as written: the states a whole pass over the sequence gives,
    whichever way its batch was laid out (a first batch of one row, prefilled whole;
    then rows sharing the prefill), and however the answer ended. The first scoring
    job's adapter pass starts from them."""
    import torch

    from rpo_app import active, generate
    from rpo_app.batches import Seq
    from rpo_app.chat_template import end_of_turn_id
    from rpo_app.frozen_prefix import FrozenPrefixScorer
    from rpo_app.scoring import keeps_logits_by_mask

    host = _tiny_host(model_dir)
    assert active.written_states_layer(host) is None  # a host keeps none unless asked
    host.kept_states = {}
    # The random model all but never ends a turn: end some rows after a few tokens, so
    # some answers end and others hit the limit.
    real, eot = generate._logits_processors, end_of_turn_id(host.tokenizer)

    def ending_some(settings, seeds, prompt_width):
        def end(input_ids, scores):
            step = input_ids.shape[1] - prompt_width
            rows = [i for i in range(len(scores)) if i % 2 == 0 and step == 2 + i % 5]
            scores[rows, eot] = scores.max() + 100.0
            return scores

        return real(settings, seeds, prompt_width) + [end]

    monkeypatch.setattr(generate, "_logits_processors", ending_some)
    layer = active.written_states_layer(host)
    assert layer == 1  # the top half of the tiny model's 2 layers
    ids, _ = store.add_prompts(PROMPTS + ["Say yes.", "Count to three."], source="test")
    written = _written(host, monkeypatch)
    stats = generate_candidates(store, host, ids, n=3, first_batch=1, batch_size=8,
                                settings=GenSettings(max_new_tokens=10, seed=7))
    (key, states), = host.kept_states.items()
    assert key == (host.model_name, layer, "fp32") and states.first == layer
    kept = {a.sequence: a for a in written if a.sequence in states.hidden}
    assert len(kept) == stats["base_logps"] > 0  # every answer whose log-prob was kept
    assert {a.cut_off for a in kept.values()} == {True, False}  # both ways of ending
    whole = FrozenPrefixScorer(layer)
    seqs = [Seq(s, len(s) - a.tokens, 0) for s, a in kept.items()]
    with torch.inference_mode():
        whole.capture(host.model, seqs, host.pad_id, host.device, keeps_logits_by_mask(host.model))
    for s in kept:
        got, want = states.hidden[s], whole.hidden[s]
        assert got.shape == want.shape
        # to rounding (9.5e-6 at most on states up to 16.6); an off-by-one is off by units
        assert torch.allclose(got[:-1], want[:-1], rtol=1e-4, atol=1e-4)
        assert not got[-1].any()  # the last token is never fed
    # The first scoring job for an adapter above that layer starts from them (its check
    # against a whole pass passes), and gives the log-probs whole passes give.
    path = make_lora_adapter(model_dir, tmp_path / "top", layers=[layer])
    store.register_adapter("top", str(path), None, str(model_dir))
    host.load_adapter("top", path)
    from_states, real_call = [], FrozenPrefixScorer.__call__

    def counting(self, model, seqs, *args, **kwargs):
        from_states.extend(tuple(q.input_ids) for q in seqs)
        return real_call(self, model, seqs, *args, **kwargs)

    monkeypatch.setattr(FrozenPrefixScorer, "__call__", counting)
    info = active.score_store(store, host, store.adapter("top"), precision="fp32", kept=host.kept_states)
    assert info["complete"] and states.usable is True
    assert set(kept) <= set(from_states)
    got = store.answer_logps(active.adapter_scorer(store.adapter("top"), "fp32"))
    encoder = active.scoring_encoder(host.tokenizer)
    for a in store.answers_to_score():
        seq = active.answer_sequence(encoder, a["prompt"], None, a["text"], bool(a["cut_off"]))
        assert got[a["id"]] == pytest.approx(host.sequence_logps([seq], adapter="top", precision="fp32")[0],
                                             rel=1e-4, abs=1e-3)


def test_generate_candidates_with_adapter_and_unknown_ids(store, host_with_adapter):
    ids, _ = store.add_prompts(PROMPTS[:2], source="test")
    stats = generate_candidates(store, host_with_adapter, ids, n=1, adapter="tuned",
                                settings=GenSettings(max_new_tokens=6))
    assert stats["generated"] == 2
    assert {r["adapter"] for pid in ids for r in store.responses_for_prompt(pid)} == {"tuned"}
    assert store.response_counts(ids, adapter="tuned") == {ids[0]: 1, ids[1]: 1}
    with pytest.raises(ValueError, match="unknown prompt ids"):
        generate_candidates(store, host_with_adapter, [999999], n=1)


def test_batches_are_stored_as_they_finish(store, tiny_host, monkeypatch):
    """An interruption keeps the answers of the batches already done."""
    ids, _ = store.add_prompts(PROMPTS, source="test")
    real = tiny_host.generate_batches

    def interrupted(*args, **kwargs):
        gen = real(*args, **kwargs)
        yield next(gen)
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny_host, "generate_batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate_candidates(store, tiny_host, ids, n=2, batch_size=2,
                            settings=GenSettings(max_new_tokens=4))
    assert 1 <= store.count_responses() <= 2


# -- adapters on the host ------------------------------------------------------------------
def test_adapter_changes_output_and_unloads(model_dir, tiny_adapter):
    host = _tiny_host(model_dir)
    before = host.generate(PROMPTS, settings=GREEDY)
    host.load_adapter("tuned", tiny_adapter)
    host.load_adapter("tuned2", tiny_adapter)
    assert host.adapter_names() == ["tuned", "tuned2"]
    assert host.generate(PROMPTS, settings=GREEDY) == before  # no adapter = base model
    tuned = host.generate(PROMPTS, settings=GREEDY, adapter="tuned")
    assert tuned != before
    assert host.generate(PROMPTS, settings=GREEDY, adapter="tuned2") == tuned
    with pytest.raises(GenerationError, match="not loaded"):
        host.generate(PROMPTS, settings=GREEDY, adapter="nope")
    host.unload_adapter("tuned")
    host.unload_adapter("tuned2")
    assert host.adapter_names() == []
    assert host.generate(PROMPTS, settings=GREEDY) == before
    with pytest.raises(KeyError):
        host.unload_adapter("tuned")


def test_adapter_takes_the_weights_dtype_and_scores_like_the_fp32_one(model_dir, tiny_adapter):
    """A bf16 host keeps a loaded adapter's LoRA weights in bf16 (peft would upcast them to
    fp32 and cast every LoRA input up and back); under the scorer's bf16 autocast the
    log-probs are those of the fp32 LoRA weights, whose matmuls autocast runs in bf16."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rpo_app.batches import Encoder, Item

    tok = AutoTokenizer.from_pretrained(model_dir)
    bf16 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    host = ModelHost.from_loaded(bf16, tok, "tiny-bf16")
    host.load_adapter("tuned", tiny_adapter)
    lora = {p.dtype for n, p in host.model.named_parameters() if "lora_" in n}
    assert lora == {torch.bfloat16}
    enc = Encoder(tok, 128, 64)
    seqs = [enc.encode(Item(p, "An answer of a few words."), 0) for p in PROMPTS]
    ours = host.sequence_logps(seqs, adapter="tuned", precision="bf16")

    upcast = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval(), str(tiny_adapter),
        adapter_name="tuned")
    assert {p.dtype for n, p in upcast.named_parameters() if "lora_" in n} == {torch.float32}
    theirs = ModelHost.from_loaded(upcast, tok, "tiny-bf16-upcast")
    theirs._adapter_paths["tuned"] = str(tiny_adapter)
    expected = theirs.sequence_logps(seqs, adapter="tuned", precision="bf16")
    base = host.sequence_logps(seqs, adapter=None, precision="bf16")
    # The bf16 host rounds each token's log-prob to bf16 (scoring._log_softmax): this
    # random model gives every token about -ln(vocabulary) = -10.8, where a bf16 step is
    # 2^-4: each side may be off by half of one per token.
    tokens = max(len(q) - q.prompt_len for q in seqs)
    assert ours == pytest.approx(expected, rel=1e-3, abs=tokens * 2 ** -4)
    assert ours != pytest.approx(base, rel=1e-3, abs=tokens * 2 ** -4)  # the adapter is in use


def test_the_estimate_times_the_model_as_a_run_computes_it(model_dir):
    """A run's child loads fp32 weights on a CPU, with eager attention under bf16 autocast
    (models.training_attention): a bf16 host times a copy in that form and stays as it was;
    an fp32 host with fp32 arithmetic times itself."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    bf16 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    host = ModelHost.from_loaded(bf16, tok, "tiny-bf16")
    twin = host.trainer_forward_model("bf16")
    assert twin is not bf16
    assert {p.dtype for p in twin.parameters()} == {torch.float32}
    assert twin.config._attn_implementation == "eager" and not twin.training
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert bf16.config._attn_implementation != "eager"
    assert host.seconds_per_token("bf16") > 0

    fp32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert ModelHost.from_loaded(fp32, tok, "tiny-fp32").trainer_forward_model("fp32") is fp32


def test_own_thread_runs_every_computation_there_with_the_same_results(model_dir, tiny_adapter):
    """The app's host computes on one thread of its own whichever thread asks (a second
    computing thread makes OpenMP stop spin-waiting: cpushare), with the answers and
    log-probs of a host that computes in the caller's thread, and errors re-raised in
    the caller."""
    from rpo_app.batches import Encoder, Item

    plain = _tiny_host(model_dir)
    plain.load_adapter("tuned", tiny_adapter)
    host = _tiny_host(model_dir)
    host.use_own_thread()
    computed_on: set[int] = set()
    host.base.get_input_embeddings().register_forward_pre_hook(
        lambda *_: computed_on.add(threading.get_ident()))
    host.load_adapter("tuned", tiny_adapter)
    answers: dict[int, list] = {}
    callers = [threading.Thread(target=lambda i=i, a=a: answers.__setitem__(
        i, host.generate(PROMPTS, settings=GREEDY, adapter=a))) for i, a in enumerate([None, "tuned"])]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    chat = list(host.chat_stream([[{"role": "user", "content": "Hi"}]], ["tuned"], GREEDY))[-1]
    seqs = [Encoder(host.tokenizer, 128, 64).encode(Item(p, "A short answer."), 0) for p in PROMPTS]
    logps = host.sequence_logps(seqs, adapter="tuned")
    assert host.decode_timing() is not None

    assert len(computed_on) == 1
    assert computed_on.isdisjoint({threading.get_ident(), *(t.ident for t in callers)})
    # Greedy texts could split on a near-tie if the two threads' OpenMP teams differ in
    # size; the log-probs compare with a tolerance, the texts by what they must show.
    assert logps == pytest.approx(plain.sequence_logps(seqs, adapter="tuned"), rel=1e-4)
    assert logps != pytest.approx(plain.sequence_logps(seqs, adapter=None), rel=1e-4)
    assert [len(a) for a in answers.values()] == [len(PROMPTS)] * 2
    assert answers[0] != answers[1]  # the adapter applied on the host's thread
    assert isinstance(chat, list) and len(chat) == 1 and chat[0]
    with pytest.raises(KeyError, match="no adapter named"):
        host.unload_adapter("nope")
    host.unload_adapter("tuned")
    assert host.adapter_names() == []


def test_load_adapter_refuses_bad_folders(tiny_host, tiny_adapter, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AdapterError, match="adapter_config.json"):
        tiny_host.load_adapter("x", empty)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((tiny_adapter / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(AdapterError, match="safetensors"):
        tiny_host.load_adapter("x", pickled)
    with pytest.raises(ValueError, match="invalid adapter name"):
        tiny_host.load_adapter("../x", tiny_adapter)
    assert tiny_host.adapter_names() == []


def test_host_over_a_model_in_training_generates_with_its_active_adapter(model_dir, tmp_path):
    """The trainer's previews: a host over the PeftModel being trained generates with the
    active adapter, and as the base model inside disable_adapter(); training goes on."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lora = LoraConfig(r=4, lora_alpha=16, lora_dropout=0.5, init_lora_weights=False,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    net = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora)
    net.train()
    host = ModelHost.from_loaded(net, AutoTokenizer.from_pretrained(model_dir), "training")
    assert not net.training  # documented: the trainer calls train() again itself
    settings = GenSettings(temperature=0, max_new_tokens=8)
    tuned = host.generate(PROMPTS, settings=settings, batch_size=2)
    with net.disable_adapter():
        base = host.generate(PROMPTS, settings=settings, batch_size=2)
    assert host.share_prefill  # the shared prefill ran on the PeftModel, no fallback
    plain = _tiny_host(model_dir)  # same weights, same batch plan
    assert base == plain.generate(PROMPTS, settings=settings, batch_size=2)
    net.save_pretrained(tmp_path / "adapter")
    plain.load_adapter("trained", tmp_path / "adapter")
    assert tuned == plain.generate(PROMPTS, settings=settings, adapter="trained", batch_size=2)
    assert tuned != base
    # Back in training mode (LoRA dropout on), generation still runs without dropout
    # and hands the mode back; gradients then reach the LoRA weights.
    net.train()
    assert host.generate(PROMPTS, settings=settings, batch_size=2) == tuned
    assert net.training
    ids = torch.tensor([host.encode_prompt(PROMPTS[1])])
    net(input_ids=ids, labels=ids).loss.backward()
    grads = [w.grad for name, w in net.named_parameters() if "lora_" in name]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


# -- streaming chat ------------------------------------------------------------------------
def test_chat_stream_mixed_adapters_in_one_batch(host_with_adapter):
    host = host_with_adapter
    convs = [[{"role": "user", "content": PROMPTS[0]}],
             [{"role": "user", "content": PROMPTS[1]}],
             [{"role": "user", "content": PROMPTS[0]}]]
    updates = list(host.chat_stream(convs, [None, "tuned", "tuned"], GREEDY))
    assert len(updates) > 1 and all(len(u) == 3 for u in updates)
    final = updates[-1]
    adapters = [None, "tuned", "tuned"]
    rows = [host.encode_chat(c) for c in convs]
    with host.lock:  # the same batch, not streamed
        new = host._run(rows, [0] * 3, GREEDY, adapters)
    assert final == [host.tokenizer.decode(t, skip_special_tokens=True).strip() for t in new]
    for prompt, toks, adapter in zip(rows, new, adapters):  # each row on its own adapter
        _assert_greedy_continuation(host, prompt, toks, GREEDY.max_new_tokens, adapter)
    assert final[0] != final[2]  # same prompt, base row vs adapter row differ


def test_chat_stream_all_base_and_reader_leaving_early(host_with_adapter):
    host = host_with_adapter
    conv = [[{"role": "user", "content": "Hello"}]]
    final = list(host.chat_stream(conv * 2, [None, None], GREEDY))[-1]
    assert final == [a for (a,) in host.generate(["Hello"] * 2, settings=GREEDY, batch_size=2)]
    stream = host.chat_stream(conv, ["tuned"], GenSettings(temperature=0, max_new_tokens=200))
    next(stream)
    stream.close()  # the reader goes away: generation stops and the model is free
    assert host.lock.acquire(timeout=30)
    host.lock.release()
    assert not [t for t in threading.enumerate() if t.name == "chat-stream"]


@pytest.mark.parametrize("batch_adapter,chat_adapters", [(None, [None, "tuned"]),
                                                          ("tuned", [None, None])])
def test_a_chat_turn_runs_between_the_steps_of_a_candidate_batch(host_with_adapter, batch_adapter,
                                                                 chat_adapters):
    """On the app's host (its own thread), a chat turn asked for while candidates decode
    answers at once, between two of their steps, not after the batch. Neither answer
    changes: the batch gets its adapter setup back after a chat that used another, and
    the states it keeps as written are its own, not the chat's."""
    import time

    import torch

    host = host_with_adapter
    host.use_own_thread()
    settings = GenSettings(temperature=0, max_new_tokens=24, repetition_penalty=1.0)
    convs = [[{"role": "user", "content": PROMPTS[0]}]] * 2

    def written(on_step=None):
        rows = [a for b in host.generate_batches(PROMPTS, 1, settings, batch_adapter, len(PROMPTS),
                                                 on_step=on_step, keep_states_at=1) for a in b]
        return [a.text for a in rows], [a.states for a in rows]

    batch_alone, states_alone = written()
    assert all((s is None) == (batch_adapter is not None) for s in states_alone)
    chat_alone = list(host.chat_stream(convs, chat_adapters, settings))[-1]
    assert chat_alone[0] != chat_alone[1] or chat_adapters == [None, None]
    steps: list[int] = []
    chat: dict = {}

    def chat_turn():
        chat["texts"] = list(host.chat_stream(convs, chat_adapters, settings))[-1]
        chat["batch_step"] = steps[-1]

    def on_step(done, _total):  # on the model thread, inside the batch
        steps.append(done)
        if done == 2:
            threading.Thread(target=chat_turn).start()
            deadline = time.monotonic() + 30
            while not host._own_thread.urgent_waiting() and time.monotonic() < deadline:
                time.sleep(0.001)

    batch, states = written(on_step)
    assert chat["batch_step"] < settings.max_new_tokens  # answered before the batch ended
    assert chat["texts"] == chat_alone and batch == batch_alone
    for got, want in zip(states, states_alone):
        assert got is want is None or torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_chat_stream_no_adapters_and_errors(tiny_host):
    conv = [{"role": "user", "content": "Hi."}]
    final = list(tiny_host.chat_stream([conv], [None], GREEDY))[-1]
    assert final == [tiny_host.generate(["Hi."], settings=GREEDY)[0][0]]
    with pytest.raises(GenerationError, match="not loaded"):
        list(tiny_host.chat_stream([conv], ["nope"], GREEDY))
    with pytest.raises(ValueError):
        list(tiny_host.chat_stream([conv], [None, None], GREEDY))
    assert BASE == "__base__"


# -- CLI -------------------------------------------------------------------------------------
def _run_cli(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "rpo_app", "generate", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_cli_generate_default_model(linked_data_dir):
    from rpo_app.store import Store

    s = Store(linked_data_dir)
    s.add_prompts(["Say hi.", "Name a fruit.", "Count to three.", "Name a river."], source="test")
    s.close()
    proc = _run_cli("--n", "2", "--limit", "3", "--max-new-tokens", "16",
                    "--data-dir", str(linked_data_dir))
    assert proc.returncode == 0, proc.stderr
    s = Store(linked_data_dir)
    rows = [r for pid in range(1, 5) for r in s.responses_for_prompt(pid)]
    assert len(rows) == 6
    assert {r["model"] for r in rows} == {"SmolLM2-135M-Instruct"}
    assert {r["prompt_id"] for r in rows} == {1, 2, 3}
    assert "generated 6 answers" in proc.stdout


def test_cli_generate_prompts_file_and_adapter(model_dir, tiny_adapter, data_dir):
    """--prompts FILE with a tiny model and a registered adapter; a rerun tops up only."""
    import shutil

    from rpo_app.store import Store

    (data_dir / "adapters").mkdir()
    shutil.copytree(tiny_adapter, data_dir / "adapters" / "tuned")
    prompts = data_dir.parent / "p.txt"
    prompts.write_text("First prompt\n\nSecond prompt\n")
    args = ["--prompts", str(prompts), "--n", "1", "--max-new-tokens", "4", "--adapter", "tuned",
            "--model", str(model_dir), "--data-dir", str(data_dir)]
    proc = _run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    s = Store(data_dir)
    texts = {p["text"]: p["id"] for p in s.prompts()}
    assert set(texts) == {"First prompt", "Second prompt"}
    rows = [r for pid in texts.values() for r in s.responses_for_prompt(pid)]
    assert len(rows) == 2 and {r["adapter"] for r in rows} == {"tuned"}
    assert {r["model"] for r in rows} == {str(model_dir)}
    proc = _run_cli(*args)
    assert proc.returncode == 0 and "nothing to do" in proc.stdout


def test_cli_generate_uses_only_the_prompts_of_a_preference_file(model_dir, data_dir, tmp_path,
                                                                 capsys):
    """A TRL preference file given to `generate --prompts` supplies prompts, nothing
    else: its chosen/rejected answers are neither stored nor turned into judgments."""
    import json

    from rpo_app.cli import main
    from rpo_app.store import Store

    rows = [{"prompt": "Name a fruit.", "chosen": "Apple.", "rejected": "Seven."},
            {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Carrot."},
            {"prompt": "Name a fruit.", "chosen": "Pear.", "rejected": "Blue."}]
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert main(["generate", "--n", "1", "--prompts", str(prefs), "--max-new-tokens", "4",
                 "--model", str(model_dir), "--data-dir", str(data_dir)]) == 0, \
        capsys.readouterr().err
    s = Store(data_dir)
    try:
        assert s.count_judgments(include_retracted=True) == 0
        prompts = {p["text"]: p["id"] for p in s.prompts()}
        assert set(prompts) == {"Name a fruit.", "Name a colour."}
        stored = [r for pid in prompts.values() for r in s.responses_for_prompt(pid)]
        assert len(stored) == 2  # one generated answer per prompt, no file answers
        assert {r["source"] for r in stored} == {"model"}
        assert {r["prompt_id"] for r in stored} == set(prompts.values())
    finally:
        s.close()


def test_cli_generate_refuses_bad_adapter(data_dir, capsys):
    from rpo_app.cli import main

    assert main(["generate", "--adapter", "../x", "--data-dir", str(data_dir)]) == 2
    assert main(["generate", "--adapter", "missing", "--data-dir", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "no adapter named 'missing'" in err


def test_top_up_continues_samples_and_counts_per_adapter(store, host_with_adapter):
    """The iterative loop: prompts the base model already answered still get fresh
    answers from the tuned adapter, and a top-up adds only what is missing."""
    from rpo_app.generate import top_up

    ids, _ = store.add_prompts(["Name a fruit.", "Name a colour.", "Name a tool."], "test")
    settings = GenSettings(max_new_tokens=6, seed=3)
    base = top_up(store, host_with_adapter, [(pid, 0) for pid in ids], 2, settings)
    assert base["generated"] == 6
    assert store.prompts_with_fewer_responses(2) == []
    # One prompt already has a tuned answer: it gets one more, the others two.
    adapter = host_with_adapter.adapter_names()[0]
    top_up(store, host_with_adapter, [(ids[0], 0)], 1, settings, adapter=adapter)
    todo = [(r["id"], r["n"]) for r in store.prompts_with_fewer_responses(2, adapter=adapter)]
    assert sorted(todo) == sorted([(ids[0], 1), (ids[1], 0), (ids[2], 0)])
    seen = []
    tuned = top_up(store, host_with_adapter, todo, 2, settings, adapter=adapter,
                   progress=lambda done, total: seen.append((done, total)))
    assert tuned["generated"] == 5 and seen[-1] == (5, 5)
    assert store.response_counts(ids, adapter=adapter) == {pid: 2 for pid in ids}


# -- min-p and repetition penalty -------------------------------------------------------------
def test_min_p_and_repetition_penalty_validation():
    for bad, field in (({"min_p": -0.1}, "min_p"), ({"min_p": 1.5}, "min_p"),
                       ({"min_p": float("nan")}, "min_p"),
                       ({"repetition_penalty": 0.0}, "repetition_penalty"),
                       ({"repetition_penalty": -1.0}, "repetition_penalty"),
                       ({"repetition_penalty": float("inf")}, "repetition_penalty"),
                       ({"repetition_penalty": float("nan")}, "repetition_penalty")):
        with pytest.raises(ValueError, match=rf"^{field} must .* got {bad[field]}$"):
            GenSettings(**bad)
    ok = GenSettings(min_p=1.0, repetition_penalty=1.2)
    assert ok.to_dict()["min_p"] == 1.0 and ok.to_dict()["repetition_penalty"] == 1.2


def test_row_sampler_min_p_and_top_p_filter_after_temperature():
    """Which tokens can be drawn at all: 400 rows with their own seeds over one known
    distribution. min_p cuts relative to the largest probability after temperature;
    with top_p both cuts apply."""
    import math

    import torch

    from rpo_app.generate import _row_sampler

    logits = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05]).log()

    def drawn(temperature, top_p, min_p, n=400):
        sampler = _row_sampler(list(range(n)), temperature, top_p, min_p)
        out = sampler(None, logits.repeat(n, 1))
        assert (out == 0).sum(-1).tolist() == [1] * n
        return set(out.argmax(-1).tolist())

    assert drawn(1.0, 1.0, 0.0) == {0, 1, 2, 3, 4}
    assert drawn(1.0, 1.0, 0.6) == {0, 1}  # floor 0.24
    assert drawn(2.0, 1.0, 0.6) == {0, 1, 2}  # flatter after temperature 2: floor 0.18
    assert drawn(1.0, 0.9, 0.0) == {0, 1, 2, 3}  # nucleus
    assert drawn(1.0, 0.9, 0.3) == {0, 1, 2}  # nucleus and floor 0.12
    assert drawn(1.0, 1.0, 1.0) == {0}
    # A flat distribution over 2000 tokens: the kept set is far past the top 64 the
    # sampler looks at first, so it must widen.
    flat = torch.zeros(300, 2000)
    flat[:, 0] = math.log(1.5)
    for top_p in (1.0, 0.95):
        out = _row_sampler(list(range(300)), 1.0, top_p, 0.5)(None, flat)
        assert len(set(out.argmax(-1).tolist())) > 200


def test_min_p_one_samples_the_greedy_answer(tiny_host):
    """min_p = 1 keeps only the most likely token: sampling at any temperature and
    top_p decodes greedily (checked per answer, within a float tolerance)."""
    rows = [tiny_host.encode_prompt(p) for p in PROMPTS for _ in range(2)]
    seeds = list(range(len(rows)))
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.9)):
        settings = GenSettings(temperature=temperature, top_p=top_p, min_p=1.0, max_new_tokens=12)
        with tiny_host.lock:
            new = tiny_host._run(rows, seeds, settings, [None] * len(rows))
        for prompt, toks in zip(rows, new):
            _assert_greedy_continuation(tiny_host, prompt, toks, settings.max_new_tokens)


def test_repetition_penalty_counts_the_answer_not_the_prompt(tiny_model_dir):
    """The tied-embedding tiny Llama answers "\n" forever. A strong penalty must break
    the loop from the second token on, greedy (temperature 0) and sampled alike; the
    first token stays "\n" although every chat prompt holds "\n": the prompt (and
    its left padding) is not counted."""
    host = _tiny_host(tiny_model_dir)
    rows = [host.encode_prompt(p) for p in PROMPTS]
    newline = host.tokenizer.encode("\n", add_special_tokens=False)
    assert len(newline) == 1 and all(newline[0] in r for r in rows)
    with host.lock:
        plain = host._run(rows, [0] * 3, GenSettings(temperature=0, max_new_tokens=6), [None] * 3)
    assert plain == [newline * 6] * 3
    for settings in (GenSettings(temperature=0, max_new_tokens=6, repetition_penalty=100.0),
                     GenSettings(temperature=0.7, min_p=1.0, max_new_tokens=6,
                                 repetition_penalty=100.0)):
        with host.lock:
            new = host._run(rows, [0] * 3, settings, [None] * 3)
        for toks in new:
            assert toks[0] == newline[0] and toks[1] != newline[0]


def test_generate_cli_takes_min_p_and_repetition_penalty(data_dir, capsys):
    from rpo_app.cli import build_parser, main

    args = build_parser("generate").parse_args(
        ["generate", "--min-p", "0.05", "--repetition-penalty", "1.1"])
    assert (args.min_p, args.repetition_penalty) == (0.05, 1.1)
    assert main(["generate", "--min-p", "2", "--data-dir", str(data_dir)]) == 2
    assert main(["generate", "--repetition-penalty", "0", "--data-dir", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert "min_p must be in [0, 1]" in err and "repetition_penalty must be" in err
