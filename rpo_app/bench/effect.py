"""`python -m rpo_app bench-effect`: does clicking fine-tune give people the model they
labeled for?

For every seed: split the seed prompts by family into training and test prompts
(no family on both sides), sample K candidates per training prompt from the base
model, and let each simulated annotator (rpo_app.judges) judge them. How it labels
is --annotation: ``all`` (the default) judges every pair of candidates (A better /
B better / tie) and every candidate alone (thumbs up above the prompt's median
score, down below); ``ranking`` orders each prompt's K candidates by score into one
ranking (equal scores tie; the store derives its C(K,2) implied pairs); ``pairs``
judges --pairs-per-prompt randomly drawn pairs per prompt. Each row records how many
annotator actions that took (``human_judgments``) and how many decided pairs they
gave (``pairs_trained``), so label budgets can be compared. Train each loss on the
same judgments with the product's own trainer, then answer the test prompts greedily
with the base model and with each tuned adapter, and ask the judge which is better.

Reported per judge x loss: the judge's win rate of tuned over base (ties count
half), mean judge scores, held-out preference accuracy, training time, and
degeneration checks next to the base model's own values (mean words, share of
answers under 3 words, repeated 3-gram share, and the base model's mean per-token
log-likelihood of the answers, a fluency proxy).

Everything goes through the product's code paths: Store, ModelHost,
generate_candidates, train.train. One data dir per seed holds the store; each
judge's judgments carry the annotator ``judge:<name>`` and training picks them with
the trainer's own annotator filter, so the candidates (which do not depend on the
judge) are generated once per seed.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import random
import statistics
import sys
import time
from pathlib import Path

from rpo_app import degeneration

log = logging.getLogger("rpo_app.bench.effect")

REPO = Path(__file__).resolve().parents[2]
SEED_PROMPTS = REPO / "data" / "prompts.jsonl"
DEFAULT_LOSSES = ("rpo-paired", "rpo-unpaired", "dpo")
ANNOTATIONS = ("all", "ranking", "pairs")
EXIT_USAGE = 2
METRICS = ("win_rate", "score_tuned", "score_base", "heldout_acc", *degeneration.FIGURES, "base_logp",
           "train_s", "steps", "human_judgments", "pairs_trained")


class BenchError(ValueError):
    """Bad input for the benchmark; the message names it."""


# --- pure pieces -----------------------------------------------------------------------

def split_by_family(rows: list[dict], n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train rows, test rows) with no prompt family on both sides.

    Families are shuffled with the seed; whole families go to the test side until it
    holds n_test prompts, the rest feed the training side. A prompt without a family
    is its own family.
    """
    families: dict[str, list[dict]] = {}
    for row in rows:
        families.setdefault(row.get("family") or f"prompt:{row['prompt']}", []).append(row)
    names = sorted(families)
    random.Random(seed).shuffle(names)
    test: list[dict] = []
    train: list[dict] = []
    for name in names:
        if len(test) < n_test:
            test.extend(families[name])
        elif len(train) < n_train:
            train.extend(families[name])
    test, train = test[:n_test], train[:n_train]
    if len(test) < n_test or len(train) < n_train:
        raise BenchError(f"{len(rows)} prompts in {len(families)} families cannot give {n_train} training and "
                         f"{n_test} test prompts from disjoint families; ask for fewer")
    return train, test


def _verdict(sa: float, sb: float) -> str:
    return "a" if sa > sb else "b" if sb > sa else "tie"


def judge_candidates(scored: list[tuple[int, float]]) -> list[tuple[str, int, int | None, str]]:
    """Judgments for one prompt's scored candidates: (kind, response_a, response_b, verdict).

    Every pair becomes a paired judgment (the higher score wins, equal scores are a
    tie); every candidate alone becomes a thumb, up above the prompt's median score
    and down below it (at the median: no thumb, the judge has no opinion).
    """
    out: list[tuple[str, int, int | None, str]] = []
    for (ra, sa), (rb, sb) in itertools.combinations(scored, 2):
        out.append(("paired", ra, rb, _verdict(sa, sb)))
    if len(scored) >= 2:
        median = statistics.median(s for _, s in scored)
        for rid, s in scored:
            if s != median:
                out.append(("unpaired", rid, None, "up" if s > median else "down"))
    return out


