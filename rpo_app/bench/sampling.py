"""Benchmark: which sampling settings give the best candidates on a small model.

`python -m rpo_app bench --only sampling` (or `python -m rpo_app.bench.sampling`).

The bundled base model answers the seed prompts (data/prompts.jsonl: 24 prompts, one
per family, families spread over the file; 12 in quick mode) twice each, at
max_new_tokens=192 and batch size 32, under each setting of a small grid of
temperature, top-p, min-p and repetition penalty, through the product's own path
(ModelHost.generate_batches, our per-row sampler). Per setting:

- short: share of answers under degeneration.SHORT_WORDS (3) words;
- repeat: mean share of an answer's word 3-grams that already occurred in it;
- at limit: share of answers that ran to the token limit (cut off mid-answer);
- logp: the base model's mean log-probability per answer token (a fluency proxy),
  and its gain over the baseline (T0.8 p0.95, GenSettings' default before this
  benchmark), paired by prompt, with a standard error;
- words: mean words per answer;
- distinct: distinct answers per prompt (2 = the pair differs; identical answers
  give an annotator nothing to compare); overlap: mean share of word 3-grams the
  two answers of a prompt share (Jaccard), a softer sameness;
- seconds of generation.

Log-prob per token rewards low temperature for nothing (greedy decoding maximises
it, and greedy is listed as a reference, not a candidate), so the pick is by this
rule, stated before the run:

1. A setting is eligible when under 2% of its answers are short, its repeated
   3-gram share is no worse than the baseline's, its share of answers at the token
   limit is at most 5 points above the baseline's, at least 90% of its pairs differ,
   and its pair overlap is at most 0.10 above the baseline's.
2. Among eligible settings, the one with the best mean log-prob per token wins.
3. It replaces the baseline only when its log-prob gain over the baseline exceeds
   two paired standard errors; otherwise the baseline stays.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SEED_PROMPTS = REPO / "data" / "prompts.jsonl"
MAX_NEW_TOKENS = 192
BATCH_SIZE = 32
N_PER_PROMPT = 2
SCORE_MAX_LENGTH = 512  # prompt (at most half) + 192 answer tokens + end of turn

# name -> GenSettings fields. The baseline DEFAULT is GenSettings' default before this
# benchmark chose one (the rule compares every setting with it).
DEFAULT = "T0.8 p0.95"
GREEDY = "greedy"
GRID: dict[str, dict] = {
    DEFAULT: {"temperature": 0.8, "top_p": 0.95},
    "T0.7 p0.9": {"temperature": 0.7, "top_p": 0.9},
    "T0.6 p0.95": {"temperature": 0.6, "top_p": 0.95},
    "T0.8 min_p0.05": {"temperature": 0.8, "top_p": 1.0, "min_p": 0.05},
    "T0.8 min_p0.1": {"temperature": 0.8, "top_p": 1.0, "min_p": 0.1},
    "T1.0 min_p0.1": {"temperature": 1.0, "top_p": 1.0, "min_p": 0.1},
    "T0.8 p0.95 rep1.1": {"temperature": 0.8, "top_p": 0.95, "repetition_penalty": 1.1},
    "T0.7 min_p0.05 rep1.05": {"temperature": 0.7, "top_p": 1.0, "min_p": 0.05,
                               "repetition_penalty": 1.05},
}
REFERENCE = {GREEDY: {"temperature": 0.0}}  # one answer per prompt, the log-prob ceiling

MAX_SHORT = 0.02
LIMIT_MARGIN = 0.05
MIN_DISTINCT_PAIRS = 0.9
OVERLAP_MARGIN = 0.10
GAIN_SE = 2.0


def seed_prompts(k: int) -> list[dict]:
    """k seed prompts, the first of k families spread evenly over the file's order."""
    rows = [json.loads(line) for line in SEED_PROMPTS.read_text(encoding="utf-8").splitlines()
            if line.strip()]
    families: dict[str, dict] = {}
    for r in rows:
        families.setdefault(r.get("family") or r["prompt"], r)
    firsts = list(families.values())
    if k >= len(firsts):
        return firsts
    return [firsts[math.floor(i * len(firsts) / k)] for i in range(k)]


