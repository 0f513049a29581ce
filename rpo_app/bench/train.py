"""Training speed: our RPO step against TRL's DPOTrainer, same model, LoRA, data, batch.

Both run in this one process, one after the other, with the same torch thread
count. Each gets ``--warmup-steps`` untimed optimizer steps, then ``--steps`` timed
ones (default: an epoch's worth). TRL runs with precompute_ref_log_probs=False, its default: it recomputes
the reference log-probs (adapter disabled) on every step. We compute them once per
sequence before training; that one-off cost is reported too, and folded into an
"amortised over one epoch" figure so the comparison does not hide it.

Then a whole run each, end to end (see e2e_ours / e2e_trl): ours is the product's
default run on these pairs (the Train tab's defaults; its step count and batch size come
from the trainer's own rule for the label set's size), and TRL's DPOTrainer does the
same work (the same steps of the same batch, model, LoRA and previews) at its best:
precomputed reference log-probs. Per-phase seconds for both, and the measured totals.

    python -m rpo_app bench ... (training part) / python -m rpo_app.bench.train --out bench.json
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the model answer question simple clear short example because people often use small steps "
         "data light water time system world first other many useful part change result idea place "
         "number problem reason language learn explain good better").split()
TOPICS = ("photosynthesis", "binary search", "inflation", "tides", "vaccines", "compilers", "rainbows",
          "black holes", "recursion", "the water cycle", "supply and demand", "neural networks", "gravity",
          "volcanoes", "encryption", "democracy")


def synthetic_judgments(n_pairs: int, seed: int = 0, max_words: int = 110) -> list[dict]:
    """Paired judgments with chat-like spread in lengths (a few words to ~max_words)."""
    rng = random.Random(seed)

    def text(n_words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."

    rows = []
    for k in range(n_pairs):
        prompt = f"Explain {TOPICS[k % len(TOPICS)]} {rng.choice(['simply', 'briefly', 'to a child', 'in detail'])}."
        a, b = text(rng.randint(4, max_words)), text(rng.randint(4, max_words))
        rows.append({"judgment_id": k + 1, "kind": "paired", "verdict": rng.choice("ab"), "strength": None,
                     "annotator": "bench", "prompt_a_text": prompt, "response_a_text": a, "prompt_b_text": prompt,
                     "response_b_text": b, "prompt_a_id": k + 1, "prompt_b_id": k + 1})
    return rows


def _summary(step_times: list[float], batch: int) -> dict:
    total = sum(step_times)
    return {"step_s": [round(t, 3) for t in step_times], "mean_step_s": total / len(step_times),
            "pairs_per_s": batch * len(step_times) / total}


def _step_config(args):
    """The timed-steps trainer's settings: no held-out split, evaluation, previews or
    checkpoints, only warm-up and timed steps."""
    from rpo_app.trainconfig import TrainConfig

    return TrainConfig(loss=args.loss, batch_size=args.batch_size, max_length=args.max_length,
                       max_prompt_length=args.max_prompt_length, max_steps=args.warmup_steps + args.steps,
                       eval_fraction=0.0, eval_every=0, sample_every=0, save_every=0, preview_count=0,
                       early_stop_patience=0, seed=args.seed, device=args.device,
                       cpu_threads=args.threads or None, precision=args.precision,
                       lora_layers=args.lora_layers).validate()


def bench_ours(args, judgments: list[dict], model_path: str, data_dir: Path) -> dict:
    from rpo_app.runfolder import RunFolder
    from rpo_app.train import Trainer, _make_accelerator

    cfg = _step_config(args)
    acc = _make_accelerator(cfg.device, cfg.precision)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, RunFolder(out), data_dir, judgments, [], model_path, acc, resume=False)
        t0 = time.time()
        trainer.setup()
        setup_s = time.time() - t0
        for _ in range(args.warmup_steps):
            trainer.train_step()
        trainer.step_times.clear()
        for _ in range(args.steps):
            trainer.train_step()
        times = list(trainer.step_times)
        steps_per_epoch = trainer.plan.batches_per_epoch
    out = _summary(times, args.batch_size)
    # One epoch: the ref pass once, then every step of the epoch.
    epoch_s = trainer.ref_seconds + steps_per_epoch * out["mean_step_s"]
    out.update(ref_precompute_s=trainer.ref_seconds, setup_s=setup_s, steps_per_epoch=steps_per_epoch,
               pairs_per_s_epoch_incl_ref=steps_per_epoch * args.batch_size / epoch_s)
    return out


def bench_scorers(args, judgments: list[dict], model_path: str, data_dir: Path) -> dict:
    """The trainer's scorer against the ways it scored before, side by side in one
    trainer: the same batches forward and backward (no optimizer step, so all see the
    same weights) and the reference pass over the same sequences twice each, the
    scorers taking turns to go first. Also the largest difference in the batch losses and
    reference log-probs from the trainer's own.

    With LoRA on the top layers (the default) the steps run from the frozen layers' kept
    states (frozen_prefix.FrozenPrefixScorer): "shared" runs each distinct prompt once per
    batch with the per-token parts on the real tokens (rpo_app.padfree), the trainer's in
    fp32; "whole" each sequence whole, the trainer's under bf16 autocast; "padded" each
    sequence whole with every part on the padding too (the trainer until December 7).
    With LoRA on every layer, each prompt once per batch through the whole model
    (PromptScorer) against every sequence whole (`sequence_logps`, the trainer's)."""
    from rpo_app.frozen_prefix import FrozenPrefixScorer
    from rpo_app.runfolder import RunFolder
    from rpo_app.scoring import PromptScorer, score_all, sequence_logps
    from rpo_app.train import Trainer, _make_accelerator

    cfg = _step_config(args)
    acc = _make_accelerator(cfg.device, cfg.precision)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, RunFolder(out), data_dir, judgments, [], model_path, acc, resume=False)
        trainer.setup()
        for _ in range(args.warmup_steps):  # the adapter moves off zero, as in a real step
            trainer.train_step()
        prefix = trainer.prefix
        if prefix is not None:
            own = "shared" if prefix.scorer.share else "whole"  # it shares in fp32 only
            variants = {"shared": FrozenPrefixScorer(prefix.first),
                        "whole": FrozenPrefixScorer(prefix.first, share=False),
                        "padded": FrozenPrefixScorer(prefix.first, share=False, real_tokens=False)}
            for v in variants.values():
                v.hidden = prefix.hidden  # the reference pass's states, kept once
            refs_by = {n: v.capture_all for n, v in variants.items()}
        else:
            own = "whole"
            variants = {"shared": PromptScorer(), "whole": sequence_logps}
            refs_by = variants
        names = list(variants)
        times = {n: {"step": 0.0, "ref": 0.0} for n in names}
        loss_diff = 0.0
        for k in range(args.steps):
            chosen, rejected = trainer.plan.batch(trainer.step + k)
            losses = {}
            for name in (names if k % 2 == 0 else names[::-1]):
                trainer.step_scorer = variants[name]
                t0 = time.perf_counter()
                loss, _ = trainer.batch_loss(chosen, rejected, ref=trainer.ref_train, emb=trainer.train_emb)
                acc.backward(loss)
                times[name]["step"] += time.perf_counter() - t0
                trainer.optimizer.zero_grad(set_to_none=True)
                losses[name] = loss.item()
            loss_diff = max(loss_diff, *(abs(v - losses[own]) for v in losses.values()))
        refs = {}
        for name in names + names[::-1]:  # each first once: load drifts
            t0 = time.perf_counter()
            refs[name] = score_all(acc, trainer.model, trainer.train_data, trainer.pad_id,
                                   2 * cfg.batch_size, trainer.keep_by_mask, adapter=False,
                                   scorer=refs_by[name])
            times[name]["ref"] += time.perf_counter() - t0
        ref_diff = max(float((refs[n] - refs[own]).abs().max()) for n in names)
        tokens = sum(trainer.train_data.lengths())
        shared = variants["shared"]
        shared_ok = (shared.scorer if prefix is not None else shared).share
    if not shared_ok:
        raise RuntimeError("the shared-prompt scorer failed on this model; see the log")
    slowest = names[-1]
    return {"steps": args.steps, "batch_size": args.batch_size, "sequences": len(trainer.train_data.seqs),
            "tokens": tokens, "from_kept_states": prefix is not None, "trainer": own,
            "step_s": {n: t["step"] / args.steps for n, t in times.items()},
            "ref_s": {n: t["ref"] / 2 for n, t in times.items()},
            "step_speedup": {n: times[slowest]["step"] / t["step"] for n, t in times.items()},
            "ref_speedup": {n: times[slowest]["ref"] / t["ref"] for n, t in times.items()},
            "max_loss_diff": loss_diff, "max_ref_logp_diff": ref_diff}


