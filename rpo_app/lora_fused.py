"""LoRA layers with the adapter's product added inside one matrix product.

peft's LoRA forward computes the base layer's output, then B(A(x)), multiplies that by
the scaling into a new tensor and adds it into another: two passes over a
tokens x out-features tensor per layer that the matrix products themselves never need,
and in training a third (the backward of the scaling). Here the scaled product goes
into the GEMM's own accumulate, `addmm(result, A(x), B^T, alpha=scaling)`, rounding once
where peft's forward rounds three times:

- a model that only infers (no gradient): in place, `result.addmm_(...)`. On the bundled
  model in bf16 an adapter pass over the app's own answers took 1.21x the base model's
  pass with peft's forward and 1.08x with this one (2 threads, side by side). Against an
  fp32 reference, on a trained adapter and the app's answers, its log-probs spread as
  peft's do (sd 0.61 against 0.63 nats an answer, 0.3 nats higher on average) and rank
  the answers' rewards the same (Spearman 0.987 against 0.989; docs/benchmarks.md, "What the
  informative order costs").
- training: out of place, `torch.addmm(...)`, whose backward gives the same gradients
  as peft's graph without the scaled copies (autocast runs it in bf16, as it runs
  peft's matmuls). A training step's forward and backward on the bundled model ran
  1.07x faster than with peft's forward (fp32, 1 thread, 26 batches of 4 pairs
  alternating, a 2-core AVX2-only EPYC; docs/benchmarks.md, "LoRA's add in training").

Only the plain case takes this path: vanilla LoRA, no LoRA dropout in training, one or
more active adapters, no per-row adapter names, not merged, not disabled. Everything
else (mixed-adapter batches, LoRA dropout, DoRA and other variants, LoRA biases) runs
peft's own forward, unchanged.
"""
from __future__ import annotations

import types


def _active(layer) -> list[str]:
    return [name for name in layer.active_adapters if name in layer.lora_A]


def _plain(layer, args, kwargs) -> bool:
    import torch

    if args or kwargs or layer.merged or layer.disable_adapters:
        return False
    active = _active(layer)
    # In eval mode dropout is the identity whatever its rate; in training only at rate 0.
    if layer.training and not all(isinstance(layer.lora_dropout[n], torch.nn.Identity) for n in active):
        return False
    return not any(name in layer.lora_variant or layer.lora_B[name].bias is not None for name in active)


def fused_forward(self, x, *args, **kwargs):
    """The forward of a peft `lora.Linear` with the adapters' products added inside the GEMM."""
    import torch

    if not _plain(self, args, kwargs):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    grad = torch.is_grad_enabled()
    # Without gradients the sum goes into the base output itself (a no-op .contiguous()
    # for nn.Linear's output). With them, out of place: autograd records one addmm, whose
    # backward scales only the rank-r products; under autocast it runs in bf16, as peft's
    # matmuls do, and outside it a bf16 model's fp32 LoRA weights add in fp32 and the sum
    # is cast back, as in peft's forward.
    flat = (result if grad else result.contiguous()).reshape(-1, result.shape[-1])
    for name in _active(self):
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        low = torch.nn.functional.linear(x.to(a.dtype), a).flatten(0, -2)
        if grad:
            flat = torch.addmm(flat.to(low.dtype), low, b.t(), alpha=self.scaling[name])
        else:
            flat.addmm_(low.to(flat.dtype), b.t().to(flat.dtype), alpha=self.scaling[name])
    return flat.view(result.shape).to(result.dtype)


def fuse_lora_layers(model) -> int:
    """Give every peft LoRA `Linear` in `model` the fused forward (idempotent); returns how
    many layers have it. ModelHost's model and the trainer's have it."""
    from peft.tuners.lora.layer import Linear

    n = 0
    for module in model.modules():
        if isinstance(module, Linear):
            if getattr(module.forward, "__func__", None) is not fused_forward:
                module.forward = types.MethodType(fused_forward, module)
            n += 1
    return n