def rank_candidates(scored: list[tuple[int, float]]) -> list[list[int]]:
    """One prompt's scored candidates as a ranking: tiers of response ids, best first.

    Equal scores share a tier (a tie); within a tier the ids keep the input order.
    """
    tiers: dict[float, list[int]] = {}
    for rid, s in scored:
        tiers.setdefault(s, []).append(rid)
    return [tiers[s] for s in sorted(tiers, reverse=True)]


def sample_pairs(scored: list[tuple[int, float]], m: int, rng: random.Random
                 ) -> list[tuple[str, int, int, str]]:
    """m distinct pairs of one prompt's scored candidates, drawn with ``rng``, judged
    like judge_candidates' pairs: ("paired", response_a, response_b, verdict).

    A prompt with fewer pairs than m (identical samples are one candidate) gives all
    it has.
    """
    if m < 1:
        raise BenchError(f"need at least one pair per prompt, got {m}")
    pairs = list(itertools.combinations(scored, 2))
    picked = rng.sample(pairs, min(m, len(pairs)))
    return [("paired", ra, rb, _verdict(sa, sb)) for (ra, sa), (rb, sb) in picked]


def pair_rng(seed: int, prompt_id: int) -> random.Random:
    """The pair draw of one prompt: fixed by the seed and the prompt's id, so every judge
    (and every rerun) is shown the same pairs."""
    return random.Random(f"bench-effect-pairs:{seed}:{prompt_id}")


def win_rate(tuned: list[float], base: list[float]) -> float:
    """Share of prompts where the tuned answer scores higher; ties count half."""
    if len(tuned) != len(base) or not tuned:
        raise ValueError("need one tuned and one base score per prompt")
    return sum(1.0 if t > b else 0.5 if t == b else 0.0 for t, b in zip(tuned, base)) / len(tuned)


def degeneration_now(row: dict, base: dict | None) -> dict:
    """`row` with its degeneration figures and collapse flag by today's rules, from the
    test answers it stored (a file written before a figure existed lacks it). `base`:
    the same seed's base_per_seed entry (its answers and their base log-prob)."""

    answers = row.get("answers")
    if "error" in row or not isinstance(answers, list):
        return row
    out = {**row, **{k: v for k, v in degeneration.summarize(answers).items() if k != "n"}}
    if base and isinstance(base.get("answers"), list):
        out["collapse"] = degeneration.collapse_warning(base["answers"], answers, base.get("base_logp"),
                                                        row.get("base_logp"))
    return out


def collapsed_count(rows: list[dict]) -> int:
    """Runs whose test answers the Train tab's collapse rule flagged (row["collapse"]): a
    judge that only counts words can give a garbled model its best win rate."""
    return sum(1 for r in rows if r.get("collapse"))


def aggregate(rows: list[dict], keys: tuple[str, ...] = ("judge", "loss")) -> list[dict]:
    """Mean and (population) standard deviation over seeds of every metric, per key."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, members in groups.items():
        entry = dict(zip(keys, key), seeds=len(members), collapsed=collapsed_count(members))
        for m in METRICS:
            vals = [r[m] for r in members if r.get(m) is not None]
            if vals:
                entry[m] = statistics.fmean(vals)
                entry[f"{m}_std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
        out.append(entry)
    return out


def format_table(summary: list[dict]) -> str:
    import pandas as pd

    def pm(entry, m, fmt):
        if m not in entry:
            return "-"
        text = format(entry[m], fmt)
        return text + (f" ± {format(entry[m + '_std'], fmt)}" if entry.get("seeds", 1) > 1 else "")

    frame = pd.DataFrame([{
        "judge": e["judge"], "loss": e["loss"],
        **({"annotation": e["annotation"]} if "annotation" in e else {}),
        "judgments": pm(e, "human_judgments", ".0f"), "pairs": pm(e, "pairs_trained", ".0f"),
        "win rate": pm(e, "win_rate", ".2f"),
        "score tuned": pm(e, "score_tuned", ".2f"), "score base": pm(e, "score_base", ".2f"),
        "held-out acc": pm(e, "heldout_acc", ".2f"), "words": pm(e, "mean_words", ".1f"),
        "<3 words": pm(e, "short_share", ".2f"), "rep. 3-grams": pm(e, "repeat_share", ".3f"),
        "loops": pm(e, "loop_share", ".2f"), "refusals": pm(e, "refusal_share", ".2f"),
        "base logp/tok": pm(e, "base_logp", ".2f"), "collapsed": f"{e.get('collapsed', 0)}/{e['seeds']}",
        "train s": pm(e, "train_s", ".0f"),
    } for e in summary])
    return frame.to_string(index=False)


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- model work ------------------------------------------------------------------------

def mean_token_logps(host, prompts: list[str], answers: list[str], max_length: int,
                     cut_off: list[bool]) -> list[float]:
    """Base model's mean log-prob per answer token (adapters off): fluency proxy.
    `cut_off[i]`: answer i hit its token limit (scored without an ending)."""
    from rpo_app.scoring import base_token_logps

    with host.lock:
        return base_token_logps(host.model, host.tokenizer, host.pad_id, host.device, prompts, answers,
                                max_length, cut_off=cut_off)


def _tqdm_progress(desc: str):
    from tqdm.auto import tqdm

    bar = {"bar": None}

    def progress(done: int, total: int) -> None:
        if bar["bar"] is None:
            bar["bar"] = tqdm(total=total, desc=desc, unit="answer", dynamic_ncols=True)
        bar["bar"].n = done
        bar["bar"].refresh()
        if done >= total:
            bar["bar"].close()
    return progress


def _cached(cache: Path | None, key: str, make):
    """JSON cache of generations and their base scores: a sweep over training settings
    reuses the base model's candidates and test answers instead of sampling them again."""
    if cache is None:
        return make()
    path = cache / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    value = make()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, ensure_ascii=False))
    tmp.replace(path)
    return value


