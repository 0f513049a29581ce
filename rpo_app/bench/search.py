"""Related-prompt search and the label queue at scale: load time and per-call latency
of PromptIndex.related and LabelQueue.next_item / submit in a store of 100k prompts.

The store is filled with synthetic prompts and *random* unit vectors written straight
through ``store.save_embeddings``: embedding 100k texts with MiniLM would take the
better part of an hour on 2 CPU cores and measures the embedder, not the search. The
search cost (one 100k x 384 matvec + a partial sort) does not depend on what the
vectors mean.

    python -m rpo_app.bench.search [--n 100000] [--queries 200] [--judgments 200000]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from rpo_app.embed import EMBEDDER_NAME, PromptIndex
from rpo_app.store import Store

DIM = 384


class _VectorsOnly:
    """Stands in for Embedder: every prompt already has a vector, so refresh() only
    loads from the store and never encodes."""

    name = EMBEDDER_NAME
    dim = DIM

    def encode(self, texts, **_):  # pragma: no cover - not reached in the benchmark
        raise RuntimeError("the search benchmark embeds nothing")


def _synthetic_prompts(store, n_prompts: int, rng) -> list[int]:
    """n prompts in 1000 families, each with a random unit vector as its embedding."""
    ids, _ = store.add_prompts(
        [{"prompt": f"synthetic prompt {i}", "family": f"family/{i % 1000}"}
         for i in range(n_prompts)], "bench")
    for start in range(0, n_prompts, 10_000):
        chunk = ids[start:start + 10_000]
        vecs = rng.standard_normal((len(chunk), DIM)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        store.save_embeddings(EMBEDDER_NAME, chunk, vecs)
    return ids


def bench_related_search(n_prompts: int = 100_000, queries: int = 200, k: int = 5,
                         seed: int = 0, data_dir: str | Path | None = None) -> dict:
    """Fill a temp store with n prompts and vectors, then time PromptIndex load and related()."""
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="rpo-bench-search-", dir=data_dir) as tmp:
        store = Store(Path(tmp))
        t0 = time.perf_counter()
        ids = _synthetic_prompts(store, n_prompts, rng)
        fill_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        index = PromptIndex(store, _VectorsOnly())
        embedded = index.refresh()
        load_s = time.perf_counter() - t0
        assert embedded == 0 and len(index) == n_prompts

        picks = rng.choice(np.asarray(ids), size=queries, replace=queries > len(ids))
        index.related(int(picks[0]), k=k)  # warm-up
        times_ms = []
        for pid in picks:
            t = time.perf_counter()
            hits = index.related(int(pid), k=k)
            times_ms.append((time.perf_counter() - t) * 1000)
            assert len(hits) == min(k, n_prompts - 1)
        store.close()
    times = np.asarray(times_ms)
    return {
        "n_prompts": n_prompts, "queries": queries, "k": k, "dim": DIM,
        "fill_s": round(fill_s, 3), "load_s": round(load_s, 3),
        "p50_ms": round(float(np.percentile(times, 50)), 3),
        "p95_ms": round(float(np.percentile(times, 95)), 3),
        "mean_ms": round(float(times.mean()), 3),
        "max_ms": round(float(times.max()), 3),
    }


def _fill_judged_store(store, n_prompts: int, n_judgments: int, rng) -> list[int]:
    """n prompts with 3 answers each (3 pairs per prompt) and n_judgments judgments by
    other annotators, spread so that most prompts are partly or fully judged: the queue
    has to look past them."""
    ids = _synthetic_prompts(store, n_prompts, rng)
    answers: dict[int, list[int]] = {}
    for start in range(0, n_prompts, 10_000):
        with store.transaction():
            for pid in ids[start:start + 10_000]:
                answers[pid] = [store.add_response(pid, f"answer {k} to {pid}", "bench")[0]
                                for k in range(3)]
    pairs = [(a, b) for pid in ids for a, b in ((answers[pid][0], answers[pid][1]),
                                                (answers[pid][0], answers[pid][2]),
                                                (answers[pid][1], answers[pid][2]))]
    paired = min(len(pairs), n_judgments * 3 // 4)
    chosen = rng.choice(len(pairs), size=paired, replace=False)
    thumbs = rng.choice(np.asarray([r for rs in answers.values() for r in rs]),
                        size=n_judgments - paired, replace=False)
    done = 0
    for start in range(0, len(chosen), 20_000):
        with store.transaction():
            for j in chosen[start:start + 20_000]:
                a, b = pairs[int(j)]
                store.add_judgment("paired", a, b, "a", f"other-{done % 7}")
                done += 1
    for start in range(0, len(thumbs), 20_000):
        with store.transaction():
            for r in thumbs[start:start + 20_000]:
                store.add_judgment("unpaired", int(r), None, "up", f"other-{done % 7}")
                done += 1
    return ids


def bench_label_queue(n_prompts: int = 100_000, n_judgments: int = 200_000, items: int = 100,
                      seed: int = 0, data_dir: str | Path | None = None) -> dict:
    """Time next_item (each mode) and submit for a new annotator in a big, busy store."""
    from rpo_app.labelqueue import LabelQueue

    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="rpo-bench-queue-", dir=data_dir) as tmp:
        store = Store(Path(tmp))
        t0 = time.perf_counter()
        _fill_judged_store(store, n_prompts, n_judgments, rng)
        fill_s = time.perf_counter() - t0
        index = PromptIndex(store, _VectorsOnly())
        index.refresh()
        queue = LabelQueue(store, index, seed=seed)
        out: dict = {"n_prompts": n_prompts, "n_judgments": store.count_judgments(),
                     "n_responses": store.count_responses(), "fill_s": round(fill_s, 1)}
        out.update(_time_queue(queue, "bench-annotator", items))
        # A team: two annotators per item, 1,000 gold judgments mixed in at 10%, 5% of
        # items re-shown; the items others started are the first choice now.
        from rpo_app.config import TeamSettings

        TeamSettings(overlap=2, gold_rate=0.1, recheck_rate=0.05).save(store)
        ids = [j["id"] for j in store.judgments(limit=20_000)]
        n_gold = min(1000, len(ids) // 2)  # a small store (the test) gets half its judgments
        store.mark_gold(rng.choice(ids, size=n_gold, replace=False).tolist(), by="bench")
        out["team"] = _time_queue(queue, "bench-annotator-2", items)
        out["integrity"] = store.integrity_check()
        store.close()
    return out


def _time_queue(queue, annotator: str, items: int) -> dict:
    """next_item and submit times per mode, and how many items were checks."""
    out: dict = {}
    checks = 0
    for mode, verdict in (("paired", "left"), ("cross", "right"), ("unpaired", "up"),
                          ("ranking", None)):
        next_ms, submit_ms = [], []
        for _ in range(items):
            t = time.perf_counter()
            item = queue.next_item(annotator, mode)
            next_ms.append((time.perf_counter() - t) * 1000)
            assert item is not None, f"the {mode} queue ran dry"
            checks += item.source != "label"
            t = time.perf_counter()
            if mode == "ranking":  # best first in shown order, the last two tied
                labels = "ABCDEF"[:len(item.answers)]
                queue.submit_ranking(item.token, " > ".join(labels[:-2]) + f" > {labels[-2]}="
                                     f"{labels[-1]}", annotator)
            else:
                queue.submit(item.token, verdict, annotator)
            submit_ms.append((time.perf_counter() - t) * 1000)
        for name, times in (("next_item", next_ms), ("submit", submit_ms)):
            arr = np.asarray(times)
            out[f"{mode}_{name}"] = {"p50_ms": round(float(np.percentile(arr, 50)), 2),
                                     "p95_ms": round(float(np.percentile(arr, 95)), 2),
                                     "max_ms": round(float(arr.max()), 2)}
    out["check_items"] = checks
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--judgments", type=int, default=200_000)
    args = p.parse_args(argv)
    print(json.dumps(bench_related_search(args.n, args.queries), indent=2))
    print(json.dumps(bench_label_queue(args.n, args.judgments), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
