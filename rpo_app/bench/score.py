"""What the informative order costs: scoring candidate pairs with an adapter.

A store of P prompts with K answers each (C(K,2) same-prompt pairs per prompt, plus the
cross-prompt pairs with each prompt's related prompts; synthetic answers of chat-like
length), an adapter on the bundled model (random LoRA weights: the cost does not depend
on what it learned), and the scoring job the app runs after each training run
(rpo_app.active.score_store, with the app's prompt index), timed by pass:

- the base model's pass: once per answer, cached in the store for good;
- the adapter's pass: once per answer and adapter;
- ranking the items and storing them (after each chunk of the pool).

Then the same job for a second adapter, with the base model's log-probs already cached:
what every later run costs. Reported per 1,000 candidate pairs (same-prompt and cross)
and per 1,000 same-prompt pairs, with the time until the queue first had an order.
A third adapter repeats the later job with every sequence run whole (prompt repeated
per answer, as before the shared-prompt scorer): the two side by side give its speedup.

    python -m rpo_app bench --only score [--quick]
"""
from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path


def _adapter(model_dir: str, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rpo_app.trainconfig import TrainConfig

    torch.manual_seed(seed)
    d = TrainConfig()
    net = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                         LoraConfig(r=d.lora_r, lora_alpha=d.lora_alpha, target_modules=d.lora_targets(),
                                    init_lora_weights=False, task_type="CAUSAL_LM"))
    net.save_pretrained(out)
    return out


def run_benchmark(data_dir, quick: bool = False, prompts: int | None = None, answers: int = 4,
                  max_words: int = 110, threads: int | None = None) -> dict:
    import torch

    from rpo_app import active
    from rpo_app.bench.train import synthetic_judgments
    from rpo_app.embed import Embedder, PromptIndex
    from rpo_app.generate import ModelHost
    from rpo_app.models import link_model_cache, pick_precision, resolve_model
    from rpo_app.store import Store

    if threads:
        torch.set_num_threads(threads)
    pairs_per_prompt = answers * (answers - 1) // 2
    prompts = prompts or (6 if quick else -(-1000 // pairs_per_prompt))
    rng = random.Random(0)
    texts = [j["response_a_text"] for j in synthetic_judgments(prompts * answers, 0, max_words)]
    result: dict = {"prompts": prompts, "answers_per_prompt": answers,
                    "pairs": prompts * pairs_per_prompt, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        link_model_cache(data_dir, tmp)
        store = Store(tmp)
        k = 0
        for p in range(prompts):
            pid, _ = store.add_prompt(f"Question {p}: explain {rng.choice(['tides', 'taxes', 'trees'])} "
                                      f"to someone new to it ({p}).", "bench-score")
            for _ in range(answers):
                store.add_response(pid, texts[k], "bench-score")
                k += 1
        model_dir = resolve_model(None, tmp)
        host = ModelHost(None, tmp, device="cpu")
        index = PromptIndex(store, Embedder())
        index.refresh()
        result["precision"] = pick_precision(str(host.device))
        for n, label in ((0, "first"), (1, "next"), (2, "whole")):
            host.share_prefill = label != "whole"
            path = _adapter(model_dir, tmp / f"adapter-{n}", seed=n)
            name = f"bench-{n}"
            store.register_adapter(name, str(path), None, model_dir)
            host.load_adapter(name, path)
            last: dict = {}
            bar = active.terminal_progress()

            def progress(p, last=last, bar=bar):
                last["p"] = p
                bar(p)

            t0 = time.perf_counter()
            info = active.score_store(store, host, store.adapter(name), index=index, progress=progress)
            total = time.perf_counter() - t0
            report = last["p"]
            named = {k: v for k, v in report.seconds.items() if v > 0 or k == "ranking"}
            named["loading and encoding"] = max(0.0, total - sum(report.seconds.values()))
            pairs = info["items"]["paired"] + info["items"]["cross"]
            result[label] = {"seconds": total, "phases": named, "tokens": report.total,
                             "first_ranks_s": info["first_ranks_s"], "items": info["items"],
                             "seconds_per_1000_pairs": total * 1000 / max(pairs, 1),
                             "seconds_per_1000_same_prompt_pairs": total * 1000 / result["pairs"]}
            host.unload_adapter(name)
        store.close()
    result["shared_prompt_speedup"] = (result["whole"]["phases"]["adapter pass"]
                                       / result["next"]["phases"]["adapter pass"])
    return result


def format_table(r: dict) -> str:
    lines = [f"informative-order scoring: {r['prompts']} prompts x {r['answers_per_prompt']} answers, "
             f"{r['threads']} threads, {r['precision']}",
             f"{'job':<34}{'phase':<24}{'seconds':>10}"]
    for label, what in (("first", "first adapter (base not cached)"), ("next", "a later adapter"),
                        ("whole", "later, each sequence whole")):
        job = r[label]
        for phase, sec in job["phases"].items():
            lines.append(f"{what:<34}{phase:<24}{sec:>10.1f}")
            what = ""
        items = job["items"]
        lines.append(f"{'':<34}{'total':<24}{job['seconds']:>10.1f}   ({job['tokens']:,} tokens; "
                     f"first ranks after {job['first_ranks_s']:.0f} s)")
        lines.append(f"{'':<34}{items['paired']:,} same-prompt + {items['cross']:,} cross pairs: "
                     f"{job['seconds_per_1000_pairs']:.0f} s per 1,000 candidate pairs, "
                     f"{job['seconds_per_1000_same_prompt_pairs']:.0f} s per 1,000 same-prompt pairs")
    lines.append(f"each prompt run once per batch: adapter pass {r['shared_prompt_speedup']:.2f}x "
                 "faster than running each sequence whole")
    return "\n".join(lines)