def _link_model(model: str | None, source_data_dir: Path, data_dir: Path) -> str | None:
    """Point the fresh data dir at the already-converted default model (no reconversion)."""
    from rpo_app.models import is_default, link_model_cache, resolve_model

    if not is_default(model):
        return resolve_model(model, source_data_dir)
    link_model_cache(source_data_dir, data_dir)
    return None


def label_prompts(store, ids: list[int], judge, judge_name: str, annotator: str, annotation: str = "all",
                  pairs_per_prompt: int = 1, seed: int = 0) -> dict:
    """Let one judge label every training prompt's candidates the --annotation way and
    store it; return counts: ``actions`` (what a person would have clicked: one per
    pair, thumb or ranking), ``paired`` (decided pairs, a ranking's implied ones
    included), ``tie``, ``up``, ``down``, ``rankings``, ``skipped`` (prompts with too
    few distinct candidates to rank)."""
    from rpo_app.judges import score
    from rpo_app.rankings import MIN_ANSWERS, implied_pairs

    counts = {"actions": 0, "paired": 0, "tie": 0, "up": 0, "down": 0, "rankings": 0, "skipped": 0}
    for pid in ids:
        responses = store.responses_for_prompt(pid)
        scored = [(r["id"], score(judge, judge_name, r["prompt"], r["text"])) for r in responses]
        if annotation == "ranking":
            if len(scored) < MIN_ANSWERS:  # identical samples collapsed into one candidate
                counts["skipped"] += 1
                continue
            tiers = rank_candidates(scored)
            store.add_ranking(tiers, annotator, source="bench-effect", shown=[rid for rid, _ in scored])
            counts["actions"] += 1
            counts["rankings"] += 1
            for _, _, verdict in implied_pairs(tiers):
                counts["tie" if verdict == "tie" else "paired"] += 1
            continue
        made = (judge_candidates(scored) if annotation == "all"
                else sample_pairs(scored, pairs_per_prompt, pair_rng(seed, pid)))
        for kind, ra, rb, verdict in made:
            store.add_judgment(kind, ra, rb, verdict, annotator=annotator, source="bench-effect")
            counts["actions"] += 1
            counts["tie" if verdict == "tie" else "paired" if kind == "paired" else verdict] += 1
    if counts["skipped"]:
        log.warning("judge %s: %d prompts have fewer than %d distinct candidates and were not ranked",
                    judge_name, counts["skipped"], MIN_ANSWERS)
    return counts


