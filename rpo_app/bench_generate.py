"""Benchmark: batched `ModelHost.generate` against one answer at a time.

Same model (the bundled SmolLM2 on the CPU unless told otherwise), same prompts,
same sampling settings. Both sides count real generated tokens: up to and
including the end-of-turn token, none of the padding after it.

    python -m rpo_app.bench_generate [--quick] [--out DIR] [--data-dir D]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
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
    tokens, t0, c0 = 0, time.perf_counter(), time.process_time()
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([host.encode_prompt(prompt, settings.system_prompt)],
                           device=host.device)
        for k in range(n):
            torch.manual_seed(settings.seed * 100003 + i * 101 + k)
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     do_sample=not settings.greedy,
                                     temperature=settings.temperature if not settings.greedy else None,
                                     top_p=settings.top_p if not settings.greedy else None,
                                     top_k=None, max_new_tokens=settings.max_new_tokens,
                                     eos_token_id=stop, pad_token_id=tok.pad_token_id)
            new = out[0, ids.shape[1]:].tolist()
            count = next((j + 1 for j, t in enumerate(new) if t in host.stop_ids), len(new))
            tokens += count
    return _row("one at a time", 1, len(prompts) * n, tokens, time.perf_counter() - t0,
                time.process_time() - c0)


def _row(method: str, batch_size: int, answers: int, tokens: int, seconds: float,
         cpu_seconds: float) -> dict:
    return {"method": method, "batch_size": batch_size, "answers": answers, "tokens": tokens,
            "seconds": round(seconds, 2), "tokens_per_second": round(tokens / seconds, 2),
            "cpu_seconds": round(cpu_seconds, 2),
            "tokens_per_cpu_second": round(tokens / cpu_seconds, 2)}


def _merge(a: dict, b: dict) -> dict:
    """Two halves of one measurement, added up."""
    return _row(a["method"], a["batch_size"], a["answers"] + b["answers"],
                a["tokens"] + b["tokens"], a["seconds"] + b["seconds"],
                a["cpu_seconds"] + b["cpu_seconds"])


def _batched(host, prompts: list[str], n: int, settings, batch_size: int) -> dict:
    tokens, answers, t0, c0 = 0, 0, time.perf_counter(), time.process_time()
    for batch in host.generate_batches(prompts, n, settings, batch_size=batch_size):
        tokens += sum(row[3] for row in batch)
        answers += len(batch)
    return _row("batched ModelHost.generate", batch_size, answers, tokens,
                time.perf_counter() - t0, time.process_time() - c0)


def run_benchmark(quick: bool = False, data_dir: str | os.PathLike | None = None,
                  model: str | None = None, device: str | None = "cpu",
                  batch_sizes: tuple[int, ...] | None = None, prompts: int | None = None,
                  n: int = 2, max_new_tokens: int | None = None, seed: int = 0,
                  log=print) -> dict:
    """Time one-at-a-time against batched generation; return the numbers.

    quick: 8 prompts, 32 new tokens, batch size 16 only (a smoke run, ~2 minutes on
    2 cores). Full: 32 prompts x 2 samples, 64 new tokens, batch sizes 16, 32 and 64.
    """
    import torch

    from rpo_app.config import resolve_data_dir
    from rpo_app.generate import GenSettings, ModelHost

    k = prompts or (8 if quick else 32)
    batch_sizes = tuple(batch_sizes or ((16,) if quick else (16, 32, 64)))
    settings = GenSettings(temperature=0.8, top_p=0.95, seed=seed,
                           max_new_tokens=max_new_tokens or (32 if quick else 64))
    texts = _seed_prompts(k)
    host = ModelHost(model, resolve_data_dir(data_dir), device=device)
    # Warm both paths up (first calls allocate and pick kernels).
    _one_at_a_time(host, texts[:1], 1, GenSettings(max_new_tokens=4))
    _batched(host, texts[:4], 1, GenSettings(max_new_tokens=4), 4)

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    # A-B-A order: half the one-at-a-time answers before the batched runs, half after,
    # so a change in load from other processes on a shared machine hits both sides.
    log(f"one at a time: {k} prompts x {n} answers, max {settings.max_new_tokens} new tokens")
    first = _one_at_a_time(host, texts[:k // 2], n, settings)
    rows = [_batched(host, texts, n, settings, bs) for bs in batch_sizes]
    second = _one_at_a_time(host, texts[k // 2:], n, settings)
    single = _merge(first, second)
    log(f"  {single['tokens']} tokens in {single['seconds']} s = "
        f"{single['tokens_per_second']} tokens/s")
    for row in rows:
        row["speedup"] = round(row["tokens_per_second"] / single["tokens_per_second"], 2)
        row["cpu_speedup"] = round(row["tokens_per_cpu_second"] / single["tokens_per_cpu_second"], 2)
        log(f"batched, batch size {row['batch_size']}: {row['tokens']} tokens in "
            f"{row['seconds']} s = {row['tokens_per_second']} tokens/s ({row['speedup']}x)")
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
        "one_at_a_time": single,
        "batched": rows,
        "best_batch_size": best["batch_size"],
        "speedup": best["speedup"],
        "target_speedup": 6.0,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    log(format_table(result))
    return result


def format_table(result: dict) -> str:
    lines = ["| method | batch | answers | tokens | seconds | tokens/s | speedup "
             "| tokens/CPU-s | CPU speedup |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    s = result["one_at_a_time"]
    lines.append(f"| {s['method']} | 1 | {s['answers']} | {s['tokens']} | {s['seconds']} | "
                 f"{s['tokens_per_second']} | 1.0x | {s['tokens_per_cpu_second']} | 1.0x |")
    for r in result["batched"]:
        lines.append(f"| {r['method']} | {r['batch_size']} | {r['answers']} | {r['tokens']} | "
                     f"{r['seconds']} | {r['tokens_per_second']} | {r['speedup']}x | "
                     f"{r['tokens_per_cpu_second']} | {r['cpu_speedup']}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rpo_app.bench_generate", description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-sizes", default=None, help="comma list, e.g. 16,32,64")
    p.add_argument("--out", default=None, help="folder for generate.json")
    args = p.parse_args(argv)
    sizes = tuple(int(x) for x in args.batch_sizes.split(",")) if args.batch_sizes else None
    result = run_benchmark(args.quick, args.data_dir, args.model, args.device, sizes)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "generate.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
