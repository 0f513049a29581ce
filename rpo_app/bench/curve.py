"""`python -m rpo_app bench-curve`: how many labels does the loop need?

Learning curves with simulated annotators (rpo_app.judges) that label only what the
label queue shows them, exactly as a person would in the Label tab: for every seed,
judge, data regime and label order, the judge labels items from the queue one by one;
at each label budget every loss of the regime is trained on the labels so far by the
product's own trainer and judged against the base model on held-out prompts (win rate,
degeneration; bench-effect's measures, bench.effect.train_and_judge).

Data regimes (what the queue is asked for):
- ``pairs``: two answers to one prompt (A better / B better / tie);
- ``thumbs``: one answer at a time (up above the prompt's median candidate score, down
  below; at the median the annotator has no opinion and skips, which stores nothing);
  DPO has no pairs to train on;
- ``cross``: an answer next to an answer to a related prompt (which answers its own
  prompt better); DPO has no same-prompt pairs to train on.

Label orders are the queue's (rpo_app.labelqueue.ORDERS): ``random``, ``queue`` (today's
order), and ``active``: the informative order, iterative as in the app: label up to the
first budget in the queue's order (there is no adapter yet), train, score the answers
with the adapter of the regime's first loss (rpo_app.active, as the app does after a
run), label on to the next budget, train, re-score, and so on.

Outputs in --out: curve.json (every row, written as it comes, so an interrupted run
keeps what it measured), curve.txt (mean ± spread over seeds) and curve.png. Several
partial runs (other seeds or judges, run side by side) combine with --merge, which reads
each row's degeneration figures and collapse flag again from its stored answers.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

from rpo_app import degeneration
from rpo_app.bench import effect
from rpo_app.bench.effect import BenchError

log = logging.getLogger("rpo_app.bench.curve")

REGIMES = {"pairs": "paired", "thumbs": "unpaired", "cross": "cross"}
ORDERS = {"random": "random", "queue": "queue", "active": "informative"}
REGIME_LOSSES = {"pairs": ("rpo-paired", "dpo"), "thumbs": ("rpo-unpaired", "kto"),
                 "cross": ("rpo-paired", "dpo")}
METRICS = ("win_rate", *degeneration.FIGURES, "base_logp", "labels", "decided", "decidable", "steps",
           "train_s", "informative_share")
# Counted over every seed's labels, trained or not (the rest: over the runs that trained).
LABEL_COUNTS = ("labels", "decided", "decidable", "informative_share")


# --- the simulated annotator ---------------------------------------------------------------

def verdict(item, judge, judge_name: str, medians: dict[int, float], cut: float | None = None
           ) -> tuple[str | None, str | None]:
    """(what the judge clicks for a queue item, its strength). The verdict is None for no
    opinion (a thumb at the median), which a person would skip. A decided pair also gets the
    Label tab's optional strength, "clearly" when the judge's score gap is at least `cut`
    (a typical gap, see strength_cut) and "slightly" below it. Thumbs carry no strength,
    as in the Label tab; without a cut the annotator leaves strength out."""
    from rpo_app.judges import score

    left = score(judge, judge_name, item.left["prompt"], item.left["text"])
    if item.right is None:
        mid = medians[item.left["prompt_id"]]
        return ("up" if left > mid else "down" if left < mid else None), None
    right = score(judge, judge_name, item.right["prompt"], item.right["text"])
    if left == right:
        return "tie", None
    strength = None if cut is None else "clearly" if abs(left - right) >= cut else "slightly"
    return ("left" if left > right else "right"), strength


def candidate_scores(store, judge, judge_name: str) -> dict[int, list[float]]:
    """The judge's score of every candidate answer, by training prompt: what the simulated
    annotator's thumbs and strengths are read against."""
    from rpo_app.judges import score

    out = {}
    for row in store.prompts():
        answers = store.responses_for_prompt(row["id"])
        if answers:
            out[row["id"]] = [score(judge, judge_name, a["prompt"], a["text"]) for a in answers]
    return out


def prompt_medians(scores: dict[int, list[float]]) -> dict[int, float]:
    """Each training prompt's median candidate score: where a thumb turns from down to up."""
    return {pid: statistics.median(values) for pid, values in scores.items()}


