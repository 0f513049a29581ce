"""What the informative order costs: scoring candidate pairs with an adapter.

A store of P prompts with K answers each (C(K,2) same-prompt pairs per prompt, plus the
cross-prompt pairs with each prompt's related prompts; synthetic answers of chat-like
length), an adapter on the bundled model (random LoRA weights: the cost does not depend
on what it learned), and the scoring job the app runs after each training run
(rpo_app.active.score_store, with the app's prompt index), timed by pass:

- the base model's pass: once per answer, cached in the store for good;
- the adapter's pass: once per answer and adapter;
- ranking the items and storing them (after each chunk of the pool).

The adapters sit where the trainer's default puts LoRA (the top half of the layers), so
the first job's base pass keeps each answer's hidden state below them and its adapter
pass starts there, as the app's does (active.KEPT_STATES_SHARE). Then:

- the same first job keeping nothing (the base log-probs forgotten first): what keeping
  saves the first job;
- the job for a second adapter, with the base model's log-probs already cached, starting
  from the kept hidden states: what every later run costs;
- the same from the kept states as they were scored before December 7 (each sequence
  whole, every part on the padding): what running each prompt once and leaving the
  padding out save;
- the same later job with nothing kept (each distinct prompt run once per batch,
  through every layer): what the kept states save;
- the later job with nothing kept and every sequence run whole (prompt repeated per
  answer, as before the shared-prompt scorer): what sharing the prompt saves.

Reported per 1,000 candidate pairs (same-prompt and cross) and per 1,000 same-prompt
pairs, with the time until the queue first had an order.

Last, the first job again on a store whose answers the app wrote (`generate_candidates`
on the same prompts, the Data tab's sampling settings): the base model's log-prob of each
answer it wrote, and its hidden states below the adapters, are kept as written
(`active.keep_as_written`), so the base pass runs only over the answers whose scored
tokens differ from the written ones, and the adapter pass starts from the states. Beside
it, the same adapter's pass with the states left out, and a first job with nothing kept
as written; how many were kept, and how far the values kept or scored from them are from
the scorer's whole passes. A later adapter's job starts from the states the first kept,
as in the app.

    python -m rpo_app bench --only score [--quick]
"""
from __future__ import annotations

import contextlib
import random
import sys
import tempfile
import time
from pathlib import Path


