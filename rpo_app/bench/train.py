"""Training speed: our RPO step against TRL's DPOTrainer, same model, LoRA, data, batch.

Both run in this one process, one after the other, with the same torch thread
count. Each gets ``--warmup-steps`` untimed optimizer steps, then ``--steps`` timed
ones (default: an epoch's worth). TRL runs with precompute_ref_log_probs=False, its default: it recomputes
the reference log-probs (adapter disabled) on every step. We compute them once per
sequence before training; that one-off cost is reported too, and folded into an
"amortised over one epoch" figure so the comparison does not hide it.

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


def bench_ours(args, judgments: list[dict], model_path: str, data_dir: Path) -> dict:
    from rpo_app.runfolder import RunFolder
    from rpo_app.train import Trainer, _make_accelerator
    from rpo_app.trainconfig import TrainConfig

    cfg = TrainConfig(loss=args.loss, batch_size=args.batch_size, max_length=args.max_length,
                      max_prompt_length=args.max_prompt_length, max_steps=args.warmup_steps + args.steps,
                      eval_fraction=0.0, eval_every=0, sample_every=0, save_every=0, preview_count=0,
                      early_stop_patience=0, seed=args.seed, device=args.device).validate()
    acc = _make_accelerator(cfg.device)
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


def bench_trl(args, judgments: list[dict], model_path: str, data_dir: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from rpo_app.batches import judgment_pairs
    from rpo_app.models import load_model
    from rpo_app.trainconfig import TrainConfig

    defaults = TrainConfig(loss="dpo")  # TRL trains DPO here
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

    cuda = (args.device or "cpu").startswith("cuda")
    model, tok = load_model(model_path, data_dir, device=args.device or "cpu")
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
            # runs without checkpointing, and in bf16 only on CUDA (bf16 matmuls are
            # emulated, so slow, on most CPUs): give TRL the same settings so both do the
            # same arithmetic.
            gradient_checkpointing=False, bf16=cuda)
        lora = LoraConfig(r=defaults.lora_r, lora_alpha=defaults.lora_alpha, lora_dropout=defaults.lora_dropout,
                          target_modules=defaults.lora_targets(), task_type="CAUSAL_LM", bias="none")
        trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=tok, peft_config=lora, callbacks=[timer])
        trainer.train()
    return _summary(timer.times[args.warmup_steps:], args.batch_size)


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", help="write the results as JSON to this file (or bench_train.json in this folder)")
    parser.add_argument("--model", default=None, help="HF id or folder (default: bundled SmolLM2)")
    parser.add_argument("--data-dir", default=None, help="data dir holding the converted default model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--loss", default="rpo-paired")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-prompt-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None,
                        help="timed optimizer steps for each trainer (default: one epoch, pairs // batch size; "
                             "length-grouped batches differ in cost, so time whole epochs)")
    parser.add_argument("--warmup-steps", type=int, default=1)
    # One thread by default: with more, a core taken by any other job stalls every
    # thread at each sync point and the timings swing 10x; one thread stays repeatable.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for both trainers (0: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-trl", action="store_true", help="time only our trainer")
    return parser


QUICK = {"pairs": 8, "batch_size": 4, "max_length": 128, "max_prompt_length": 64, "steps": 2, "warmup_steps": 1}


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
    data_dir = resolve_data_dir(args.data_dir)
    model_path = check_model(args.model, data_dir)
    judgments = synthetic_judgments(args.pairs, args.seed)
    result = {"model": model_path, "device": args.device, "threads": torch.get_num_threads(),
              "pairs": args.pairs, "batch_size": args.batch_size, "max_length": args.max_length,
              "timed_steps": args.steps, "warmup_steps": args.warmup_steps, "loss": args.loss}
    print(f"timing ours ({args.loss}) ...", file=sys.stderr, flush=True)
    result["ours"] = bench_ours(args, judgments, model_path, data_dir)
    if not args.skip_trl:
        print("timing TRL DPOTrainer ...", file=sys.stderr, flush=True)
        result["trl"] = bench_trl(args, judgments, model_path, data_dir)
        result["speedup"] = result["ours"]["pairs_per_s"] / result["trl"]["pairs_per_s"]
        result["speedup_epoch_incl_ref"] = result["ours"]["pairs_per_s_epoch_incl_ref"] / result["trl"]["pairs_per_s"]
    print(format_table(result))
    if args.out:
        out = Path(args.out)
        if out.is_dir() or not out.suffix:  # a folder (as `make bench` passes): name the file
            out = out / "bench_train.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    return 0


def format_table(r: dict) -> str:
    lines = [f"training speed: {Path(r['model']).name}, {r['device']} ({r['threads']} threads), "
             f"batch {r['batch_size']} pairs, max_length {r['max_length']}, {r['timed_steps']} timed steps",
             f"{'trainer':<34}{'s/step':>10}{'pairs/s':>10}"]
    ours = r["ours"]
    lines.append(f"{'rpo_app ' + r['loss']:<34}{ours['mean_step_s']:>10.2f}{ours['pairs_per_s']:>10.3f}")
    lines.append(f"{'  incl. ref pass, 1 epoch':<34}{'':>10}{ours['pairs_per_s_epoch_incl_ref']:>10.3f}"
                 f"   (ref pass {ours['ref_precompute_s']:.1f}s once)")
    if "trl" in r:
        lines.append(f"{'TRL DPOTrainer':<34}{r['trl']['mean_step_s']:>10.2f}{r['trl']['pairs_per_s']:>10.3f}")
        lines.append(f"speedup: {r['speedup']:.2f}x per step, {r['speedup_epoch_incl_ref']:.2f}x over an epoch "
                     "including our reference pass")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rpo_app.bench.train", description=__doc__.splitlines()[0])
    return main_from_args(add_args(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
