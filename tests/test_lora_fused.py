"""The inference host's LoRA layers (rpo_app.lora_fused): the adapter's product added
inside one matrix product, peft's own forward wherever that is not the plain case."""
from __future__ import annotations

import copy

import pytest


@pytest.fixture(scope="module")
def two_adapters():
    """A random Llama with two random LoRA adapters on every linear layer (fp32)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    lora = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    net = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(**lora), adapter_name="one")
    net.add_adapter("two", LoraConfig(**lora))
    return net.eval()


@pytest.fixture
def counted(monkeypatch):
    """How often peft's own LoRA forward runs."""
    from peft.tuners.lora.layer import Linear

    calls = []
    real = Linear.forward

    def forward(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Linear, "forward", forward)
    return calls


def _fused(net):
    from rpo_app.lora_fused import fuse_lora_layers

    out = copy.deepcopy(net)
    n = fuse_lora_layers(out)
    assert n == 2 * 7  # q k v o gate up down, two layers
    assert fuse_lora_layers(out) == n  # idempotent
    return out


IDS = [[1, 5, 9, 13, 17, 21], [1, 6, 10, 14, 18, 22]]


def test_the_fused_forward_gives_peft_logits_for_each_adapter(two_adapters, counted):
    import torch

    fused = _fused(two_adapters)
    ids = torch.tensor(IDS)
    with torch.inference_mode():
        for name in ("one", "two"):
            two_adapters.set_adapter(name)
            fused.set_adapter(name)
            counted.clear()
            ours = fused(input_ids=ids).logits
            assert not counted  # the fused path, not peft's
            theirs = two_adapters(input_ids=ids).logits
            assert counted
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        with two_adapters.disable_adapter():
            base = two_adapters(input_ids=ids).logits
    assert not torch.allclose(ours, base, atol=1e-3)  # the adapters do change the logits


def test_everything_but_the_plain_case_runs_peft_forward(two_adapters, counted):
    import torch

    fused = _fused(two_adapters)
    fused.set_adapter("one")
    two_adapters.set_adapter("one")
    ids = torch.tensor(IDS)
    with torch.inference_mode():
        with fused.disable_adapter():
            off = fused(input_ids=ids).logits
        with two_adapters.disable_adapter():
            base = two_adapters(input_ids=ids).logits
        torch.testing.assert_close(off, base)
        # per-row adapters (a chat turn's base and tuned sides in one batch)
        counted.clear()
        mixed = fused(input_ids=ids, adapter_names=["one", "__base__"]).logits
        assert counted
        torch.testing.assert_close(mixed, two_adapters(input_ids=ids, adapter_names=["one", "__base__"]).logits)
    # gradients: peft's forward, and they reach the LoRA weights
    counted.clear()
    fused(input_ids=ids).logits.sum().backward()
    assert counted
    grads = [p.grad for n, p in fused.named_parameters() if "lora_A.one" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_in_bf16_the_fused_forward_is_no_further_from_fp32_than_peft(two_adapters):
    """It rounds once where peft's forward rounds the product, the scaled product and
    the sum: measured against the fp32 logits it is at least as close."""
    import torch

    ids = torch.tensor(IDS)
    two_adapters.set_adapter("one")
    with torch.inference_mode():
        exact = two_adapters(input_ids=ids).logits
        low = copy.deepcopy(two_adapters).to(torch.bfloat16)
        fused = _fused(low)
        theirs = low(input_ids=ids).logits.float()
        ours = fused(input_ids=ids).logits.float()
    assert (ours - exact).abs().mean() <= 1.1 * (theirs - exact).abs().mean()
