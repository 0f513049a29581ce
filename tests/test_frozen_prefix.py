"""LoRA on the top layers only (rpo_app.frozen_prefix): a step that starts from the kept
hidden states of the frozen layers gives the whole model's log-probs and gradients."""
from __future__ import annotations

import pytest
from conftest import tiny_lora_llama


def _net(layers: int = 4, top: int = 2):
    return tiny_lora_llama(layers, top)


def _seqs():
    from rpo_app.batches import Seq

    rows = [(1, 5, 9, 13, 17, 21, 25), (1, 6, 10, 14, 18), (1, 7, 11, 15, 19, 23, 27, 31, 35)]
    return [Seq(input_ids=r, prompt_len=3, prompt_idx=0) for r in rows]


def _grads(net, scorer, seqs):
    net.zero_grad(set_to_none=True)
    values = scorer(net, seqs, 0, "cpu", True)
    (values * values.new_tensor([1.0, -2.0, 0.5])).sum().backward()
    return values.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}


def test_adapted_layers_rule():
    from rpo_app.frozen_prefix import adapted_layers

    assert adapted_layers(30, 8) == list(range(22, 30))
    assert adapted_layers(30, None) == list(range(15, 30))  # unset: the top half
    assert adapted_layers(3, None) == [1, 2] and adapted_layers(1, None) is None
    assert adapted_layers(30, 0) is None
    assert adapted_layers(30, 30) is None and adapted_layers(30, 64) is None  # every layer: peft's None


def test_the_learning_rate_follows_the_adapted_layers():
    """Unset, the rate is 3e-4 x all layers / adapted layers (at most 4x); a rate or a
    layer count that was given stays."""
    from rpo_app.trainconfig import TrainConfig, resolve_for_model

    half = resolve_for_model(TrainConfig(), 30)
    assert (half.lora_layers, half.learning_rate) == (15, pytest.approx(6e-4))
    every = resolve_for_model(TrainConfig(lora_layers=0), 30)
    assert (every.lora_layers, every.learning_rate) == (0, pytest.approx(3e-4))
    assert resolve_for_model(TrainConfig(lora_layers=8), 30).learning_rate == pytest.approx(1.125e-3)
    assert resolve_for_model(TrainConfig(lora_layers=2), 30).learning_rate == pytest.approx(1.2e-3)  # the cap
    assert resolve_for_model(TrainConfig(lora_layers=40), 30).learning_rate == pytest.approx(3e-4)
    given = resolve_for_model(TrainConfig(learning_rate=1e-4), 30)
    assert (given.lora_layers, given.learning_rate) == (15, 1e-4)
    one = resolve_for_model(TrainConfig(), 1)  # a one-layer model: its layer is every layer
    assert (one.lora_layers, one.learning_rate) == (0, pytest.approx(3e-4))
    again = resolve_for_model(TrainConfig.from_dict(half.to_dict()), 30)  # a resumed run's config.yaml
    assert again.to_dict() == half.to_dict()


def test_only_the_top_layers_are_adapted():
    net = _net()
    adapted = {int(n.split(".layers.")[1].split(".")[0]) for n, p in net.named_parameters() if p.requires_grad}
    assert adapted == {2, 3}


@pytest.mark.parametrize("captured", ["one at a time", "as the step's batch", "not at all"])
def test_a_step_from_the_kept_hidden_states_matches_the_whole_model(captured):
    """Hidden states kept from batches of another layout (the reference pass sorts by
    length), or filled in by the step itself (a resumed run), score as the whole model."""
    import torch

    from rpo_app.frozen_prefix import FrozenPrefixScorer
    from rpo_app.scoring import sequence_logps

    net, seqs = _net(), _seqs()
    prefix = FrozenPrefixScorer(2)
    with torch.no_grad():
        if captured == "one at a time":
            for s in seqs:
                prefix.capture(net, [s], 0, "cpu", True)
        elif captured == "as the step's batch":
            want = sequence_logps(net, seqs, 0, "cpu", True)
            assert torch.equal(prefix.capture(net, seqs, 0, "cpu", True), want)  # scores as it keeps
    assert len(prefix.hidden) == (0 if captured == "not at all" else 3)
    whole, whole_grads = _grads(net, sequence_logps, seqs)
    got, got_grads = _grads(net, prefix, seqs)
    assert len(prefix.hidden) == 3
    torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-5)
    assert whole_grads.keys() == got_grads.keys() and len(got_grads) == 2 * 7 * 2  # A, B; 7 linears; 2 layers
    for name, g in whole_grads.items():
        assert g.abs().max() > 0, name
        # float rounding differs with the batch layout: close to the gradient's own scale
        torch.testing.assert_close(got_grads[name], g, rtol=1e-3, atol=1e-4 * g.abs().max().item())
    assert len(net.get_base_model().get_decoder().layers) == 4  # the layer list is put back
    assert prefix.scorer.share  # each prompt ran once: the shared-prompt scorer did not fail