def prepare_seed(args, seed: int, prompt_rows: list[dict], out: Path, source: str = "bench-effect") -> dict:
    """One seed's fixed part: a fresh store of the training prompts with their sampled
    candidates, the model host, and the base model's greedy test answers with their
    metrics (generations cached: OUT/cache). Returns its pieces by name."""
    from rpo_app.generate import GenSettings, ModelHost, generate_candidates
    from rpo_app.store import Store

    seed_dir = out / f"seed-{seed}"
    data_dir = seed_dir / "data"
    if data_dir.exists():
        import shutil

        shutil.rmtree(data_dir)  # a fresh store: judgments from an earlier run must not leak in
    data_dir.mkdir(parents=True)
    model = _link_model(args.model, Path(args.source_data_dir), data_dir)
    train_rows, test_rows = split_by_family(prompt_rows, args.train_prompts, args.test_prompts, seed)
    log.info("seed %d: %d training prompts (%d families), %d test prompts (%d families)", seed,
             len(train_rows), len({r.get('family') for r in train_rows}), len(test_rows),
             len({r.get('family') for r in test_rows}))
    store = Store(data_dir)
    # fp32 whatever the CPU: the cached candidates and base answers, and the results
    # recorded in docs/benchmarks.md, were made in fp32.
    host = ModelHost(model, data_dir, device=args.device, precision="fp32")
    cache = None if args.no_cache else Path(args.cache_dir) if args.cache_dir else out / "cache"
    # Its own flags only (no min-p, no repetition penalty): the candidates and the greedy
    # test answers stay comparable with the results recorded in docs/benchmarks.md.
    sample = GenSettings(temperature=args.gen_temperature, top_p=args.top_p,
                         max_new_tokens=args.max_new_tokens, seed=seed, min_p=0.0,
                         repetition_penalty=1.0)
    greedy = GenSettings(temperature=0.0, max_new_tokens=args.max_new_tokens, seed=seed,
                         repetition_penalty=1.0)

    ids, _ = store.add_prompts([{"prompt": r["prompt"], "family": r.get("family")} for r in train_rows],
                               source)
    # "cut off": the cache keeps which answers hit the token limit (older caches did not).
    candidates_key = _hash("candidates", "cut off", host.model_name, str(model),
                           [r["prompt"] for r in train_rows], args.candidates, sample.to_dict())

    def make_candidates() -> dict:
        # Sampled into a scratch store: generate_candidates stores answers in the order
        # they finish, and answer ids decide what the queue's random order shows, so the
        # cell's store is filled below from this dict whether it came from the cache or not.
        import shutil

        scratch_dir = seed_dir / "candidates-scratch"
        shutil.rmtree(scratch_dir, ignore_errors=True)
        scratch = Store(scratch_dir)
        try:
            scratch_ids, _ = scratch.add_prompts([{"prompt": r["prompt"], "family": r.get("family")}
                                                  for r in train_rows], source)
            generate_candidates(scratch, host, scratch_ids, args.candidates, sample,
                                progress=_tqdm_progress(f"seed {seed}: candidates"))
            return {str(pid): [[r["text"], bool(r["cut_off"])] for r in scratch.responses_for_prompt(sid)]
                    for pid, sid in zip(ids, scratch_ids)}
        finally:  # a stopped or failed sampling leaves no scratch store behind either
            scratch.close()
            shutil.rmtree(scratch_dir, ignore_errors=True)

    answers = _cached(cache, candidates_key, make_candidates)
    for pid in ids:
        for text, cut_off in answers[str(pid)]:
            store.add_response(pid, text, source="model", model=host.model_name,
                               gen_settings=sample.to_dict(), cut_off=cut_off)
    cached = {pid: [text for text, _ in rows] for pid, rows in answers.items()}

    test_prompts = [r["prompt"] for r in test_rows]
    key = _hash("base-answers", "cut off", host.model_name, str(model), test_prompts,
                greedy.to_dict())
    base_generated = _cached(cache, key, lambda: [list(a[0]) for a in host.answers(
        test_prompts, 1, greedy, progress=_tqdm_progress(f"seed {seed}: base answers"))])
    base_answers = [text for text, _ in base_generated]
    base_logp = mean_token_logps(host, test_prompts, base_answers, args.max_length,
                                 [cut for _, cut in base_generated])
    base_metrics = {"seed": seed, **degeneration.summarize(base_answers),
                    "base_logp": statistics.fmean(base_logp), "answers": base_answers,
                    "test_prompts": test_prompts, "train_prompts": [r["prompt"] for r in train_rows]}
    # Greedy answers are the base model's own most likely text, so any tuned model that
    # answers differently scores a lower base log-probability. The sampled candidates
    # (what the annotator was shown) are the base model's fluency when it does vary.
    # Scoring every candidate costs minutes on a CPU, so it is cached with them.
    sampled = [(r["prompt"], t, cut) for r, pid in zip(train_rows, ids)
               for t, cut in answers[str(pid)]]
    base_metrics["sampled"] = {
        **{k: v for k, v in degeneration.summarize([t for _, t, _ in sampled]).items() if k != "n"},
        "base_logp": _cached(cache, _hash("sampled-logp", "cut unended", candidates_key,
                                                 args.max_length),
                             lambda: statistics.fmean(mean_token_logps(
                                 host, [p for p, _, _ in sampled], [t for _, t, _ in sampled],
                                 args.max_length, [cut for _, _, cut in sampled])))}
    return {"seed_dir": seed_dir, "data_dir": data_dir, "model": model, "store": store, "host": host,
            "ids": ids, "test_prompts": test_prompts, "base_answers": base_answers,
            "base_metrics": base_metrics, "greedy": greedy}


