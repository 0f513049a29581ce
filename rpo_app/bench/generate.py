"""Benchmark: batched `ModelHost.generate` against one answer at a time.

Same model (the bundled SmolLM2 on the CPU unless told otherwise), same prompts,
same sampling settings. Both sides count real generated tokens: up to and
including the end-of-turn token, none of the padding after it.

    python -m rpo_app.bench.generate [--quick] [--out DIR] [--data-dir D]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SEED_PROMPTS = REPO / "data" / "prompts.jsonl"


def _seed_prompts(k: int) -> list[str]:
    """k prompts from the seed file, spread over its families."""
    rows = [json.loads(line) for line in SEED_PROMPTS.read_text(encoding="utf-8").splitlines()
            if line.strip()]
    step = max(1, len(rows) // k)
    return [r["prompt"] for r in rows[::step][:k]]


def _one_at_a_time(host, prompts: list[str], n: int, settings) -> dict:
    """The plain way: one `model.generate` call per answer, transformers' own sampler."""
    import torch

    model, tok = host.model, host.tokenizer
    stop = sorted(host.stop_ids)
    per_answer = []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([host.encode_prompt(prompt, settings.system_prompt)],
                           device=host.device)
        for k in range(n):
            torch.manual_seed(settings.seed * 100003 + i * 101 + k)
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     do_sample=not settings.greedy,
                                     temperature=settings.temperature if not settings.greedy else None,
                                     top_p=settings.top_p if not settings.greedy else None,
                                     top_k=None, max_new_tokens=settings.max_new_tokens,
                                     eos_token_id=stop, pad_token_id=tok.pad_token_id)
            seconds = time.perf_counter() - t0
            new = out[0, ids.shape[1]:].tolist()
            count = next((j + 1 for j, t in enumerate(new) if t in host.stop_ids), len(new))
            per_answer.append((count, seconds))
    return {"answers": len(per_answer), "tokens": sum(c for c, _ in per_answer),
            "seconds": sum(s for _, s in per_answer), "per_answer": per_answer}


def _batched(host, prompts: list[str], n: int, settings, batch_size: int) -> dict:
    tokens, answers, t0 = 0, 0, time.perf_counter()
    for batch in host.generate_batches(prompts, n, settings, batch_size=batch_size):
        tokens += sum(a.tokens for a in batch)
        answers += len(batch)
    return {"answers": answers, "tokens": tokens, "seconds": time.perf_counter() - t0}


