"""Training with LoRA on the top decoder layers only, the frozen layers run once.

When LoRA adapts only the top k of a model's n decoder layers, everything below them is
the frozen base model: a sequence's hidden state where the first adapted layer reads it
is the same at every training step. The reference pass runs every layer anyway, so it
keeps those hidden states, and each step runs the top k layers and the LM head alone,
forward and backward. The log-probs and the gradients are those of the whole model (to
float rounding; `tests/test_frozen_prefix.py`); only the frozen layers' repeated
forward passes are gone.
"""
from __future__ import annotations

import contextlib

from rpo_app.padfree import real_tokens_only
from rpo_app.scoring import PromptScorer, sequence_logps


def decoder_layers(model_config) -> int:
    """How many decoder layers a model has (a multimodal model's text model's)."""
    cfg = getattr(model_config, "text_config", None) or model_config
    return getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 1)


def adapted_layers(n_layers: int, top: int | None) -> list[int] | None:
    """The decoder layers LoRA adapts: the top `top` of `n_layers` as
    `trainconfig.lora_layers_for` counts them (None: the top half); all is None, as peft
    spells it."""
    from rpo_app.trainconfig import lora_layers_for

    top = lora_layers_for(top, n_layers)
    return None if top >= n_layers else list(range(n_layers - top, n_layers))


def adapted_count(n_layers: int, top: int | None) -> int:
    return len(adapted_layers(n_layers, top) or range(n_layers))


def all_linear_names(model) -> list[str]:
    """The module names peft's "all-linear" means (every Linear but the LM head), spelled
    out: peft takes `layers_to_transform` only with a list of names."""
    import torch

    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and module is not head})


def lora_placement(model, target_modules, lora_layers: int | None) -> dict:
    """peft's `target_modules` and `layers_to_transform` for LoRA on the top
    `lora_layers` decoder layers of `model` (0: every layer; None: the top half)."""
    layers = adapted_layers(decoder_layers(model.config), lora_layers)
    if layers and target_modules == "all-linear":
        target_modules = all_linear_names(model)
    return {"target_modules": target_modules, "layers_to_transform": layers}


def kept_states_gb(seqs, model_config) -> float:
    """What `FrozenPrefixScorer` keeps for `seqs`: a token's hidden state in fp32."""
    cfg = getattr(model_config, "text_config", None) or model_config
    return sum(len(s) for s in seqs) * cfg.hidden_size * 4 / 1e9