def train_config(args, loss: str, seed: int, annotator: str, model, **overrides):
    """The product's training settings for a benchmark run (the Train tab's defaults
    unless the flags say otherwise)."""
    from rpo_app.trainconfig import TrainConfig

    return TrainConfig(
        loss=loss, beta=args.beta, temperature=args.temperature, learning_rate=args.lr,
        max_steps=args.steps, epochs=args.epochs, min_steps=args.min_steps,
        small_set=args.small_set, small_set_batch=args.small_set_batch,
        small_set_steps=args.small_set_steps,
        batch_size=args.batch_size, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_layers=args.lora_layers, max_length=args.max_length, seed=seed, eval_fraction=args.eval_fraction,
        # No previews and no label check: the benchmark answers its own test prompts and
        # never reads the suspect list; both would only add time to every run.
        eval_every=args.eval_every, sample_every=0, save_every=0, preview_count=0,
        check_labels=False,
        sample_max_new_tokens=args.max_new_tokens, annotators=[annotator], model=model,
        device=args.device, cpu_threads=args.cpu_threads, sft_weight=args.sft_weight, **overrides)


def loss_label(loss: str, margin: float = 0.0, sft_weight: float = 0.0) -> str:
    """A row's loss as the tables show it: a strength margin or an NLL term is its own
    curve, kept apart from the plain loss in the summary."""
    return loss + (f" +margin {margin:g}" if margin else "") + (f" +sft {sft_weight:g}" if sft_weight else "")


def train_and_judge(args, prep: dict, cfg, run_dir: Path, judge, judge_name: str, name: str) -> dict:
    """Train `cfg` with the product's trainer into run_dir, then answer the test prompts
    greedily with the adapter and let the judge compare with the base model's answers.
    Returns the row's metrics (with "error" when training refused or failed)."""
    from rpo_app.judges import score
    from rpo_app.runfolder import RunFolder
    from rpo_app.train import train

    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    t0 = time.time()
    rc = train(cfg, run_dir, prep["data_dir"])
    train_s = time.time() - t0
    run = RunFolder(run_dir, writable=False)
    status = run.status()
    if rc == 130 or status.state == "stopped":
        # The trainer caught Ctrl-C / SIGTERM and stopped cleanly: so does the benchmark.
        raise KeyboardInterrupt
    row = {"beta": cfg.beta, "train_s": train_s, "rc": rc, "state": status.state}
    if rc != 0 or not run.adapter.exists():
        row["error"] = status.error or f"training exited with code {rc}"
        return row
    host, test_prompts = prep["host"], prep["test_prompts"]
    host.load_adapter(name, run.adapter)
    try:
        tuned_answers = [a[0] for a in host.answers(test_prompts, 1, prep["greedy"], adapter=name,
                                                    progress=_tqdm_progress(f"{name}: test"))]
    finally:
        host.unload_adapter(name)
    tuned = [a.text for a in tuned_answers]
    base_scores = [score(judge, judge_name, p, a) for p, a in zip(test_prompts, prep["base_answers"])]
    tuned_scores = [score(judge, judge_name, p, a) for p, a in zip(test_prompts, tuned)]
    accs = [m.eval_accuracy for m in run.metrics() if m.eval_accuracy is not None]
    tuned_logp = statistics.fmean(mean_token_logps(host, test_prompts, tuned, args.max_length,
                                                   [a.cut_off for a in tuned_answers]))
    row.update({
        "win_rate": win_rate(tuned_scores, base_scores),
        "score_tuned": statistics.fmean(tuned_scores), "score_base": statistics.fmean(base_scores),
        "heldout_acc": accs[-1] if accs else None, "base_logp": tuned_logp,
        "steps": status.step, "early_stopped": status.early_stopped, "adapter": str(run.adapter),
        "answers": tuned,
    })
    # the degeneration figures, and the Train tab's collapse rule on the test answers (its
    # previews are not run here), as --merge reads them again later
    row.update(degeneration_now(row, prep["base_metrics"]))
    if row["collapse"]:
        log.warning("%s: %s", name, row["collapse"])
    return row


