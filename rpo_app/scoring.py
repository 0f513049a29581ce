"""Log-probs of response tokens: the one scorer for training, evaluation, previews and
bench-effect.

Every function takes tokenized ``Seq``s (rpo_app.batches) and sums the log-probs of
the response tokens only, in one forward pass per chunk.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Sequence

log = logging.getLogger(__name__)


def keeps_logits_by_mask(model) -> bool:
    """Whether the model computes logits only where a boolean `logits_to_keep` says.

    Transformers' own models do (slice_logits_to_keep); skipping the LM head on prompt
    and padding positions saves time and, above all, the B x T x vocab logits memory.
    """
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "slice_logits_to_keep" in inspect.getsource(type(base).forward)
    except (OSError, TypeError):
        return False


# Response tokens per slice of the LM head (0: the model's own head, all tokens at once).
# The response-tokens x vocabulary logits, their log-softmax and both gradients were a
# step's largest tensors (4 bytes x 49,152 per token each on the bundled model); a slice
# keeps only its log-probs' gradient with respect to its hidden states (_frozen_head_logps),
# or, where the head itself trains, is recomputed in the backward pass
# (`bench --only memory`).
HEAD_SLICE = 512


def runs_head_apart(model) -> bool:
    """Whether the model's logits are its LM head applied to the decoder's last hidden
    states and nothing more (no softcapping, no scale): then `sequence_logps` can run the
    head itself, a slice of tokens at a time."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        parts = base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    return None not in parts and _plain_head(type(base))


@functools.lru_cache(maxsize=None)
def _plain_head(cls) -> bool:
    import inspect
    import re

    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    # "logits = ..." assigns; the "logits=logits," keyword of the return value does not
    assigned = re.findall(r"^\s*logits = (.+)$", source, flags=re.M)
    return "slice_logits_to_keep" in source and assigned == ["self.lm_head(hidden_states)"]


def _log_softmax(logits, fp32: bool):
    # fp32 by default: training and the reference pass must agree to the last bit (at step
    # 0 the policy is exactly the reference), and the loss's gradient flows through it.
    # log_softmax is one fused kernel each way; gather minus logsumexp made several
    # vocabulary-wide temporaries and took twice as long. fp32=False keeps bf16 logits in
    # bf16 (the kernel still sums in fp32; only each log-prob is rounded). The fp32 copy of
    # the tokens x vocabulary logits and its log-softmax cost 0.075 of a bf16 scoring
    # pass's 0.55 ms a token on the bundled model; the rounding moves an answer's sum by
    # 0.03 +- 0.09 nats, where scoring in bf16 at all moves it by 0.6 (docs/benchmarks.md, "What the
    # informative order costs").
    return (logits.float() if fp32 else logits).log_softmax(-1)


def _picked_logps(logits, labels, fp32: bool):
    """The fp32 log-prob of each row's label under `logits` (tokens x vocabulary)."""
    return _log_softmax(logits, fp32).gather(-1, labels[:, None]).squeeze(-1).float()


def _token_logps(head, hidden, labels, fp32: bool = True):
    return _picked_logps(_head_logits(head, hidden), labels, fp32)


def _head_logits(head, hidden):
    """`head(hidden)`, with a frozen plain head's weight cast for autocast once (_cast_once)."""
    import torch

    if isinstance(head, torch.nn.Linear) and head.bias is None and not head.weight.requires_grad:
        return torch.nn.functional.linear(hidden, _cast_once(head))
    return head(hidden)


def _cast_once(head):
    """A frozen head's weight as autocast would cast it for a matrix product, cast once
    and kept on the head while the weight stays the same tensor, unchanged and on its
    device. Autocast keeps its casts only for weights that train, so the trainer's fp32
    head (49,152 x 576 on the bundled model) was cast to bf16 for every slice of every
    pass, twice in a training slice (its logits, then its backward product): 3.5 times a
    step, 22-40 ms each. Outside autocast, or where the weight has autocast's dtype, the
    weight itself."""
    import torch

    weight = head.weight
    kind = weight.device.type
    if not torch.is_autocast_enabled(kind) or weight.dtype == torch.get_autocast_dtype(kind):
        return weight
    dtype = torch.get_autocast_dtype(kind)
    kept = getattr(head, "_rpo_autocast_weight", None)
    if (kept is None or kept[0] is not weight or kept[1] != weight._version or kept[2].dtype != dtype
            or kept[2].device != weight.device):
        kept = (weight, weight._version, weight.detach().to(dtype))
        head._rpo_autocast_weight = kept
    return kept[2]


