"""The training loop: LoRA preference training (RPO, DPO, IPO, KTO) on HF Accelerate.

One code path for the CPU, one GPU (bf16 autocast) and many GPUs or nodes
(`accelerate launch` / torchrun). Run as `python -m rpo_app train ...` or
`python -m rpo_app.train ...`; both take the same flags (rpo_app.trainconfig).

What it writes is the run folder's contract (rpo_app.runfolder); the losses come from
rpo_app.loss_registry, log-probs from rpo_app.scoring, checkpoints from
rpo_app.checkpoints, the stop rule from rpo_app.earlystop.

Heavy libraries (torch, transformers, peft, accelerate) are imported inside
functions so that building the CLI parser stays instant.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from rpo_app import checkpoints
from rpo_app.batches import JUDGMENT_FIELDS, count_examples
from rpo_app.cpushare import RunShare
from rpo_app.earlystop import EarlyStopping, off_reason
from rpo_app.heap import kept_heap, map_large_blocks, peak_resident_gb
from rpo_app.loss_registry import get_loss
from rpo_app.runfolder import MetricRow, RunFolder, SampleRow
from rpo_app.trainconfig import ConfigError, TrainConfig, add_train_args, batch_note, check_data, config_from_args, resolve_for_model  # noqa: F401

log = logging.getLogger("rpo_app.train")

EXIT_BAD_CONFIG = 2


# --- inputs, checked before the model loads --------------------------------------------

def read_judgments_file(path: str | os.PathLike) -> list[dict]:
    """A --judgments file: JSONL rows in the shape of Store.training_judgments."""
    out = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise ConfigError(f"cannot read judgments file {path}: {err}") from err
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise ConfigError(f"{path} line {n}: not JSON ({err})") from err
        missing = set(JUDGMENT_FIELDS) - set(row)
        if missing:
            raise ConfigError(f"{path} line {n}: missing {', '.join(sorted(missing))}")
        out.append(row)
    return out


def load_judgments(cfg: TrainConfig, data_dir: str | os.PathLike) -> tuple[list[dict], dict, dict | None]:
    """(the judgments to train on, what was left out and why, the store's state)."""
    from rpo_app import lineage

    if cfg.judgments:
        rows, left_out = lineage.select(cfg, read_judgments_file(cfg.judgments))
        return rows, left_out, None
    from rpo_app.store import Store

    store = Store(data_dir)
    rows, left_out = lineage.from_store(cfg, store)
    return rows, left_out, store.state()


def check_model(model: str | None, data_dir: str | os.PathLike) -> str:
    """Resolve the model to a folder or cached hub id, or refuse with a clear message."""
    from rpo_app.models import resolve_model

    try:
        path = resolve_model(model, data_dir)
    except Exception as err:  # noqa: BLE001 - any failure here means "cannot use this model"
        raise ConfigError(f"unknown model {model!r}: {err}") from err
    if Path(path).is_dir():
        return path
    looks_like_path = path.startswith((".", "/", "~")) or path.count("/") != 1 or os.sep in path.replace("/", "")
    if looks_like_path:
        raise ConfigError(f"unknown model {model!r}: no such folder, and not a Hugging Face id (org/name)")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(path, "config.json"), str):
        return path
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(path)
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"unknown model {model!r}: not a folder, not in the Hugging Face cache, and "
                          f"not downloadable ({err.__class__.__name__})") from err
    return path


def model_layers(path: str) -> int:
    """A checked model's decoder layer count, from its config alone (no weights)."""
    from transformers import AutoConfig

    from rpo_app.frozen_prefix import decoder_layers

    try:
        return decoder_layers(AutoConfig.from_pretrained(path))
    except Exception as err:  # noqa: BLE001 - any failure here means "cannot use this model"
        raise ConfigError(f"cannot read the config of model {path!r}: {err}") from err


# The share of free memory the frozen layers' kept outputs may take (Trainer._room_for_kept_states).
KEPT_STATES_SHARE = 0.5


# --- the forward pass ------------------------------------------------------------------

def gather_keep_grad(accelerator, local):
    """All processes' values concatenated, gradient flowing into the local slice only.

    A plain all_gather cuts the graph. Putting the local tensor back in its slot keeps
    this process's path; every process computes the same global loss, so each one's
    backward yields exactly d(loss)/d(own slice). DDP then averages the parameter
    gradients over processes, so the caller scales the loss by the number of processes.
    (torch.distributed.nn's differentiable all_gather needs all_to_all, which gloo lacks.)
    """
    import torch

    if accelerator.num_processes == 1:
        return local
    parts = accelerator.gather(local.detach().contiguous())
    n, r = local.shape[0], accelerator.process_index
    return torch.cat([parts[: r * n], local, parts[(r + 1) * n:]])


def process_order(global_idx: list[int], rank: int, world: int) -> tuple[list[int], list[int]]:
    """(this process's share, the global batch in gathered order).

    Shares are strided so each process gets a mix of lengths; after a gather the
    items come back grouped by process, and ref log-probs and embeddings are indexed
    in that same order so every row still lines up.
    """
    gathered = [i for r in range(world) for i in global_idx[r::world]]
    return global_idx[rank::world], gathered


# --- the trainer -----------------------------------------------------------------------

class StopRequested(Exception):
    pass