def _ngrams(text: str, n: int = 3) -> set:
    from rpo_app.degeneration import words

    w = words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def pair_overlap(a: str, b: str) -> float:
    """Jaccard share of word 3-grams two answers share (1 = same text, 0 = nothing)."""
    ga, gb = _ngrams(a), _ngrams(b)
    if not ga and not gb:
        return 1.0 if a.strip() == b.strip() else 0.0
    return len(ga & gb) / len(ga | gb)


def _measure(host, name: str, fields: dict, rows: list[dict], n: int) -> dict:
    from tqdm.auto import tqdm

    from rpo_app.bench.effect import mean_token_logps
    from rpo_app.degeneration import SHORT_WORDS, repeated_ngram_share, word_count
    from rpo_app.generate import GenSettings

    settings = GenSettings(max_new_tokens=MAX_NEW_TOKENS, seed=0, **fields)
    prompts = [r["prompt"] for r in rows]
    texts: list[list[str | None]] = [[None] * n for _ in prompts]
    tokens: list[list[int]] = [[0] * n for _ in prompts]
    cut: list[list[bool]] = [[False] * n for _ in prompts]
    t0 = time.perf_counter()
    with tqdm(total=len(prompts) * n, desc=f"sampling {name}", unit="answer",
              dynamic_ncols=True, file=sys.stderr) as bar:
        for batch in host.generate_batches(prompts, n, settings, batch_size=BATCH_SIZE):
            for a in batch:
                texts[a.prompt][a.sample], tokens[a.prompt][a.sample], cut[a.prompt][a.sample] = \
                    a.text, a.tokens, a.cut_off
            bar.update(len(batch))
    seconds = time.perf_counter() - t0
    flat = [t for answers in texts for t in answers]
    flat_prompts = [p for p in prompts for _ in range(n)]
    logps = mean_token_logps(host, flat_prompts, flat, SCORE_MAX_LENGTH,
                             [c for cs in cut for c in cs])
    per_prompt_logp = [statistics.fmean(logps[i * n:(i + 1) * n]) for i in range(len(prompts))]
    out = {
        "settings": settings.to_dict(),
        "answers": len(flat),
        "short_share": statistics.fmean(1.0 if word_count(t) < SHORT_WORDS else 0.0 for t in flat),
        "repeat_share": statistics.fmean(repeated_ngram_share(t) for t in flat),
        "limit_share": statistics.fmean(1.0 if c >= MAX_NEW_TOKENS else 0.0
                                        for cs in tokens for c in cs),
        "base_logp": statistics.fmean(logps),
        "mean_words": statistics.fmean(word_count(t) for t in flat),
        "tokens": sum(c for cs in tokens for c in cs),
        "seconds": round(seconds, 1),
        "per_prompt_logp": per_prompt_logp,
        "samples": [{"prompt": r["prompt"], "family": r.get("family"), "texts": a}
                    for r, a in zip(rows, texts)],
    }
    if n >= 2:
        out["distinct_per_prompt"] = statistics.fmean(len(set(a)) for a in texts)
        out["distinct_pairs"] = statistics.fmean(1.0 if a[0] != a[1] else 0.0 for a in texts)
        out["pair_overlap"] = statistics.fmean(pair_overlap(a[0], a[1]) for a in texts)
    return out


