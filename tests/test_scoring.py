"""The scorer that runs each prompt once (rpo_app.scoring.shared_prompt_logps) against the
plain one: the same log-probs up to float rounding, whatever the prompts share."""
from __future__ import annotations

import functools

import pytest


@pytest.fixture(scope="module")
def lively_lm():
    """A random Llama whose next-token distributions vary with the context (larger
    weights than the default init), so a wrong position, mask or cache row shows."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, initializer_range=0.3, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


SYSTEM = (1, 5, 6, 7, 8)  # a common prefix, like the chat template's system turn


def _seqs():
    from rpo_app.batches import Seq

    p1, p2, p3 = SYSTEM + (20, 21, 22), SYSTEM + (30,), SYSTEM + (40, 41, 42, 43, 44, 45)
    return [Seq(p1 + (50, 51, 52, 2), len(p1), 0),
            Seq(p2 + (60, 61, 62, 63, 64, 65, 66, 2), len(p2), 1),
            Seq(p1 + (53, 2), len(p1), 0),          # same prompt as the first, shorter answer
            Seq(p3 + (70,), len(p3), 2),             # a one-token answer: only the prompt's last logits
            Seq(p1 + (50, 51, 54, 55, 56, 2), len(p1), 0),
            Seq(p2, len(p2), 1)]                     # no answer tokens: scores 0


def _lora(lm, seed: int):
    """`lm` with a rank-2 LoRA on every linear layer, B not zero (so it changes the
    answers), in train mode. Callers unload it: the model is module-scoped."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    net = get_peft_model(lm, LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM",
                                        init_lora_weights=False))
    return net.train()


def _sums_and_grads(net, score, bf16: bool = False):
    """`score`'s sums over _seqs() and the trainable gradients of a weighted sum of them
    (bf16: under CPU bf16 autocast, as the trainer runs on bf16 hardware)."""
    import torch

    net.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        sums = score(net, _seqs(), 0, "cpu", True)
    (sums * torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 2.0])).sum().backward()
    return sums.detach(), [p.grad.clone() for p in net.parameters() if p.requires_grad]


@pytest.mark.parametrize("by_mask", [False, True])
def test_shared_prompts_score_what_the_plain_scorer_scores(lively_lm, by_mask):
    import torch

    from rpo_app.scoring import keeps_logits_by_mask, sequence_logps, shared_prompt_logps

    if by_mask and not keeps_logits_by_mask(lively_lm):
        pytest.skip("this transformers' Llama has no boolean logits_to_keep")
    s = _seqs()
    with torch.no_grad():
        plain = sequence_logps(lively_lm, s, 0, "cpu", by_mask)
        shared = shared_prompt_logps(lively_lm, s, 0, "cpu", by_mask)
        # one prompt alone (the whole prompt is the common prefix but its last token)
        alone = shared_prompt_logps(lively_lm, [s[0], s[2], s[4]], 0, "cpu", by_mask)
        single = shared_prompt_logps(lively_lm, [s[1]], 0, "cpu", by_mask)
    assert torch.allclose(shared, plain, rtol=1e-4, atol=1e-4), (shared, plain)
    assert torch.allclose(alone, plain[[0, 2, 4]], rtol=1e-4, atol=1e-4)
    assert torch.allclose(single, plain[[1]], rtol=1e-4, atol=1e-4)
    assert shared[5] == 0 and (shared[:5] < 0).all()
    assert len({round(v, 3) for v in shared[:5].tolist()}) == 5  # distinct: positions matter


def test_a_sequence_without_a_prompt_is_refused(lively_lm):
    from rpo_app.batches import Seq
    from rpo_app.scoring import shared_prompt_logps

    with pytest.raises(ValueError, match="without a prompt token"):
        shared_prompt_logps(lively_lm, [Seq((3, 4, 5), 0, 0)], 0, "cpu", False)