def test_a_step_runs_each_prompt_once_from_the_kept_states():
    """Two prompts, answers of several lengths: scoring from the kept states with each
    prompt run once gives what whole sequences give, gradients included, and the top
    layers' cache numbering is put back."""
    import torch

    from rpo_app.batches import Seq
    from rpo_app.frozen_prefix import FrozenPrefixScorer

    net = _net()
    seqs = [Seq((1, 5, 9, 13, 17, 21, 25), 3, 0), Seq((1, 6, 10, 14, 18), 4, 1),
            Seq((1, 5, 9, 11, 15, 19, 23, 27, 31), 3, 0)]
    shared, whole = FrozenPrefixScorer(2), FrozenPrefixScorer(2, share=False)
    with torch.no_grad():
        for prefix in (shared, whole):
            prefix.capture(net, seqs, 0, "cpu", True)
    numbers = {n: m.layer_idx for n, m in net.named_modules() if isinstance(getattr(m, "layer_idx", None), int)}
    want, want_grads = _grads(net, whole, seqs)
    got, got_grads = _grads(net, shared, seqs)
    assert shared.scorer.share and not whole.scorer.share
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, g in want_grads.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(got_grads[name], g, rtol=1e-3, atol=1e-4 * g.abs().max().item())
    assert numbers == {n: m.layer_idx for n, m in net.named_modules()
                       if isinstance(getattr(m, "layer_idx", None), int)}
    assert sorted(set(numbers.values())) == [0, 1, 2, 3]


def test_sharing_that_does_not_reproduce_the_model_falls_back_to_whole_sequences(monkeypatch):
    """Where the top layers' cache is not what the model expects, the check before the
    first step (matches) finds the shared scorer far off and scores whole sequences."""
    import torch

    from rpo_app import scoring
    from rpo_app.frozen_prefix import FrozenPrefixScorer

    net, seqs = _net(), _seqs()
    prefix = FrozenPrefixScorer(2)
    with torch.no_grad(), net.disable_adapter():
        want = prefix.capture(net, seqs, 0, "cpu", True)
    shared = scoring.shared_prompt_logps
    monkeypatch.setattr(scoring, "shared_prompt_logps", lambda *a, **k: shared(*a, **k) + 5.0)
    assert prefix.reproduces(net, seqs, 0, "cpu", True, want)
    assert not prefix.scorer.share


def test_a_reference_pass_that_cannot_share_turns_sharing_off_for_the_steps(monkeypatch):
    """The trainer's reference pass (capture_all): where the shared-prompt scorer raises on
    the model, it scores and keeps whole sequences, and the steps' scorer stops sharing
    too, rather than failing once more at the first step."""
    import torch

    from rpo_app import scoring
    from rpo_app.frozen_prefix import FrozenPrefixScorer

    net, seqs = _net(), _seqs()
    with torch.no_grad(), net.disable_adapter():
        want = scoring.sequence_logps(net, seqs, 0, "cpu", True)
        prefix = FrozenPrefixScorer(2)
        torch.testing.assert_close(prefix.capture_all(net, seqs, 0, "cpu", True), want)
        assert prefix.scorer.share and len(prefix.hidden) == 3

        def no_cache(*_a, **_k):
            raise TypeError("this model takes no cache")

        monkeypatch.setattr(scoring, "shared_prompt_logps", no_cache)
        prefix = FrozenPrefixScorer(2)
        torch.testing.assert_close(prefix.capture_all(net, seqs, 0, "cpu", True), want)
        assert not prefix.scorer.share and len(prefix.hidden) == 3
        torch.testing.assert_close(prefix(net, seqs, 0, "cpu", True), want, rtol=1e-5, atol=1e-5)


def test_the_layer_list_is_put_back_when_a_step_fails():
    import torch

    from rpo_app.frozen_prefix import FrozenPrefixScorer

    net, seqs = _net(), _seqs()
    prefix = FrozenPrefixScorer(2)
    with torch.no_grad():
        prefix.capture(net, seqs, 0, "cpu", True)
    layers = net.get_base_model().get_decoder().layers
    prefix.hidden[tuple(seqs[0].input_ids)] = torch.zeros(7, 31)  # the wrong width
    with pytest.raises(RuntimeError):
        prefix(net, seqs, 0, "cpu", True)
    assert net.get_base_model().get_decoder().layers is layers



def test_a_decoder_that_changes_its_input_is_caught():
    """A decoder that adds to `inputs_embeds` in its own forward (learned positions, say)
    does not give the reference pass's log-probs from the kept states: the trainer
    checks before its first step and then runs the whole model (Trainer._check_prefix)."""
    import torch

    from rpo_app.frozen_prefix import FrozenPrefixScorer

    net, seqs = _net(), _seqs()
    prefix = FrozenPrefixScorer(2)
    with torch.no_grad(), net.disable_adapter():
        want = prefix.capture(net, seqs, 0, "cpu", True)
    assert prefix.reproduces(net, seqs, 0, "cpu", True, want)

    def shift(_module, args, kwargs):
        if kwargs.get("inputs_embeds") is not None:
            kwargs["inputs_embeds"] = kwargs["inputs_embeds"] + 1.0
        return args, kwargs

    net.get_base_model().get_decoder().register_forward_pre_hook(shift, with_kwargs=True)
    assert not prefix.reproduces(net, seqs, 0, "cpu", True, want)


def test_only_a_decoder_with_a_layers_list_takes_the_kept_states():
    from transformers import GPT2Config, GPT2LMHeadModel

    from rpo_app.frozen_prefix import FrozenPrefixScorer

    assert FrozenPrefixScorer.supports(_net(), 4)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    assert not FrozenPrefixScorer.supports(gpt2, 2)