class Trainer:
    def __init__(self, cfg: TrainConfig, run: RunFolder, data_dir: str | os.PathLike,
                 train_j: list[dict], eval_j: list[dict], model_path: str, accelerator, resume: bool):
        self.cfg, self.data_dir, self.model_path = cfg, data_dir, model_path
        self.spec = get_loss(cfg.loss)
        self.train_j, self.eval_j = train_j, eval_j
        self.acc = accelerator
        self.main = accelerator.is_main_process
        self.world = accelerator.num_processes
        self.run = run
        self.resume = resume
        self.stop_flag = False
        self.step = 0
        self.steps_keep_heap = False  # _save_memory decides
        self.elapsed_before = 0.0
        self.early = EarlyStopping(patience=cfg.early_stop_patience, active=False)
        self.early_stop_note: str | None = None
        self.ref_seconds = 0.0
        # The held-out log-probs of the last evaluation and the step they were scored at:
        # the label check reuses them while the adapter is still that step's.
        self.evaluated: tuple[int, object] | None = None
        self.t_start = time.time()
        self.step_times: list[float] = []
        self.cpu = RunShare(data_dir, fixed=cfg.cpu_threads)

    # -- setup --
    def setup(self) -> None:
        import torch
        from accelerate.utils import set_seed
        from peft import LoraConfig, get_peft_model

        from rpo_app.batches import BatchPlan, Encoder, build_data
        from rpo_app.frozen_prefix import FrozenPrefixScorer, decoder_layers, lora_placement
        from rpo_app.lora_fused import fuse_lora_layers
        from rpo_app.models import load_model, pick_dtype, training_attention
        from rpo_app.scoring import keeps_logits_by_mask, sequence_logps

        cfg = self.cfg
        self.cpu.adjust()
        set_seed(cfg.seed)
        device = self.acc.device
        self.run.begin_phase("loading the model")
        log.info("loading model %s on %s", self.model_path, device)
        attention = training_attention(device.type, "bf16" if self.acc.mixed_precision == "bf16" else "fp32")
        base, self.tok = load_model(self.model_path, self.data_dir, device=str(device),
                                    dtype=pick_dtype(str(device)), attn_implementation=attention)
        _disable_dropout(base)
        # `train` resolved these before config.yaml was written; a benchmark's own Trainer may not have.
        resolve_for_model(cfg, decoder_layers(base.config))
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id

        encoder = Encoder(self.tok, cfg.max_length, cfg.max_prompt_length)
        self.train_data = build_data(self.train_j, encoder, self.spec)
        self.eval_data = build_data(self.eval_j, encoder, self.spec, for_eval=True)
        self.pool = self.spec.pools
        # Held-out accuracy needs held-out pairs, or both held-out pools.
        n_eval = len(self.eval_data.pairs) or min(len(self.eval_data.chosen), len(self.eval_data.rejected))
        self.has_eval = n_eval > 0
        self.early_stop_note = off_reason(n_eval, cfg.early_stop_patience, cfg.early_stop_min_pairs)
        self.early.active = bool(cfg.early_stop_patience) and self.has_eval and self.early_stop_note is None
        if self.early_stop_note:
            log.warning("%s; training all steps", self.early_stop_note)
        self.plan = BatchPlan(self.train_data, cfg.batch_size * self.world, cfg.seed, pool=self.pool)
        n_examples = (max(len(self.train_data.chosen), len(self.train_data.rejected)) if self.pool
                      else len(self.train_data.pairs))
        self.max_steps = cfg.planned_steps(self.plan.batches_per_epoch, n_examples)
        if caution := cfg.overtraining_caution(n_examples, self.plan.batches_per_epoch):
            self._warn(caution)
        log.info("train: %d sequences, %d pairs, %d chosen, %d rejected; eval: %d pairs, %d chosen, %d rejected",
                 len(self.train_data.seqs), len(self.train_data.pairs), len(self.train_data.chosen),
                 len(self.train_data.rejected), len(self.eval_data.pairs), len(self.eval_data.chosen),
                 len(self.eval_data.rejected))
        if self.spec.contrasts_batch and cfg.batch_size * self.world < 4:
            self._warn(f"RPO with a global batch of {cfg.batch_size * self.world} contrasts few items; "
                       "it then behaves much like DPO (a batch of 8 or more is where RPO differs)")

        self.checkpointing = self._save_memory(base, eager_attention=attention == "eager")
        self.run.update_status(gradient_checkpointing=self.checkpointing)
        if self.checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        placement = lora_placement(base, cfg.lora_targets(), cfg.lora_layers)
        layers = placement["layers_to_transform"]
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          task_type="CAUSAL_LM", bias="none", **placement)
        model = get_peft_model(base, lora)
        fuse_lora_layers(model)  # LoRA's scaled add inside the GEMM, in the step and the previews
        model.train()
        self.keep_by_mask = keeps_logits_by_mask(model)
        # Without the kept states every sequence is scored whole: running each distinct
        # prompt once (PromptScorer) through every layer gained about 5% a step
        # (docs/benchmarks.md, "Each prompt once per batch, in training too?");
        # `python -m rpo_app.bench.train` swaps this to time both. From the kept states it
        # gains more (FrozenPrefixScorer).
        self.step_scorer = sequence_logps
        # Below the first adapted layer the model is frozen: its hidden states come from
        # the reference pass, once, and a step runs only the adapted layers. One process
        # only: the scorer calls the decoder itself, and with several processes the
        # gradients are averaged by the wrapper's forward, which that would bypass.
        # Gradient checkpointing recomputes a layer in the backward pass, outside the
        # scorer's call: no cache to share, and no record of the pass's real tokens.
        plain = not self.checkpointing
        # Each prompt once per step only where the step's products are fp32: a step from
        # the kept states ran 1.11-1.22x faster for it on an AVX2-only CPU, while under
        # bf16 autocast its extra passes cost more than they save (a default run on an AMX
        # Xeon: 123 s shared, 103 s whole; docs/benchmarks.md, "December 7, night").
        shared = plain and self.acc.mixed_precision != "bf16"
        self.prefix = (FrozenPrefixScorer(layers[0], share=shared, real_tokens=plain)
                       if layers and self.world == 1
                       and FrozenPrefixScorer.supports(model, decoder_layers(base.config))
                       and self._room_for_kept_states(base.config) else None)
        if self.prefix:
            self.step_scorer = self.prefix

        self.train_emb = self.eval_emb = None
        if self.spec.needs_embeddings(cfg.weighting):
            self.run.begin_phase("embedding the prompts")
            self.train_emb, self.eval_emb = self._embed_prompts()

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        from transformers import get_scheduler

        # Not passed to accelerator.prepare: a prepared scheduler steps once per
        # process, which assumes each process sees 1/N of the batches; ours see all.
        self.scheduler = get_scheduler(cfg.lr_scheduler, optimizer,
                                       num_warmup_steps=math.ceil(cfg.warmup_ratio * self.max_steps),
                                       num_training_steps=self.max_steps)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)

        self.ref_train, self.ref_eval = self._reference_logps()
        if self.ref_train is None:
            raise StopRequested()
        if self.prefix:
            self._check_prefix()
        if self.resume:
            self._load_checkpoint()
        self.preview = self._preview_prompts()
        self.base_answers = self._base_answers()
        self.base_logps: list[float] | None = None

    def _warn(self, warning: str) -> None:
        """Log a warning and add it to the status line's (each stays until the run ends)."""
        log.warning(warning)
        before = self.run.status().warning  # a resumed run's status has its first start's
        if not before or warning not in before:
            self.run.update_status(warning=f"{before}; {warning}" if before else warning)

    def _room_for_kept_states(self, model_config) -> bool:
        """Whether the frozen layers' outputs for every answer fit in half the memory free
        (a large label set: thousands of answers keep gigabytes). Without room, the steps
        run the frozen layers too, without gradients, and the run says so."""
        from rpo_app.frozen_prefix import kept_states_gb
        from rpo_app.heap import free_memory_gb

        seqs = self.train_data.seqs + self.eval_data.seqs
        need, free = kept_states_gb(seqs, model_config), free_memory_gb(self.acc.device)
        if need <= KEPT_STATES_SHARE * free:
            return True
        self._warn(f"the frozen layers run at every step: keeping their output for {len(seqs)} "
                   f"answers would take about {need:.1f} GB and {free:.1f} GB is free")
        return False

    def _largest_forward(self) -> tuple[int, int]:
        """(sequences, longest) of the largest forward pass this process's steps make, over
        the first epochs' batches (later epochs regroup the same lengths; a run of 100,000
        steps would otherwise wait on the scan)."""
        lengths = self.train_data.lengths()
        best = (0, 0)
        for k in range(min(self.max_steps * self.cfg.grad_accum, 4 * self.plan.batches_per_epoch)):
            chosen, rejected = self.plan.batch(k)
            mine = set(process_order(chosen, self.acc.process_index, self.world)[0]
                       + process_order(rejected, self.acc.process_index, self.world)[0])
            if mine:
                shape = (len(mine), max(lengths[i] for i in mine))
                best = max(best, shape, key=lambda sl: sl[0] * sl[1])
        return best

    def _save_memory(self, base, eager_attention: bool) -> bool:
        """Whether the steps recompute activations: asked for, or switched on here because
        the largest step would not fit in the memory free (cfg.auto_checkpointing)."""
        from rpo_app.heap import free_memory_gb
        from rpo_app.runestimate import CHECKPOINTING_STEP_FACTOR, plan_memory

        seqs, longest = self._largest_forward()
        plan = plan_memory(base.config, seqs, longest, free_memory_gb(self.acc.device),
                           asked=self.cfg.gradient_checkpointing, auto=self.cfg.auto_checkpointing,
                           element_size=next(base.parameters()).element_size(),
                           eager_attention=eager_attention, lora_layers=self.cfg.lora_layers)
        if plan.switched:
            self._warn(f"Save memory switched on: the largest step ({seqs} sequences of up to "
                       f"{longest} tokens) would need about {plan.plain_gb:.1f} GB and "
                       f"{plan.free_gb:.1f} GB is free; steps take about "
                       f"{CHECKPOINTING_STEP_FACTOR:.1f}x as long")
        else:
            log.info("largest step: %d sequences of up to %d tokens, about %.1f GB; %.1f GB free%s",
                     seqs, longest, plan.need_gb, plan.free_gb,
                     "; the steps keep freed memory in the heap" if plan.kept_heap else "")
        # The heap is the CPU's: a GPU's steps allocate through torch's own cache.
        self.steps_keep_heap = plan.kept_heap and self.acc.device.type == "cpu"
        return plan.checkpointing

    def _embed_prompts(self):
        import torch

        from rpo_app.embed import Embedder

        prompts = self.train_data.embed_texts() + self.eval_data.embed_texts()
        log.info("embedding %d prompts", len(prompts))
        vecs = torch.from_numpy(Embedder(device="cpu").encode(prompts)).to(self.acc.device)
        n = len(self.train_data.prompts)
        return vecs[:n], vecs[n:]

    def _fingerprint(self) -> str:
        """Identifies the model and the exact token sequences the cached ref log-probs belong to."""
        h = hashlib.sha256(f"{self.model_path}|{self.acc.mixed_precision}|{self.pad_id}".encode())
        for data in (self.train_data, self.eval_data):
            for s in data.seqs:
                h.update(repr((s.input_ids, s.prompt_len)).encode())
            h.update(b"|")
        return h.hexdigest()

    def _reference_logps(self):
        """The base model's log-probs (adapter off), once per sequence, cached in the run folder."""
        import torch

        from rpo_app.scoring import score_all

        cache = self.run.ref_logps
        fingerprint = self._fingerprint()
        saved = torch.load(cache, map_location="cpu") if cache.exists() else {}
        usable = saved.get("fingerprint") == fingerprint
        if self.world > 1:  # all reuse or all recompute: score_all gathers across processes
            flag = torch.tensor([1.0 if usable else 0.0], device=self.acc.device)
            usable = self.acc.reduce(flag, reduction="sum").item() == self.world
        if usable:
            log.info("reference log-probs: reusing %s", cache.name)
            return saved["train"].to(self.acc.device), saved["eval"].to(self.acc.device)
        n = len(self.train_data.seqs) + len(self.eval_data.seqs)
        log.info("reference log-probs: scoring %d sequences once with the adapter disabled", n)
        t0 = time.time()
        chunk = 2 * self.cfg.batch_size
        n_train = sum(self.train_data.lengths()) // self.world
        total = n_train + sum(self.eval_data.lengths()) // self.world
        self.run.begin_phase("scoring the answers with the base model", total=total, unit="tokens")
        ref = []
        # Keeping the frozen layers' states, each chunk's system turn and prompts once, as
        # the steps run them (FrozenPrefixScorer).
        scorer = self.prefix.capture_all if self.prefix else None
        for offset, data in ((0, self.train_data), (n_train, self.eval_data)):
            ref.append(score_all(self.acc, self.model, data, self.pad_id, chunk, self.keep_by_mask,
                                 adapter=False, should_stop=lambda: self.stop_flag, scorer=scorer,
                                 progress=lambda done, _t, o=offset: self._progress(o + done)))
            if ref[-1] is None:
                return None, None
        self.ref_seconds = time.time() - t0
        log.info("reference log-probs done in %.1fs", self.ref_seconds)
        if self.prefix:
            log.info("kept the frozen layers' hidden states: %.0f MB; the steps run %s from them",
                     self.prefix.kept_mb(), "each prompt once" if self.prefix.scorer.share else "each sequence whole")
        if self.main:
            tmp = cache.with_suffix(".tmp")
            torch.save({"fingerprint": fingerprint, "train": ref[0].cpu(), "eval": ref[1].cpu()}, tmp)
            os.replace(tmp, cache)
        return ref[0], ref[1]

    def _progress(self, done: float, total: float | None = None) -> None:
        """Work counted in a long phase (the reference pass, evaluation, previews, the label
        check), and the cores' share as it is now: the app may have started or stopped
        computing since the phase began."""
        self.run.phase_progress(done, total)
        self.cpu.follow()

    def _check_prefix(self) -> None:
        """The steps run the whole model where starting from the kept hidden states does
        not give this model's reference log-probs (FrozenPrefixScorer.reproduces)."""
        from rpo_app.scoring import sequence_logps

        sample = list(range(min(2, len(self.train_data.seqs))))
        with self.acc.autocast():
            ok = self.prefix.reproduces(self.model, [self.train_data.seqs[i] for i in sample], self.pad_id,
                                        self.acc.device, self.keep_by_mask, self.ref_train[sample])
        if not ok:
            self._warn("LoRA on the top layers: this model's decoder changes a layer's input given "
                       "to it, so every step runs the whole model (the frozen layers' time is not saved)")
            self.prefix, self.step_scorer = None, sequence_logps

    def _preview_prompts(self) -> list[str]:
        if self.cfg.preview_prompts:
            return list(self.cfg.preview_prompts)
        source = self.eval_data.prompts or self.train_data.prompts
        return source[: self.cfg.preview_count]

    def _base_answers(self) -> list:
        """The base model's answers to the preview prompts, once (kept across resumes)."""
        from rpo_app.generate import Answer
        from rpo_app.runfolder import atomic_write_text, read_json

        saved = read_json(self.run.base_samples)
        if saved and saved.get("prompts") == self.preview:
            # A run from before cut_off was kept scored every answer with its ending.
            cut = saved.get("cut_off") or [False] * len(saved["answers"])
            return [Answer(text, bool(c)) for text, c in zip(saved["answers"], cut)]
        if self.preview:
            self.run.begin_phase("the base model's previews", total=self.cfg.sample_max_new_tokens,
                                 unit="tokens")
        answers = self._generate(self.preview, adapter=False) if self.main else []
        if self.main:
            atomic_write_text(self.run.base_samples, json.dumps(
                {"prompts": self.preview, "answers": [a.text for a in answers],
                 "cut_off": [a.cut_off for a in answers]}, ensure_ascii=False))
        return answers

    def _generate(self, prompts: list[str], adapter: bool) -> list:
        """Greedy previews through the app's batched generator (same prompt encoding and
        end-of-turn rule as candidates and chat), with the trained adapter on or off."""
        import contextlib

        from rpo_app.generate import GenSettings, ModelHost

        if not prompts:
            return []
        prompts = self._prompt_inputs(prompts)
        net = self.acc.unwrap_model(self.model)
        was_training = net.training
        host = ModelHost.from_loaded(net, self.tok, str(self.model_path))  # puts net in eval mode
        # Plain greedy: a repetition penalty would hide the loops the collapse warning looks for.
        settings = GenSettings(temperature=0, max_new_tokens=self.cfg.sample_max_new_tokens,
                               repetition_penalty=1.0)
        self.cpu.adjust()

        # When the first token comes and how fast the rest follow: where a slow preview's
        # time goes (a one-off start-up cost or every step) shows in train.log.
        clock = {"start": time.time(), "first": None, "calls": 0}

        def steps(done: int, total: int) -> None:
            if clock["first"] is None:
                clock["first"] = time.time()
            clock["calls"] += 1  # once a step, and once more when the batch ends
            self._progress(done, total)

        try:
            ctx = contextlib.nullcontext() if adapter else net.disable_adapter()
            # No autocast: decoding a few rows reads every weight once per token, and under
            # CPU autocast each fp32 weight is also cast to bf16 at every step (a preview
            # of 2 x 48 tokens: 16 s with autocast, 12 s without). On a GPU the weights are
            # bf16 already.
            with ctx:
                answers = host.answers(prompts, n=1, settings=settings, batch_size=len(prompts),
                                       on_step=steps)
        finally:
            net.train(was_training)
        more = clock["calls"] - 2  # steps after the first
        if more > 0:
            log.info("previews (%s): %d prompts, first step %.2f s after the start, then %.1f ms a "
                     "step over %d more", "tuned" if adapter else "base model", len(prompts),
                     clock["first"] - clock["start"], 1000 * (time.time() - clock["first"]) / more, more)
        return [a[0] for a in answers]  # generate.Answer: text and whether it was cut

    def _prompt_inputs(self, prompts: list[str]) -> list:
        """A preview prompt that is one of the data's conversations goes in as that."""
        known = {**self.eval_data.messages, **self.train_data.messages}
        return [known.get(p, p) for p in prompts]

    # -- checkpoints --
    def _save_checkpoint(self) -> None:
        checkpoints.save(self.run, self.acc, self.model, self.optimizer, self.scheduler, step=self.step,
                         grad_accum=self.cfg.grad_accum, elapsed_s=self._elapsed(), early=self.early,
                         keep=self.cfg.keep_checkpoints)

    def _load_checkpoint(self) -> None:
        state = checkpoints.load_latest(self.run, self.acc, self.model, self.optimizer, self.scheduler,
                                        self.early)
        if state is None:
            log.warning("--resume: no checkpoint in %s; starting from step 0", self.run.checkpoints)
            return
        self.step = state["step"]
        self.elapsed_before = state.get("elapsed_s", 0.0)
        self.run.trim_after(self.step)
        log.info("resumed from %s (step %d of %d)", state["path"], self.step, self.max_steps)

    # -- loss on one global batch --
    def batch_loss(self, chosen_idx: list[int], rejected_idx: list[int], *, ref, emb, logps_table=None):
        """Loss and metrics over the global batch given by seq indices.

        With ``logps_table`` (eval) the policy log-probs are looked up, no forward.
        Otherwise this process runs its share (chosen and rejected in one forward)
        and the log-probs of all processes are gathered, so the RPO contrast matrix
        spans the global batch.
        """
        import torch

        from rpo_app.losses import preference_metrics

        if logps_table is None:
            my_c, c_order = process_order(chosen_idx, self.acc.process_index, self.world)
            my_r, r_order = process_order(rejected_idx, self.acc.process_index, self.world)
            # A ranking puts one answer in several pairs of a batch: score each sequence once.
            unique = list(dict.fromkeys(my_c + my_r))
            data_seqs = [self.train_data.seqs[i] for i in unique]
            with self.acc.autocast():
                scored = self.step_scorer(self.model, data_seqs, self.pad_id, self.acc.device,
                                          self.keep_by_mask)
            at = {seq: k for k, seq in enumerate(unique)}
            local = scored[torch.tensor([at[i] for i in my_c + my_r], dtype=torch.long,
                                        device=scored.device)]
            pc = gather_keep_grad(self.acc, local[: len(my_c)])
            pr = gather_keep_grad(self.acc, local[len(my_c):])
        else:
            c_order, r_order = chosen_idx, rejected_idx
            pc, pr = logps_table[c_order], logps_table[r_order]
        data = self.train_data if logps_table is None else self.eval_data
        c_t = torch.tensor(c_order, device=self.acc.device)
        r_t = torch.tensor(r_order, device=self.acc.device)
        rc, rr = ref[c_t], ref[r_t]
        ec = er = None
        if emb is not None:
            ec = emb[torch.tensor([data.seqs[i].prompt_idx for i in c_order], device=self.acc.device)]
            er = emb[torch.tensor([data.seqs[i].prompt_idx for i in r_order], device=self.acc.device)]
        cfg = self.cfg
        keep = None
        if self.spec.contrasts_batch:
            from rpo_app.batches import contrast_keep

            keep = contrast_keep(c_order, r_order, data.beats, aligned=not self.pool).to(self.acc.device)
        offset = None
        if cfg.strength_margin and not self.pool:
            from rpo_app.batches import pair_offsets

            offset = torch.tensor(pair_offsets(c_order, r_order, data, cfg.strength_margin),
                                  device=self.acc.device)
        loss = self.spec.compute(pc, pr, rc, rr, beta=cfg.beta, settings=cfg,
                                 chosen_prompt_emb=ec, rejected_prompt_emb=er, keep=keep,
                                 offset=offset)
        if cfg.sft_weight:
            from rpo_app.losses import sft_nll

            tokens = torch.tensor([len(data.seqs[i]) - data.seqs[i].prompt_len for i in c_order],
                                  device=self.acc.device, dtype=pc.dtype)
            loss = loss + cfg.sft_weight * sft_nll(pc, tokens)
        metrics = preference_metrics(pc, pr, rc, rr, beta=cfg.beta, aligned=not self.pool)
        return loss, metrics

    # -- eval and samples --
    def evaluate(self) -> dict:
        """Held-out metrics as MetricRow fields (eval_accuracy, eval_margin, eval_loss)."""
        import torch

        from rpo_app.batches import eval_batches
        from rpo_app.losses import preference_metrics
        from rpo_app.scoring import score_all

        data = self.eval_data
        if not self.has_eval:
            return {}
        self.run.begin_phase("evaluating", total=sum(data.lengths()) // self.world, unit="tokens")
        table = score_all(self.acc, self.model, data, self.pad_id, 2 * self.cfg.batch_size,
                          self.keep_by_mask, adapter=True, scorer=self.prefix,
                          progress=lambda done, _t: self._progress(done))
        self.evaluated = (self.step, table)
        losses = []
        with torch.no_grad():
            for c, r in eval_batches(data, self.cfg.batch_size * self.world, self.pool):
                loss, _ = self.batch_loss(c, r, ref=self.ref_eval, emb=self.eval_emb, logps_table=table)
                losses.append(loss.item())
            if data.pairs:  # accuracy on held-out pairs for every loss: one comparable measure
                c = torch.tensor([p[0] for p in data.pairs], device=table.device)
                r = torch.tensor([p[1] for p in data.pairs], device=table.device)
                m = preference_metrics(table[c], table[r], self.ref_eval[c], self.ref_eval[r], self.cfg.beta)
            else:
                c = torch.tensor(data.chosen, device=table.device)
                r = torch.tensor(data.rejected, device=table.device)
                m = preference_metrics(table[c], table[r], self.ref_eval[c], self.ref_eval[r], self.cfg.beta,
                                       aligned=False)
        out = {"eval_accuracy": m["accuracy"], "eval_margin": m["margin"]}
        if losses:
            out["eval_loss"] = sum(losses) / len(losses)
        return out

    def _adapter_snapshot(self) -> dict:
        from peft import get_peft_model_state_dict

        net = self.acc.unwrap_model(self.model)
        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(net).items()}

    def write_samples(self, phase: str = "previews") -> None:
        if self.main and self.preview:
            from rpo_app.scoring import base_token_logps

            self.run.begin_phase(phase, total=self.cfg.sample_max_new_tokens, unit="tokens")
            answers = self._generate(self.preview, adapter=True)
            net = self.acc.unwrap_model(self.model)

            def score(answers: list) -> list[float]:  # by the base model: the garbled-answer warning
                return base_token_logps(net, self.tok, self.pad_id, self.acc.device,
                                        self._prompt_inputs(self.preview), [a.text for a in answers],
                                        self.cfg.max_length, cut_off=[a.cut_off for a in answers])

            if self.base_logps is None:  # the base answers and the base model never change
                self.base_logps = score(self.base_answers)
            rows = zip(self.preview, self.base_answers, answers, self.base_logps, score(answers))
            for prompt, (base, _), (tuned, _), base_lp, tuned_lp in rows:
                self.run.append_sample(SampleRow(step=self.step, prompt=prompt, base=base, tuned=tuned,
                                                 base_logp=round(base_lp, 4), tuned_logp=round(tuned_lp, 4)))
        self.acc.wait_for_everyone()

    # -- the loop --
    def _elapsed(self) -> float:
        return self.elapsed_before + (time.time() - self.t_start)

    def _stop_agreed(self) -> bool:
        """A signal may reach only one process; all must stop at the same step."""
        if self.world == 1:
            return self.stop_flag
        import torch

        flag = torch.tensor([1.0 if self.stop_flag else 0.0], device=self.acc.device)
        return bool(self.acc.reduce(flag, reduction="sum").item() > 0)

    def train_step(self) -> MetricRow:
        cfg = self.cfg
        t0 = time.time()
        totals: dict[str, float] = {}
        tokens = pairs = 0
        for micro in range(cfg.grad_accum):
            chosen, rejected = self.plan.batch(self.step * cfg.grad_accum + micro)
            last = micro == cfg.grad_accum - 1
            ctx = self.acc.no_sync(self.model) if not last else _nullcontext()
            with ctx:
                loss, metrics = self.batch_loss(chosen, rejected, ref=self.ref_train, emb=self.train_emb)
                # x world: see gather_keep_grad; / grad_accum: the step averages micro-batches.
                self.acc.backward(loss * self.world / cfg.grad_accum)
            for k, v in {"loss": loss.item(), **metrics}.items():
                totals[k] = totals.get(k, 0.0) + v / cfg.grad_accum
            tokens += self.train_data.n_tokens(chosen + rejected)
            pairs += len(chosen)
        grad_norm = self.acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        dt = max(time.time() - t0, 1e-9)
        self.step_times.append(dt)
        recent = self.step_times[-20:]
        return MetricRow(step=self.step, **totals, lr=lr, grad_norm=float(grad_norm),
                         pairs_per_s=pairs / dt, tokens_per_s=tokens / dt, elapsed_s=self._elapsed(),
                         eta_s=sum(recent) / len(recent) * (self.max_steps - self.step))

    def fit(self) -> str:
        """Run to max_steps (or early stop / signal). Returns the final state."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.t_start = time.time()
        self.step_times = []
        self.run.begin_phase("training", total=self.max_steps, unit="steps", state="running",
                             step=self.step, max_steps=self.max_steps, error=None,
                             early_stop_note=self.early_stop_note)
        self.run.phase_progress(self.step, force=True)
        bar = tqdm(total=self.max_steps, initial=self.step, desc="train", unit="step",
                   disable=None if self.main else True, dynamic_ncols=True)
        state, early = "finished", False
        eval_accuracy = self.run.status().eval_accuracy
        # Steps allocate the same sizes over and over: kept in the heap where memory allows.
        with kept_heap() if self.steps_keep_heap else contextlib.nullcontext():
            while self.step < self.max_steps:
                if self._stop_agreed():  # checked before each step: a signal during previews counts too
                    state = "stopped"
                    break
                self.cpu.adjust()
                row = self.train_step()
                due = (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == self.max_steps
                if due and self.has_eval:
                    for key, value in self.evaluate().items():
                        setattr(row, key, value)
                    eval_accuracy = row.eval_accuracy
                    early = self.early.update(self.step, row.eval_accuracy, row.eval_loss, self._adapter_snapshot)
                    if self.step < self.max_steps and not early:
                        self._resume_training_phase()
                self.run.append_metric(row)
                bar.update(1)
                bar.set_postfix(loss=f"{row.loss:.4f}", acc=f"{row.accuracy:.2f}")
                self.run.update_status(state="running", step=self.step, max_steps=self.max_steps, loss=row.loss,
                                       eval_accuracy=eval_accuracy, elapsed_s=row.elapsed_s, eta_s=row.eta_s,
                                       phase_done=self.step, peak_memory_gb=peak_resident_gb())
                if cfg.sample_every and self.step % cfg.sample_every == 0 and self.step < self.max_steps:
                    self.write_samples()
                    self._resume_training_phase()
                if early:
                    e = self.early
                    log.info("early stop at step %d: held-out accuracy has not beaten %.3f nor the loss %.4f "
                             "for %d evals (last progress at step %s)", self.step, e.best_accuracy,
                             e.best_loss if e.best_loss is not None else float("nan"), cfg.early_stop_patience,
                             e.best_step)
                    break
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.max_steps:
                    self._save_checkpoint()
        bar.close()
        if state == "stopped":
            self._save_checkpoint()
            return state
        self._save_checkpoint()
        if early and self.early.adapter_state is not None:
            self._restore_best()
        if self.cfg.check_labels:
            self.check_labels()
        self.write_samples("the final previews")
        self.run.begin_phase("saving the adapter")
        self._save_adapter()
        self.run.update_status(early_stopped=early, best_step=self.early.best_step,
                               best_eval_accuracy=self.early.best_step_accuracy)
        return state

    def check_labels(self) -> None:
        """Score every decided pair, training and held out, with the final adapter: the
        suspect-label list (rpo_app.suspects) reads the result. The held-out answers'
        scores come from the final evaluation where it ran with this adapter."""
        from rpo_app.batches import judgment_pairs
        from rpo_app.scoring import score_all
        from rpo_app.suspects import check_rows

        rows, work = [], []
        final = self.evaluated[1] if self.evaluated and self.evaluated[0] == self.step else None
        for data, judgments, ref, split, table in (
                (self.train_data, self.train_j, self.ref_train, "train", None),
                (self.eval_data, self.eval_j, self.ref_eval, "held_out", final)):
            index = {item: k for k, item in enumerate(data.items)}
            pairs = [(p.judgment_id, index[p.chosen], index[p.rejected], split)
                     for p in judgment_pairs(judgments)
                     if p.chosen in index and p.rejected in index]
            if pairs:
                work.append((data, ref, pairs, table))
        total = sum(sum(data.lengths()) for data, _, _, table in work if table is None) // self.world
        if work:
            self.run.begin_phase("checking the labels", total=total, unit="tokens")
        before = 0
        for data, ref, pairs, table in work:
            if table is None:
                table = score_all(self.acc, self.model, data, self.pad_id, 2 * self.cfg.batch_size,
                                  self.keep_by_mask, adapter=True, scorer=self.prefix,
                                  progress=lambda done, _t, b=before: self._progress(b + done))
                before += sum(data.lengths()) // self.world
            rows += check_rows(pairs, table.tolist(), ref.tolist(), self.cfg.beta)
        if self.main:
            self.run.write_label_checks(rows)

    def _resume_training_phase(self) -> None:
        """Back to the steps after an evaluation or previews."""
        self.run.begin_phase("training", total=self.max_steps, unit="steps")
        self.run.phase_progress(self.step, force=True)

    def _restore_best(self) -> None:
        from peft import set_peft_model_state_dict

        net = self.acc.unwrap_model(self.model)
        set_peft_model_state_dict(net, {k: v.to(self.acc.device) for k, v in self.early.adapter_state.items()})
        self.evaluated = None  # scored with the adapter just replaced
        log.info("restored the adapter from step %s (held-out accuracy %.3f)", self.early.best_step,
                 self.early.best_step_accuracy)

    def _save_adapter(self) -> None:
        if self.main:
            tmp = self.run.root / "adapter.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            self.acc.unwrap_model(self.model).save_pretrained(tmp)
            if self.run.adapter.exists():
                shutil.rmtree(self.run.adapter)
            os.replace(tmp, self.run.adapter)
            log.info("adapter saved: %s", self.run.adapter)
        self.acc.wait_for_everyone()


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _disable_dropout(model) -> None:
    """Zero the base model's dropout (LoRA's own dropout is added later, by peft).

    With dropout on, the policy differs from the reference at step 0 and the
    rewards measure noise instead of what the adapter learned.
    """
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


# --- entry points ----------------------------------------------------------------------

def _remove_log_handlers() -> None:
    root = logging.getLogger("rpo_app")
    for h in list(root.handlers):
        if getattr(h, "_rpo_train", False):
            root.removeHandler(h)
            h.close()


def _setup_logging(out: Path, main: bool) -> None:
    root = logging.getLogger("rpo_app")
    root.setLevel(logging.INFO if main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    _remove_log_handlers()
    # A caller that set up logging (the rpo_app CLI) already prints to stderr.
    handlers = [] if logging.getLogger().handlers else [logging.StreamHandler(sys.stderr)]
    if main:
        out.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(out / "train.log", encoding="utf-8"))
    for h in handlers:
        h.setFormatter(fmt)
        h._rpo_train = True
        root.addHandler(h)


def _make_accelerator(device: str | None, precision: str = "auto"):
    import torch
    from accelerate import Accelerator

    from rpo_app.models import pick_precision

    cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but no CUDA GPU is visible")
    mixed = "bf16" if pick_precision("cpu" if cpu else "cuda", precision) == "bf16" else "no"
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state.get("_mixed_precision") not in (None, mixed):
        # A process that trains twice (bench-effect, tests) may switch precision; accelerate
        # keeps one state per process and refuses a change unless it is cleared. The
        # distributed set-up (PartialState) stays.
        AcceleratorState._reset_state()
    return Accelerator(cpu=cpu, mixed_precision=mixed)


def train(cfg: TrainConfig, out: str | os.PathLike, data_dir: str | os.PathLike = "data",
          resume: bool = False) -> int:
    """Run one training job; returns the process exit code (0 also when stopped)."""
    out = Path(out)
    stop = {"flag": False}
    trainer: Trainer | None = None

    def on_signal(signum, _frame):
        if trainer is not None:
            trainer.stop_flag = True
        if stop["flag"] and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: leave now
        stop["flag"] = True
        log.warning("signal %d: stopping after the current step", signum)

    # Signal handlers can only be set from the main thread (a library caller may not be).
    old = {}
    if threading.current_thread() is threading.main_thread():
        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    main = int(os.environ.get("RANK", "0")) == 0  # before the Accelerator exists: from the launcher's env
    run = RunFolder(out, writable=main)
    _setup_logging(out, main)
    map_large_blocks()
    try:
        try:
            cfg.validate()
            if not resume and RunFolder(out, writable=False).has_run():
                raise ConfigError(f"{out} already holds a run; pass --resume to continue it or use a new --out")
            # The run keeps a copy of what it trains on: a resume then sees the same
            # judgments (hence the same data order) even if labeling went on meanwhile.
            snapshot = run.judgments
            reuse_snapshot = resume and snapshot.exists()
            if reuse_snapshot:
                judgments, left_out, store_state = read_judgments_file(snapshot), {}, None
            else:
                judgments, left_out, store_state = load_judgments(cfg, data_dir)
            accelerator = _make_accelerator(cfg.device, cfg.precision)
            asked = cfg.batch_size
            train_j, eval_j = check_data(cfg, judgments, accelerator.num_processes)
            if note := batch_note(cfg, asked, max(count_examples(train_j, get_loss(cfg.loss)))):
                log.info("batch size %d: %s", cfg.batch_size, note)
            model_path = check_model(cfg.model, data_dir)
            resolve_for_model(cfg, model_layers(model_path))
        except ConfigError as err:
            log.error("refused: %s", err)
            run.update_status(state="failed", error=str(err), step=0)
            return EXIT_BAD_CONFIG
        run = RunFolder(out, writable=accelerator.is_main_process)
        if run.writable:
            cfg.to_yaml(run.config)
            if not reuse_snapshot:
                from rpo_app import lineage

                run.write_judgments(judgments)
                lineage.write(run, lineage.record(train_j, eval_j, left_out, store_state,
                                                  cfg.judgments or "the store"))
        run.update_status(state="running", step=0, max_steps=cfg.max_steps, error=None, started_at=time.time())
        trainer = Trainer(cfg, run, data_dir, train_j, eval_j, model_path, accelerator, resume)
        trainer.stop_flag = stop["flag"]
        if store_state and store_state.get("answers_unchecked_for_cut"):
            from rpo_app.cut_backfill import unchecked_advice

            trainer._warn(unchecked_advice(store_state["answers_unchecked_for_cut"]))
        try:
            trainer.setup()
        except StopRequested:
            run.update_status(state="stopped", step=0)
            return 0
        if trainer.stop_flag:  # a signal during setup: nothing trained, nothing to save
            run.update_status(state="stopped", step=trainer.step, max_steps=trainer.max_steps)
            return 0
        state = trainer.fit()
        run.end_phases(state=state, step=trainer.step, max_steps=trainer.max_steps,
                       adapter=str(run.adapter) if state == "finished" else None,
                       peak_memory_gb=peak_resident_gb())
        log.info("%s at step %d", state, trainer.step)
        return 0
    except KeyboardInterrupt:
        run.update_status(state="stopped", error="interrupted")
        return 130
    except Exception as err:  # noqa: BLE001 - the UI needs the reason in status.json
        log.exception("training failed")
        run.update_status(state="failed", error=f"{err.__class__.__name__}: {err}")
        return 1
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        _remove_log_handlers()


# --- CLI -------------------------------------------------------------------------------

def main_from_args(args: argparse.Namespace) -> int:
    from rpo_app.config import resolve_data_dir

    try:
        cfg = config_from_args(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    return train(cfg, args.out, resolve_data_dir(args.data_dir), resume=args.resume)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rpo_app.train", description=__doc__.splitlines()[0])
    add_train_args(parser)
    return main_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
