"""LoRA layers for a model that only infers: the adapter's product added inside one
matrix product.

peft's LoRA forward computes the base layer's output, then B(A(x)), multiplies that by
the scaling into a new tensor and adds it into another: two passes over a
tokens x out-features tensor per layer that the matrix products themselves never need.
On the bundled model in bf16 those two passes were most of what an adapter added to a
scoring pass: on the app's own answers an adapter pass took 1.21x the base model's pass
with peft's forward and 1.08x with this one (2 threads, side by side). Here
`result.addmm_(A(x), B^T, alpha=scaling)` adds the scaled product in place, inside the
GEMM, rounding once where peft's forward rounds three times. Against an fp32 reference,
on a trained adapter and the app's answers, its log-probs spread as peft's do (sd 0.61
against 0.63 nats an answer, 0.3 nats higher on average) and rank the answers' rewards
the same (Spearman 0.987 against 0.989; README, "What the informative order costs").

Only the plain case takes this path: vanilla LoRA, eval mode, no gradient, one or more
active adapters, no per-row adapter names, not merged, not disabled. Everything else
(training, mixed-adapter batches, DoRA and other variants, LoRA biases) runs peft's own
forward, unchanged.
"""
from __future__ import annotations

import types


def _active(layer) -> list[str]:
    return [name for name in layer.active_adapters if name in layer.lora_A]


def _plain(layer, args, kwargs) -> bool:
    import torch

    if args or kwargs or layer.training or layer.merged or layer.disable_adapters:
        return False
    if torch.is_grad_enabled():
        return False
    return not any(name in layer.lora_variant or layer.lora_B[name].bias is not None
                   for name in _active(layer))


def fused_forward(self, x, *args, **kwargs):
    """The forward of a peft `lora.Linear` with the adapters' products added in place."""
    import torch

    if not _plain(self, args, kwargs):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x).contiguous()  # a no-op for nn.Linear's output
    flat = result.view(-1, result.shape[-1])
    for name in _active(self):
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        # Eval mode, so the dropout is the identity and is skipped.
        low = torch.nn.functional.linear(x.to(a.dtype), a)
        flat.addmm_(low.reshape(-1, low.shape[-1]).to(flat.dtype), b.t().to(flat.dtype),
                    alpha=self.scaling[name])
    return result


def fuse_lora_layers(model) -> int:
    """Give every peft LoRA `Linear` in `model` the fused forward (idempotent); returns how
    many layers have it. For a model that is never trained: ModelHost's."""
    from peft.tuners.lora.layer import Linear

    n = 0
    for module in model.modules():
        if isinstance(module, Linear):
            if getattr(module.forward, "__func__", None) is not fused_forward:
                module.forward = types.MethodType(fused_forward, module)
            n += 1
    return n