def bench_trl(args, judgments: list[dict], model_path: str, data_dir: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from rpo_app.batches import judgment_pairs
    from rpo_app.models import load_model

    rows = [{"prompt": [{"role": "user", "content": p.chosen.prompt}],
             "chosen": [{"role": "assistant", "content": p.chosen.response}],
             "rejected": [{"role": "assistant", "content": p.rejected.response}]}
            for p in judgment_pairs(judgments)]

    class Timer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self._t = 0.0

        def on_step_begin(self, *a, **k):
            self._t = time.time()

        def on_step_end(self, *a, **k):
            self.times.append(time.time() - self._t)

    model, tok = load_model(model_path, data_dir, device=args.device or "cpu")
    defaults, placement = _trl_settings(model, args.lora_layers)
    timer = Timer()
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
            learning_rate=defaults.learning_rate, beta=defaults.beta, max_length=args.max_length,
            max_steps=args.warmup_steps + args.steps, warmup_steps=defaults.warmup_ratio,  # < 1: a ratio
            lr_scheduler_type=defaults.lr_scheduler, max_grad_norm=defaults.max_grad_norm,
            logging_steps=1, save_strategy="no", report_to="none", seed=args.seed, disable_tqdm=True,
            use_cpu=(args.device or "cpu") == "cpu", precompute_ref_log_probs=False, dataloader_num_workers=0,
            # TRL turns on activation checkpointing and bf16 autocast by default. Ours
            # runs without checkpointing, and in bf16 where the device multiplies bf16
            # natively (models.pick_precision): give TRL the same settings so both do the
            # same arithmetic.
            gradient_checkpointing=False, bf16=args.precision == "bf16")
        lora = LoraConfig(r=defaults.lora_r, lora_alpha=defaults.lora_alpha, lora_dropout=defaults.lora_dropout,
                          task_type="CAUSAL_LM", bias="none", **placement)
        trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=tok, peft_config=lora, callbacks=[timer])
        trainer.train()
    return _summary(timer.times[args.warmup_steps:], args.batch_size)


