"""What a training step costs in memory: peak resident size of one LoRA training step on
the bundled model, glibc's heap and the LM head as the trainer had them before against
how it runs them now, side by side in one run.

Each variant runs in a fresh process (a heap's history is the thing measured): load the
model in fp32 with the trainer's LoRA, then one forward and backward over a batch like
the default run's largest (`seqs` sequences of `length` tokens at most: run_benchmark's
arguments, the default run's batch and max length from the CLI; lengths spread over the
top half so the batch is padded, the first 48 tokens of each the prompt), through the
trainer's scorer (rpo_app.scoring.sequence_logps). A thread reads the process's resident
size every 5 ms; the peak is reported above the size after loading, with the step's
seconds.

    python -m rpo_app bench --only memory [--quick]
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time

PROMPT_TOKENS = 48

# (what changed, glibc large blocks mapped, LM head slice (0: the model's own head),
# gradient checkpointing): each row adds one lever to the row above.
VARIANTS = [
    ("glibc defaults, the model's own head (before)", False, 0, False),
    ("+ large blocks mapped (rpo_app.heap)", True, 0, False),
    ("+ the LM head in slices (the trainer now)", True, None, False),
    ("+ --gradient-checkpointing", True, None, True),
]


def _batch(seqs: int, length: int, seed: int = 0):
    from rpo_app.batches import Seq

    rng = random.Random(seed)
    lengths = [length] + [rng.randint(length // 2, length) for _ in range(seqs - 1)]
    return [Seq(tuple(rng.randrange(100, 40_000) for _ in range(n)), min(PROMPT_TOKENS, n // 2), 0)
            for n in lengths]


def child(spec: dict) -> dict:
    """One variant, in this (fresh) process."""
    import psutil
    import torch
    from peft import LoraConfig, get_peft_model

    from rpo_app import scoring
    from rpo_app.heap import map_large_blocks
    from rpo_app.models import load_model
    from rpo_app.train import _disable_dropout
    from rpo_app.trainconfig import TrainConfig

    if spec["mapped"]:
        map_large_blocks()
    if spec["head_slice"] is not None:
        scoring.HEAD_SLICE = spec["head_slice"]
    base, _tok = load_model(spec.get("model"), spec["data_dir"], device="cpu", dtype=torch.float32)
    _disable_dropout(base)
    if spec["checkpointing"]:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    d = TrainConfig()
    model = get_peft_model(base, LoraConfig(r=d.lora_r, lora_alpha=d.lora_alpha, lora_dropout=0.0,
                                            target_modules=d.lora_targets(), task_type="CAUSAL_LM"))
    model.train()
    batch = _batch(spec["seqs"], spec["length"])
    proc = psutil.Process()
    time.sleep(0.2)
    loaded = proc.memory_info().rss
    peak, done = [loaded], threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    logps = scoring.sequence_logps(model, batch, 0, torch.device("cpu"), scoring.keeps_logits_by_mask(model))
    logps.sum().backward()
    step_s = time.perf_counter() - t0
    done.set()
    watcher.join()
    return {"loaded_gb": loaded / 1e9, "peak_above_loaded_gb": (peak[0] - loaded) / 1e9,
            "step_s": step_s, "tokens": sum(len(s) for s in batch),
            "padded_tokens": len(batch) * max(len(s) for s in batch)}


def run_benchmark(data_dir, quick: bool = False, model: str | None = None,
                  seqs: int | None = None, length: int | None = None) -> dict:
    """Every variant in its own process, in VARIANTS order."""
    from rpo_app.trainconfig import TrainConfig

    d = TrainConfig()
    seqs = seqs or (4 if quick else 2 * d.small_set_batch)  # the default run's batch of pairs
    length = length or (128 if quick else d.max_length)
    rows = []
    for name, mapped, head_slice, checkpointing in VARIANTS:
        spec = {"data_dir": str(data_dir), "model": model, "seqs": seqs, "length": length,
                "mapped": mapped, "head_slice": head_slice, "checkpointing": checkpointing}
        out = subprocess.run([sys.executable, "-m", "rpo_app.bench.memory", json.dumps(spec)],
                             capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"memory benchmark variant {name!r} failed:\n{out.stderr[-2000:]}")
        rows.append({"variant": name, **json.loads(out.stdout.strip().splitlines()[-1])})
    return {"seqs": seqs, "length": length, "rows": rows}


def format_table(result: dict) -> str:
    first = result["rows"][0]
    lines = [f"One training step, {result['seqs']} sequences of at most {result['length']} tokens "
             f"({first['tokens']} tokens, {first['padded_tokens']} padded), fp32, CPU",
             "| variant | peak above the loaded model (GB) | step (s) |", "| --- | ---: | ---: |"]
    lines += [f"| {r['variant']} | {r['peak_above_loaded_gb']:.2f} | {r['step_s']:.1f} |"
              for r in result["rows"]]
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