@functools.lru_cache(maxsize=None)
def _frozen_head_logps():
    """An autograd function: `_token_logps` through a head that does not train (LoRA leaves
    it frozen), with its backward worked out in the forward pass.

    d log p(y | h) / d h = (onehot(y) - softmax(W h)) W needs the vocabulary-wide softmax
    once, while it is at hand; kept, it is one hidden-size vector a token, where
    checkpointing kept nothing but ran the head a third time (a forward again, then the
    backward's product): 6-12% of a step on the bundled model (docs/benchmarks.md, "Memory of a
    training step"). The backward only
    scales the kept rows by the upstream gradient.
    """
    import torch

    class FrozenHeadLogps(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, head, labels, fp32):
            weight = _cast_once(head)
            lsm = _log_softmax(torch.nn.functional.linear(hidden, weight), fp32)
            logps = lsm.gather(-1, labels[:, None]).squeeze(-1).float()
            rows = torch.arange(len(labels), device=labels.device)
            probs = lsm.exp_()  # the log-softmax is not needed any more
            probs[rows, labels] -= 1
            ctx.save_for_backward(-(probs.to(weight.dtype) @ weight).to(hidden.dtype))
            return logps

        @staticmethod
        def backward(ctx, grad):
            (d_hidden,) = ctx.saved_tensors
            return grad.to(d_hidden.dtype)[:, None] * d_hidden, None, None, None

    return FrozenHeadLogps


def _head_slice_logps(head, hidden, labels, fp32: bool):
    """One slice of `_scored_logps`'s head: plain without a gradient, through the frozen
    head's own backward when only the hidden states need one, else checkpointed."""
    import torch
    from torch.utils.checkpoint import checkpoint

    if not (torch.is_grad_enabled() and hidden.requires_grad):
        return _token_logps(head, hidden, labels, fp32)
    if (isinstance(head, torch.nn.Linear) and head.bias is None
            and not head.weight.requires_grad):
        return _frozen_head_logps().apply(hidden, head, labels, fp32)
    return checkpoint(_token_logps, head, hidden, labels, fp32, use_reentrant=False)


def _scored_logps(model, inputs: dict, score, labels, keep_by_mask: bool, fp32: bool = True):
    """Log-probs of `labels`, the tokens the positions `score` marks predict, from one
    forward pass over `inputs` (keyword arguments of the model's forward). Where the
    model allows it the LM head runs apart, a slice of tokens at a time, keeping no
    vocabulary-wide tensor for the backward pass (HEAD_SLICE)."""
    import torch

    if keep_by_mask and HEAD_SLICE and runs_head_apart(model):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = base.get_decoder()(**inputs).last_hidden_state[score]
        head = base.get_output_embeddings()
        parts = [_head_slice_logps(head, hidden[k:k + HEAD_SLICE], labels[k:k + HEAD_SLICE], fp32)
                 for k in range(0, len(labels), HEAD_SLICE)]
        return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    if keep_by_mask:
        logits = model(**inputs, logits_to_keep=score).logits
    else:
        logits = model(**inputs).logits[score]
    return _picked_logps(logits, labels, fp32)


def _placed(embed, spans, width: int, device):
    """`inputs_embeds` for rows laid out as `spans`: row r holds `embed(seq, start, stop)`,
    the model's input at those positions of `seq`, from column `at` on (spans of (seq,
    start, stop, at)), and zeros where the mask hides padding."""
    parts = [(embed(seq, start, stop), at) for seq, start, stop, at in spans]
    out = parts[0][0].new_zeros(len(parts), width, parts[0][0].shape[-1], device=device)
    for row, (h, at) in enumerate(parts):
        out[row, at:at + len(h)] = h
    return out