# -- a whole run, end to end -------------------------------------------------------------
# What a click on "Start training" costs, phase by phase: the reference pass, the steps,
# the base model's previews and the tuned model's, saving. TRL's DPOTrainer does the same
# work at its best settings for it (precompute_ref_log_probs=True: the reference
# log-probs once, not at every step; TRL 1.16 has no logits-to-keep option for DPO), and
# its previews are plain greedy `generate` calls on the same prompts and length.

def e2e_ours(args, judgments: list[dict], model_path: str, data_dir: Path) -> dict:
    """The product's trainer in this process (train.train), its phases from status.json:
    the default run (its own steps and batch for this label set) unless --e2e-steps."""
    from rpo_app.runfolder import RunFolder
    from rpo_app.train import train
    from rpo_app.trainconfig import TrainConfig

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "judgments.jsonl"
        path.write_text("".join(json.dumps(j) + "\n" for j in judgments))
        cfg = TrainConfig(loss=args.loss, batch_size=args.batch_size, max_length=args.max_length,
                          max_prompt_length=args.max_prompt_length, max_steps=args.e2e_steps,
                          eval_fraction=0.0, eval_every=0, sample_every=0, save_every=0,
                          preview_prompts=list(PREVIEWS[:args.previews]),
                          sample_max_new_tokens=args.preview_tokens, early_stop_patience=0,
                          seed=args.seed, device=args.device, judgments=str(path),
                          model=model_path, cpu_threads=args.threads or None, precision=args.precision,
                          lora_layers=args.lora_layers)
        t0 = time.time()
        rc = train(cfg, Path(tmp) / "run", data_dir)
        wall = time.time() - t0
        run = RunFolder(Path(tmp) / "run", writable=False)
        status = run.status()
        batch = TrainConfig.from_yaml(run.config).batch_size if run.config.exists() else None
        log_file = Path(tmp) / "run" / "train.log"
        # The previews' own timing (first step, then a step): the run folder goes with tmp.
        previews = [line.split(" INFO ", 1)[-1] for line in
                    (log_file.read_text().splitlines() if log_file.exists() else [])
                    if "INFO previews (" in line]
    if rc != 0:
        raise RuntimeError(f"our trainer exited with {rc}: {status.error}")
    phases = status.phase_seconds()
    return {"wall_s": wall, "phases": phases, "steps": status.step, "batch_size": batch,
            "previews": previews}


