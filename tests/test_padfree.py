"""A decoder's token-by-token parts on its real tokens only (rpo_app.padfree): the
log-probs and LoRA gradients of a padded batch are what they were, and the padding never
reaches an MLP or a projection."""
from __future__ import annotations

import pytest
from conftest import tiny_lora_llama as _net


def _seqs():
    from rpo_app.batches import Seq

    # Lengths 4, 9 and 6: the batch pads two of three rows; two rows share a prompt.
    rows = [((1, 5, 9), (13,)), ((1, 5, 9), (14, 18, 22, 26, 30, 34)), ((1, 7, 11), (15, 19, 23))]
    return [Seq(input_ids=p + a, prompt_len=len(p), prompt_idx=k) for k, (p, a) in enumerate(rows)]


def _run(net, scorer, seqs):
    import torch

    net.zero_grad(set_to_none=True)
    values = scorer(net, seqs, 0, "cpu", True)
    (values * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    return values.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("scorer", ["sequence_logps", "shared_prompt_logps"])
def test_real_tokens_only_score_and_train_as_the_padded_batch(scorer):
    import torch

    from rpo_app import scoring
    from rpo_app.padfree import real_tokens_only

    net, seqs = _net(), _seqs()
    score = getattr(scoring, scorer)
    decoder = net.get_base_model().get_decoder()
    # What the matrix products inside are given: an MLP's, a query's and an output
    # projection's (the LoRA layers' own base layers).
    parts = [decoder.layers[1].mlp.gate_proj, decoder.layers[0].self_attn.q_proj.base_layer,
             decoder.layers[1].self_attn.o_proj.base_layer]
    with watch_rows(parts) as padded:
        want, want_grads = _run(net, score, seqs)
    with watch_rows(parts) as real, real_tokens_only(decoder):
        got, got_grads = _run(net, score, seqs)
    for k in range(len(parts)):
        assert sum(real[k]) < sum(padded[k])  # the padding was left out
        if scorer == "sequence_logps":
            assert padded[k] == [3 * 9] and real[k] == [sum(len(s) for s in seqs)]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for name, g in want_grads.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item())
    with watch_rows(parts) as after:  # the hooks are gone once the context ends
        score(net, seqs, 0, "cpu", True)
    assert after == padded


def test_a_batch_without_padding_runs_as_it_was():
    """No gather or scatter where every token is real: the MLP gets the batch as it is."""
    import torch

    from rpo_app.batches import Seq
    from rpo_app.padfree import real_tokens_only
    from rpo_app.scoring import sequence_logps

    net = _net()
    decoder = net.get_base_model().get_decoder()
    seqs = [Seq((1, 5, 9, 13), 2, 0), Seq((1, 6, 10, 14), 2, 0)]
    parts = [decoder.layers[0].mlp.gate_proj, decoder.layers[0].self_attn.k_proj.base_layer]
    with torch.no_grad(), watch_rows(parts, shape=True) as seen, real_tokens_only(decoder):
        sequence_logps(net, seqs, 0, "cpu", True)
    assert seen == [[(2, 4, 32)], [(2, 4, 32)]]


def test_rows_come_in_a_few_sizes_where_products_are_planned_per_shape(monkeypatch):
    """In bf16 on a CPU (oneDNN plans a kernel for each new shape) a pass gathers its real
    tokens plus copies of the first, up to one of a few row counts; what the copies
    compute is never read, so the log-probs and gradients are the padded batch's."""
    import torch

    from rpo_app import padfree
    from rpo_app.scoring import sequence_logps

    assert [padfree.rows_for(n) for n in (1, 16, 17, 33, 400, 416, 417, 1000)] == [
        16, 16, 32, 48, 416, 416, 448, 1024]
    assert all(0 <= padfree.rows_for(n) - n < max(16, n / 8) for n in range(1, 5000))
    net, seqs = _net(), _seqs()
    decoder = net.get_base_model().get_decoder()
    assert not padfree.plans_per_shape(decoder)  # fp32: MKL plans nothing
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert padfree.plans_per_shape(decoder)
    parts = [decoder.layers[1].mlp.gate_proj, decoder.layers[0].self_attn.v_proj.base_layer]
    want, want_grads = _run(net, sequence_logps, seqs)
    monkeypatch.setattr(padfree, "plans_per_shape", lambda _decoder: True)
    with watch_rows(parts) as seen, padfree.real_tokens_only(decoder):
        got, got_grads = _run(net, sequence_logps, seqs)
    assert seen == [[padfree.rows_for(19)]] * 2 == [[32]] * 2  # 4 + 9 + 6 real tokens
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item())


class watch_rows:
    """Records what each of `modules`' forward is given, one list a module: the rows
    (tokens) of its input, or the input's shape (shape=True)."""

    def __init__(self, modules, shape: bool = False):
        self.modules, self.shape = modules, shape
        self.seen: list[list] = [[] for _ in modules]

    def __enter__(self):
        def hook(k):
            def record(_m, args):
                x = args[0]
                self.seen[k].append(tuple(x.shape) if self.shape else x.shape[:-1].numel())
            return record

        self.handles = [m.register_forward_pre_hook(hook(k)) for k, m in enumerate(self.modules)]
        return self.seen

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
