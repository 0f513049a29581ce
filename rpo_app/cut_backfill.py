"""`python -m rpo_app mark-cut`: find the answers stored before the store recorded which
ones hit their token limit (`responses.cut_off`), and mark them.

Such a store counts every answer as ended, so training scores an end-of-turn token the
model never wrote after each cut one. The text alone cannot say whether an answer
ended (decoding drops the token), so two signs must agree:

- its text re-encodes to nearly its generation's `max_new_tokens` (an answer that
  ended used one token fewer than the limit at most; decoding, stripping and
  re-encoding move the count by up to 3 tokens, measured on answers whose flag is known);
- the model that wrote it gives an end-of-turn right after it a log-prob below
  UNLIKELY_END: it would hardly have stopped there. An ended answer was sampled with
  its end-of-turn, so that token was likely.

An answer that fits the first sign but not the second is left as ended: scoring its
ending costs little, since the model finds it likely.
"""
from __future__ import annotations

import sys
from typing import Callable

# Re-encoding a stored (decoded, stripped) answer gives up to this many tokens fewer
# than were generated.
NEAR_LIMIT = 3
# Nats. The bundled model: -0.6 to -2.6 after an answer that ended, about -22 after one
# cut in mid-sentence.
UNLIKELY_END = -8.0
# Long enough that no stored answer is truncated before its end-of-turn.
MAX_LENGTH = 4096


def unchecked_advice(n: int) -> str:
    """What a store with `n` answers from before the cut flag (Store.answers_unchecked_for_cut)
    tells its user: the Data tab and a training run's warning say it."""
    return (f"{_n(n, 'generated answer')} {'was' if n == 1 else 'were'} stored before the store "
            "recorded which answers hit their token limit, so a cut one trains with an ending "
            "the model never wrote; `python -m rpo_app mark-cut` finds and marks them")


def near_limit(tokenizer, text: str, max_new_tokens: int) -> bool:
    """Whether `text` re-encodes to nearly `max_new_tokens` tokens (see NEAR_LIMIT)."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= max_new_tokens - NEAR_LIMIT


def find_cut(rows: list[dict], host, batch_size: int = 8,
             progress: Callable[[int, int], None] | None = None) -> dict:
    """Which of `rows` (Store.generated_answers_marked_ended) were cut. Only rows written by
    `host`'s model are checked: another tokenizer counts other tokens. Returns the ids
    found cut, with counts and each checked answer's end-of-turn log-prob."""
    from rpo_app.batches import Item
    from rpo_app.conversation import frozen
    from rpo_app.scoring import end_of_turn_logps

    mine = [r for r in rows if r.get("model") == host.model_name]
    near = [r for r in mine
            if (r.get("gen_settings") or {}).get("max_new_tokens")
            and near_limit(host.tokenizer, r["text"], int(r["gen_settings"]["max_new_tokens"]))]
    logps: dict[int, float] = {}
    if progress:
        progress(0, len(near))
    for k in range(0, len(near), batch_size):
        part = near[k:k + batch_size]
        items = [Item(r["prompt"], r["text"], frozen(r.get("prompt_messages"))) for r in part]
        with host.lock:
            ends = end_of_turn_logps(host.base, host.tokenizer, host.pad_id, host.device,
                                     items, MAX_LENGTH, batch_size)
        logps.update({r["id"]: v for r, v in zip(part, ends)})
        if progress:
            progress(len(logps), len(near))
    cut = sorted(i for i, v in logps.items() if v < UNLIKELY_END)
    return {"checked": len(mine), "other_models": len(rows) - len(mine), "near_limit": len(near),
            "cut": cut, "end_logps": logps}


def cli_mark_cut(args) -> int:
    from tqdm import tqdm

    from rpo_app.config import DataLayout, resolve_data_dir
    from rpo_app.generate import ModelHost
    from rpo_app.models import ModelLoadError
    from rpo_app.store import Store, StoreError

    layout = DataLayout(resolve_data_dir(args.data_dir))
    store = Store(layout.root)
    rows = store.generated_answers_marked_ended()
    if not rows:
        print("nothing to check: no generated answer is marked as ended")
        return 0
    try:
        host = ModelHost(args.model, layout.root, device=args.device)
    except ModelLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with tqdm(total=0, unit="answer", desc="scoring the endings", file=sys.stderr) as bar:
        def progress(done: int, total: int) -> None:
            bar.total, bar.n = total, done
            bar.refresh()

        found = find_cut(rows, host, progress=progress)
    others = found["other_models"]
    skipped = (f"; {_n(others, 'answer')} written by another model {'was' if others == 1 else 'were'} "
               "skipped (run again with --model for them)" if others else "")
    n_cut = len(found["cut"])
    summary = (f"{_n(found['checked'], 'answer')} by {host.model_name} marked as ended, "
               f"{found['near_limit']} near their token limit")
    if args.dry_run:
        print(f"{summary}: {n_cut} {'was' if n_cut == 1 else 'were'} cut and would be marked (dry run: "
              f"nothing written){skipped}")
        return 0
    try:
        marked = store.mark_cut_off(found["cut"], unchecked_left=others)
    except StoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{summary}: marked {marked} as cut at their token limit{skipped}")
    return 0


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"