def _decided_gaps(scores: dict[int, list[float]]) -> list[float]:
    """The score gap of every same-prompt pair of candidates the judge does not tie."""
    from itertools import combinations

    return [abs(a - b) for values in scores.values() for a, b in combinations(values, 2) if a != b]


def strength_cut(scores: dict[int, list[float]]) -> float | None:
    """The median score gap between two different-scoring answers to one training prompt:
    the simulated annotator calls a pair "clearly" better at or above it, so about half its
    decided same-prompt pairs are clear and half slight. None when no prompt has two."""
    gaps = _decided_gaps(scores)
    return statistics.median(gaps) if gaps else None


def decidable(scores: dict[int, list[float]], medians: dict[int, float], regime: str) -> int | None:
    """How many items of the candidate pool carry a preference for this judge: the most
    decided labels any order could find (a rare trait leaves most pairs tied). Same-prompt
    pairs that differ in score, or single answers off their prompt's median; None for
    cross-prompt pairs, which depend on the prompt index's neighbours."""
    if regime == "pairs":
        return len(_decided_gaps(scores))
    if regime == "thumbs":
        return sum(v != medians[pid] for pid, values in scores.items() for v in values)
    return None


def label_until(queue, annotator: str, mode: str, order: str, budget: int, counts: dict,
                judge, judge_name: str, medians: dict[int, float], cut: float | None = None) -> bool:
    """Label queue items until `counts["labels"]` reaches budget; False when the queue ran
    out first. `counts` keeps labels, decided pairs, ties, ups, downs, skips and how many
    items the informative order picked. With a `cut`, decided pairs carry a strength."""
    while counts["labels"] < budget:
        item = queue.next_item(annotator, mode, order)
        if item is None:
            return False
        v, strength = verdict(item, judge, judge_name, medians, cut)
        if v is None:
            queue.skip(item.token, annotator)
            counts["skips"] += 1
            continue
        queue.submit(item.token, v, annotator, strength=strength, seconds_spent=0.0,
                     source="bench-curve")
        counts["labels"] += 1
        counts["informative"] += item.order == "informative"
        # decided: labels that carry a preference (a winner, or a thumb either way)
        counts["decided"] += v != "tie"
        counts[{"left": "wins", "right": "wins", "tie": "ties", "up": "ups", "down": "downs"}[v]] += 1
    return True


# --- one seed ------------------------------------------------------------------------------

