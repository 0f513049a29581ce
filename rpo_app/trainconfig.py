"""Training settings: TrainConfig, its YAML form, its command-line flags, and the rule
for settings that follow from others.

Its own module so that the UI process (the Train tab) can build and check a config
without importing the training loop. Torch-free; `validate` imports only
transformers' scheduler names.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rpo_app.batches import KINDS
from rpo_app.loss_registry import LOSS_NAMES, LOSSES, WEIGHTINGS, default_betas, default_small_sets, get_loss
from rpo_app.models import PRECISIONS
from rpo_app.runfolder import atomic_write_text


class ConfigError(ValueError):
    """Settings or data the trainer refuses, before any model is loaded."""


# A prompt longer than this is cut from its start; half the length leaves room for the answer.
MAX_PROMPT_LENGTH_CAP = 256


def derive_settings(cfg: "TrainConfig") -> None:
    """Fill the settings that follow from others when they were not given (None).

    The one rule for the Train tab, the CLI and bench-effect: beta and the small-set
    bound from the loss (loss_registry), LoRA alpha = 2 x rank (the usual scale, so a rank change keeps the
    update size), max prompt length = half the max length, between 16 and 256 tokens.
    The saved config.yaml holds the resolved values.
    """
    if cfg.beta is None and cfg.loss in LOSS_NAMES:
        cfg.beta = get_loss(cfg.loss).default_beta
    if cfg.small_set is None and cfg.loss in LOSS_NAMES:
        cfg.small_set = get_loss(cfg.loss).small_set
    if cfg.lora_alpha is None and cfg.lora_r is not None:
        cfg.lora_alpha = 2 * cfg.lora_r
    if cfg.max_prompt_length is None and cfg.max_length is not None:
        cfg.max_prompt_length = min(MAX_PROMPT_LENGTH_CAP, max(16, cfg.max_length // 2))


# The learning rate measured with LoRA on every layer (the effect benchmark: 3e-4 wins
# ~70% at 30 steps and stays close to the base model; 5e-4 at batch 8 loops and drifts).
# LoRA on fewer layers moves the model less per step, so the rate scales with all layers
# over adapted ones: measured on the bundled model's 30 (docs/benchmarks.md, "LoRA on the top layers
# only"), the top 15 won 0.70 at 3e-4 and 0.73 at 6e-4 on `concise`, the top 8 0.59 at
# 3e-4 and 0.71 at 1e-3. The cap: at 2e-3 the top 8's answers repeated 3x the 3-grams.
LEARNING_RATE_EVERY_LAYER = 3e-4
LEARNING_RATE_MAX_SCALE = 4.0


def lora_layers_for(setting: int | None, n_layers: int) -> int:
    """How many top decoder layers LoRA adapts, of a model's `n_layers`: the setting;
    the top half when unset (None); every layer for 0 or more than the model has.

    The top half by default: the layers below run once per answer, in the reference
    pass, instead of at every step (rpo_app.frozen_prefix), so a default run on a 2-core
    CPU took 287 s against 451 s on every layer and won as often (docs/benchmarks.md, "LoRA on the
    top layers only").
    """
    if setting is None:
        return max(1, (n_layers + 1) // 2)
    return n_layers if not setting or setting >= n_layers else setting


def resolve_for_model(cfg: "TrainConfig", n_layers: int) -> "TrainConfig":
    """Fill the settings that follow from the model (None until it is known): LoRA's
    layers (`lora_layers_for`, saved as 0 when that is every layer) and the learning
    rate, LEARNING_RATE_EVERY_LAYER x all layers / adapted layers, at most
    LEARNING_RATE_MAX_SCALE x. The trainer resolves before it writes config.yaml; the
    Train tab before it records a run (its estimate reads None as the top half, through
    frozen_prefix.adapted_layers)."""
    top = lora_layers_for(cfg.lora_layers, n_layers)
    if cfg.lora_layers is None:
        cfg.lora_layers = 0 if top >= n_layers else top
    if cfg.learning_rate is None:
        cfg.learning_rate = LEARNING_RATE_EVERY_LAYER * min(n_layers / top, LEARNING_RATE_MAX_SCALE)
    return cfg


@dataclass
class TrainConfig:
    loss: str = field(default="rpo-paired", metadata={"help": f"one of {', '.join(LOSS_NAMES)}"})
    beta: float | None = field(default=None, metadata={
        "help": "how strongly the model is held near the base model (> 0; default: per loss, "
                f"{default_betas()})"})
    temperature: float = field(default=0.5, metadata={"help": "RPO softmax temperature over prompt similarity (> 0)"})
    weighting: str = field(default="embedding", metadata={"help": f"RPO contrast weights: {', '.join(WEIGHTINGS)}"})
    sft_weight: float = field(default=0.0, metadata={
        "help": "weight of an NLL term on the chosen answers (TRL's loss_type ['sigmoid', 'sft']); "
                "0 = off, the default: on thumbs-only data 0.2 kept every rpo-unpaired run from "
                "collapsing but won less on small sets (docs/benchmarks.md, 'An NLL term on thumbs')"})
    strength_margin: float = field(default=0.0, metadata={
        "help": "ODPO-style offset (Amini et al. 2024): a pair judged 'clearly' must win by this "
                "margin of beta-scaled log-ratios, 'slightly' by half of it, one without a "
                "strength by none (dpo, rpo-paired); 0 = strength ignored, the default: its "
                "effect is not measured yet"})
    # Measured with `python -m rpo_app bench-effect` on the bundled 135M model (docs/benchmarks.md,
    # "Effect benchmark"): 5e-5 does nothing measurable in 30 steps; 5e-4 at batch 8
    # wins 92% but answers start to loop and drift; 3e-4 wins ~70% at 30 steps and
    # stays close to the base model. At 60 steps RPO's garbling came from its beta
    # (above), not from this rate: 1.5e-4 was fluent but no longer won 70%.
    learning_rate: float | None = field(default=None, metadata={
        "help": f"AdamW's rate (default: {LEARNING_RATE_EVERY_LAYER:g} x the model's layers / the "
                f"adapted layers, at most {LEARNING_RATE_MAX_SCALE:g}x: {2 * LEARNING_RATE_EVERY_LAYER:g} "
                "on the top half)"})
    max_steps: int | None = field(default=None, metadata={
        "help": "optimizer steps; unset: run `epochs` epochs, but at least `min_steps`"})
    # One pass over a large label set; a few dozen pairs make only a handful of batches,
    # and the effect benchmark's sparse judges did not move the model in 9-21 steps
    # (3 epochs) but did in 60. 60 steps is what it measured for every judge.
    epochs: int = 1
    min_steps: int = field(default=60, metadata={
        "help": "when max_steps is unset, train at least this many steps (more passes over a "
                "small label set; early stopping still ends a run that stops improving). 0: no floor"})
    small_set: int | None = field(default=None, metadata={
        "help": "when max_steps is unset, a label set with fewer training examples than this "
                "(pairs, or items in the larger pool) trains small_set_steps steps in batches of "
                f"at most small_set_batch instead (0: off; default: per loss, {default_small_sets()})"})
    small_set_batch: int = field(default=4, metadata={"help": "see small_set"})
    small_set_steps: int = field(default=40, metadata={"help": "see small_set"})
    batch_size: int = field(default=8, metadata={"help": "examples per process per micro-batch"})
    grad_accum: int = 1
    max_length: int = 512
    max_prompt_length: int | None = field(default=None, metadata={
        "help": "prompt tokens kept (default: half of max_length, 16-256)"})
    lora_r: int = 16
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA scale (default: 2 x lora_r)"})
    # Off: on a CPU the dropout masks cost a quarter of a training step (13.3 s against
    # 17.4 s, batch 8, bundled model), and without them the policy at step 0 is exactly
    # the reference model, in train mode too.
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"],
                                      metadata={"help": "module names for LoRA, or all-linear"})
    lora_layers: int | None = field(default=None, metadata={
        "help": "LoRA on the top N decoder layers only (0: on every layer; default: the top "
                "half). The frozen layers below run once per answer, in the reference pass, "
                "instead of at every step"})
    warmup_ratio: float = 0.1
    lr_scheduler: str = field(default="linear", metadata={"help": "transformers scheduler name"})
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    eval_fraction: float = field(default=0.1, metadata={"help": "share of judgments held out, split by prompt"})
    eval_every: int = field(default=20, metadata={"help": "steps between evals (0: only at the end)"})
    early_stop_patience: int = field(default=5, metadata={
        "help": "stop after this many evals in which neither the held-out accuracy rose nor the "
                "held-out loss fell, and keep the adapter of the last eval that improved (0: never)"})
    # With n held-out pairs the accuracy moves in steps of 1/n: at the 3-7 pairs that a
    # judge deciding 30-66 pairs holds out, one pair ended a benchmark run at step 10.
    early_stop_min_pairs: int = field(default=16, metadata={
        "help": "early stopping needs at least this many held-out pairs (or items in the smaller "
                "held-out pool); with fewer the run trains all its steps and says so"})
    sample_every: int = field(default=50, metadata={"help": "steps between preview samples (0: only at the end)"})
    preview_prompts: list[str] = field(default_factory=list, metadata={
        "help": "prompts to sample during training (default: a few held-out prompts)"})
    preview_count: int = 2
    # A glimpse, decoded twice a run (base and tuned): at 96 tokens the previews were 10.6%
    # of a default run over 32 pairs on a 2-core Xeon with AMX (12.6 of 119.1 s), whose
    # steps bf16 makes fast and whose decoding it does not.
    sample_max_new_tokens: int = 64
    check_labels: bool = field(default=True, metadata={
        "help": "at the end, score every decided pair with the final adapter for the suspect-label "
                "list (one forward pass over the run's answers)"})
    save_every: int = field(default=50, metadata={"help": "steps between checkpoints (0: only on stop/end)"})
    keep_checkpoints: int = 2
    kinds: list[str] | None = field(default=None, metadata={"help": f"judgment kinds to use ({', '.join(KINDS)})"})
    annotators: list[str] | None = field(default=None, metadata={"help": "only these annotators' judgments"})
    exclude_annotators: list[str] | None = field(default=None, metadata={
        "help": "leave out these annotators' judgments"})
    exclude_judgments: list[int] | None = field(default=None, metadata={
        "help": "leave out these judgment ids"})
    min_gold_accuracy: float | None = field(default=None, metadata={
        "help": "leave out annotators below this accuracy on gold items (with at least 5 answered)"})
    judgments: str | None = field(default=None, metadata={"help": "JSONL file of judgments instead of the store"})
    model: str | None = field(default=None, metadata={"help": "HF id or folder (default: bundled SmolLM2)"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ... (default: a GPU when there is one)"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute activations in the backward pass: less memory per step, slower steps "
                "(rpo_app.runestimate has the measured ratios)"})
    auto_checkpointing: bool = field(default=True, metadata={
        "help": "switch gradient checkpointing on by itself when the run's largest step would "
                "need more memory than is free (rpo_app.runestimate.step_memory_gb)"})
    precision: str = field(default="auto", metadata={
        "help": "auto (bf16 autocast on a GPU with bf16 and on a CPU with bf16 instructions, "
                "else fp32), bf16 or fp32"})
    cpu_threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads (default: torch's choice; 1 is faster when other jobs share the cores)"})

    def __post_init__(self) -> None:
        derive_settings(self)

    def is_small_set(self, n_examples: int) -> bool:
        """Whether the default schedule takes its small-label-set branch (see small_set)."""
        return not self.max_steps and 0 < n_examples < self.small_set

    def overtraining_caution(self, n_examples: int, batches_per_epoch: int | None = None) -> str | None:
        """The loss's measured caution (loss_registry) when a set smaller than the loss's
        own small-set bound will see more examples than the small-set schedule shows it
        (more steps, or larger batches): where the benchmark saw the loss collapse.
        batches_per_epoch: the trainer's count (default: one process at batch_size)."""
        spec = get_loss(self.loss)
        if not spec.overtraining_caution or not 0 < n_examples < spec.small_set:
            return None
        batch = self.planned_batch(n_examples)
        batches = batches_per_epoch or math.ceil(n_examples / batch)
        seen = self.planned_steps(batches, n_examples) * batch * self.grad_accum
        small = self.small_set_steps * self.small_set_batch
        return spec.overtraining_caution if seen > small else None

    def planned_batch(self, n_examples: int) -> int:
        """Examples per process per micro-batch: batch_size, at most small_set_batch on a
        small label set."""
        return min(self.batch_size, self.small_set_batch) if self.is_small_set(n_examples) else self.batch_size

    def planned_steps(self, batches_per_epoch: int, n_examples: int | None = None) -> int:
        """Optimizer steps a run will take: max_steps; else, for a small label set of
        n_examples, small_set_steps; else `epochs` but at least min_steps."""
        if self.max_steps:
            return self.max_steps
        floor = self.small_set_steps if n_examples is not None and self.is_small_set(n_examples) \
            else self.min_steps
        return max(1, floor, math.ceil(self.epochs * batches_per_epoch / self.grad_accum))

    def validate(self) -> "TrainConfig":
        """Raise ConfigError naming the first bad setting."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.loss in LOSS_NAMES, f"unknown loss {self.loss!r}; choose one of {', '.join(LOSS_NAMES)}")
        need(self.weighting in WEIGHTINGS, f"unknown weighting {self.weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
        need(self.weighting != "diagonal" or (get_loss(self.loss).contrasts_batch and not get_loss(self.loss).pools),
             "weighting 'diagonal' needs aligned pairs: use it with loss rpo-paired")
        need(self.beta is not None and self.beta > 0, f"beta must be > 0, got {self.beta}")
        need(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        need(self.learning_rate is None or self.learning_rate > 0,
             f"learning_rate must be > 0, got {self.learning_rate}")
        need(self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}")
        need(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(self.min_steps >= 0, f"min_steps must be >= 0, got {self.min_steps}")
        need(self.small_set >= 0, f"small_set must be >= 0, got {self.small_set}")
        need(self.small_set_batch >= 1, f"small_set_batch must be >= 1, got {self.small_set_batch}")
        need(self.small_set_steps >= 1, f"small_set_steps must be >= 1, got {self.small_set_steps}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        need(self.max_prompt_length is not None and self.max_prompt_length >= 1, f"max_prompt_length must be >= 1, got {self.max_prompt_length}")
        need(self.max_prompt_length is None or self.max_length > self.max_prompt_length,
             f"max_length ({self.max_length}) must exceed max_prompt_length ({self.max_prompt_length})")
        need(self.lora_r >= 1, f"lora_r must be >= 1, got {self.lora_r}")
        need(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}")
        need(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        need(bool(self.target_modules), "target_modules is empty")
        need(self.lora_layers is None or (isinstance(self.lora_layers, int)
                                         and not isinstance(self.lora_layers, bool) and self.lora_layers >= 0),
             f"lora_layers must be a whole number of layers (0: every layer), got {self.lora_layers!r}")
        need(0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        need(0 <= self.eval_fraction < 1, f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        for name in ("eval_every", "sample_every", "save_every", "early_stop_patience", "early_stop_min_pairs",
                     "preview_count"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        need(self.sample_max_new_tokens >= 1, "sample_max_new_tokens must be >= 1")
        need(self.precision in PRECISIONS,
             f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        need(self.cpu_threads is None or self.cpu_threads >= 1, f"cpu_threads must be >= 1, got {self.cpu_threads}")
        need(self.sft_weight >= 0, f"sft_weight must be >= 0, got {self.sft_weight}")
        need(self.strength_margin >= 0, f"strength_margin must be >= 0, got {self.strength_margin}")
        need(not self.strength_margin or get_loss(self.loss).takes_offset,
             f"strength_margin works with {', '.join(n for n, s in LOSSES.items() if s.takes_offset)}"
             f", not {self.loss}")
        need(self.min_gold_accuracy is None or 0 <= self.min_gold_accuracy <= 1,
             f"min_gold_accuracy must be in [0, 1], got {self.min_gold_accuracy}")
        need(all(isinstance(i, int) and not isinstance(i, bool) for i in self.exclude_judgments or ()),
             f"exclude_judgments must be judgment ids (whole numbers), got {self.exclude_judgments}")
        bad_kinds = set(self.kinds or ()) - set(KINDS)
        need(not bad_kinds, f"unknown judgment kinds {sorted(bad_kinds)}; choose from {', '.join(KINDS)}")
        from transformers import SchedulerType  # light: no model code is imported

        names = [s.value for s in SchedulerType]
        need(self.lr_scheduler in names, f"unknown lr_scheduler {self.lr_scheduler!r}; choose one of {', '.join(names)}")
        return self

    def lora_targets(self) -> str | list[str]:
        return "all-linear" if list(self.target_modules) == ["all-linear"] else list(self.target_modules)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | os.PathLike) -> None:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)
        atomic_write_text(Path(path), text)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown training settings: {', '.join(unknown)}")
        values = dict(values)
        if isinstance(values.get("target_modules"), str):
            values["target_modules"] = [values["target_modules"]]
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "TrainConfig":
        return cls.from_dict(yaml_values(path))


def recorded(values: dict) -> dict:
    """The settings a run recorded (its config.yaml, the store's row), to run it again: a
    run from before `lora_layers` existed trained every layer, not today's default."""
    return {"lora_layers": 0, **values}


def yaml_values(path: str | os.PathLike) -> dict:
    """The settings a YAML file gives, unresolved: a flag that changes the loss must
    still get that loss's beta when the file does not set one."""
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"config {path} must be a mapping of setting: value")
    return values


# --- what a config can train on ----------------------------------------------------------

def check_data(cfg: TrainConfig, judgments: list[dict], world_size: int) -> tuple[list[dict], list[dict]]:
    """Split and make sure the loss has at least one global batch to train on."""
    from rpo_app.batches import count_examples, split_judgments

    source = cfg.judgments or "the store"
    spec = get_loss(cfg.loss)
    if not judgments:
        raise ConfigError(f"no judgments to train on in {source} (kinds={cfg.kinds}, annotators={cfg.annotators}); "
                          "label some first")
    train_j, eval_j = split_judgments(judgments, cfg.eval_fraction, cfg.seed)
    chosen, rejected = count_examples(train_j, spec)
    need = cfg.batch_size * world_size
    if spec.pools and (chosen == 0 or rejected == 0):
        raise ConfigError(f"loss {cfg.loss} needs both liked and disliked answers; the training split has "
                          f"{chosen} chosen and {rejected} rejected items")
    have = max(chosen, rejected)
    if have // world_size < MIN_BATCH:
        raise ConfigError(
            f"loss {cfg.loss} has {have} training {spec.example_word()} after holding out "
            f"{len(eval_j)} of {len(judgments)} judgments, fewer than {MIN_BATCH * world_size} "
            f"(a batch of {MIN_BATCH} per process); label more, or lower eval_fraction")
    cfg.batch_size = cfg.planned_batch(have)
    # A label set smaller than one batch trains in batches of all of it: the common first
    # run (a handful of decided pairs) is not refused.
    cfg.batch_size = min(cfg.batch_size, have // world_size)
    return train_j, eval_j


def batch_note(cfg: TrainConfig, asked: int, n_examples: int) -> str | None:
    """Why check_data left a smaller batch than the `asked` one, in words (the Train tab
    and train.log): the small-set schedule, or too few examples for one batch."""
    if cfg.batch_size >= asked:
        return None
    if cfg.is_small_set(n_examples) and cfg.batch_size == cfg.small_set_batch:
        return f"a small set (fewer than {cfg.small_set}): it trains in batches of {cfg.batch_size}"
    return f"they are fewer than the batch size ({asked}): it trains in batches of {cfg.batch_size}"


# The smallest batch a label set is shrunk to when it is smaller than batch_size.
MIN_BATCH = 2


# --- command-line flags ---------------------------------------------------------------

def _none_or(conv):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else conv(text)
    parse.__name__ = conv.__name__
    return parse


def add_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags for `train`: run options plus one flag per TrainConfig field.

    Field flags default to "not given", so the precedence is: built-in defaults <
    --config file (or the run's config.yaml on --resume) < flags.
    """
    parser.add_argument("--out", required=True, help="run folder")
    parser.add_argument("--config", help="YAML file of training settings")
    parser.add_argument("--data-dir", help="data dir with the store and models (default: $RPO_APP_DATA_DIR or ./data)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    group = parser.add_argument_group("training settings")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kw = {"dest": f.name, "default": argparse.SUPPRESS, "help": f.metadata.get("help")}
        ann = str(f.type)
        if ann.startswith("list"):
            kw["nargs"] = "+"
            if ann.startswith("list[int]"):
                kw["type"] = int
        elif ann == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        else:
            conv = int if ann.startswith("int") else float if ann.startswith("float") else str
            kw["type"] = _none_or(conv) if "None" in ann else conv
        group.add_argument(flag, **kw)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict = {}
    saved = Path(args.out) / "config.yaml"
    if args.config:
        values = yaml_values(args.config)
    elif getattr(args, "resume", False) and saved.exists():
        values = recorded(yaml_values(saved))
    for f in dataclasses.fields(TrainConfig):
        if hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return TrainConfig.from_dict(values)
