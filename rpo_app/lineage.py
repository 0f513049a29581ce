"""Which judgments a run trains on, and the record of it (a run folder's lineage.json).

One home for the selection, so the Train tab's check, the trainer and "train again
without..." leave out the same judgments: the kinds and annotators asked for, minus
excluded annotators and judgment ids, minus annotators below the gold-accuracy bar.
The record lists every judgment id (trained on or held out), counts by kind and
annotator, what was left out and why, and the store's state at the time. The store
indexes it when the run's adapter is registered, so a judgment knows its adapters.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from rpo_app.batches import filter_judgments
from rpo_app.runfolder import LINEAGE_FILE, RunFolder, atomic_write_text, read_json

# Gold answers an annotator needs before min_gold_accuracy can leave them out.
MIN_GOLD_ITEMS = 5


def select(cfg, rows: list[dict], all_rows: list[dict] | None = None,
           gold_ids: set[int] | frozenset = frozenset()) -> tuple[list[dict], dict]:
    """(the judgments cfg trains on, what was left out and why).

    rows: training judgments (Store.training_judgments or a --judgments file);
    all_rows: every active judgment with checks (Store.judgments), for gold accuracy."""
    kept = filter_judgments(rows, cfg.kinds, cfg.annotators)
    left_out: dict = {}
    low: dict[str, dict] = {}
    if cfg.min_gold_accuracy is not None and all_rows is not None and gold_ids:
        from rpo_app.agreement import low_accuracy_annotators

        low = low_accuracy_annotators(all_rows, set(gold_ids), cfg.min_gold_accuracy,
                                      MIN_GOLD_ITEMS)
    dropped = set(cfg.exclude_annotators or ()) | set(low)
    if dropped:
        n = Counter(j.get("annotator") for j in kept if j.get("annotator") in dropped)
        kept = [j for j in kept if j.get("annotator") not in dropped]
        left_out["annotators"] = {
            name: {"judgments": n.get(name, 0),
                   "why": ("below the gold-accuracy bar" if name in low else "excluded"),
                   **({"gold": low[name]} if name in low else {})}
            for name in sorted(dropped)}
    if cfg.exclude_judgments:
        ids = set(cfg.exclude_judgments)
        before = len(kept)
        kept = [j for j in kept if j.get("judgment_id") not in ids]
        left_out["judgments"] = {"ids": sorted(ids), "removed": before - len(kept)}
    return kept, left_out


def from_store(cfg, store) -> tuple[list[dict], dict]:
    rows = store.training_judgments(kinds=cfg.kinds, annotators=cfg.annotators)
    all_rows = store.judgments() if cfg.min_gold_accuracy is not None else None
    return select(cfg, rows, all_rows, store.gold_ids() if all_rows is not None else frozenset())


def record(train_j: list[dict], eval_j: list[dict], left_out: dict,
           store_state: dict | None, source: str) -> dict:
    def counts(rows, key):
        return dict(Counter(str(j.get(key)) for j in rows).most_common())

    both = train_j + eval_j
    return {
        "source": source,
        "created_at": time.time(),
        "train_ids": [j.get("judgment_id") for j in train_j],
        "held_out_ids": [j.get("judgment_id") for j in eval_j],
        "counts": {"train": len(train_j), "held_out": len(eval_j),
                   "by_kind": counts(both, "kind"), "by_annotator": counts(both, "annotator")},
        "left_out": left_out,
        "store": store_state,
    }


def write(run: RunFolder, rec: dict) -> None:
    atomic_write_text(run.lineage, json.dumps(rec, ensure_ascii=False, indent=1))


def read(run_root: str | Path) -> dict | None:
    return read_json(RunFolder(run_root, writable=False).lineage)


def read_adapter(adapter_dir: str | Path) -> dict | None:
    """The copy an adapter folder carries (adapters.register_from_run puts it there)."""
    return read_json(Path(adapter_dir) / LINEAGE_FILE)


def index(store, run_id: str, run_root: str | Path) -> int:
    """Put a run's lineage in the store's index (once); returns rows written."""
    rec = read(run_root)
    if rec is None or store.has_lineage(run_id):
        return 0
    ids = [i for i in rec.get("train_ids", []) if isinstance(i, int)]
    held = [i for i in rec.get("held_out_ids", []) if isinstance(i, int)]
    return store.record_lineage(run_id, ids, held)


def describe(rec: dict | None) -> str:
    """A few lines of Markdown for the adapter view."""
    if not rec:
        return "No lineage recorded for this adapter (trained before lineage was kept, or imported)."
    c = rec.get("counts", {})
    lines = [f"Trained on **{c.get('train', 0)} judgments**, {c.get('held_out', 0)} held out "
             f"(from {rec.get('source')})."]
    for what, key in (("Trained on", "train_ids"), ("Held out", "held_out_ids")):
        if rec.get(key):
            lines.append(f"{what}: #{id_ranges(rec[key])}.")
    if c.get("by_kind"):
        lines.append("By kind: " + ", ".join(f"{k} {v}" for k, v in c["by_kind"].items()) + ".")
    if c.get("by_annotator"):
        lines.append("By annotator: " + ", ".join(f"{k} {v}" for k, v in c["by_annotator"].items()) + ".")
    out = rec.get("left_out") or {}
    for name, info in (out.get("annotators") or {}).items():
        lines.append(f"Left out **{name}** ({info['judgments']} judgments, {info['why']}).")
    if out.get("judgments"):
        lines.append(f"Left out {out['judgments']['removed']} listed judgments "
                     f"(#{id_ranges(out['judgments']['ids'])}).")
    st = rec.get("store")
    if st:
        lines.append(f"The store then held {st.get('active_judgments')} active judgments "
                     f"(newest id {st.get('max_judgment_id')}).")
    return "  \n".join(lines)


def id_ranges(ids) -> str:
    """[1, 2, 3, 7, 9, 10] -> "1-3, 7, 9-10": a run's ids stay readable in one line."""
    nums = sorted({i for i in ids if isinstance(i, int)})
    parts, start = [], None
    for i, n in enumerate(nums):
        if start is None:
            start = n
        if i + 1 == len(nums) or nums[i + 1] != n + 1:
            parts.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(parts)