def run_seed(args, seed: int, judges: dict, prompt_rows: list[dict], out: Path, emit) -> dict:
    """Every judge x regime x order of one seed; each result row goes to `emit`."""
    from rpo_app import active
    from rpo_app.embed import Embedder, PromptIndex
    from rpo_app.labelqueue import LabelQueue
    from rpo_app.loss_registry import get_loss
    from rpo_app.store import Store

    prep = effect.prepare_seed(args, seed, prompt_rows, out, source="bench-curve")
    embedder = Embedder()
    PromptIndex(prep["store"], embedder).refresh()  # the copies below carry the embeddings
    budgets = sorted(args.budgets)
    for judge_name, judge in judges.items():
        annotator = f"judge:{judge_name}"
        for regime in args.regimes:
            losses = args.regime_losses.get(regime) or REGIME_LOSSES[regime]
            for order_name in args.orders:
                where = prep["seed_dir"] / "curve" / judge_name / regime / order_name
                data_dir = where / "data"
                if where.exists():
                    import shutil

                    shutil.rmtree(where)
                data_dir.mkdir(parents=True)
                prep["store"].copy_to(data_dir / "rpo.sqlite3")
                effect._link_model(args.model, Path(args.source_data_dir), data_dir)
                store = Store(data_dir)
                index = PromptIndex(store, embedder)
                index.refresh()
                queue = LabelQueue(store, index=index, seed=seed)
                scores = candidate_scores(store, judge, judge_name)
                medians = prompt_medians(scores)
                cut = strength_cut(scores) if args.strength_margin else None
                pool = decidable(scores, medians, regime)
                counts = {k: 0 for k in ("labels", "decided", "wins", "ties", "ups", "downs",
                                         "skips", "informative")}
                cell = {**prep, "data_dir": data_dir}
                order_budgets = sorted(args.active_budgets or budgets) if order_name == "active" else budgets
                kept: dict = {}  # hidden states from one scoring round to the next, as in the app
                for budget in order_budgets:
                    more = label_until(queue, annotator, REGIMES[regime], ORDERS[order_name], budget,
                                       counts, judge, judge_name, medians, cut)
                    adapters = {}
                    for loss in losses:
                        name = f"{judge_name}-{regime}-{order_name}-{budget}-{loss}"
                        margin = args.strength_margin if get_loss(loss).takes_offset else 0.0
                        cfg = effect.train_config(args, loss, seed, annotator, prep["model"],
                                                  strength_margin=margin)
                        result = effect.train_and_judge(args, cell, cfg, where / f"b{budget}" / loss,
                                                        judge, judge_name, name)
                        row = {"seed": seed, "judge": judge_name, "regime": regime, "order": order_name,
                               "budget": budget, "loss": effect.loss_label(loss, margin, args.sft_weight),
                               "strength_margin": margin, "sft_weight": args.sft_weight, **counts,
                               "decidable": pool,
                               "informative_share": counts["informative"] / max(counts["labels"], 1),
                               "exhausted": not more, **result}
                        if "adapter" in row:
                            adapters[loss] = row.pop("adapter")
                        emit(row)
                    selector = next((adapters[loss] for loss in losses if loss in adapters), None)
                    if order_name == "active" and selector is not None and budget != order_budgets[-1]:
                        name = f"{judge_name}-{regime}-{budget}"
                        store.register_adapter(name, selector, None, str(prep["model"]))
                        prep["host"].load_adapter(name, selector)
                        try:
                            info = active.score_store(store, prep["host"], store.adapter(name),
                                                      index=index if regime == "cross" else None,
                                                      kept=kept)
                            log.info("%s: informative order from %d answers in %.1f s", name,
                                     info["answers"], info["seconds"])
                        finally:
                            prep["host"].unload_adapter(name)
                store.close()
    prep["store"].close()
    return prep["base_metrics"]


# --- summary -------------------------------------------------------------------------------