def e2e_trl(args, judgments: list[dict], model_path: str, data_dir: Path, steps: int,
            batch_size: int) -> dict:
    """TRL's DPOTrainer with the reference log-probs precomputed, plus the same previews:
    `steps` optimizer steps of `batch_size` pairs (what our run did)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from rpo_app.batches import judgment_pairs
    from rpo_app.models import load_model

    rows = [{"prompt": [{"role": "user", "content": p.chosen.prompt}],
             "chosen": [{"role": "assistant", "content": p.chosen.response}],
             "rejected": [{"role": "assistant", "content": p.rejected.response}]}
            for p in judgment_pairs(judgments)]
    marks: dict[str, float] = {}

    class Marks(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.setdefault("train_begin", time.time())

        def on_step_begin(self, *a, **k):
            marks.setdefault("first_step", time.time())

        def on_train_end(self, *a, **k):
            marks["train_end"] = time.time()

    def previews(model, tok) -> float:
        t = time.time()
        texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                         tokenize=False) for q in PREVIEWS[:args.previews]]
        tok.padding_side = "left"
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            model.generate(**enc, max_new_tokens=args.preview_tokens, do_sample=False,
                           pad_token_id=tok.pad_token_id or tok.eos_token_id)
        tok.padding_side = "right"
        return time.time() - t

    phases: dict[str, float] = {}
    t0 = time.time()
    model, tok = load_model(model_path, data_dir, device=args.device or "cpu")
    defaults, placement = _trl_settings(model, args.lora_layers)
    phases["loading the model"] = time.time() - t0
    phases["the base model's previews"] = previews(model, tok)
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out, per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
            learning_rate=defaults.learning_rate, beta=defaults.beta, max_length=args.max_length,
            max_steps=steps, warmup_steps=defaults.warmup_ratio,
            lr_scheduler_type=defaults.lr_scheduler, max_grad_norm=defaults.max_grad_norm,
            logging_steps=1, save_strategy="no", report_to="none", seed=args.seed, disable_tqdm=True,
            use_cpu=(args.device or "cpu") == "cpu", precompute_ref_log_probs=True,
            precompute_ref_batch_size=batch_size, dataloader_num_workers=0,
            gradient_checkpointing=False, bf16=args.precision == "bf16")
        lora = LoraConfig(r=defaults.lora_r, lora_alpha=defaults.lora_alpha, lora_dropout=defaults.lora_dropout,
                          task_type="CAUSAL_LM", bias="none", **placement)
        t = time.time()
        # TRL 1.16 tokenizes and precomputes the reference log-probs while it builds the
        # trainer: this phase is its counterpart of our tokenizing and reference pass.
        trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=tok, peft_config=lora, callbacks=[Marks()])
        phases["tokenizing + the reference pass"] = time.time() - t
        t = time.time()
        trainer.train()
        phases["starting the training loop"] = marks["first_step"] - t
        phases["training"] = marks["train_end"] - marks["first_step"]
        phases["previews"] = previews(trainer.model, tok)
        t = time.time()
        trainer.save_model(out)
        phases["saving the adapter"] = time.time() - t
    return {"wall_s": time.time() - t0, "phases": phases, "steps": steps, "batch_size": batch_size}


def _trl_settings(model, lora_layers: int | None):
    """TRL's settings: ours for DPO (TRL trains DPO here), resolved for this model as our
    trainer resolves them, so LoRA sits on the same layers (`--lora-layers`) at the same
    rate; and peft's placement of that LoRA."""
    from rpo_app.frozen_prefix import decoder_layers, lora_placement
    from rpo_app.trainconfig import TrainConfig, resolve_for_model

    cfg = resolve_for_model(TrainConfig(loss="dpo", lora_layers=lora_layers), decoder_layers(model.config))
    return cfg, lora_placement(model, cfg.lora_targets(), cfg.lora_layers)