def run_seed(args, seed: int, judges: dict, prompt_rows: list[dict], out: Path) -> tuple[list[dict], dict]:
    """Everything for one seed; returns (rows per judge x loss, base model metrics)."""
    from rpo_app.judges import score

    prep = prepare_seed(args, seed, prompt_rows, out)
    store, ids, seed_dir = prep["store"], prep["ids"], prep["seed_dir"]
    base_metrics = prep["base_metrics"]
    rows = []
    for judge_name, judge in judges.items():
        annotator = f"judge:{judge_name}"
        counts = label_prompts(store, ids, judge, judge_name, annotator, args.annotation,
                               args.pairs_per_prompt, seed)
        base_scores = [score(judge, judge_name, p, a) for p, a in zip(prep["test_prompts"],
                                                                     prep["base_answers"])]
        base_metrics.setdefault("judge_scores", {})[judge_name] = statistics.fmean(base_scores)
        log.info("judge %s: %s", judge_name, counts)
        for loss in args.losses:
            cfg = train_config(args, loss, seed, annotator, prep["model"])
            result = train_and_judge(args, prep, cfg, seed_dir / judge_name / loss, judge, judge_name,
                                     f"{judge_name}-{loss}")
            row = {"seed": seed, "judge": judge_name, "loss": loss_label(loss, sft_weight=args.sft_weight),
                   "annotation": args.annotation,
                   "judgments": dict(counts), "human_judgments": counts["actions"],
                   "pairs_trained": counts["paired"], **result}
            row.pop("adapter", None)
            if "error" in row:
                log.error("seed %d %s %s: %s", seed, judge_name, loss, row["error"])
            else:
                log.info("seed %d %s %s: win rate %.2f, %.1f words (base %.1f)", seed, judge_name, loss,
                         row["win_rate"], row["mean_words"], base_metrics["mean_words"])
            rows.append(row)
    store.close()
    return rows, base_metrics


# --- output ----------------------------------------------------------------------------