def sequence_logps(model, seqs, pad_id: int, device, keep_by_mask: bool, fp32: bool = True,
                   embed=None):
    """Summed log-probs of each sequence's response tokens, one forward pass for all.
    `fp32=False`: the log-softmax in the logits' own dtype (_log_softmax). `embed(seq,
    start, stop)`: the model's input at those positions of `seq`, given as `inputs_embeds`
    instead of the ids (rpo_app.frozen_prefix gives a layer's kept input)."""
    import torch

    from rpo_app.batches import collate

    batch = collate(seqs, pad_id)
    ids = batch["input_ids"].to(device)
    attention = batch["attention_mask"].to(device)
    score = batch["score_mask"].to(device)
    # Position t predicts token t + 1: roll the ids left to line labels up with logits.
    labels = ids.roll(-1, dims=1)[score]
    rows = score.nonzero(as_tuple=True)[0]
    given = (dict(input_ids=ids) if embed is None else
             dict(inputs_embeds=_placed(embed, [(s, 0, len(s), 0) for s in seqs], ids.shape[1], device)))
    token_logps = _scored_logps(model, dict(**given, attention_mask=attention, use_cache=False),
                                score, labels, keep_by_mask, fp32)
    return torch.zeros(len(seqs), device=device).index_add(0, rows, token_logps)


def shared_prefix_layout(rows, pad_id: int):
    """Rows of token ids laid out to run their common prefix once: returns (p, ids, mask)
    with p the prefix length (at most the shortest row less one, so every row keeps a
    last token of its own) and each row as [prefix | padding | rest]. The mask hides the
    padding; position ids must count real tokens only (mask.cumsum(-1) - 1)."""
    import torch

    shortest, first = min(len(r) for r in rows), rows[0]
    p = 0
    while p < shortest - 1 and all(r[p] == first[p] for r in rows):
        p += 1
    width = max(len(r) for r in rows) - p
    ids = torch.full((len(rows), p + width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), p + width), dtype=torch.long)
    for i, r in enumerate(rows):
        rest = r[p:]
        ids[i, :p] = torch.tensor(r[:p], dtype=torch.long)
        ids[i, p + width - len(rest):] = torch.tensor(rest, dtype=torch.long)
        mask[i, :p] = 1
        mask[i, p + width - len(rest):] = 1
    return p, ids, mask


def shared_prompt_logps(model, seqs, pad_id: int, device, keep_by_mask: bool, fp32: bool = True,
                        embed=None):
    """What `sequence_logps` returns, with each distinct prompt run once.

    Scoring K answers to one prompt repeats the prompt K times, and every prompt starts
    with the same chat-template system turn. Here the batch's common prefix runs once,
    each distinct prompt once (layout [prefix | padding | rest of the prompt], the mask
    hiding the padding and position ids counting real tokens, as in generation's shared
    prefill), and the answers run on copies of their prompt's KV cache. The last prompt
    position's logits score each answer's first token. Equal to `sequence_logps` up to
    float rounding (other shapes, other sums), gradients included: the answers' gradient
    flows back through the cache into the one prompt pass. The prompt pass needs the
    model to return its cache, which gradient checkpointing turns off while training.
    `embed`: as for `sequence_logps`.
    """
    import torch

    prompts = [tuple(s.input_ids[:s.prompt_len]) for s in seqs]
    answers = [s.input_ids[s.prompt_len:] for s in seqs]
    if min(len(q) for q in prompts) == 0:
        raise ValueError("a sequence without a prompt token has no position to score its first token from")
    distinct: dict[tuple, int] = {}
    slot = [distinct.setdefault(q, len(distinct)) for q in prompts]
    p, ids, mask = shared_prefix_layout(list(distinct), pad_id)
    ids, mask = ids.to(device), mask.to(device)
    holder = {}  # a sequence with each distinct prompt: where `embed` reads its positions
    for b, k in enumerate(slot):
        holder.setdefault(k, seqs[b])

    def given(part, spans):
        return (dict(input_ids=part) if embed is None else
                dict(inputs_embeds=_placed(embed, spans, part.shape[1], device)))

    last_only = {"logits_to_keep": 1} if keep_by_mask else {}
    cache = None
    if p:
        cache = model(**given(ids[:1, :p], [(holder[0], 0, p, 0)]), attention_mask=mask[:1, :p],
                      use_cache=True, **last_only).past_key_values
        cache.batch_repeat_interleave(len(distinct))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, p:]  # real tokens only, as in generation
    width = ids.shape[1] - p
    rests = [(holder[k], p, len(q), width - (len(q) - p)) for q, k in distinct.items()]
    out = model(**given(ids[:, p:], rests), attention_mask=mask, position_ids=positions,
                past_key_values=cache, use_cache=True, **last_only)
    last = _log_softmax(out.logits[:, -1], fp32).float()
    rows = torch.tensor(slot, device=device)
    firsts = torch.tensor([a[0] if a else 0 for a in answers], device=device)
    total = last[rows, firsts] * torch.tensor([1.0 if a else 0.0 for a in answers], device=device)
    steps = max(len(a) for a in answers) - 1  # the last answer token predicts nothing
    if steps <= 0:
        return total
    cache = out.past_key_values
    cache.batch_select_indices(rows)
    a_ids = torch.full((len(seqs), steps), pad_id, dtype=torch.long)
    a_mask = torch.zeros((len(seqs), steps), dtype=torch.long)
    labels = torch.full((len(seqs), steps), pad_id, dtype=torch.long)
    for b, a in enumerate(answers):
        if len(a) > 1:
            a_ids[b, :len(a) - 1] = torch.tensor(a[:-1], dtype=torch.long)
            a_mask[b, :len(a) - 1] = 1
            labels[b, :len(a) - 1] = torch.tensor(a[1:], dtype=torch.long)
    a_ids, a_mask, labels = a_ids.to(device), a_mask.to(device), labels.to(device)
    score = a_mask.bool()
    a_positions = mask.sum(-1)[rows][:, None] + torch.arange(steps, device=device)[None, :]
    spans = [(q, q.prompt_len, max(q.prompt_len, len(q) - 1), 0) for q in seqs]
    inputs = dict(**given(a_ids, spans), attention_mask=torch.cat([mask[rows], a_mask], dim=1),
                  position_ids=a_positions, past_key_values=cache, use_cache=False)
    token_logps = _scored_logps(model, inputs, score, labels[score], keep_by_mask, fp32)
    return total.index_add(0, score.nonzero(as_tuple=True)[0], token_logps)


