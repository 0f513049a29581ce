"""What a run will cost before it starts: the Train tab's up-front time estimate (every
phase of a run, from timings taken on this machine, the loaded model's forward pass and
decoding speed, and the run's own data, its sequence count and length, so nothing is
left out of the total), and a training step's peak memory, which the trainer also reads
to switch gradient checkpointing on when a step would not fit.

Fixed costs (starting the child and loading the model, saving) come from the newest
finished run on this data dir when there is one, else from typical CPU figures.
"""
from __future__ import annotations

from dataclasses import dataclass

# A LoRA training step (forward, backward through the frozen base, optimizer) costs
# about this many forward passes of the same tokens, as the run computes them
# (generate.ModelHost.trainer_forward_model): measured on 2 CPU cores with the bundled
# model, fp32 2.2-2.4 (LoRA r=16, all linear layers, batch 8 pairs), rounded up; bf16
# autocast 3.1 (its backward gains less than its forward: a default run over 32 pairs on
# a 2-core Xeon with AMX, 40 steps in 81.9 s against 91.7 estimated at 3.5). Used until
# a finished run on this machine has measured its own step speed.
STEP_FORWARDS = {"fp32": 2.5, "bf16": 3.1}
# LoRA on the top k of n decoder layers (rpo_app.frozen_prefix): a step runs those layers
# from the kept hidden states, the LM head and the optimizer. Measured on the bundled model
# (a step's forward and backward over 8 sequences of 120-250 tokens, fp32, 1 thread, a
# 2-core AVX2-only EPYC): 19.5 s with LoRA on all 30 layers, 7.4 s on the top 8, 5.3 s on
# the top 4, i.e. about 3.2 s plus 0.53 s a layer: the part that does not shrink with the
# layers is 0.16 of an every-layer step.
FIXED_STEP_SHARE = 0.16
# Gradient checkpointing runs each layer's forward again in the backward pass. Measured
# with `bench --only memory` (one step, 8 x 512 tokens, fp32, 2 threads): 105.8 s against
# 75.3 s, and a peak of 1.55 GB above the loaded model against 7.28 GB; earlier, 28.6 s
# against 21.1 s (batch 8 x 256, 1 thread, `python -m rpo_app.bench.train`).
CHECKPOINTING_STEP_FACTOR = 1.4
CHECKPOINTING_MEMORY = 0.21
# A training step's peak memory above the loaded model grows with the padded tokens of
# its largest forward pass (sequences x the longest), barely with their length: fused
# attention keeps no score matrix. Counted in hidden-sized vectors kept per layer and
# token, plus a fixed part in vocabulary-sized vectors per token of one LM-head slice
# (logits, log-softmax and their gradients). Fitted from above to `bench --only memory`
# on the bundled model (30 layers x 576, fp32, LoRA on every linear layer, heads of 512
# tokens), GB at 2,048 padded tokens: 4.02 (4 x 512), 3.98 (8 x 256), 4.16 (2 x 1024);
# at 4,096: 7.28 (8 x 512), 6.97 (16 x 256), 7.47 (4 x 1024). With gradient
# checkpointing 1.20, 1.17 and 1.11 at 2,048; 1.56, 1.36 and 1.53 at 4,096. Not measured
# beyond 1,024 tokens a sequence.
STEP_VECTORS_PER_TOKEN = {False: 24, True: 3}  # key: gradient checkpointing
HEAD_VECTORS_PER_TOKEN = 8
# Plain (eager) attention, which the trainer takes under bf16 autocast on a CPU, keeps
# each layer's attention probabilities, heads x longest^2 per sequence, for the backward
# pass. Counted at 4 bytes a score: with fp32 eager attention 8 x 512 measured 8.48 GB
# against 7.26 fused, 1.2 GB more where this counts 2.3 (bf16 autocast keeps the fp32
# softmax and a bf16 copy of it, unmeasured: this CPU has no bf16 instructions).
EAGER_SCORE_BYTES = 4
# The share of the memory free that a step may plan to use: the rest is for the
# optimizer's state, the heap's slack and whatever else the machine runs meanwhile.
MEMORY_HEADROOM = 0.85
# The steps keep freed memory in the heap (rpo_app.heap.kept_heap) when this many times
# a step's planned need fits in that share: reused, not faulted in again, at a higher
# peak. Measured on a 2-core Xeon with AMX (December 7, a default run over 32 pairs,
# bf16 autocast, 2 threads): 40 steps 78.5 s kept against 104.9 s mapped, the run's
# peak 4.40 GB against 3.74 (the step planned at 2.7 GB).
KEPT_HEAP_FACTOR = 2.0
TYPICAL = {"loading the model": 12.0, "embedding the prompts": 4.0, "saving the adapter": 2.0}