PREVIEWS = ("Give me three tips for sleeping better.", "Explain what a hash table is.",
            "How do I politely decline a meeting?")


def _e2e_in_child(args, side: str, steps: int | None, batch_size: int) -> dict:
    """One whole run (`side`: ours or trl) in a fresh process, as the app runs training.
    Our trainer sets glibc's malloc for its own process (rpo_app.heap), and TRL run after it
    in the same process inherited that: its 40 steps took 227 s under our setting against
    194 s with freed memory kept, on one 2-core Xeon VM."""
    import subprocess

    given = {**vars(args), "e2e_side": side, "batch_size": batch_size, "e2e_steps": steps}
    argv = [sys.executable, "-m", "rpo_app.bench.train"]
    for action in add_args(argparse.ArgumentParser())._actions:
        value = given.get(action.dest)
        if action.option_strings and value not in (None, False) and action.dest != "out":
            flag = action.option_strings[0]
            argv += [flag] if value is True else [flag, str(value)]
    out = subprocess.run(argv, stdout=subprocess.PIPE, text=True)  # progress goes to our stderr
    if out.returncode:
        raise RuntimeError(f"the whole run ({side}) exited with {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def e2e_summary(ours: dict, trl: dict) -> dict:
    """Both runs' totals (the phases added up) and the ratio."""
    totals = {name: sum(run["phases"].values()) for name, run in (("ours", ours), ("trl", trl))}
    return {"totals": totals, "speedup": totals["trl"] / totals["ours"]}


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from rpo_app.trainconfig import TrainConfig

    parser.add_argument("--out", help="write the results as JSON to this file (or bench_train.json in this folder)")
    parser.add_argument("--model", default=None, help="HF id or folder (default: bundled SmolLM2)")
    parser.add_argument("--data-dir", default=None, help="data dir holding the converted default model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--loss", default="rpo-paired")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                        help="both trainers' arithmetic (auto: the trainer's rule, models.pick_precision)")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-prompt-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None,
                        help="timed optimizer steps for each trainer (default: one epoch, pairs // batch size; "
                             "length-grouped batches differ in cost, so time whole epochs)")
    from rpo_app.trainconfig import TrainConfig

    parser.add_argument("--lora-layers", type=int, default=TrainConfig().lora_layers,
                        help="LoRA on the top N decoder layers only, in both trainers (0: every layer; "
                             "default: the trainer's, the top half)")
    parser.add_argument("--warmup-steps", type=int, default=1)
    # One thread by default: with more, a core taken by any other job stalls every
    # thread at each sync point and the timings swing 10x; one thread stays repeatable.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for both trainers (0: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-trl", action="store_true", help="time only our trainer")
    parser.add_argument("--skip-scorers", action="store_true",
                        help="skip timing the trainer's scorer against whole sequences and padded layers")
    parser.add_argument("--skip-end-to-end", action="store_true",
                        help="skip the whole-run comparison (reference pass, steps, previews, saving)")
    parser.add_argument("--e2e-steps", type=int, default=None,
                        help="steps of each whole run at --batch-size (default: the product's "
                             "default run on these pairs, its own steps and batch size)")
    parser.add_argument("--previews", type=int, default=2, help="preview prompts in each whole run")
    parser.add_argument("--preview-tokens", type=int, default=TrainConfig.sample_max_new_tokens,
                        help="new tokens per preview (the trainer's default)")
    parser.add_argument("--e2e-side", choices=("ours", "trl"), help=argparse.SUPPRESS)
    return parser