class PromptScorer:
    """`shared_prompt_logps` while it works for the model, else `sequence_logps`: the app's
    scoring (ModelHost.sequence_logps), and what bench.train times inside the trainer
    against whole sequences. A model whose cache cannot be copied per row, or whose forward
    takes no cache or position ids, fails on the first batch and is scored whole from
    then on (with a warning in the log). `fp32`: as for `sequence_logps`."""

    def __init__(self, share: bool = True, fp32: bool = True, keep=None):
        self.share = share
        self.fp32 = fp32
        # A frozen_prefix.FrozenPrefixScorer that keeps each sequence's hidden states as
        # it scores (its capture_shared and capture), or None.
        self.keep = keep

    def __call__(self, model, seqs, pad_id: int, device, keep_by_mask: bool, fp32: bool | None = None,
                 embed=None):
        """`fp32`: this call's, where not the scorer's; `embed`: as for `sequence_logps` (not
        with `keep`)."""
        import functools

        import torch

        fp32 = self.fp32 if fp32 is None else fp32
        if self.keep is None:
            shared = functools.partial(shared_prompt_logps, embed=embed)
            whole = functools.partial(sequence_logps, embed=embed)
        else:
            shared, whole = self.keep.capture_shared, self.keep.capture
        if self.share and all(s.prompt_len for s in seqs):
            try:
                return shared(model, seqs, pad_id, device, keep_by_mask, fp32)
            except torch.OutOfMemoryError:
                raise
            except Exception as err:  # noqa: BLE001 - an odd architecture: the plain path
                log.warning("shared-prompt scoring failed (%s); scoring each sequence whole", err)
                self.share = False
        return whole(model, seqs, pad_id, device, keep_by_mask, fp32)


