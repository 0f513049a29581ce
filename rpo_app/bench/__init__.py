"""`make bench` / `python -m rpo_app bench`: every speed target, measured side by side in
one run on this machine (ratios, not absolute timings, are what carry across machines).

- train: our RPO step vs TRL's DPOTrainer, same model, LoRA, data, batch and length.
- generate: batched ModelHost.generate vs plain model.generate one answer at a time.
- sampling: candidate quality (short answers, loops, base log-prob per token, distinct
  pairs) under a grid of temperature / top-p / min-p / repetition penalty settings.
- first-run: from an empty data dir, seconds to a first pair, to 32 answers, and a
  default run over 32 pairs phase by phase (bench/firstrun.py).
- score: the informative order's scoring job (base and adapter log-probs of every
  candidate answer, ranks of every pair) per 1,000 candidate pairs (bench/score.py).
- memory: peak memory of a training step, before and after each memory lever, one
  fresh process per variant (bench/memory.py).
- search: related-prompt search over 100k prompts.
- queue: the label queue's next item and submit with 100k prompts and 200k judgments.
- load: 20 gradio_client annotators x 50 judgments against the real server during a
  training run and a chat, beside a bare-Gradio baseline (exactly-once is checked).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cli_bench(args) -> int:
    from rpo_app.config import resolve_data_dir

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = resolve_data_dir(args.data_dir)
    parts = [args.only] if args.only else ["search", "queue", "generate", "sampling", "first-run",
                                           "train", "memory", "score", "load"]
    summary: dict = {}
    if "search" in parts:
        from rpo_app.bench.search import bench_related_search

        summary["search"] = bench_related_search(n_prompts=10_000 if args.quick else 100_000)
        (out / "search.json").write_text(json.dumps(summary["search"], indent=1))
        print(json.dumps(summary["search"], indent=1))
    if "queue" in parts:
        from rpo_app.bench.search import bench_label_queue

        summary["queue"] = bench_label_queue(
            n_prompts=10_000 if args.quick else 100_000,
            n_judgments=20_000 if args.quick else 200_000)
        (out / "queue.json").write_text(json.dumps(summary["queue"], indent=1))
        print(json.dumps(summary["queue"], indent=1))
    if "generate" in parts:
        from rpo_app.bench.generate import format_table, run_benchmark

        summary["generate"] = run_benchmark(quick=args.quick, data_dir=data_dir)
        (out / "generate.json").write_text(json.dumps(summary["generate"], indent=1))
        print(format_table(summary["generate"]))
    if "sampling" in parts:
        from rpo_app.bench import sampling as bench_sampling

        summary["sampling"] = bench_sampling.run_benchmark(data_dir, quick=args.quick)
        (out / "sampling.json").write_text(json.dumps(summary["sampling"], indent=1,
                                                      ensure_ascii=False))
        print(bench_sampling.format_table(summary["sampling"]))
    if "first-run" in parts:
        from rpo_app.bench import firstrun

        summary["first_run"] = firstrun.main(data_dir, out, quick=args.quick)
    if "train" in parts:
        from rpo_app.bench import train as bench_train

        rc = bench_train.main_from_args(argparse.Namespace(
            out=str(out), data_dir=str(data_dir), quick=args.quick))
        if rc:
            return rc
        summary["train"] = json.loads((out / "bench_train.json").read_text())
    if "memory" in parts:
        from rpo_app.bench import memory as bench_memory

        summary["memory"] = bench_memory.run_benchmark(data_dir, quick=args.quick)
        (out / "memory.json").write_text(json.dumps(summary["memory"], indent=1))
        print(bench_memory.format_table(summary["memory"]))
    if "score" in parts:
        from rpo_app.bench import score as bench_score

        summary["score"] = bench_score.run_benchmark(data_dir, quick=args.quick)
        (out / "score.json").write_text(json.dumps(summary["score"], indent=1))
        print(bench_score.format_table(summary["score"]))
    if "load" in parts:
        from rpo_app.bench.load import run as bench_load

        per = 10 if args.quick else 50
        # One annotator on a quiet server, twenty on a quiet one, twenty during training
        # and chat: what the label path costs, and what sharing the cores costs.
        summary["load"] = {
            "one_annotator": bench_load(1, per, data_dir, with_training=False, with_chat=False),
            "twenty_annotators": bench_load(20, per, data_dir, with_training=False,
                                            with_chat=False),
            "twenty_during_training_and_chat": bench_load(20, per, data_dir)}
        (out / "load.json").write_text(json.dumps(summary["load"], indent=1))
        print(json.dumps(summary["load"], indent=1))
        for name, result in summary["load"].items():
            checks = result["checks"]
            if checks["lost"] or checks["duplicated_requests"] or result["errors"]:
                print(f"load ({name}): judgments lost or duplicated, or annotators failed",
                      file=sys.stderr)
                return 1
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"results in {out}/", file=sys.stderr)
    return 0