def _adapter(model_dir: str, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rpo_app.frozen_prefix import lora_placement
    from rpo_app.trainconfig import TrainConfig

    torch.manual_seed(seed)
    d = TrainConfig()
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    net = get_peft_model(base, LoraConfig(r=d.lora_r, lora_alpha=d.lora_alpha,
                                          **lora_placement(base, d.lora_targets(), d.lora_layers),
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
    texts = [j["response_a_text"] for j in synthetic_judgments(prompts * answers, 0, max_words)]
    result: dict = {"prompts": prompts, "answers_per_prompt": answers,
                    "pairs": prompts * pairs_per_prompt, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        link_model_cache(data_dir, tmp)
        store = Store(tmp)
        k = 0
        for text in _prompt_texts(prompts):
            pid, _ = store.add_prompt(text, "bench-score")
            for _ in range(answers):
                store.add_response(pid, texts[k], "bench-score")
                k += 1
        model_dir = resolve_model(None, tmp)
        host = ModelHost(None, tmp, device="cpu")
        index = PromptIndex(store, Embedder())
        index.refresh()
        result["precision"] = pick_precision(str(host.device))
        kept: dict = {}
        base_key = active.base_scorer(host, result["precision"])
        for n, label in enumerate(JOB_NAMES):
            host.share_prefill = label != "whole"
            if label == "first, keeping nothing":
                store.forget_answer_logps(base_key)
            path = _adapter(model_dir, tmp / f"adapter-{n}", seed=n)
            name = f"bench-{n}"
            store.register_adapter(name, str(path), None, model_dir)
            host.load_adapter(name, path)
            with _kept_scorer_as_before(kept, label == "next, as before"):
                job = _job(store, host, store.adapter(name), index,
                           kept if label in ("first", "next", "next, as before") else None)
            pairs = job["items"]["paired"] + job["items"]["cross"]
            result[label] = {**job, "seconds_per_1000_pairs": job["seconds"] * 1000 / max(pairs, 1),
                             "seconds_per_1000_same_prompt_pairs": job["seconds"] * 1000 / result["pairs"]}
            host.unload_adapter(name)
        store.close()
        result["written"] = _written_job(tmp, host, model_dir, prompts, answers)
    result["shared_prompt_speedup"] = (result["whole"]["phases"]["adapter pass"]
                                       / result["next, nothing kept"]["phases"]["adapter pass"])
    result["kept_states_speedup"] = (result["next, nothing kept"]["phases"]["adapter pass"]
                                     / result["next"]["phases"]["adapter pass"])
    result["kept_scorer_speedup"] = (result["next, as before"]["phases"]["adapter pass"]
                                     / result["next"]["phases"]["adapter pass"])
    result["first_keeping_ratio"] = (result["first"]["phases"]["adapter pass"]
                                     / result["first, keeping nothing"]["phases"]["adapter pass"])
    return result


# The jobs, in the order they run: "first" keeps hidden states and "next" starts from them;
# "next, as before" too, scoring from them as before December 7 (_kept_scorer_as_before).
JOB_NAMES = {"first": "first adapter (base not cached)", "first, keeping nothing": "the same, keeping nothing",
             "next": "a later adapter, from kept states",
             "next, as before": "the same, as before December 7",
             "next, nothing kept": "a later adapter, nothing kept",
             "whole": "later, nothing kept, each whole"}


@contextlib.contextmanager
def _kept_scorer_as_before(kept: dict, before: bool):
    """While it lasts (`before`), the kept states score as they did before December 7:
    each sequence whole, every part on the padding (FrozenPrefixScorer's `share` and
    `real_tokens` off), where they now run each prompt once and leave the padding out."""
    states = list(kept.values()) if before else []
    flags = [(s.scorer.share, s.real_tokens) for s in states]
    try:
        for s in states:
            s.scorer.share = s.real_tokens = False
        yield
    finally:
        for s, (share, real) in zip(states, flags):
            s.scorer.share, s.real_tokens = share, real


def _prompt_texts(n: int) -> list[str]:
    """The bench's prompts: the synthetic store's and the one the app writes answers for
    are the same, so their figures compare."""
    rng = random.Random(0)
    return [f"Question {p}: explain {rng.choice(['tides', 'taxes', 'trees'])} to someone new to it ({p})."
            for p in range(n)]


def _job(store, host, adapter: dict, index, kept: dict | None = None) -> dict:
    """One scoring job, timed by phase; `kept` as for active.score_store."""
    from rpo_app import active

    last: dict = {}
    bar = active.terminal_progress()

    def progress(p):
        last["p"] = p
        bar(p)

    t0 = time.perf_counter()
    info = active.score_store(store, host, adapter, index=index, progress=progress, kept=kept)
    total = time.perf_counter() - t0
    report = last["p"]
    named = {k: v for k, v in report.seconds.items() if v > 0 or k == "ranking"}
    named["loading and encoding"] = max(0.0, total - sum(report.seconds.values()))
    return {"seconds": total, "phases": named, "tokens": report.total,
            "first_ranks_s": info["first_ranks_s"], "items": info["items"]}


def _written_job(tmp: Path, host, model_dir: str, prompts: int, answers: int) -> dict:
    from tqdm import tqdm

    from rpo_app import active
    from rpo_app.embed import Embedder, PromptIndex
    from rpo_app.generate import GenSettings, generate_candidates
    from rpo_app.models import link_model_cache
    from rpo_app.store import Store

    data = tmp / "written"
    link_model_cache(tmp, data)
    store = Store(data)
    ids = [store.add_prompt(text, "bench-score")[0] for text in _prompt_texts(prompts)]
    host.kept_states = {}  # as the app's host: the states below the adapters kept as written
    t0 = time.perf_counter()
    with tqdm(total=prompts * answers, desc="writing the answers", unit="answer", file=sys.stderr) as bar:
        stats = generate_candidates(store, host, ids, answers, GenSettings(), batch_size=32,
                                    progress=lambda done, _total: bar.update(done - bar.n))
    generation_s = time.perf_counter() - t0
    index = PromptIndex(store, Embedder())
    index.refresh()
    base_key = active.base_scorer(host, active.written_precision(host))
    kept = store.answer_logps(base_key)
    written_states = sum(len(s.hidden) for s in host.kept_states.values())
    out: dict = {"generation_s": generation_s, "answers": stats["new"], "kept_answers": stats["base_logps"],
                 "kept_states": written_states,
                 "kept_states_mb": sum(s.kept_mb() for s in host.kept_states.values())}
    # The first job with everything kept as written (log-probs and hidden states); the
    # same adapter again under another name with the states left out (its pass runs every
    # layer: the same work as before the states were kept); a first job with nothing kept
    # as written; then a later adapter's job, from the states the first kept.
    path = _adapter(model_dir, tmp / "adapter-5", seed=5)
    for name, label, adapter_path, states in (
            ("bench-5", "kept", path, host.kept_states),
            ("bench-5-again", "logps only", path, None),
            ("bench-6", "none kept", _adapter(model_dir, tmp / "adapter-6", seed=6), None),
            ("bench-7", "later", _adapter(model_dir, tmp / "adapter-7", seed=7), host.kept_states)):
        if label == "none kept":
            store.forget_answer_logps(base_key)
        store.register_adapter(name, str(adapter_path), None, model_dir)
        host.load_adapter(name, adapter_path)
        out[label] = _job(store, host, store.adapter(name), index, states)
        host.unload_adapter(name)
    scored = store.answer_logps(base_key)
    diffs = [v - scored[i] for i, v in kept.items()]
    # The same adapter's log-probs from the states kept as written against every layer run
    precision = active.written_precision(host)
    from_states = store.answer_logps(active.adapter_scorer(store.adapter("bench-5"), precision))
    whole = store.answer_logps(active.adapter_scorer(store.adapter("bench-5-again"), precision))
    state_diffs = [from_states[i] - whole[i] for i in from_states if i in whole]
    out["same_prompt_pairs"] = sum(n * (n - 1) // 2 for n in store.response_counts(ids).values())
    for label in WRITTEN_JOBS:
        out[label]["seconds_per_1000_same_prompt_pairs"] = \
            out[label]["seconds"] * 1000 / max(out["same_prompt_pairs"], 1)
    out["kept_minus_scored"] = _spread(diffs)
    out["from_states_minus_whole"] = _spread(state_diffs)
    store.close()
    return out


def _spread(diffs: list[float]) -> dict:
    import statistics

    return {"mean": statistics.fmean(diffs) if diffs else None,
            "sd": statistics.pstdev(diffs) if diffs else None,
            "max_abs": max(map(abs, diffs)) if diffs else None}


WRITTEN_JOBS = {"kept": "first adapter, kept as written",
                "logps only": "the same, states left out",
                "none kept": "first adapter, none kept",
                "later": "a later adapter, from kept states"}


def format_table(r: dict) -> str:
    lines = [f"informative-order scoring: {r['prompts']} prompts x {r['answers_per_prompt']} answers, "
             f"{r['threads']} threads, {r['precision']}",
             f"{'job':<34}{'phase':<24}{'seconds':>10}"]
    for label, what in JOB_NAMES.items():
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
    lines.append(f"from the kept hidden states: a later adapter pass {r['kept_states_speedup']:.2f}x "
                 f"faster than with nothing kept; the first job's, from the states its base pass kept, "
                 f"{r['first_keeping_ratio']:.2f}x as long as with nothing kept")
    lines.append(f"from the kept hidden states, each prompt once and the padding left out: a later adapter "
                 f"pass {r['kept_scorer_speedup']:.2f}x faster than each sequence whole with the padding")
    w = r["written"]
    lines.append(f"the app's own answers: {w['answers']} written in {w['generation_s']:.0f} s, the base "
                 f"log-prob kept as written for {w['kept_answers']}, the hidden states for "
                 f"{w['kept_states']} ({w['kept_states_mb']:.0f} MB); {w['same_prompt_pairs']:,} same-prompt pairs")
    for label, what in WRITTEN_JOBS.items():
        job = w[label]
        for phase, sec in job["phases"].items():
            lines.append(f"{what:<34}{phase:<24}{sec:>10.1f}")
            what = ""
        lines.append(f"{'':<34}{'total':<24}{job['seconds']:>10.1f}   ({job['tokens']:,} tokens; "
                     f"first ranks after {job['first_ranks_s']:.0f} s; "
                     f"{job['seconds_per_1000_same_prompt_pairs']:.0f} s per 1,000 same-prompt pairs)")
    for key, what in (("kept_minus_scored", "base log-prob kept as written - the scorer's"),
                      ("from_states_minus_whole", "adapter log-prob from the written states - every layer run")):
        d = w[key]
        if d["mean"] is not None:
            lines.append(f"{what}: {d['mean']:+.2f} ± {d['sd']:.2f} nats per answer, at most {d['max_abs']:.2f}")
    return "\n".join(lines)
