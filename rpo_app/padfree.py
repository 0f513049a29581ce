"""A decoder's token-by-token parts run on the tokens its attention mask keeps, not on
the padding.

A scoring batch pads every row to its longest: in a training step the answer rows pad to
the step's longest answer, and on the train benchmark's 32 pairs 22% of the token rows a
step ran through its layers were padding. A Llama-style layer's MLP and its attention's
projections work token by token and hold nearly all of its matrix products, so here they
run on the real tokens alone, gathered into one matrix, and their outputs go back to the
padded layout with zeros at the padding. Nothing reads those zeros: the mask hides padded
positions from attention and no log-prob is taken there. The attention itself keeps the
padded layout. Equal to the padded pass up to float rounding (other matrix shapes).

A training step from the kept states (fp32, 1 thread, the same 16 batches forward and
backward, alternating): 3.27 s with every part on the padding, 2.97 s with the MLPs on
the real tokens, 2.90 s with the projections too (docs/benchmarks.md).
"""
from __future__ import annotations

import contextlib


def rows_for(n: int) -> int:
    """How many rows a pass of `n` real tokens gathers where products are planned per
    shape (`plans_per_shape`): `n` rounded up to one of 8 sizes per doubling (at most an
    eighth more; 16 rows at least), so passes of nearby sizes share one plan."""
    step = max(16, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


def plans_per_shape(decoder) -> bool:
    """Whether this pass's matrix products run in bf16 or fp16 on a CPU: oneDNN plans (and
    compiles) a kernel for each new shape there, about 2 ms each on an AMX Xeon, where the
    product of 400 tokens by a 576 x 1,536 weight takes 2 ms itself; fp32 products (MKL)
    plan nothing."""
    import torch

    param = next(decoder.parameters(), None)
    if param is None or param.device.type != "cpu":
        return False
    low = (torch.bfloat16, torch.float16)
    return param.dtype in low or (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in low)


def _real_tokens(kwargs, bucket: bool = False) -> tuple[int, object, int] | None:
    """(rows x columns of this forward's input, flat indices of the rows to gather, how many
    of them are real tokens), from the decoder's keyword arguments: a 2-D mask whose last
    columns are this input's (a KV cache's columns come first); None where every token is
    real or the mask says nothing. `bucket`: the indices padded to `rows_for` of the real
    tokens with copies of the first one, whose outputs nothing reads (`real_tokens_only`)."""
    import torch

    mask = kwargs.get("attention_mask")
    given = kwargs.get("inputs_embeds")
    if given is None:
        given = kwargs.get("input_ids")
    if mask is None or given is None or mask.dim() != 2:
        return None
    rows, width = given.shape[0], given.shape[1]
    if mask.shape[0] != rows or mask.shape[1] < width:
        return None
    own = mask[:, mask.shape[1] - width:]
    if bool(own.all()):
        return None
    real = own.reshape(-1).nonzero().squeeze(1)
    n = len(real)
    if bucket and n:
        real = torch.cat([real, real[:1].expand(rows_for(n) - n)])
    return rows * width, real, n


# Where a Llama-style layer works token by token: its MLP, and its attention's projections
# (the attention itself needs the padded layout).
PER_TOKEN = ("mlp", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")


def _module(layer, path: str):
    for name in path.split("."):
        layer = getattr(layer, name, None)
    return layer


@contextlib.contextmanager
def real_tokens_only(decoder):
    """While it lasts, the token-by-token parts of `decoder.layers` (PER_TOKEN, as the list
    is when it starts) run on the real tokens of each forward pass of `decoder`.
    Single-threaded use: the hooks share one record of the pass in progress. Not with
    gradient checkpointing, which recomputes a layer outside the pass they recorded."""
    now: dict = {"real": None, "input": None, "packed": None}
    shapes: dict[int, tuple] = {}

    # In bf16 on a CPU the rows come in a few sizes, so that later passes reuse the
    # kernels oneDNN planned for earlier ones: the app's scoring job for a later adapter
    # (bf16, 2 threads) took 5.3 s against 5.9 s with the rows as they came.
    bucket = plans_per_shape(decoder)

    def on_decoder(_module, args, kwargs):
        now.update(real=None if args else _real_tokens(kwargs, bucket), input=None, packed=None)

    def gather(module, args):
        x = args[0]
        real = now["real"]
        if real is None or x.dim() != 3 or x.shape[0] * x.shape[1] != real[0]:
            shapes.pop(id(module), None)
            return None
        shapes[id(module)] = x.shape
        if now["input"] is not x:  # the query, key and value projections read one input
            now.update(input=x, packed=x.reshape(-1, x.shape[-1]).index_select(0, real[1]))
        return (now["packed"],) + args[1:]

    def scatter(module, _args, out):
        shape = shapes.pop(id(module), None)
        if shape is None:
            return None
        _, index, n = now["real"]
        full = out.new_zeros(shape[0] * shape[1], out.shape[-1]).index_copy(0, index[:n], out[:n])
        return full.view(shape[0], shape[1], out.shape[-1])

    handles = [decoder.register_forward_pre_hook(on_decoder, with_kwargs=True)]
    try:
        for layer in list(decoder.layers):
            for path in PER_TOKEN:
                part = _module(layer, path)
                if part is not None:
                    handles += [part.register_forward_pre_hook(gather), part.register_forward_hook(scatter)]
        yield
    finally:
        for h in handles:
            h.remove()