@dataclass
class RunShape:
    """What a run will do, from its config and data."""

    steps: int
    batch_size: int
    train_seqs: int
    eval_seqs: int
    mean_tokens: float  # per sequence, prompt + answer
    evals: int
    mid_previews: int
    preview_count: int
    preview_tokens: int
    embeds: bool
    check_labels: bool = True
    checkpointing: bool = False
    step_share: float = 1.0  # of a step with LoRA on every layer (step_share)


def step_share(n_layers: int, lora_layers: int) -> float:
    """A step's cost with LoRA on the top `lora_layers` of `n_layers` (0: all; None: half) against
    one with LoRA on every layer (FIXED_STEP_SHARE)."""
    from rpo_app.frozen_prefix import adapted_count

    return FIXED_STEP_SHARE + (1 - FIXED_STEP_SHARE) * adapted_count(n_layers, lora_layers) / n_layers


def run_shape(cfg, n_examples: int, train_seqs: int, eval_seqs: int, mean_tokens: float,
              preview_count: int, embeds: bool, n_layers: int | None = None) -> RunShape:
    """`n_layers`: the model's decoder layers, for a run with LoRA on the top few only."""
    steps = cfg.planned_steps(max(1, n_examples // cfg.batch_size), n_examples)
    evals = 0
    if eval_seqs:
        evals = (steps // cfg.eval_every if cfg.eval_every else 0) + (
            0 if cfg.eval_every and steps % cfg.eval_every == 0 else 1)
    mid = len(range(cfg.sample_every, steps, cfg.sample_every)) if cfg.sample_every else 0
    return RunShape(steps=steps, batch_size=cfg.batch_size, train_seqs=train_seqs,
                    eval_seqs=eval_seqs, mean_tokens=mean_tokens, evals=evals, mid_previews=mid,
                    preview_count=preview_count, preview_tokens=cfg.sample_max_new_tokens,
                    embeds=embeds, check_labels=cfg.check_labels,
                    checkpointing=cfg.gradient_checkpointing,
                    step_share=step_share(n_layers, cfg.lora_layers) if n_layers else 1.0)


def estimate_phases(shape: RunShape, forward_s_per_token: float,
                    decode_timing, past: dict[str, float] | None = None,
                    precision: str = "fp32", step_s_per_token: float | None = None,
                    measured_with_checkpointing: bool = False,
                    measured_step_share: float = 1.0,
                    rates: dict[str, float] | None = None) -> dict[str, float]:
    """Seconds per phase (runfolder.PHASES names), in run order. `decode_timing`: the
    app's generate.DecodeSpeed (its step_seconds(rows)). `step_s_per_token`: a
    training step's seconds per token measured by an earlier run here, with gradient
    checkpointing or not as `measured_with_checkpointing` says, and LoRA on the layers
    that make `measured_step_share` (else the forward timing times STEP_FORWARDS,
    without, on every layer). `rates`: seconds per token of the phases that count tokens
    in that run (RunStatus.phase_rates), which replace the forward timing: measured on the
    run's own passes, they include what one timed pass leaves out (page faults, the
    lengths' spread)."""
    past, rates = past or {}, rates or {}
    scored = shape.train_seqs + shape.eval_seqs
    reference = rates.get("scoring the answers with the base model", forward_s_per_token)
    # Evaluating and the label check run the adapted layers only, as the steps do.
    top = shape.step_share / measured_step_share

    def adapted(phase: str) -> float:
        return rates[phase] * top if phase in rates else shape.step_share * forward_s_per_token

    # The trainer's previews decode at the app's speed: its LoRA's add runs inside the
    # matrix product (rpo_app.lora_fused), so the tuned previews cost about what the base
    # model's do (the first-run benchmark, 2 prompts, two runs: 109.9 and 113.6 ms a step
    # against 111.7 and 105.3).
    preview = (shape.preview_tokens * decode_timing.step_seconds(shape.preview_count)
               if shape.preview_count else 0.0)
    per_token = shape.step_share * (step_s_per_token / measured_step_share if step_s_per_token
                                    else STEP_FORWARDS[precision] * forward_s_per_token)
    measured_on = measured_with_checkpointing and bool(step_s_per_token)
    if shape.checkpointing != measured_on:
        per_token *= CHECKPOINTING_STEP_FACTOR if shape.checkpointing else 1 / CHECKPOINTING_STEP_FACTOR
    step = per_token * 2 * shape.batch_size * shape.mean_tokens
    out = {"loading the model": past.get("loading the model", TYPICAL["loading the model"])}
    if shape.embeds:
        out["embedding the prompts"] = past.get("embedding the prompts",
                                                TYPICAL["embedding the prompts"])
    out["scoring the answers with the base model"] = reference * scored * shape.mean_tokens
    out["the base model's previews"] = preview
    out["training"] = step * shape.steps
    out["evaluating"] = adapted("evaluating") * shape.eval_seqs * shape.mean_tokens * shape.evals
    out["previews"] = preview * shape.mid_previews
    # The final adapter scores every sequence once more (rpo_app.suspects), but for the
    # held-out ones where the last evaluation, at the last step, scored them already.
    if shape.check_labels:
        checked = shape.train_seqs + (0 if shape.evals else shape.eval_seqs)
        out["checking the labels"] = adapted("checking the labels") * checked * shape.mean_tokens
    out["the final previews"] = preview
    out["saving the adapter"] = past.get("saving the adapter", TYPICAL["saving the adapter"])
    return out


def step_memory_gb(model_config, seqs: int, longest: int, checkpointing: bool,
                   element_size: int = 4, head_slice: int | None = None,
                   eager_attention: bool = False, lora_layers: int = 0) -> float:
    """A training step's peak memory above the loaded model (GB): one forward and backward
    over `seqs` sequences padded to `longest` tokens (see STEP_VECTORS_PER_TOKEN). With
    LoRA on the top `lora_layers` only, only those keep activations for the backward."""
    from rpo_app.frozen_prefix import adapted_count, decoder_layers
    from rpo_app.scoring import HEAD_SLICE

    cfg = getattr(model_config, "text_config", None) or model_config
    layers = adapted_count(decoder_layers(cfg), lora_layers)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 1)
    tokens = seqs * longest
    head_slice = HEAD_SLICE if head_slice is None else head_slice
    head_tokens = min(head_slice, tokens) if head_slice else tokens
    body = STEP_VECTORS_PER_TOKEN[checkpointing] * tokens * layers * hidden * element_size
    head = HEAD_VECTORS_PER_TOKEN * head_tokens * cfg.vocab_size * 4  # fp32 log-softmax
    scores = 0
    if eager_attention:  # with checkpointing one layer's at a time, recomputed
        heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 1)
        scores = EAGER_SCORE_BYTES * heads * longest ** 2 * seqs * (1 if checkpointing else layers)
    return (body + head + scores) / 1e9