def _paired_gain(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b over prompts and its standard error."""
    diffs = [x - y for x, y in zip(a, b)]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return statistics.fmean(diffs), se


def choose(settings: dict[str, dict]) -> dict:
    """Apply the module docstring's rule to measured settings (the grid's, with the
    baseline among them). Returns the pick, whether it replaces the baseline, and why
    each setting was not eligible."""
    base = settings[DEFAULT]
    reasons: dict[str, list[str]] = {}
    for name, r in settings.items():
        why = []
        if r["short_share"] >= MAX_SHORT:
            why.append(f"short answers {r['short_share']:.1%} >= {MAX_SHORT:.0%}")
        if r["repeat_share"] > base["repeat_share"]:
            why.append("more repeated 3-grams than the baseline")
        if r["limit_share"] > base["limit_share"] + LIMIT_MARGIN:
            why.append("more answers cut at the token limit than the baseline + 5 points")
        if r["distinct_pairs"] < MIN_DISTINCT_PAIRS:
            why.append(f"only {r['distinct_pairs']:.0%} of pairs differ")
        if r["pair_overlap"] > base["pair_overlap"] + OVERLAP_MARGIN:
            why.append("pairs overlap more than the baseline's + 0.10")
        reasons[name] = why
    eligible = [name for name, why in reasons.items() if not why]
    best = max(eligible, key=lambda nm: settings[nm]["base_logp"]) if eligible else DEFAULT
    gain, se = settings[best]["logp_gain"], settings[best]["logp_gain_se"]
    adopt = best != DEFAULT and gain > GAIN_SE * se
    return {"best": best, "adopt": adopt, "chosen": best if adopt else DEFAULT,
            "chosen_settings": GRID[best if adopt else DEFAULT], "eligible": eligible,
            "not_eligible": {k: v for k, v in reasons.items() if v}}


def run_benchmark(data_dir: str | os.PathLike | None = None, quick: bool = False,
                  model: str | None = None, device: str | None = None, log=print) -> dict:
    """Measure every setting of GRID (and greedy as a reference); return the numbers,
    the answers and the pick."""
    import torch

    from rpo_app.config import resolve_data_dir
    from rpo_app.generate import GenSettings, ModelHost

    rows = seed_prompts(12 if quick else 24)
    host = ModelHost(model, resolve_data_dir(data_dir), device=device)
    log(f"{len(rows)} prompts x {N_PER_PROMPT} answers, max {MAX_NEW_TOKENS} new tokens, "
        f"batch size {BATCH_SIZE}, {len(GRID)} settings + greedy, "
        f"{torch.get_num_threads()} torch threads")
    host.generate([r["prompt"] for r in rows[:2]], 1, GenSettings(max_new_tokens=4))  # warm-up
    measured: dict[str, dict] = {}
    for name, fields in {**GRID, **REFERENCE}.items():
        measured[name] = _measure(host, name, fields, rows, 1 if name in REFERENCE else N_PER_PROMPT)
    for r in measured.values():
        r["logp_gain"], r["logp_gain_se"] = _paired_gain(
            r["per_prompt_logp"], measured[DEFAULT]["per_prompt_logp"])
    pick = choose({k: v for k, v in measured.items() if k not in REFERENCE})
    result = {
        "benchmark": "sampling",
        "model": host.model_name,
        "device": str(host.device),
        "torch_threads": torch.get_num_threads(),
        "quick": quick,
        "prompts": len(rows),
        "n": N_PER_PROMPT,
        "max_new_tokens": MAX_NEW_TOKENS,
        "batch_size": BATCH_SIZE,
        "rule": {"max_short": MAX_SHORT, "limit_margin": LIMIT_MARGIN,
                 "min_distinct_pairs": MIN_DISTINCT_PAIRS, "overlap_margin": OVERLAP_MARGIN,
                 "gain_standard_errors": GAIN_SE},
        "settings": measured,
        "pick": pick,
    }
    return result


def format_table(result: dict) -> str:
    lines = ["| setting | short | repeat 3-gram | at limit | logp/token | gain vs baseline "
             "| words | distinct/prompt | pair overlap | seconds |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    pick = result["pick"]
    for name, r in result["settings"].items():
        mark = " (chosen)" if name == pick["chosen"] else ""
        distinct = f"{r['distinct_per_prompt']:.2f}" if "distinct_per_prompt" in r else "-"
        overlap = f"{r['pair_overlap']:.3f}" if "pair_overlap" in r else "-"
        gain = f"{r['logp_gain']:+.3f} ± {r['logp_gain_se']:.3f}" if name != DEFAULT else "-"
        lines.append(f"| {name}{mark} | {r['short_share']:.1%} | {r['repeat_share']:.3f} | "
                     f"{r['limit_share']:.1%} | {r['base_logp']:.3f} | {gain} | "
                     f"{r['mean_words']:.1f} | {distinct} | {overlap} | {r['seconds']} |")
    lines.append("")
    lines.append(f"best eligible: {pick['best']}; "
                 + (f"replaces the baseline {DEFAULT}" if pick["adopt"]
                    else f"the baseline {DEFAULT} stays"))
    for name, why in pick["not_eligible"].items():
        lines.append(f"- {name}: {'; '.join(why)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rpo_app.bench.sampling",
                                description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="folder for sampling.json")
    args = p.parse_args(argv)
    result = run_benchmark(args.data_dir, args.quick, args.model, args.device)
    print(format_table(result))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sampling.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
