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
    # LoRA dropout in training: peft's forward
    dropped = _fused(two_adapters).train()
    for module in dropped.modules():
        if hasattr(module, "lora_dropout"):
            module.lora_dropout["one"] = torch.nn.Dropout(0.5)
    counted.clear()
    dropped(input_ids=ids)
    assert counted


def _training_adapter_one(net):
    """`net` in training mode with adapter "one" active and its LoRA weights alone trainable."""
    net = net.train()
    net.set_adapter("one")
    for n, p in net.named_parameters():
        p.requires_grad_("lora_" in n and ".one." in n)
        p.grad = None
    return net


def test_training_through_the_fused_forward_gives_peft_gradients(two_adapters, counted):
    """The trainer's LoRA layers take the fused path with gradients on: the same loss and
    the same gradient on every LoRA weight as peft's own graph."""
    import torch

    ids = torch.tensor(IDS)

    def grads(net):
        net = _training_adapter_one(net)
        loss = net(input_ids=ids).logits.log_softmax(-1)[..., 7].mean()
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in net.named_parameters() if p.requires_grad}

    theirs_loss, theirs = grads(copy.deepcopy(two_adapters))
    assert counted
    counted.clear()
    ours_loss, ours = grads(_fused(two_adapters))
    assert not counted  # the fused path, not peft's
    torch.testing.assert_close(ours_loss, theirs_loss, rtol=1e-5, atol=1e-6)
    assert ours.keys() == theirs.keys() and len(ours) == 2 * 7 * 2
    for name, g in ours.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(g, theirs[name], rtol=1e-4, atol=1e-6)


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


@pytest.mark.parametrize("case", ["autocast", "bf16 model, fp32 LoRA"])
def test_training_in_bf16_through_the_fused_forward(two_adapters, counted, case):
    """Under CPU autocast (the trainer's bf16), and for a bf16 model whose LoRA weights
    peft keeps in fp32 (the trainer's CUDA case): peft's output dtype, and gradients no
    further from fp32's than peft's own."""
    import contextlib

    import torch

    ids = torch.tensor(IDS)

    def run(net, low: bool):
        if low and case != "autocast":
            net = net.to(torch.bfloat16)
            for n, p in net.named_parameters():
                if "lora_" in n:
                    p.data = p.data.float()
        net = _training_adapter_one(net)
        ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if low and case == "autocast"
               else contextlib.nullcontext())
        with ctx:
            logits = net(input_ids=ids).logits
        logits.float().log_softmax(-1)[..., 7].mean().backward()
        return logits.dtype, {n: p.grad.float() for n, p in net.named_parameters() if p.requires_grad}

    _, exact = run(copy.deepcopy(two_adapters), low=False)
    theirs_dtype, theirs = run(copy.deepcopy(two_adapters), low=True)
    counted.clear()
    ours_dtype, ours = run(_fused(two_adapters), low=True)
    assert not counted and ours_dtype == theirs_dtype
    ours_err = sum((ours[n] - g).norm() for n, g in exact.items())
    theirs_err = sum((theirs[n] - g).norm() for n, g in exact.items())
    assert ours_err <= 1.25 * theirs_err