def run_benchmark(quick: bool = False, data_dir: str | os.PathLike | None = None,
                  model: str | None = None, device: str | None = "cpu",
                  batch_sizes: tuple[int, ...] | None = None, prompts: int | None = None,
                  n: int = 2, max_new_tokens: int | None = None, seed: int = 0,
                  repeats: int | None = None, log=print) -> dict:
    """Time one-at-a-time against batched generation; return the numbers.

    quick: 8 prompts x 2, 32 new tokens, batch size 16 once (a smoke run, about a
    minute on 2 idle cores). Full: 32 prompts x 2 samples, 64 new tokens, batch sizes
    16, 32 and 64, each run twice.

    On a shared machine other processes come and go, so: the one-at-a-time answers
    are split, half before the batched runs and half after (A-B-A); its rate is
    given both as total tokens / total seconds and as the median of the per-answer
    rates (robust to a burst of load); each batched run is repeated and the fastest
    kept (as timeit does). `speedup` = best batched rate / median one-at-a-time
    rate; `speedup_vs_total` uses the total rate instead.
    """
    import statistics

    import torch

    from rpo_app.config import resolve_data_dir
    from rpo_app.generate import GenSettings, ModelHost

    k = prompts or (8 if quick else 32)
    batch_sizes = tuple(batch_sizes or ((16,) if quick else (16, 32, 64)))
    repeats = repeats or (1 if quick else 2)
    settings = GenSettings(temperature=0.8, top_p=0.95, seed=seed,
                           max_new_tokens=max_new_tokens or (32 if quick else 64))
    texts = _seed_prompts(k)
    host = ModelHost(model, resolve_data_dir(data_dir), device=device)
    # Warm both paths up (first calls allocate and pick kernels).
    _one_at_a_time(host, texts[:1], 1, GenSettings(max_new_tokens=4))
    _batched(host, texts[:4], 1, GenSettings(max_new_tokens=4), 4)

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    log(f"{k} prompts x {n} answers, max {settings.max_new_tokens} new tokens, "
        f"{torch.get_num_threads()} torch threads")
    first = _one_at_a_time(host, texts[:k // 2], n, settings)
    runs = {bs: [_batched(host, texts, n, settings, bs) for _ in range(repeats)]
            for bs in batch_sizes}
    second = _one_at_a_time(host, texts[k // 2:], n, settings)

    per_answer = first["per_answer"] + second["per_answer"]
    tokens = first["tokens"] + second["tokens"]
    seconds = first["seconds"] + second["seconds"]
    single = {
        "method": "one at a time (model.generate)", "batch_size": 1,
        "answers": len(per_answer), "tokens": tokens, "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 2),
        "median_tokens_per_second": round(statistics.median(c / s for c, s in per_answer), 2),
    }
    log(f"one at a time: {tokens} tokens in {seconds:.1f} s = {single['tokens_per_second']} "
        f"tokens/s (median per answer {single['median_tokens_per_second']})")
    rows = []
    for bs, tries in runs.items():
        best = min(tries, key=lambda r: r["seconds"])
        rate = best["tokens"] / best["seconds"]
        row = {"method": "batched ModelHost.generate", "batch_size": bs,
               "answers": best["answers"], "tokens": best["tokens"],
               "seconds": round(best["seconds"], 2), "tokens_per_second": round(rate, 2),
               "all_seconds": [round(t["seconds"], 2) for t in tries],
               "speedup": round(rate / single["median_tokens_per_second"], 2),
               "speedup_vs_total": round(rate / single["tokens_per_second"], 2)}
        log(f"batched, batch size {bs}: {row['tokens']} tokens in {row['seconds']} s = "
            f"{row['tokens_per_second']} tokens/s ({row['speedup']}x)")
        rows.append(row)
    best = max(rows, key=lambda r: r["tokens_per_second"])
    result = {
        "benchmark": "generate",
        "model": host.model_name,
        "device": str(host.device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "prompts": k,
        "n": n,
        "settings": settings.to_dict(),
        "quick": quick,
        "repeats": repeats,
        "one_at_a_time": single,
        "batched": rows,
        "best_batch_size": best["batch_size"],
        "speedup": best["speedup"],
        "speedup_vs_total": best["speedup_vs_total"],
        "target_speedup": 6.0,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    log(format_table(result))
    return result


def format_table(result: dict) -> str:
    s = result["one_at_a_time"]
    lines = ["| method | batch | answers | tokens | seconds | tokens/s | speedup |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| {s['method']} | 1 | {s['answers']} | {s['tokens']} | {s['seconds']} | "
             f"{s['tokens_per_second']} (median {s['median_tokens_per_second']}) | 1.0x |"]
    for r in result["batched"]:
        lines.append(f"| {r['method']} | {r['batch_size']} | {r['answers']} | {r['tokens']} | "
                     f"{r['seconds']} | {r['tokens_per_second']} | {r['speedup']}x "
                     f"({r['speedup_vs_total']}x vs total) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rpo_app.bench.generate", description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-sizes", default=None, help="comma list, e.g. 16,32,64")
    p.add_argument("--repeats", type=int, default=None, help="batched runs per batch size")
    p.add_argument("--out", default=None, help="folder for generate.json")
    args = p.parse_args(argv)
    sizes = tuple(int(x) for x in args.batch_sizes.split(",")) if args.batch_sizes else None
    result = run_benchmark(args.quick, args.data_dir, args.model, args.device, sizes,
                           repeats=args.repeats)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "generate.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
