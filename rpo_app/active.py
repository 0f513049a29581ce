"""Scoring the unlabeled items with the newest adapter, for the label queue's "most
informative first" order (the math: rpo_app.informative).

After a run finishes, the app scores a pool of answers in the background: each answer's
log-prob under the base model (once per answer: cached in the store for good) and under
the new adapter (once per adapter), in length-sorted batches through the app's model
host. From those it ranks every pair of answers to one prompt, every cross-prompt pair
with a related prompt, and every single answer, and stores the ranks; the queue reads
them (LabelQueue, order "informative") and falls back to its usual order until they
exist. The pool is scored in chunks of whole prompts, both passes per chunk, and the
ranks are rewritten after each: the first chunk is small, so the order is usable a
minute or two after a run, long before the whole pool is scored.

`python -m rpo_app score` runs the same job from the command line.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import sys
import threading
import time
from dataclasses import dataclass
from itertools import combinations
from typing import Callable

from rpo_app.jobs import BackgroundJob
from rpo_app.progress import eta_seconds, eta_words, human

log = logging.getLogger(__name__)

# Answers scored per job: the pool of pool-based active learning. Scoring is one forward
# pass per answer and adapter; a pool keeps a large store's job to minutes, and the next
# run's job draws a fresh pool (answers already scored are not scored again).
POOL_ANSWERS = 1500
# Tokens per forward batch; length-sorted, so little of it is padding.
BATCH_TOKENS = 4096
# Answers per chunk (whole prompts; both passes, then the ranks are rewritten). The first
# chunk is small so the first ranks come soon; later ones double up to the largest, as
# each rewrite re-ranks everything scored so far.
FIRST_CHUNK = 32
LARGEST_CHUNK = 256
# Cross-prompt pairs: each answer against the answers of its few most related prompts.
CROSS_RELATED = 3
MAX_LENGTH = 512  # the trainer's default max_length: the same truncation as training
# An adapter on the top layers only (the default: the top half) leaves the layers below
# it as the base model's, so a job keeps each pool answer's hidden state where the
# adapter's lowest LoRA layer reads it, and the next adapter's pass starts there
# (frozen_prefix.FrozenPrefixScorer). A token's state is the model's hidden size in its
# dtype: 1.2 KB in bf16 on the bundled model, 0.4 GB for 1,500 answers of 230 tokens.
# Kept only within this share of the memory free when a job starts.
KEPT_STATES_SHARE = 0.25


def base_scorer(host, precision: str) -> str:
    """The cache key of the base model's log-probs on this host."""
    return f"base:{host.model_name}:{precision}:{MAX_LENGTH}"


def adapter_scorer(adapter: dict, precision: str) -> str:
    """The cache key of one adapter's log-probs: its run (which survives renames) or its
    name and registration time."""
    own = f"run:{adapter['run_id']}" if adapter.get("run_id") else \
        f"adapter:{adapter['name']}@{adapter.get('created_at', 0):.0f}"
    return f"{own}:{precision}:{MAX_LENGTH}"