def base_token_logps(net, tokenizer, pad_id: int, device, prompts: list[str], answers: list[str],
                     max_length: int, cut_off: Sequence[bool] | None = None,
                     batch_size: int = 8) -> list[float]:
    """The base model's mean log-prob per answer token (adapters off), a fluency proxy:
    garbled or made-up words score far below the base model's own answers. `cut_off[i]`:
    answer i hit its token limit, so it is scored without the end-of-turn token it never
    wrote (that one token costs ~20 nats and would make long answers look garbled)."""
    import contextlib

    import torch
    from peft import PeftModel

    from rpo_app.batches import Encoder, Item

    enc = Encoder(tokenizer, max_length, max_length // 2)
    cut_off = cut_off if cut_off is not None else [False] * len(answers)
    seqs = [enc.encode(Item(p, a, cut_off=bool(c)), 0)
            for p, a, c in zip(prompts, answers, cut_off, strict=True)]
    was_training = net.training
    net.eval()  # no LoRA dropout while scoring
    out: list[float] = []
    try:
        ctx = net.disable_adapter() if isinstance(net, PeftModel) else contextlib.nullcontext()
        with ctx, torch.no_grad():
            for k in range(0, len(seqs), batch_size):
                part = seqs[k:k + batch_size]
                sums = sequence_logps(net, part, pad_id, device, keep_by_mask=False)
                out += [float(v) / max(len(q) - q.prompt_len, 1) for v, q in zip(sums.tolist(), part)]
    finally:
        net.train(was_training)
    return out


def _chunks_by_length(indices: list[int], lengths: list[int], size: int) -> list[list[int]]:
    # Longest first, not grouped by prompt: a prompt's answers differ in length by up to
    # the token limit, so grouping them would pad more than sharing their prompt saves;
    # a shared-prompt scorer still runs the chat template's system turn once per chunk.
    order = sorted(indices, key=lambda i: -lengths[i])
    return [order[k:k + size] for k in range(0, len(order), size)]


def score_all(accelerator, model, data, pad_id: int, chunk: int, keep_by_mask: bool,
              adapter: bool, should_stop=lambda: False, progress=None, scorer=None):
    """Log-probs of every sequence in ``data``, computed once, shared by all processes.

    Each process scores a strided share, longest first so padding stays small, then
    the shares are gathered so every process holds the full table. `progress(tokens
    scored, tokens in all)` after each chunk counts this process's share. `scorer`
    (default `sequence_logps`): how a chunk is scored, e.g. a PromptScorer.
    """
    import torch
    from accelerate.utils import gather_object

    from rpo_app.heap import kept_heap

    score = scorer or sequence_logps
    net = accelerator.unwrap_model(model)
    mine = list(range(accelerator.process_index, len(data.seqs), accelerator.num_processes))
    lengths = data.lengths()
    results: list[tuple[int, float]] = []
    total_tokens, scored = sum(lengths[i] for i in mine), 0
    was_training = net.training
    net.eval()
    try:
        # The same sizes chunk after chunk: reused from the heap, not faulted in again.
        with torch.no_grad(), accelerator.autocast(), kept_heap():
            for part in _chunks_by_length(mine, lengths, chunk):
                # With several processes a lone early exit would leave the others
                # waiting in the gather below; they stop together at the first step.
                if accelerator.num_processes == 1 and should_stop():
                    return None
                seqs = [data.seqs[i] for i in part]
                if adapter:
                    vals = score(net, seqs, pad_id, accelerator.device, keep_by_mask)
                else:
                    with net.disable_adapter():
                        vals = score(net, seqs, pad_id, accelerator.device, keep_by_mask)
                results.extend(zip(part, vals.tolist()))
                if progress is not None:
                    scored += sum(lengths[i] for i in part)
                    progress(scored, total_tokens)
    finally:
        net.train(was_training)
    if accelerator.num_processes > 1:
        results = gather_object(results)
    table = torch.zeros(len(data.seqs), dtype=torch.float32)
    for i, v in results:
        table[i] = v
    return table.to(accelerator.device)


def end_of_turn_logps(net, tokenizer, pad_id: int, device, items: Sequence, max_length: int,
                      batch_size: int = 8) -> list[float]:
    """The model's log-prob of the end-of-turn token right after each item's answer
    (batches.Item): about -22 nats after an answer cut in mid-sentence on the bundled
    model, -0.6 to -2.6 after one that ended. Scored as an answer with its ending minus
    the same answer without it, so it reads exactly what training would add."""
    import torch

    from rpo_app.batches import Encoder

    enc = Encoder(tokenizer, max_length, max_length // 2)
    was_training = net.training
    net.eval()
    out: list[float] = []
    try:
        with torch.no_grad():
            for k in range(0, len(items), batch_size):
                part = items[k:k + batch_size]
                ended = [enc.encode(dataclasses.replace(it, cut_off=False), 0) for it in part]
                cut = [enc.encode(dataclasses.replace(it, cut_off=True), 0) for it in part]
                sums = sequence_logps(net, ended + cut, pad_id, device, keep_by_mask=False).tolist()
                out += [a - b for a, b in zip(sums[:len(part)], sums[len(part):])]
    finally:
        net.train(was_training)
    return out