@dataclass
class MemoryPlan:
    """How a run's largest step will run: the one rule for asked, switched on or off."""

    plain_gb: float  # the step without gradient checkpointing
    need_gb: float  # the step as it will run
    free_gb: float
    checkpointing: bool
    switched: bool  # on because the step would not fit, not because it was asked for
    kept_heap: bool = False  # the steps keep freed memory in the heap (KEPT_HEAP_FACTOR)


def plan_memory(model_config, seqs: int, longest: int, free_gb: float, *, asked: bool, auto: bool,
                element_size: int = 4, eager_attention: bool = False, lora_layers: int = 0) -> MemoryPlan:
    """Gradient checkpointing when asked for, or (auto) when the step without it would
    take more than MEMORY_HEADROOM of `free_gb`."""
    def need(checkpointing: bool) -> float:
        return step_memory_gb(model_config, seqs, longest, checkpointing, element_size,
                              eager_attention=eager_attention, lora_layers=lora_layers)

    plain = need(False)
    switched = auto and not asked and plain > MEMORY_HEADROOM * free_gb
    on = asked or switched
    need_gb = need(True) if on else plain
    return MemoryPlan(plain, need_gb, free_gb, on, switched,
                      kept_heap=not on and KEPT_HEAP_FACTOR * need_gb <= MEMORY_HEADROOM * free_gb)