@pytest.mark.parametrize("head_trains", [False, True])
def test_the_head_run_in_slices_gives_the_models_own_logps_and_gradients(lively_lm, monkeypatch,
                                                                         head_trains):
    """The LM head run apart, a few tokens at a time, must give what the model's own logits
    give: the same sums and the same gradients, whether the frozen head's backward was
    worked out in the forward pass (LoRA) or the head trains and each slice is recomputed."""
    import torch

    from rpo_app import scoring

    net = _lora(lively_lm, 1)
    head = net.get_base_model().get_output_embeddings()
    head.weight.requires_grad_(head_trains)
    assert scoring.runs_head_apart(net) and scoring.keeps_logits_by_mask(net)
    monkeypatch.setattr(scoring, "HEAD_SLICE", 3)  # 21 answer tokens: 7 slices
    frozen_path = []
    apply = scoring._frozen_head_logps().apply
    monkeypatch.setattr(scoring._frozen_head_logps(), "apply",
                        lambda *a: frozen_path.append(1) or apply(*a))

    def run(apart: bool):
        monkeypatch.setattr(scoring, "runs_head_apart", lambda _m: apart)
        return _sums_and_grads(net, scoring.sequence_logps)

    try:
        (sliced, g_sliced), (whole, g_whole) = run(True), run(False)
    finally:
        head.weight.requires_grad_(False)
        net.unload()  # the module-scoped model goes back to the other tests without LoRA layers
    assert len(frozen_path) == (0 if head_trains else 7)
    assert len(g_sliced) == 2 * 2 * 7 + head_trains  # A and B of 7 linears in 2 layers (+ the head)
    assert torch.allclose(sliced, whole, rtol=1e-5, atol=1e-5), (sliced, whole)
    assert sliced[5] == 0 and (sliced[:5] < 0).all()
    # other sums, other rounding: compared by norm, not element by element
    assert all((a - b).norm() <= 1e-4 * b.norm() for a, b in zip(g_sliced, g_whole))
    assert any(g.abs().sum() > 0 for g in g_sliced)


