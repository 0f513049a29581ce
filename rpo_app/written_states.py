"""The hidden states below the adapters, kept as the base model writes an answer.

The scoring job after a run scores every pool answer under the new adapter. With LoRA on
the top layers only (the trainer's default), the layers below are the base model's, and
a later job starts from each answer's input to the lowest adapted layer, kept by the job
before (frozen_prefix.FrozenPrefixScorer). The first job had nothing kept. Yet when the
app wrote the answer itself, its decoding steps computed exactly those states, token by
token: this records them while a batch is written, so that first job starts from them
too, as it already skips the base pass over the log-probs kept as written.

The layout follows `ModelHost._run`: the shared prefill's passes (the batch's common
prefix once, each distinct prompt's rest once but for its last token), then generate's
calls: the first over each row's last prompt token (over the whole left-padded prompt
where nothing was prefilled), then one token a row per decoding step. A step's input is
the token the step before chose, so an answer's states are complete once its row ends;
its last token is never fed, and its state is kept as zeros, as the scorer's own keeping
does (FrozenPrefixScorer.capture_shared).
"""
from __future__ import annotations

import contextlib


class WrittenStates:
    """Records the input of decoder layer `layer` of `model` while a batch is written."""

    def __init__(self, model, layer: int):
        from rpo_app.frozen_prefix import _decoder

        self.layer = layer
        self._module = _decoder(model).layers[layer]
        self._calls: list = []
        self._paused = False
        self._first = None  # index in _calls of generate's first call
        self._mask = None
        self._slot: list[int] | None = None  # each row's distinct prompt; None: not prefilled
        self._prefix = 0

    @contextlib.contextmanager
    def recording(self):
        handle = self._module.register_forward_pre_hook(self._keep, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()

    def _keep(self, _module, args, kwargs):
        if not self._paused:
            self._calls.append((args[0] if args else kwargs["hidden_states"]).detach())

    @contextlib.contextmanager
    def paused(self):
        """Other work on the same model meanwhile (a chat turn let in between two decoding
        steps) is not this batch's."""
        was, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = was

    def decoding(self, mask, slot: list[int] | None = None, prefix: int = 0) -> None:
        """generate is about to start over the rows laid out by `mask` (batch x width, 1
        on each row's own tokens). `slot` (each row's distinct prompt) and `prefix`: the
        shared prefill ran those passes before (ModelHost._shared_prefill); None: nothing
        was prefilled."""
        self._first = len(self._calls)
        self._mask = mask.bool()
        self._slot = None if slot is None else list(slot)
        self._prefix = prefix

    def row(self, i: int, fed: int, length: int):
        """Row i's states for its sequence of `length` tokens, whose first `fed` answer
        tokens were fed back (the last is never fed): one row per token, the last zeros."""
        import torch

        calls, first, mask = self._calls, self._first, self._mask[i]
        if self._slot is not None:
            parts, k = [], 0
            if self._prefix:
                parts.append(calls[0][0, :self._prefix])
                k = 1
            own = int(mask[self._prefix:].sum())  # this row's prompt tokens after the prefix
            if k < first:  # each distinct prompt but its last token, right-aligned
                rest = calls[k][self._slot[i]]
                parts.append(rest[rest.shape[0] + 1 - own:])
            parts.append(calls[first][i, -1:])
        else:
            parts = [calls[first][i][mask]]
        parts += [calls[first + s][i, -1:] for s in range(1, fed + 1)]
        states = torch.cat(parts)
        if len(states) < length:
            states = torch.cat([states, states.new_zeros(length - len(states), states.shape[-1])])
        return states