KEYS = ("judge", "regime", "order", "loss", "budget")


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and spread (population sd) over seeds per judge x regime x order x loss x budget.
    A row that could not train (no data for the loss) counts in `untrainable`."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in KEYS), []).append(r)
    out = []
    for key, members in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0][:4]) + (kv[0][4],)):
        ok = [m for m in members if "error" not in m]
        entry = dict(zip(KEYS, key), seeds=len(members), trained=len(ok),
                     untrainable=len(members) - len(ok), collapsed=effect.collapsed_count(ok),
                     exhausted=sum(1 for m in members if m.get("exhausted")),
                     errors=sorted({m["error"].split(";")[0] for m in members if "error" in m}))
        fluent = [m["win_rate"] for m in ok if not m.get("collapse") and m.get("win_rate") is not None]
        if entry["collapsed"] and fluent:
            entry["win_rate_fluent"] = statistics.fmean(fluent)
        for m in METRICS:
            vals = [r[m] for r in (members if m in LABEL_COUNTS else ok)
                    if r.get(m) is not None]
            if vals:
                entry[m] = statistics.fmean(vals)
                entry[f"{m}_std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
                if m == "win_rate":
                    entry["win_rate_seeds"] = [round(v, 3) for v in vals]
        out.append(entry)
    return out


def targets(summary: list[dict]) -> list[str]:
    """The issue's targets, read off the summary, one line each."""
    by = {tuple(e[k] for k in KEYS): e for e in summary}
    lines = []
    judges = sorted({e["judge"] for e in summary})
    budgets = sorted({e["budget"] for e in summary})
    for judge in judges:
        ref = by.get((judge, "pairs", "random", "rpo-paired", budgets[-1]))
        active_ran = any(k[:4] == (judge, "pairs", "active", "rpo-paired") for k in by)
        if ref and "win_rate" in ref and active_ran:
            reach = [b for b in budgets
                     if by.get((judge, "pairs", "active", "rpo-paired", b), {}).get("win_rate", -1)
                     >= ref["win_rate"]]
            got = by[(judge, "pairs", "active", "rpo-paired", reach[0])] if reach else None
            lines.append(f"{judge}: active reaches random's {budgets[-1]}-label win rate "
                         f"({ref['win_rate']:.2f}) with " + (f"{reach[0]} labels" if reach else
                                                             "none of the budgets")
                         + _collapses(ref, "random") + (_collapses(got, "active") if got else ""))
        found = _found(by, judge, budgets[-1])
        if found:
            lines.append(found)
        actives = [(by[k]["win_rate"], k[4]) for k in by
                   if k[:4] == (judge, "pairs", "active", "rpo-paired") and k[4] <= 128
                   and "win_rate" in by[k]]
        if actives:
            best, at = max(actives, key=lambda wb: (wb[0], -wb[1]))
            lines.append(f"{judge}: active's best win rate within 128 labels: {best:.2f} at {at} labels"
                         + _collapses(by[(judge, "pairs", "active", "rpo-paired", at)], "active"))
        for b in budgets:
            u, k = by.get((judge, "thumbs", "random", "rpo-unpaired", b)), by.get((judge, "thumbs", "random", "kto", b))
            if u and k and "win_rate" in u and "win_rate" in k:
                got = f" (the queue ran out at {u['labels']:.0f} on average)" if u.get("exhausted") else ""
                lines.append(f"{judge}, thumbs only, {b} labels{got}: rpo-unpaired {u['win_rate']:.2f} vs "
                             f"kto {k['win_rate']:.2f} ({100 * (u['win_rate'] - k['win_rate']):+.0f} points)"
                             + "".join(_collapses(e, name) for e, name in ((u, "rpo-unpaired"), (k, "kto"))))
            c = by.get((judge, "cross", "random", "rpo-paired", b))
            d = by.get((judge, "cross", "random", "dpo", b))
            if c and "win_rate" in c:
                lines.append(f"{judge}, cross-prompt only, {b} labels: rpo-paired {c['win_rate']:.2f}; "
                             f"dpo " + (f"{d['win_rate']:.2f}" if d and "win_rate" in d else
                                        "has nothing to train on"))
    return lines


def _found(by: dict, judge: str, budget: int) -> str | None:
    """How many of the pool's decided same-prompt pairs each order found by `budget` labels."""
    entries = {order: by.get((judge, "pairs", order, "rpo-paired", budget), {}) for order in ORDERS}
    found = [(order, e) for order, e in entries.items() if e.get("decidable") is not None]
    if not found:
        return None
    return (f"{judge}: decided pairs found in {budget} labels, of the "
            f"{found[0][1]['decidable']:.0f} the candidates hold: "
            + ", ".join(f"{order} {e['decided']:.0f}" for order, e in found))


def _collapses(entry: dict, name: str) -> str:
    """A target line's note on seeds whose answers collapsed (their win rate counts above)."""
    if not entry.get("collapsed"):
        return ""
    rest = (f", {entry['win_rate_fluent']:.2f} without them" if "win_rate_fluent" in entry else "")
    return f"; {name} collapsed on {entry['collapsed']} of {entry['trained']} seeds{rest}"


def _labels(entry: dict, pm) -> str:
    """The budget, and what the annotator could give where the queue ran out first (a
    rare trait: most answers sit at their prompt's median, and a thumb there is a skip)."""
    if not entry.get("exhausted"):
        return str(entry["budget"])
    return f"{entry['budget']} (queue ran out on {entry['exhausted']}/{entry['seeds']}: {pm(entry, 'labels', '.0f')})"


def format_table(summary: list[dict]) -> str:
    import pandas as pd

    def pm(e, m, fmt):
        if m not in e:
            return "-"
        return format(e[m], fmt) + (f" ± {format(e[m + '_std'], fmt)}" if e.get("seeds", 1) > 1 else "")

    frame = pd.DataFrame([{
        "judge": e["judge"], "regime": e["regime"], "order": e["order"], "loss": e["loss"],
        "labels": _labels(e, pm), "decided": pm(e, "decided", ".0f"),
        "decidable": pm(e, "decidable", ".0f"),
        "win rate": pm(e, "win_rate", ".2f") if e["trained"] else "no data",
        "per seed": ", ".join(f"{v:.2f}" for v in e.get("win_rate_seeds", [])),
        "words": pm(e, "mean_words", ".1f"), "<3 words": pm(e, "short_share", ".2f"),
        "rep. 3-grams": pm(e, "repeat_share", ".3f"), "loops": pm(e, "loop_share", ".2f"),
        "refusals": pm(e, "refusal_share", ".2f"),
        "base logp/tok": pm(e, "base_logp", ".2f"), "collapsed": f"{e.get('collapsed', 0)}/{e['trained']}",
        "steps": pm(e, "steps", ".0f"), "train s": pm(e, "train_s", ".0f"),
    } for e in summary])
    return frame.to_string(index=False)


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judges = sorted({e["judge"] for e in summary})
    regimes = [r for r in REGIMES if any(e["regime"] == r for e in summary)]
    # Wide enough for the title with a single panel.
    fig, axes = plt.subplots(len(regimes), len(judges),
                             figsize=(max(6.4, 4.2 * len(judges)), 3.4 * len(regimes)),
                             squeeze=False, sharey=True)
    styles = {"random": ":", "queue": "--", "active": "-"}
    # Orders measured at the same budget sit a little apart, so no point hides another.
    dodge = {"random": 1.05, "queue": 0.95, "active": 1.0}
    # One colour per loss across panels, so rpo-paired in one panel is rpo-paired in the next.
    losses = sorted({e["loss"] for e in summary})
    colours = {loss: f"C{k}" for k, loss in enumerate(losses)}
    budgets = sorted({e["budget"] for e in summary})
    for i, regime in enumerate(regimes):
        for j, judge in enumerate(judges):
            ax = axes[i][j]
            lines = sorted({(e["order"], e["loss"]) for e in summary
                            if e["judge"] == judge and e["regime"] == regime})
            drawn = 0
            for order, loss in lines:
                pts = sorted((e["budget"], e["win_rate"], e.get("win_rate_std", 0)) for e in summary
                             if (e["judge"], e["regime"], e["order"], e["loss"]) == (judge, regime, order, loss)
                             and "win_rate" in e)
                if pts:
                    xs, ys, sd = zip(*pts)
                    xs = [x * dodge.get(order, 1.0) for x in xs]
                    ax.errorbar(xs, ys, yerr=sd, ls=styles.get(order, "-"), marker="o", capsize=3,
                                color=colours[loss], label=f"{loss}, {order}")
                    drawn += 1
            ax.axhline(0.5, color="grey", lw=1)
            ax.axhline(0.7, color="green", lw=1, ls=":")
            ax.set_xscale("log", base=2)
            ax.set_xticks(budgets, [str(b) for b in budgets])
            ax.set_xlim(budgets[0] / 1.3, budgets[-1] * 1.3)
            ax.set_ylim(0, 1)
            ax.set_title(f"{judge} · {regime}", fontsize=10)
            if j == 0:
                ax.set_ylabel("win rate vs base")
            if i == len(regimes) - 1:
                ax.set_xlabel("labels")
            if drawn:
                ax.legend(fontsize=7)
            else:  # say so rather than leave a blank frame that reads as "nothing learned"
                ax.text(0.5, 0.5, "not measured" if not lines else "nothing to train on",
                        ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.suptitle("Learning curves: simulated annotators labeling what the queue shows")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(out: Path, config: dict, rows: list[dict], bases: list[dict]) -> list[dict]:
    summary = summarize(rows)
    result = {"config": config, "summary": summary, "targets": targets(summary), "rows": rows,
              "base_per_seed": bases}
    tmp = out / "curve.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False, default=str))
    tmp.replace(out / "curve.json")
    text = format_table(summary) if summary else "(no results)"
    (out / "curve.txt").write_text(text + "\n\n" + "\n".join(result["targets"]) + "\n")
    if summary:
        plot(summary, out / "curve.png")
    return summary


# --- command line --------------------------------------------------------------------------

def add_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=list(REGIMES),
                   help="data regimes (default: all three)")
    p.add_argument("--orders", nargs="+", choices=list(ORDERS), default=list(ORDERS),
                   help="label orders (default: random, queue, active)")
    p.add_argument("--budgets", nargs="+", type=int, default=[16, 32, 64, 128],
                   help="label budgets at which every loss is trained and judged")
    p.add_argument("--active-budgets", nargs="+", type=int, default=None,
                   help="budgets for the active order (default: --budgets)")
    for regime, losses in REGIME_LOSSES.items():
        p.add_argument(f"--{regime}-losses", nargs="+", default=None, dest=f"losses_{regime}",
                       help=f"losses trained in the {regime} regime (default: {' '.join(losses)}); "
                            "the first one's adapter picks the active order's next labels")
    p.add_argument("--strength-margin", type=float, default=0.0, metavar="M",
                   help="the simulated annotators add the Label tab's strength to decided pairs "
                        "(clearly at or above the median score gap between a prompt's candidates, "
                        "slightly below) and the losses that take a margin train with "
                        "--strength-margin M (see `train --help`); 0: no strength, the default")
    p.add_argument("--merge", nargs="+", default=None, metavar="CURVE_JSON",
                   help="combine the rows of earlier runs' curve.json files into --out and stop")
    return effect.add_common_args(p, out="bench-results/curve", train_prompts=64, test_prompts=32)


def _check(args) -> dict:
    judges = effect.check_common_args(args)
    from rpo_app.loss_registry import LOSS_NAMES

    if args.strength_margin < 0:
        raise BenchError(f"--strength-margin must be >= 0, got {args.strength_margin}")
    if any(b < 1 for b in args.budgets + (args.active_budgets or [])):
        raise BenchError(f"--budgets must be >= 1, got {args.budgets + (args.active_budgets or [])}")
    args.regime_losses = {}
    for regime in REGIMES:
        losses = getattr(args, f"losses_{regime}")
        bad = [loss for loss in losses or () if loss not in LOSS_NAMES]
        if bad:
            raise BenchError(f"unknown loss {bad[0]!r}; choose from {', '.join(LOSS_NAMES)}")
        if losses:
            args.regime_losses[regime] = tuple(losses)
    return judges


def main_from_args(args: argparse.Namespace) -> int:
    from rpo_app.config import resolve_data_dir
    from rpo_app.judges import JudgeError

    out = Path(args.out)
    if args.merge:
        rows, bases = [], []
        for name in args.merge:
            try:
                data = json.loads(Path(name).read_text())
            except (OSError, ValueError) as err:
                print(f"error: cannot read {name}: {err}", file=sys.stderr)
                return effect.EXIT_USAGE
            if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
                print(f"error: {name} is not a bench-curve curve.json (no list of rows)", file=sys.stderr)
                return effect.EXIT_USAGE
            # each file's rows against its own base answers (other files may hold other test prompts)
            own = {b.get("seed"): b for b in data.get("base_per_seed", [])}
            rows += [effect.degeneration_now(r, own.get(r.get("seed"))) for r in data["rows"]]
            bases += [{**b, **degeneration.summarize(b["answers"])} if isinstance(b.get("answers"), list)
                      else b for b in data.get("base_per_seed", [])]
        out.mkdir(parents=True, exist_ok=True)
        summary = write_outputs(out, {"merged": args.merge}, rows, bases)
        print(format_table(summary))
        print("\n".join(targets(summary)))
        return 0
    try:
        judges = _check(args)
        prompt_rows = effect._read_prompts(Path(args.prompts))
    except (BenchError, JudgeError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return effect.EXIT_USAGE
    import torch

    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    args.source_data_dir = str(resolve_data_dir(args.source_data_dir))
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k != "func"}
    rows: list[dict] = []
    bases: list[dict] = []
    t0 = time.time()

    def emit(row: dict) -> None:
        rows.append(row)
        state = row.get("error") or f"win rate {row['win_rate']:.2f}, {row['mean_words']:.1f} words"
        log.info("seed %d %s %s %s %d labels (%d decided) %s: %s", row["seed"], row["judge"],
                 row["regime"], row["order"], row["budget"], row["decided"], row["loss"], state)
        write_outputs(out, {**config, "seconds": time.time() - t0}, rows, bases)

    try:
        for seed in range(args.seed_offset, args.seed_offset + args.seeds):
            bases.append(run_seed(args, seed, judges, prompt_rows, out, emit))
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return effect.EXIT_USAGE
    summary = write_outputs(out, {**config, "seconds": time.time() - t0}, rows, bases)
    print(format_table(summary))
    print("\n".join(targets(summary)))
    print(f"results in {out}/ (curve.json, curve.txt, curve.png)", file=sys.stderr)
    return 0