def test_a_model_that_scales_its_logits_keeps_its_own_head():
    """Gemma 2 softcaps its logits after the head: running the head apart would skip that."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from rpo_app.scoring import runs_head_apart

    cfg = Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    assert not runs_head_apart(Gemma2ForCausalLM(cfg))


@pytest.mark.parametrize("apart", [False, True])
def test_shared_prompts_train_as_whole_sequences_do(lively_lm, monkeypatch, apart):
    """The training step scores with gradients through the prompt's cache: the same sums
    and the same LoRA gradients as running each sequence whole, with the head run in
    slices or not."""
    import torch

    from rpo_app import scoring

    net = _lora(lively_lm, 2)
    monkeypatch.setattr(scoring, "HEAD_SLICE", 3)
    monkeypatch.setattr(scoring, "runs_head_apart", lambda _m: apart)
    run = functools.partial(_sums_and_grads, net)

    try:
        (shared, g_shared), (whole, g_whole) = run(scoring.shared_prompt_logps), run(scoring.sequence_logps)
    finally:
        net.unload()
    assert torch.allclose(shared, whole, rtol=1e-4, atol=1e-4), (shared, whole)
    assert all((a - b).norm() <= 1e-4 * b.norm() for a, b in zip(g_shared, g_whole))
    # the prompt pass gets its share: LoRA weights of the first layer's attention move
    assert all(g.abs().sum() > 0 for g in g_shared)


def test_a_model_the_shared_scorer_cannot_run_is_scored_whole_from_then_on(lively_lm, monkeypatch, caplog):
    import torch

    from rpo_app import scoring

    calls = []

    def broken(*_a, **_k):
        calls.append(1)
        raise TypeError("forward() got an unexpected keyword argument 'position_ids'")

    monkeypatch.setattr(scoring, "shared_prompt_logps", broken)
    scorer = scoring.PromptScorer()
    with torch.no_grad():
        first = scorer(lively_lm, _seqs(), 0, "cpu", False)
        again = scorer(lively_lm, _seqs(), 0, "cpu", False)
        plain = scoring.sequence_logps(lively_lm, _seqs(), 0, "cpu", False)
    assert torch.equal(first, plain) and torch.equal(again, plain)
    assert calls == [1] and not scorer.share
    assert "scoring each sequence whole" in caplog.text


def test_the_log_softmax_in_the_logits_dtype_rounds_only_each_token(lively_lm):
    """fp32=False (the informative order's bf16 scoring) leaves the log-softmax in the
    logits' own dtype: with fp32 logits nothing changes, with bf16 logits each token's
    log-prob is rounded to bf16 and no more. Both scorers and PromptScorer pass it on."""
    import copy

    import torch

    from rpo_app.scoring import PromptScorer, sequence_logps, shared_prompt_logps

    s = _seqs()
    with torch.no_grad():
        for scorer in (sequence_logps, shared_prompt_logps):
            assert torch.equal(scorer(lively_lm, s, 0, "cpu", False, fp32=False),
                               scorer(lively_lm, s, 0, "cpu", False))
        low = copy.deepcopy(lively_lm).to(torch.bfloat16)
        for share in (True, False):
            exact = PromptScorer(share)(low, s, 0, "cpu", False)
            rounded = PromptScorer(share, fp32=False)(low, s, 0, "cpu", False)
            tokens = torch.tensor([len(q) - q.prompt_len for q in s], dtype=torch.float32)
            # each token within half a bf16 step of its log-prob (|log p| < 16 here: 2^-5)
            assert ((rounded - exact).abs() <= tokens * 2 ** -5).all(), (rounded, exact)
            assert not torch.equal(rounded, exact)  # the flag reached the scorer


def test_the_frozen_heads_backward_under_bf16_autocast_matches_the_checkpointed_one(lively_lm, monkeypatch):
    """Under autocast (the trainer's bf16 on a GPU or a bf16 CPU) the head's products run in
    bf16 inside the autograd function too: its gradients must stay as close to the
    checkpointed head's as bf16 allows."""
    import torch

    from rpo_app import scoring

    net = _lora(lively_lm, 3)
    monkeypatch.setattr(scoring, "HEAD_SLICE", 3)
    monkeypatch.setattr(scoring, "runs_head_apart", lambda _m: True)
    frozen = scoring._head_slice_logps

    def checkpointed(head, hidden, labels, fp32):
        from torch.utils.checkpoint import checkpoint
        return checkpoint(scoring._token_logps, head, hidden, labels, fp32, use_reentrant=False)

    def run(slice_logps):
        monkeypatch.setattr(scoring, "_head_slice_logps", slice_logps)
        return _sums_and_grads(net, scoring.sequence_logps, bf16=True)

    try:
        (ours, g_ours), (theirs, g_theirs) = run(frozen), run(checkpointed)
    finally:
        net.unload()
    assert ours.dtype == torch.float32 and torch.allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    assert all(g.dtype == torch.float32 for g in g_ours)
    assert all((a - b).norm() <= 2e-2 * b.norm() for a, b in zip(g_ours, g_theirs))
    assert any(g.abs().sum() > 0 for g in g_ours)


def test_a_frozen_heads_weight_is_cast_for_autocast_once_and_gives_autocasts_numbers():
    """Autocast casts a frozen head's fp32 weight anew at every product (it keeps only the
    casts of weights that train); the scorer casts it once. The log-probs are autocast's
    own bit for bit, the hidden states' gradients to rounding, and a weight changed in
    place is cast again."""
    import torch

    from rpo_app import scoring

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(6, 16)
    labels = torch.randint(0, 50, (6,))

    def autocasts_own(h):  # the head as autocast runs it, with a checkpointed backward
        from torch.utils.checkpoint import checkpoint
        return checkpoint(lambda x: scoring._picked_logps(head(x), labels, True), h, use_reentrant=False)

    def run(fn):
        h = hidden.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(h)
        out.sum().backward()
        return out.detach(), h.grad

    ours, g_ours = run(lambda h: scoring._frozen_head_logps().apply(h, head, labels, True))
    theirs, g_theirs = run(autocasts_own)
    assert torch.equal(ours, theirs)
    assert torch.allclose(g_ours, g_theirs, rtol=0, atol=1e-6)
    cast = head._rpo_autocast_weight[2]
    assert cast.dtype == torch.bfloat16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = scoring._token_logps(head, hidden, labels)
        assert head._rpo_autocast_weight[2] is cast  # no second cast
        assert torch.equal(plain, scoring._picked_logps(head(hidden), labels, True))
        head.weight.mul_(2)
        again = scoring._token_logps(head, hidden, labels)
    assert head._rpo_autocast_weight[2] is not cast
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(again, scoring._picked_logps(head(hidden), labels, True))
    assert torch.equal(scoring._token_logps(head, hidden, labels), scoring._picked_logps(head(hidden), labels, True))