QUICK = {"pairs": 8, "batch_size": 4, "max_length": 128, "max_prompt_length": 64, "steps": 2, "warmup_steps": 1,
         "e2e_steps": 2, "preview_tokens": 8, "previews": 1}


def _complete(args: argparse.Namespace) -> argparse.Namespace:
    """Fill what a caller's namespace lacks (the `bench` command has its own flags)
    from our defaults; ``quick`` (if set) shrinks the run to a smoke test."""
    defaults = vars(add_args(argparse.ArgumentParser()).parse_args([]))
    merged = {**defaults, **{k: v for k, v in vars(args).items() if k in defaults and v is not None}}
    if getattr(args, "quick", False):
        merged.update({k: v for k, v in QUICK.items() if getattr(args, k, None) is None})
    return argparse.Namespace(**merged)


def main_from_args(args: argparse.Namespace) -> int:
    import logging

    import torch

    from rpo_app.config import resolve_data_dir
    from rpo_app.train import check_model

    args = _complete(args)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps is None:
        args.steps = max(1, args.pairs // args.batch_size)
    from rpo_app.models import pick_precision

    args.precision = pick_precision(args.device or "cpu", args.precision)
    data_dir = resolve_data_dir(args.data_dir)
    model_path = check_model(args.model, data_dir)
    judgments = synthetic_judgments(args.pairs, args.seed)
    if args.e2e_side == "ours":  # one whole run in this fresh process (_e2e_in_child)
        print(json.dumps(e2e_ours(args, judgments, model_path, data_dir)))
        return 0
    if args.e2e_side == "trl":
        print(json.dumps(e2e_trl(args, judgments, model_path, data_dir, args.e2e_steps, args.batch_size)))
        return 0
    result = {"model": model_path, "device": args.device, "threads": torch.get_num_threads(),
              "pairs": args.pairs, "batch_size": args.batch_size, "max_length": args.max_length,
              "timed_steps": args.steps, "warmup_steps": args.warmup_steps, "loss": args.loss,
              "precision": args.precision}
    print(f"timing ours ({args.loss}) ...", file=sys.stderr, flush=True)
    result["ours"] = bench_ours(args, judgments, model_path, data_dir)
    if not args.skip_scorers:
        print("timing the shared-prompt scorer against whole sequences ...", file=sys.stderr, flush=True)
        result["scorers"] = bench_scorers(args, judgments, model_path, data_dir)
    if not args.skip_trl:
        print("timing TRL DPOTrainer ...", file=sys.stderr, flush=True)
        result["trl"] = bench_trl(args, judgments, model_path, data_dir)
        result["speedup"] = result["ours"]["pairs_per_s"] / result["trl"]["pairs_per_s"]
        result["speedup_epoch_incl_ref"] = result["ours"]["pairs_per_s_epoch_incl_ref"] / result["trl"]["pairs_per_s"]
    if not args.skip_trl and not args.skip_end_to_end:
        what = f"{args.e2e_steps} steps" if args.e2e_steps else "the default run"
        print(f"whole run, ours ({what}) ...", file=sys.stderr, flush=True)
        ours = _e2e_in_child(args, "ours", args.e2e_steps, args.batch_size)
        print(f"whole run, TRL DPOTrainer ({ours['steps']} steps of {ours['batch_size']}, "
              "precompute_ref_log_probs=True) ...", file=sys.stderr, flush=True)
        trl = _e2e_in_child(args, "trl", ours["steps"], ours["batch_size"])
        result["end_to_end"] = {"ours": ours, "trl": trl, **e2e_summary(ours, trl)}
    print(format_table(result))
    if args.out:
        out = Path(args.out)
        if out.is_dir() or not out.suffix:  # a folder (as `make bench` passes): name the file
            out = out / "bench_train.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    return 0


def format_table(r: dict) -> str:
    lines = [f"training speed: {Path(r['model']).name}, {r['device']} ({r['threads']} threads, "
             f"{r.get('precision', 'fp32')}), "
             f"batch {r['batch_size']} pairs, max_length {r['max_length']}, {r['timed_steps']} timed steps",
             f"{'trainer':<34}{'s/step':>10}{'pairs/s':>10}"]
    ours = r["ours"]
    lines.append(f"{'rpo_app ' + r['loss']:<34}{ours['mean_step_s']:>10.2f}{ours['pairs_per_s']:>10.3f}")
    lines.append(f"{'  incl. ref pass, 1 epoch':<34}{'':>10}{ours['pairs_per_s_epoch_incl_ref']:>10.3f}"
                 f"   (ref pass {ours['ref_precompute_s']:.1f}s once)")
    sc = r.get("scorers")
    if sc:
        kept = sc.get("from_kept_states")
        packed = ", per-token parts on the real tokens" if kept else ""
        what = {"shared": "each prompt once per batch" + packed, "whole": "every sequence whole" + packed,
                "padded": "every sequence whole, every part on the padding too"}
        where = "from the frozen layers' kept states" if kept else "through every layer"
        lines.append(f"the trainer's scorer ({what[sc.get('trainer', 'whole')]}) and the others, {where}, "
                     f"the same {sc['steps']} batches and {sc['sequences']} sequences ({sc['tokens']} tokens):")
        for n in sc["step_s"]:
            lines.append(f"  {what[n]:<55} step (forward + backward) {sc['step_s'][n]:.2f} s "
                         f"({sc['step_speedup'][n]:.2f}x), reference pass {sc['ref_s'][n]:.1f} s "
                         f"({sc['ref_speedup'][n]:.2f}x)")
        lines.append(f"  largest difference from the trainer's: loss {sc['max_loss_diff']:.1e}, "
                     f"log-prob {sc['max_ref_logp_diff']:.1e}")
    if "trl" in r:
        lines.append(f"{'TRL DPOTrainer':<34}{r['trl']['mean_step_s']:>10.2f}{r['trl']['pairs_per_s']:>10.3f}")
        lines.append(f"speedup: {r['speedup']:.2f}x per step, {r['speedup_epoch_incl_ref']:.2f}x over an epoch "
                     "including our reference pass")
    e = r.get("end_to_end")
    if e:
        lines += ["", f"whole run, {e['ours']['steps']} steps of {e['ours']['batch_size']} pairs; TRL "
                  "with precompute_ref_log_probs=True (seconds per phase)",
                  f"{'phase':<42}{'rpo_app':>10}{'TRL':>10}"]
        for phase in dict.fromkeys([*e["ours"]["phases"], *e["trl"]["phases"]]):
            a, b = e["ours"]["phases"].get(phase), e["trl"]["phases"].get(phase)
            lines.append(f"{phase:<42}{'' if a is None else f'{a:.1f}':>10}{'' if b is None else f'{b:.1f}':>10}")
        t = e["totals"]
        lines.append(f"{'total':<42}{t['ours']:>10.1f}{t['trl']:>10.1f}   speedup {e['speedup']:.2f}x")
        lines += [f"  ours: {line}" for line in e["ours"].get("previews", [])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rpo_app.bench.train", description=__doc__.splitlines()[0])
    return main_from_args(add_args(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