def _decoder(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


@contextlib.contextmanager
def _top_layers_only(decoder, first: int):
    """The decoder runs its layers from `first` up: its input is then that layer's input,
    given as `inputs_embeds`. Llama-style decoders add nothing to it (Gemma scales its
    embeddings inside the embedding module); one that does, such as learned position
    embeddings added in the decoder's forward, fails `FrozenPrefixScorer.reproduces`."""
    import torch

    full = decoder.layers
    top = list(full)[first:]
    # A layer reads and writes the KV cache at its `layer_idx`, and the cache's length is
    # its first layer's: numbered as the list they run in, the shared-prompt scorer's
    # cache holds the top layers from its first slot.
    numbered = [(m, m.layer_idx) for layer in top for m in layer.modules()
                if isinstance(getattr(m, "layer_idx", None), int)]
    decoder.layers = torch.nn.ModuleList(top)
    try:
        for m, k in numbered:
            m.layer_idx = k - first
        yield
    finally:
        decoder.layers = full
        for m, k in numbered:
            m.layer_idx = k


def _key(seq) -> tuple:
    return tuple(seq.input_ids)


class FrozenPrefixScorer:
    """The training step's scorer (`Trainer.step_scorer`) for LoRA on layers `first` up,
    and the app's scoring job's for a later adapter (`ModelHost.sequence_logps`).

    `capture` scores as `sequence_logps` does and keeps each sequence's input to layer
    `first`, in memory (the residual stream's dtype x the hidden size a token: in training
    fp32, 2.3 KB on the bundled model, so 1,000 pairs of 300 tokens keep 1.4 GB).
    `capture_shared` keeps the same through the shared-prompt scorer (the trainer's
    reference pass through `capture_all`, the app's scoring job). A step scores from
    those; a sequence the reference pass did not see (a resumed run reuses its saved
    reference log-probs) gets its hidden states from one forward pass without gradients
    first. `keep` takes states computed elsewhere (the app's answers as they were written:
    rpo_app.written_states).

    Scoring from the kept states runs each distinct prompt once (`share`, the
    shared-prompt scorer: scoring.PromptScorer) where the model allows it and the caller
    asks (the trainer: in fp32 only): a step's pairs share their prompt, and every prompt
    the chat template's system turn.
    """

    def __init__(self, first: int, budget_mb: float | None = None, share: bool = True,
                 real_tokens: bool = True):
        import threading

        self.first = first
        # The layers' token-by-token parts on the real tokens alone (rpo_app.padfree);
        # False: on the padding too, as before December 7 (`python -m rpo_app.bench.train`
        # times both). Not with gradient checkpointing (padfree.real_tokens_only).
        self.real_tokens = real_tokens
        # Whole sequences once the shared-prompt scorer has failed on this model; a trainer
        # with gradient checkpointing has no cache to share (share=False).
        self.scorer = PromptScorer(share=share)
        self.hidden: dict[tuple, object] = {}
        # The app's generation keeps states (`keep`) on the model's thread while a scoring
        # job prunes them (`keep_only`) on its own.
        self._lock = threading.Lock()
        self.budget_mb = budget_mb  # what `room` lets it keep; None: no limit
        # Whether scoring from kept states reproduces a whole pass (None: not checked yet).
        self.usable: bool | None = None

    @staticmethod
    def supports(model, n_layers: int) -> bool:
        """Whether the model's decoder keeps its layers where this scorer swaps them
        (a `layers` list, as Llama-style decoders do; GPT-2's `h` does not)."""
        import torch

        try:
            layers = _decoder(model).layers
        except (AttributeError, NotImplementedError):
            return False
        return isinstance(layers, torch.nn.ModuleList) and len(layers) == n_layers

    def capture(self, model, seqs, pad_id: int, device, keep_by_mask: bool, fp32: bool = True):
        layer = _decoder(model).layers[self.first]
        lengths = [len(s) for s in seqs]
        kept = {}

        def keep(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            kept["h"] = hidden.detach()

        handle = layer.register_forward_pre_hook(keep, with_kwargs=True)
        try:
            with self._real_tokens(model):
                values = sequence_logps(model, seqs, pad_id, device, keep_by_mask, fp32)
        finally:
            handle.remove()
        # The residual stream's own dtype: fp32 in training (under autocast too), the
        # weights' dtype on a bf16 host, half the bytes.
        h = kept["h"]
        for row, (s, n) in enumerate(zip(seqs, lengths)):
            self.hidden[_key(s)] = h[row, :n].clone()
        return values

    def capture_shared(self, model, seqs, pad_id: int, device, keep_by_mask: bool, fp32: bool = True):
        """`capture` through the shared-prompt scorer (scoring.shared_prompt_logps: the
        batch's common prefix once, each distinct prompt once, the answers on its cache),
        each sequence's states pieced together from those passes. The last token of an
        answer is never fed there (it predicts nothing), so its state is kept as zeros: no
        earlier position attends to it, and its own output is not scored. Raises what the
        shared-prompt scorer raises on a model it does not fit."""
        import torch

        from rpo_app.scoring import shared_prefix_layout, shared_prompt_logps

        layer = _decoder(model).layers[self.first]
        calls: list = []

        def keep(_module, args, kwargs):
            calls.append((args[0] if args else kwargs["hidden_states"]).detach())

        handle = layer.register_forward_pre_hook(keep, with_kwargs=True)
        try:
            with self._real_tokens(model):
                values = shared_prompt_logps(model, seqs, pad_id, device, keep_by_mask, fp32)
        finally:
            handle.remove()
        prompts = [tuple(q.input_ids[:q.prompt_len]) for q in seqs]
        distinct: dict[tuple, int] = {}
        slot = [distinct.setdefault(q, len(distinct)) for q in prompts]
        p, ids, _ = shared_prefix_layout(list(distinct), pad_id)
        prefix = calls.pop(0)[0, :p] if p else None
        rest, answers = calls[0], calls[1] if len(calls) > 1 else None
        width = ids.shape[1] - p
        for b, q in enumerate(seqs):
            own = len(prompts[b]) - p
            parts = ([prefix] if p else []) + [rest[slot[b], width - own:]]
            n = len(q) - q.prompt_len
            if n > 1:
                parts.append(answers[b, :n - 1])
            if n:
                parts.append(rest.new_zeros(1, rest.shape[-1]))
            self.hidden[_key(q)] = torch.cat(parts).clone()
        return values

    def capture_all(self, model, seqs, pad_id: int, device, keep_by_mask: bool, fp32: bool = True):
        """Score `seqs` through every layer, keeping their states, as the steps will score
        them: `capture_shared` while this scorer shares prompts, else `capture`. Where the
        shared-prompt scorer fails on the model, the steps stop sharing too (one flag,
        `self.scorer.share`)."""
        scorer = PromptScorer(share=self.scorer.share, keep=self)
        try:
            return scorer(model, seqs, pad_id, device, keep_by_mask, fp32=fp32)
        finally:
            self.scorer.share = scorer.share

    def _real_tokens(self, model):
        return real_tokens_only(_decoder(model)) if self.real_tokens else contextlib.nullcontext()

    def reproduces(self, model, seqs, pad_id: int, device, keep_by_mask: bool, want) -> bool:
        """Whether scoring `seqs` from their kept hidden states, with the adapter off, gives
        the base model's log-probs `want` (the reference pass's): a decoder that does more
        to `inputs_embeds` than pass them to its layers would not (far off, not rounding)."""
        import torch

        with torch.no_grad(), model.disable_adapter():
            return self.matches(model, seqs, pad_id, device, keep_by_mask, want)

    def matches(self, model, seqs, pad_id: int, device, keep_by_mask: bool, want,
                fp32: bool = True) -> bool:
        """Whether scoring `seqs` from their kept hidden states, the model as it is set up,
        gives `want`, what a whole pass in that setup gave (far off, not rounding)."""
        import torch

        def close() -> bool:
            got = self(model, seqs, pad_id, device, keep_by_mask, fp32)
            return bool(torch.all((got - want).abs() <= 0.5 + 0.02 * want.abs()))

        if close():
            return True
        if not self.scorer.share:
            return False
        # The top layers' cache laid out other than the model expects (layers of several
        # kinds, say): whole sequences may still reproduce it.
        self.scorer.share = False
        return close()

    def room(self, seqs) -> bool:
        """Whether keeping `seqs` too stays within the budget (priced at the bytes a token
        of the states already kept takes; the first batch is always let in)."""
        if self.budget_mb is None or not self.hidden:
            return True
        h = next(iter(self.hidden.values()))
        per_token = h[0].numel() * h.element_size() / 1e6
        new = sum(len(s) for s in {_key(s): s for s in seqs if _key(s) not in self.hidden}.values())
        return self.kept_mb() + new * per_token <= self.budget_mb

    def has(self, seqs) -> bool:
        return all(_key(s) in self.hidden for s in seqs)

    def keep(self, seq, states) -> bool:
        """Keep `states` (one row a token of `seq`, as `capture` keeps them) as `seq`'s,
        where `room` allows; whether kept."""
        with self._lock:
            if len(states) != len(seq) or not self.room([seq]):
                return False
            self.hidden[_key(seq)] = states
            return True

    def keep_only(self, seqs) -> None:
        """Forget every kept state but those of `seqs` (a scoring job's pool)."""
        wanted = {_key(s) for s in seqs}
        with self._lock:
            self.hidden = {k: h for k, h in self.hidden.items() if k in wanted}

    def kept_mb(self) -> float:
        """The kept hidden states' size: a token's is the model's hidden size, in fp32 in
        training."""
        return sum(h.numel() * h.element_size() for h in list(self.hidden.values())) / 1e6

    def _fill(self, model, seqs, pad_id: int, device, keep_by_mask: bool) -> None:
        import torch

        missing = list({_key(s): s for s in seqs if _key(s) not in self.hidden}.values())
        if missing:
            # The adapter off: the states below it do not depend on it, and its dropout
            # would draw from the RNG that the step's own dropout masks come from (a
            # resumed run would no longer retrace the run it continues).
            with torch.no_grad(), model.disable_adapter():
                self.capture(model, missing, pad_id, device, keep_by_mask)

    def __call__(self, model, seqs, pad_id: int, device, keep_by_mask: bool, fp32: bool = True):
        self._fill(model, seqs, pad_id, device, keep_by_mask)
        dtype = next(p for p in _decoder(model).parameters()).dtype

        def kept(seq, start: int, stop: int):
            return self.hidden[_key(seq)][start:stop].to(device=device, dtype=dtype)

        with _top_layers_only(_decoder(model), self.first), self._real_tokens(model):
            return self.scorer(model, seqs, pad_id, device, keep_by_mask, fp32=fp32, embed=kept)