@dataclass
class Estimate:
    """The Train tab's up-front estimate of a run: its shape, a step's memory plan and the
    seconds of each phase (runfolder.PHASES names, in run order)."""

    shape: RunShape
    memory: MemoryPlan
    phases: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.phases.values())


def estimate_run(host, cfg, train_j: list[dict], eval_j: list[dict], n_examples: int,
                 last: dict | None = None) -> Estimate:
    """What a run of `cfg` over these judgments (trainconfig.check_data's split) will take
    on the loaded app model `host` (generate.ModelHost: its timings, times once if not
    yet). `last`: the newest finished run's timings here (ui.train._last_run_timings),
    which replace the typical figures; {} or None before any run."""
    from rpo_app.batches import Encoder, build_data
    from rpo_app.frozen_prefix import decoder_layers
    from rpo_app.loss_registry import get_loss
    from rpo_app.models import pick_precision

    last = last or {}
    timing = host.decode_timing()  # timed once (a few seconds), then kept
    spec = get_loss(cfg.loss)
    # The sequences as the trainer tokenizes them (chat template, truncation), on a sample.
    seqs = build_data(train_j[:64], Encoder(host.tokenizer, cfg.max_length, cfg.max_prompt_length),
                      spec).seqs
    lengths = [len(q) for q in seqs] or [1]
    mean_tokens = sum(lengths) / len(lengths)
    per_item = 2 if not spec.pools else 1
    preview = min(cfg.preview_count, len({j["prompt_a_text"] for j in (eval_j or train_j)}))
    n_layers = decoder_layers(host.model.config)
    shape = run_shape(cfg, n_examples, per_item * n_examples, 2 * len(eval_j), mean_tokens,
                      len(cfg.preview_prompts) or preview, spec.needs_embeddings(cfg.weighting),
                      n_layers=n_layers)
    precision = pick_precision(str(host.device), cfg.precision)
    memory = step_plan(host, cfg, min(2 * cfg.batch_size, per_item * n_examples),
                       min(max(lengths), cfg.max_length), precision)
    shape.checkpointing = memory.checkpointing
    phases = estimate_phases(shape, host.seconds_per_token(precision), timing, last.get("past"),
                             precision, last.get("step_s_per_token"),
                             measured_with_checkpointing=last.get("checkpointing", False),
                             measured_step_share=step_share(n_layers, last.get("lora_layers", 0)),
                             rates=last.get("rates"))
    return Estimate(shape, memory, phases)


def step_plan(host, cfg, seqs: int, longest: int, precision: str = "fp32") -> MemoryPlan:
    """A step's memory as the trainer will plan it (plan_memory) for a run of `cfg` whose
    child loads the app model's copy: what it needs, the memory free, and whether the
    run will recompute activations."""
    from rpo_app.heap import free_memory_gb
    from rpo_app.models import training_attention

    size = next(host.model.parameters()).element_size()
    # The run's own process loads a copy of the model before it plans its steps.
    free = free_memory_gb(host.device) - sum(p.numel() for p in host.model.parameters()) * size / 1e9
    return plan_memory(host.model.config, seqs, longest, free, asked=cfg.gradient_checkpointing,
                       auto=cfg.auto_checkpointing, element_size=size,
                       eager_attention=training_attention(str(host.device), precision) == "eager",
                       lora_layers=cfg.lora_layers)