def plot(summary: list[dict], base: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judges = list(dict.fromkeys(e["judge"] for e in summary))
    losses = list(dict.fromkeys(e["loss"] for e in summary))
    by = {(e["judge"], e["loss"]): e for e in summary}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(losses), 1)
    for k, loss in enumerate(losses):
        xs = [j + (k - (len(losses) - 1) / 2) * width for j in range(len(judges))]
        es = [by.get((j, loss), {}) for j in judges]
        ax1.bar(xs, [e.get("win_rate", 0) for e in es], width, yerr=[e.get("win_rate_std", 0) for e in es],
                label=loss, capsize=3)
        ax2.bar(xs, [e.get("mean_words", 0) for e in es], width, label=loss)
    ax1.axhline(0.5, color="grey", lw=1, ls="--")
    ax1.axhline(0.7, color="green", lw=1, ls=":", label="target 0.7")
    ax1.set_ylim(0, 1)
    ax1.set_ylabel("judge win rate, tuned vs base")
    ax2.axhline(base["mean_words"], color="black", lw=1, ls="--", label="base model")
    ax2.set_ylabel("mean words per test answer")
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(judges)), judges)
        ax.legend(fontsize=8)
    fig.suptitle("Effect of fine-tuning on simulated annotators (held-out prompt families)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _read_prompts(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if not isinstance(row, dict) or not row.get("prompt"):
                raise BenchError(f"{path} line {n}: need an object with a 'prompt'")
            rows.append(row)
    return rows


def add_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--losses", nargs="+", default=list(DEFAULT_LOSSES), help="losses to train")
    p.add_argument("--annotation", choices=ANNOTATIONS, default="all",
                   help="how the judge labels each training prompt: all = every pair and every thumb; "
                        "ranking = one ranking of the K candidates (needs K 3-6); pairs = "
                        "--pairs-per-prompt randomly drawn pairs (default: all)")
    p.add_argument("--pairs-per-prompt", type=int, default=1,
                   help="with --annotation pairs: pairs judged per prompt, 1 to C(K,2) (default 1)")
    return add_common_args(p, out="bench-results/effect", train_prompts=40, test_prompts=30)


def add_common_args(p: argparse.ArgumentParser, out: str, train_prompts: int, test_prompts: int
                    ) -> argparse.ArgumentParser:
    """The flags bench-effect and bench-curve share: judges, data, generation, training."""
    from rpo_app.loss_registry import default_betas, default_small_sets
    from rpo_app.trainconfig import TrainConfig  # a plain dataclass module: no torch at import

    d = TrainConfig()
    p.add_argument("--judge", action="append", default=None,
                   help="a shipped judge (concise, numbered_list, caveat), module:function or "
                        "file.py:function; repeatable (default: all shipped judges)")
    p.add_argument("--train-prompts", type=int, default=train_prompts)
    p.add_argument("--test-prompts", type=int, default=test_prompts)
    p.add_argument("--candidates", type=int, default=4, help="answers sampled per training prompt (K)")
    p.add_argument("--seeds", type=int, default=1, help="repeat with this many seeds (0, 1, ...)")
    p.add_argument("--seed-offset", type=int, default=0, help="first seed")
    p.add_argument("--out", default=out)
    p.add_argument("--model", default=None, help="HF id or folder (default: bundled SmolLM2-135M)")
    p.add_argument("--data-dir", dest="source_data_dir", default=None,
                   help="data dir holding the converted default model (default: $RPO_APP_DATA_DIR or ./data)")
    p.add_argument("--prompts", default=str(SEED_PROMPTS), help="JSONL with prompt and family fields")
    p.add_argument("--device", default=None)
    p.add_argument("--cpu-threads", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--gen-temperature", type=float, default=0.8, help="sampling temperature of the candidates")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--cache-dir", default=None,
                   help="where generations are cached (default: OUT/cache); share it between runs "
                        "that differ only in training settings")
    p.add_argument("--no-cache", action="store_true", help="sample candidates and base answers again")
    g = p.add_argument_group("training (defaults: the Train tab's)")
    g.add_argument("--steps", type=int, default=d.max_steps,
                   help="optimizer steps for every judge (default: --epochs over each judge's own "
                        "pairs, at least --min-steps)")
    g.add_argument("--epochs", type=int, default=d.epochs, help="epochs when --steps is not given")
    g.add_argument("--min-steps", type=int, default=d.min_steps,
                   help="when --steps is not given, at least this many steps even for a judge that "
                        "decides few pairs (0: no floor)")
    g.add_argument("--small-set", type=int, default=None,
                   help="when --steps is not given, a label set of fewer examples than this trains "
                        "--small-set-steps steps of at most --small-set-batch (the trainer's rule; 0: off; "
                        f"default: per loss, {default_small_sets()})")
    g.add_argument("--small-set-batch", type=int, default=d.small_set_batch)
    g.add_argument("--small-set-steps", type=int, default=d.small_set_steps)
    g.add_argument("--lr", type=float, default=d.learning_rate,
                   help="default: the trainer's rule (3e-4 x all layers / adapted layers)")
    g.add_argument("--beta", type=float, default=None,
                   help=f"default: each loss's own ({default_betas()})")
    g.add_argument("--temperature", type=float, default=d.temperature, help="RPO tau")
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--lora-r", type=int, default=d.lora_r)
    g.add_argument("--lora-alpha", type=int, default=None, help="default: the trainer's rule (2 x rank)")
    g.add_argument("--lora-layers", type=int, default=d.lora_layers,
                   help="LoRA on the top N decoder layers only (0: every layer; default: the trainer's, "
                        "the top half)")
    g.add_argument("--max-length", type=int, default=320)
    g.add_argument("--eval-fraction", type=float, default=d.eval_fraction)
    g.add_argument("--eval-every", type=int, default=10)
    g.add_argument("--sft-weight", type=float, default=d.sft_weight,
                   help="weight of an NLL term on the chosen answers (see `train --help`); rows "
                        "trained with one are labeled 'LOSS +sft W'")
    return p


def _check_args(args) -> dict:
    from rpo_app.loss_registry import LOSS_NAMES as LOSSES

    judges = check_common_args(args)
    bad = [loss for loss in args.losses if loss not in LOSSES]
    if bad:
        raise BenchError(f"unknown loss {bad[0]!r}; choose from {', '.join(LOSSES)}")
    if args.annotation == "ranking":
        from rpo_app.rankings import MAX_ANSWERS, MIN_ANSWERS

        if not MIN_ANSWERS <= args.candidates <= MAX_ANSWERS:
            raise BenchError(f"--annotation ranking ranks {MIN_ANSWERS} to {MAX_ANSWERS} answers: "
                             f"--candidates must be in that range, got {args.candidates}")
    most = args.candidates * (args.candidates - 1) // 2
    if not 1 <= args.pairs_per_prompt <= most:
        raise BenchError(f"--pairs-per-prompt must be between 1 and {most} (the pairs among "
                         f"{args.candidates} candidates), got {args.pairs_per_prompt}")
    return judges


def check_common_args(args) -> dict:
    """Check the shared flags; returns the judges by name."""
    from rpo_app.judges import SHIPPED, load_judge

    judges = dict(load_judge(spec) for spec in (args.judge or list(SHIPPED)))
    for name in ("train_prompts", "test_prompts", "seeds", "steps", "epochs", "batch_size", "max_new_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.beta is not None and args.beta <= 0:
        raise BenchError(f"--beta must be > 0, got {args.beta}")
    if args.min_steps < 0:
        raise BenchError(f"--min-steps must be >= 0, got {args.min_steps}")
    if args.sft_weight < 0:
        raise BenchError(f"--sft-weight must be >= 0, got {args.sft_weight}")
    if args.candidates < 2:
        raise BenchError(f"--candidates must be >= 2 (judgments compare candidates), got {args.candidates}")
    if (args.small_set or 0) < 0 or args.small_set_batch < 1 or args.small_set_steps < 1:
        raise BenchError("--small-set must be >= 0, --small-set-batch and --small-set-steps >= 1")
    if args.cpu_threads is not None and args.cpu_threads < 1:
        raise BenchError(f"--cpu-threads must be >= 1, got {args.cpu_threads}")
    return judges


def main_from_args(args: argparse.Namespace) -> int:
    from rpo_app.config import resolve_data_dir
    from rpo_app.judges import JudgeError

    try:
        judges = _check_args(args)
        prompt_rows = _read_prompts(Path(args.prompts))
    except (BenchError, JudgeError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    import torch

    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    args.source_data_dir = str(resolve_data_dir(args.source_data_dir))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows, bases = [], []
    seeds = range(args.seed_offset, args.seed_offset + args.seeds)
    try:
        for seed in seeds:
            seed_rows, base = run_seed(args, seed, judges, prompt_rows, out)
            rows += seed_rows
            bases.append(base)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    ok = [r for r in rows if "error" not in r]
    summary = aggregate(ok)
    for entry in summary:
        entry["annotation"] = (f"pairs x{args.pairs_per_prompt}" if args.annotation == "pairs"
                               else args.annotation)
    shown = (*degeneration.FIGURES, "base_logp")
    base_summary = {m: statistics.fmean(b[m] for b in bases) for m in shown}
    base_summary.update({f"{m}_std": statistics.pstdev(b[m] for b in bases) for m in shown})
    base_summary["sampled"] = {m: statistics.fmean(b["sampled"][m] for b in bases) for m in shown}
    config = {k: v for k, v in vars(args).items() if k != "func"}
    result = {"config": config, "judges": list(judges), "seconds": time.time() - t0,
              "summary": summary, "base": base_summary, "per_seed": rows, "base_per_seed": bases,
              "failed": [r for r in rows if "error" in r]}
    (out / "effect.json").write_text(json.dumps(result, indent=1, ensure_ascii=False, default=str))
    table = format_table(summary) if summary else "(no successful runs)"
    base_line = "\n".join(
        f"{what}: {s['mean_words']:.1f} words, <3 words {s['short_share']:.2f}, "
        f"rep. 3-grams {s['repeat_share']:.3f}, loops {s['loop_share']:.2f}, "
        f"refusals {s['refusal_share']:.2f}, "
        f"base logp/tok {s['base_logp']:.2f}"
        for what, s in (("base model, greedy test answers", base_summary),
                        (f"base model, sampled candidates (T={args.gen_temperature})", base_summary["sampled"])))
    (out / "effect.txt").write_text(table + "\n" + base_line + "\n")
    if summary:
        plot(summary, base_summary, out / "effect.png")
    print(table)
    print(base_line)
    for r in result["failed"]:
        print(f"FAILED seed {r['seed']} {r['judge']} {r['loss']}: {r['error']}", file=sys.stderr)
    print(f"results in {out}/ (effect.json, effect.txt, effect.png)", file=sys.stderr)
    return 1 if result["failed"] else 0