def scoring_encoder(tokenizer):
    """How answers are tokenized for scoring: the trainer's truncation (MAX_LENGTH)."""
    from rpo_app.batches import Encoder
    from rpo_app.trainconfig import MAX_PROMPT_LENGTH_CAP

    return Encoder(tokenizer, MAX_LENGTH, min(MAX_PROMPT_LENGTH_CAP, MAX_LENGTH // 2))


def answer_sequence(encoder, prompt: str, messages, text: str, cut_off: bool):
    """The tokens (batches.Seq) the scorers score for one answer to a prompt (or to a
    conversation's next turn, `messages`)."""
    from rpo_app.batches import Item

    return encoder.encode(Item(prompt, text, _frozen(messages), cut_off), 0)


def written_precision(host) -> str | None:
    """The scorers' precision that the host's decoding steps match: its weights' dtype
    (bf16 weights compute as bf16 autocast does; None: neither)."""
    import torch

    return {torch.bfloat16: "bf16", torch.float32: "fp32"}.get(next(host.base.parameters()).dtype)


def keep_as_written(store, host, encoder, response_id: int, prompt: dict, answer,
                    states_layer: int | None = None) -> bool:
    """Keep what writing a base-model answer computed anyway (generate.Generated): its
    log-prob, stored as its base-model score, so the first scoring job after a run skips
    the base pass over the answers the app wrote; and its hidden states below the
    adapters (Generated.states, recorded at `states_layer`: written_states_layer, taken
    once per generation job), in the host's kept states, so that job's adapter pass
    starts from them. Only where the scorer would score exactly the tokens written (the
    same chat template, no system prompt, no truncation, text that decodes and encodes
    back to the same tokens, the end-of-turn token that ended it) and in the precision
    they were written in; True when the log-prob was stored.

    Not bit-identical to the scorer's pass: the decoding steps round differently. In bf16
    the kept log-probs sit 0.3 ± 0.6 nats above the scorer's per answer of up to 192
    tokens (higher: each token was drawn from the very logits that rounded it up), about
    as far as the scorer's own batch layouts differ from each other (± 0.6-0.8);
    `python -m rpo_app bench --only score` measures both. `encoder`: scoring_encoder's,
    made once per generation job."""
    from rpo_app.frozen_prefix import FrozenPrefixScorer

    written = written_precision(host)
    if answer.logp is None or written is None:
        return False
    seq = answer_sequence(encoder, prompt["text"], prompt.get("messages"), answer.text, answer.cut_off)
    if tuple(seq.input_ids) != tuple(answer.sequence):
        return False
    store.save_answer_logps(base_scorer(host, written), [(response_id, answer.logp, len(seq) - seq.prompt_len)])
    if answer.states is not None and states_layer is not None:
        key = (host.model_name, states_layer, written)
        states = host.kept_states.get(key)
        if states is None:
            states = host.kept_states.setdefault(
                key, FrozenPrefixScorer(states_layer, _states_budget_mb(host, 0.0)))
        states.keep(seq, answer.states)
    return True


def written_states_layer(host) -> int | None:
    """The decoder layer whose input the app keeps as it writes answers: the lowest the
    trainer's default adapts (the top half), which every adapter on that many layers or
    fewer can start from (kept_states_for). None: the host keeps no states, or the
    model's decoder cannot be run from a layer up."""
    from rpo_app.frozen_prefix import FrozenPrefixScorer, adapted_layers, decoder_layers
    from rpo_app.trainconfig import TrainConfig

    if host.kept_states is None:
        return None
    n = decoder_layers(host.base.config)
    layers = adapted_layers(n, TrainConfig().lora_layers)
    if not layers or not FrozenPrefixScorer.supports(host.base, n):
        return None
    return layers[0]


def _states_budget_mb(host, kept_mb: float) -> float:
    """What kept states may take: the `kept_mb` they hold and KEPT_STATES_SHARE of the
    memory free now."""
    from rpo_app.heap import free_memory_gb

    return kept_mb + KEPT_STATES_SHARE * free_memory_gb(host.device) * 1000


def newest_adapter(store) -> dict | None:
    adapters = store.adapters()
    return adapters[-1] if adapters else None


def needs_scoring(store) -> dict | None:
    """The newest adapter when the informative order is not (fully) scored with it."""
    adapter = newest_adapter(store)
    if adapter is None:
        return None
    meta = store.informative_meta() or {}
    if meta.get("adapter_key") == _adapter_key(adapter) and meta.get("complete"):
        return None
    return adapter


def _adapter_key(adapter: dict) -> str:
    return adapter.get("run_id") or f"{adapter['name']}@{adapter.get('created_at', 0):.0f}"


def adapter_beta(store, adapter: dict) -> float:
    """The beta the adapter was trained with (its margin's scale), else RPO's default."""
    from rpo_app.trainconfig import TrainConfig

    run = store.run(adapter["run_id"]) if adapter.get("run_id") else None
    beta = (run or {}).get("config", {}).get("beta")
    return float(beta) if beta else float(TrainConfig().beta)


@dataclass
class Progress:
    phase: str
    done: int  # tokens scored in this phase (both passes)
    total: int
    seconds: dict = dataclasses.field(default_factory=dict)  # per pass: base, adapter, ranking


def pick_pool(answers: list[dict], size: int, seed) -> list[dict]:
    """Up to `size` answers, whole prompts at a time (a pair needs both of its answers):
    the prompts with the fewest judgments first, in a seeded random order among equals."""
    by_prompt: dict[int, list[dict]] = {}
    for a in answers:
        by_prompt.setdefault(a["prompt_id"], []).append(a)
    prompts = sorted(by_prompt)
    random.Random(str(seed)).shuffle(prompts)
    prompts.sort(key=lambda p: sum(a.get("judged", 0) for a in by_prompt[p]))  # stable
    pool: list[dict] = []
    for pid in prompts:
        if pool and len(pool) + len(by_prompt[pid]) > size:
            break
        pool.extend(by_prompt[pid])
    return pool


def chunks(pool: list[dict], first: int | None = None, largest: int | None = None) -> list[list[int]]:
    """The pool's answer ids in chunks of whole prompts, in pool order: the first of at
    least `first` answers (FIRST_CHUNK), each next one twice the last, up to `largest`."""
    largest = largest or LARGEST_CHUNK
    out: list[list[int]] = []
    size, cur, cur_prompt = first or FIRST_CHUNK, [], None
    for a in pool:
        if cur and a["prompt_id"] != cur_prompt and len(cur) >= size:
            out.append(cur)
            cur, size = [], min(2 * size, largest)
        cur.append(a["id"])
        cur_prompt = a["prompt_id"]
    if cur:
        out.append(cur)
    return out


def _batches(order: list[int], lengths: dict[int, int]) -> list[list[int]]:
    out, cur, width = [], [], 0
    for i in order:
        width = max(width, lengths[i])
        if cur and width * (len(cur) + 1) > BATCH_TOKENS:
            out.append(cur)
            cur, width = [], lengths[i]
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def kept_states_for(kept: dict | None, host, adapter_name: str, precision: str, seqs: list):
    """The kept hidden states (frozen_prefix.FrozenPrefixScorer) this adapter's job can
    start from, out of `kept` (ModelHost.kept_states: across jobs, and from the answers
    as written): the highest layer at or below the adapter's lowest LoRA layer, on this
    model and precision; a new one at that layer if none. Everything else in `kept`, and
    every state outside this pool, is dropped. None: no `kept`, or an adapter on every
    layer."""
    from rpo_app.frozen_prefix import FrozenPrefixScorer

    if kept is None:
        return None
    first = host.adapter_first_layer(adapter_name)
    if first is None:
        return None
    usable = [k for k in list(kept) if k[0] == host.model_name and k[2] == precision and k[1] <= first]
    key = max(usable, key=lambda k: k[1]) if usable else (host.model_name, first, precision)
    states = kept.get(key) or FrozenPrefixScorer(key[1])
    kept.clear()
    kept[key] = states
    states.keep_only(seqs)
    states.budget_mb = _states_budget_mb(host, states.kept_mb())
    return states


def score_store(store, host, adapter: dict, index=None, pool_size: int = POOL_ANSWERS,
                precision: str = "auto", seed: int = 0,
                progress: Callable[[Progress], None] | None = None,
                should_stop: Callable[[], bool] = lambda: False, kept: dict | None = None) -> dict:
    """Score a pool of answers with the base model and `adapter` (loaded in `host` under
    its name), rank the items and make them the queue's informative order. Returns the
    order's description (also stored: Store.informative_meta).

    `kept`: hidden states kept from job to job and as answers were written
    (kept_states_for; the app's host holds one, ModelHost.kept_states); the adapter pass
    keeps them and starts from them."""
    from rpo_app import informative
    from rpo_app.models import pick_precision

    t0 = time.time()
    precision = pick_precision(str(host.device), precision)
    base_key, ad_key = base_scorer(host, precision), adapter_scorer(adapter, precision)
    beta = adapter_beta(store, adapter)
    pool = pick_pool(store.answers_to_score(), pool_size, f"{seed}:{ad_key}")
    encoder = scoring_encoder(host.tokenizer)
    seqs = {a["id"]: answer_sequence(encoder, a["prompt"], a.get("prompt_messages"), a["text"],
                                     bool(a.get("cut_off")))
            for a in pool}
    lengths = {i: len(s) for i, s in seqs.items()}
    texts = {a["id"]: a["text"] for a in pool}
    prompt_of = {a["id"]: a["prompt_id"] for a in pool}
    longest: dict[int, int] = {}
    for i, n in lengths.items():
        longest[prompt_of[i]] = max(longest.get(prompt_of[i], 0), n)
    meta = {"adapter": adapter["name"], "adapter_key": _adapter_key(adapter), "beta": beta,
            "pool": len(pool), "precision": precision, "started_at": t0}
    logps = {base_key: store.answer_logps(base_key), ad_key: store.answer_logps(ad_key)}

    def publish(complete: bool) -> dict:
        reward = {i: logps[ad_key][i] - logps[base_key][i] for i in seqs
                  if i in logps[ad_key] and i in logps[base_key]}
        rows = _rank(pool, reward, beta, texts, index, informative)
        # When the queue first had an order to serve: what a user waits for after a run.
        meta.setdefault("first_ranks_s", round(time.time() - t0, 1))
        info = {**meta, "answers": len(reward), "complete": complete,
                "items": {k: sum(r.kind == k for r in rows) for k in ("paired", "cross", "unpaired")},
                "seconds": round(time.time() - t0, 1), "updated_at": time.time(),
                "finished_at": time.time() if complete else None}
        store.replace_item_scores(ad_key, rows, info)
        return info

    states = kept_states_for(kept, host, adapter["name"], precision, list(seqs.values()))
    # The base pass keeps the states too: below the adapter's lowest layer both passes run
    # the base model, so the adapter pass then runs the adapted layers alone.
    passes = ((base_key, None, "base model pass", states), (ad_key, adapter["name"], "adapter pass", states))
    seconds = {"base model pass": 0.0, "adapter pass": 0.0, "ranking": 0.0}
    # Both passes' tokens, chunk after chunk in the same proportion, so the speed measured
    # so far holds for the rest and the ETA is honest across them.
    total = sum(lengths[i] for key, *_ in passes for i in seqs if i not in logps[key])
    done = from_kept = 0
    phase = f"adapter {adapter['name']}" if all(i in logps[base_key] for i in seqs) else \
        f"base model and adapter {adapter['name']}"
    if progress:
        progress(Progress(phase, 0, total, dict(seconds)))
    parts = chunks(pool)
    for n, chunk in enumerate(parts):
        for key, name, what, start in passes:
            # A prompt's answers side by side (the host runs each prompt once per batch),
            # prompts by their longest answer so a batch pads little.
            todo = sorted((i for i in chunk if i not in logps[key]),
                          key=lambda i: (-longest[prompt_of[i]], prompt_of[i], -lengths[i]))
            for batch in _batches(todo, lengths):
                if should_stop():
                    return {**meta, "stopped": True}
                t = time.perf_counter()
                if start is not None and name is not None:  # the adapter pass: how much skips layers
                    from_kept += sum(start.has([seqs[i]]) for i in batch)
                values = host.sequence_logps([seqs[i] for i in batch], adapter=name, precision=precision,
                                             states=start)
                rows = [(i, v, lengths[i] - seqs[i].prompt_len) for i, v in zip(batch, values)]
                store.save_answer_logps(key, rows)
                logps[key].update({i: v for i, v, _ in rows})
                seconds[what] += time.perf_counter() - t
                done += sum(lengths[i] for i in batch)
                if progress:
                    progress(Progress(phase, done, total, dict(seconds)))
        if n < len(parts) - 1:
            t = time.perf_counter()
            publish(complete=False)
            seconds["ranking"] += time.perf_counter() - t
    t = time.perf_counter()
    info = publish(complete=True)
    seconds["ranking"] += time.perf_counter() - t
    if progress:
        progress(Progress(phase, done, total, dict(seconds)))
    log.info("informative order: %d answers scored with %s in %.1f s; %s%s", info["answers"],
             adapter["name"], info["seconds"], info["items"],
             f"; the adapter pass started from kept hidden states for {from_kept}, "
             f"{states.kept_mb():.0f} MB of them kept for the next" if states else "")
    return info


def _frozen(messages):
    from rpo_app.conversation import frozen

    return frozen(messages)


def _rank(pool: list[dict], reward: dict[int, float], beta: float, texts: dict[int, str], index,
          informative) -> list:
    by_prompt: dict[int, list[int]] = {}
    for a in pool:
        by_prompt.setdefault(a["prompt_id"], []).append(a["id"])
    same = [pair for ids in by_prompt.values() for pair in combinations(ids, 2)]
    rows = informative.score_pairs("paired", same, reward, beta, texts)
    if index is not None:
        cross = set()
        for pid, ids in by_prompt.items():
            for other, _sim in index.related(pid, k=CROSS_RELATED):
                for a in ids:
                    for b in by_prompt.get(other, ()):
                        cross.add(tuple(sorted((a, b))))
        rows += informative.score_pairs("cross", sorted(cross), reward, beta, texts)
    rows += informative.score_answers([a["id"] for a in pool], reward, beta)
    return rows


# -- the background job -------------------------------------------------------------------

@dataclass
class ScoreJobStatus:
    state: str = "idle"  # idle | running | finished | failed | stopped
    adapter: str | None = None
    phase: str = ""
    done: int = 0
    total: int = 0
    phase_started_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    answers: int = 0
    items: dict = dataclasses.field(default_factory=dict)
    error: str | None = None

    @property
    def running(self) -> bool:
        return self.state == "running"

    def eta_s(self) -> float | None:
        if not self.running or self.phase_started_at is None:
            return None
        return eta_seconds(time.time() - self.phase_started_at, self.done, self.total)

    def line(self) -> str:
        if self.state == "idle":
            return ""
        if self.state == "failed":
            return f"⚠ Scoring for the informative order failed: {self.error}"
        if self.state == "stopped":
            return "Scoring for the informative order stopped."
        if self.state == "finished":
            took = (self.finished_at or 0) - (self.started_at or 0)
            return (f"✔ Informative order ready: {self.answers} answers scored with adapter "
                    f"{self.adapter} in {human(took)}.")
        eta = self.eta_s()
        pct = f"{100 * self.done / self.total:.0f}%" if self.total else "starting"
        when = (eta_words(eta) if eta is not None else
                "ranking the items" if self.total and self.done >= self.total else
                "measuring the speed")
        return (f"Scoring answers for the informative order ({self.phase}): {pct} of "
                f"{self.total:,} tokens · {when}")


class ScoringJobs(BackgroundJob):
    """One scoring job at a time in a thread; a newer adapter stops the older job."""

    what = "scoring for the informative order"

    def __init__(self, store, host: Callable[[], object], index: Callable[[], object] | None = None,
                 before: Callable[[], None] | None = None):
        super().__init__(ScoreJobStatus())
        self.store = store
        self._host = host
        self._index = index
        self._before = before or (lambda: None)  # e.g. load the new adapter into the host
        self._stop = threading.Event()

    def start_if_needed(self) -> bool:
        """Start scoring for the newest adapter unless its order is complete or being made."""
        adapter = needs_scoring(self.store)
        with self._lock:
            if adapter is None or (self._status.running and self._status.adapter == adapter["name"]):
                return False
        self.start(adapter)
        return True

    def start(self, adapter: dict) -> None:
        old = self._thread
        if old is not None and old.is_alive():
            self._stop.set()
            old.join()
        self._stop = stop = threading.Event()
        with self._lock:
            self._status = ScoreJobStatus(state="running", adapter=adapter["name"], started_at=time.time())

        def report(p: Progress) -> None:
            with self._lock:
                if p.phase != self._status.phase:
                    self._status.phase, self._status.phase_started_at = p.phase, time.time()
                self._status.done, self._status.total = p.done, p.total

        def work() -> None:
            self._before()
            host = self._host()
            # the host's kept states: from job to job, and from its answers as written
            info = score_store(self.store, host, adapter,
                               index=self._index() if self._index else None, progress=report,
                               should_stop=stop.is_set, kept=host.kept_states)
            self._set(state="stopped" if info.get("stopped") else "finished",
                      answers=info.get("answers", 0), items=info.get("items", {}))

        self._launch("score-informative", work)

    def stop(self) -> None:
        self._stop.set()


# -- the command line ---------------------------------------------------------------------

def terminal_progress() -> Callable[[Progress], None]:
    """A scoring job's progress as a tqdm bar per phase, on stderr (the CLI, the benchmark)."""
    from tqdm.auto import tqdm

    bars: dict[str, tqdm] = {}

    def progress(p: Progress) -> None:
        bar = bars.get(p.phase)
        if bar is None:
            bar = bars[p.phase] = tqdm(total=p.total, desc=p.phase, unit="tok", dynamic_ncols=True)
        bar.n = p.done
        bar.refresh()
        if p.done >= p.total:
            bar.close()

    return progress


def cli_score(args) -> int:
    """`python -m rpo_app score`: what the app does after a run, with a progress bar."""
    import json

    from rpo_app.config import DataLayout, resolve_data_dir
    from rpo_app.embed import Embedder, PromptIndex
    from rpo_app.generate import ModelHost
    from rpo_app.store import Store

    layout = DataLayout(resolve_data_dir(args.data_dir))
    store = Store(layout.db)
    try:
        adapters = {a["name"]: a for a in store.adapters()}
        if args.adapter is not None and args.adapter not in adapters:
            print(f"error: no adapter named {args.adapter!r} (have: {', '.join(adapters) or 'none'})",
                  file=sys.stderr)
            return 2
        adapter = adapters[args.adapter] if args.adapter else newest_adapter(store)
        if adapter is None:
            print("error: no adapter yet: train once, then score", file=sys.stderr)
            return 2
        if args.pool < 2:
            print(f"error: --pool must be at least 2 answers, got {args.pool}", file=sys.stderr)
            return 2
        host = ModelHost(args.model, data_dir=layout.root, device=args.device)
        host.load_adapter(adapter["name"], adapter["path"])
        index = PromptIndex(store, Embedder())
        index.refresh()
        info = score_store(store, host, adapter, index=index, pool_size=args.pool,
                           progress=terminal_progress())
        if args.json:
            print(json.dumps(info, indent=1))
        else:
            print(f"informative order: {info['answers']} answers scored with adapter {adapter['name']} "
                  f"in {info['seconds']:.1f} s; items: " +
                  ", ".join(f"{n} {k}" for k, n in info["items"].items()))
        return 0
    finally:
        store.close()
