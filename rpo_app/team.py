"""What a team sees about itself: agreement and bias per annotator, gold accuracy, the
leaderboard of the app's models, suspect labels, and the team's queue settings. The
Team and Data tabs and the `agreement`, `leaderboard`, `gold`, `suspects` and `team`
commands read the same functions."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from rpo_app.config import TeamSettings

BOOTSTRAP = 200  # leaderboard resamples: stable to a few rating points, fast enough to redraw


def agreement_report(store) -> dict:
    from rpo_app import agreement

    return agreement.report(store.judgments(), store.gold_ids())


def board(store, sources: list[str] | None = None, bootstrap: int = BOOTSTRAP):
    """The Bradley-Terry leaderboard from every pair judgment between two of the app's
    models (blind chat votes and Label-tab pairs whose answers two models wrote)."""
    from rpo_app import leaderboard

    return leaderboard.leaderboard(leaderboard.votes(store.judgments(), sources),
                                   bootstrap=bootstrap)


def suspect_labels(store, layout, run_id: str | None = None,
                   confidence: float | None = None) -> tuple[str | None, list[dict]]:
    """(the run, its suspect judgments joined with the store) for `run_id`, or for the
    newest run that checked its labels; (None, []) when no run has."""
    from rpo_app import suspects
    from rpo_app.runfolder import RunFolder

    runs = [store.run(run_id)] if run_id else store.runs()
    if run_id and runs[0] is None:
        raise ValueError(f"there is no run {run_id!r}")
    for run in runs:
        rows = RunFolder(layout.run_dir(run["id"]), writable=False).label_checks()
        if rows is not None:
            hits = suspects.suspects(rows, confidence or suspects.CONFIDENCE)
            active = {j["id"]: j for j in store.judgments()}
            return run["id"], suspects.with_judgments(hits, active)
        if run_id:
            raise ValueError(f"run {run_id} has no label check (it was stopped, failed, or "
                             "ran before rpo_app checked labels)")
    return None, []


def read_bench(path: str | Path):
    from rpo_app import leaderboard

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read bench-effect results {path}: {err}") from err
    if not isinstance(data, dict) or "summary" not in data:
        raise ValueError(f"{path} is not a bench-effect effect.json (no 'summary')")
    return leaderboard.bench_rows(data)


def parse_ids(text: str) -> list[int]:
    """Judgment ids typed as "12, 15 18" or "#12"."""
    ids = []
    for part in (text or "").replace(",", " ").split():
        part = part.lstrip("#")
        if not part.isdigit():
            raise ValueError(f"{part!r} is not a judgment id (a whole number)")
        ids.append(int(part))
    if not ids:
        raise ValueError("give one or more judgment ids")
    return ids


# --- commands ---------------------------------------------------------------------------

def _open(args):
    from rpo_app.io import _open_store

    return _open_store(args)


def cli_agreement(args) -> int:
    from rpo_app import agreement

    store = _open(args)
    try:
        rep = agreement_report(store)
    finally:
        store.close()
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        print(agreement.format_report(rep), end="")
    return 0


def cli_leaderboard(args) -> int:
    from rpo_app import leaderboard

    store = _open(args)
    try:
        table = board(store, args.source or None, args.bootstrap)
    finally:
        store.close()
    try:
        bench = read_bench(args.bench) if args.bench else None
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        out = {"leaderboard": table.to_dict("records")}
        if bench is not None:
            out["bench_effect"] = bench.to_dict("records")
        print(json.dumps(out, indent=1, default=float))
        return 0
    print(leaderboard.format_table(table))
    if bench is not None:
        print("\nSimulated judges (bench-effect; not part of the ratings above)")
        print(leaderboard.format_bench(bench))
    return 0


def cli_gold(args) -> int:
    from rpo_app.store import StoreError

    store = _open(args)
    try:
        if args.action == "list":
            ids = sorted(store.gold_ids())
            print(f"{len(ids)} gold judgments" + (f": {' '.join(map(str, ids))}" if ids else ""))
            return 0
        try:
            ids = parse_ids(" ".join(args.ids))
            if args.action == "mark":
                n = store.mark_gold(ids, by=args.by)
                print(f"marked {n} judgments as gold ({len(ids) - n} were already)")
            else:
                print(f"unmarked {store.unmark_gold(ids)} judgments")
        except (ValueError, StoreError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    finally:
        store.close()


def cli_team(args) -> int:
    store = _open(args)
    try:
        current = TeamSettings.load(store)
        changes = {k: v for k, v in (("overlap", args.overlap), ("gold_rate", args.gold_rate),
                                     ("recheck_rate", args.recheck_rate),
                                     ("rank_size", args.rank_size)) if v is not None}
        if changes:
            try:
                current = dataclasses.replace(current, **changes).save(store, by="cli")
            except ValueError as err:
                print(f"error: {err}; nothing was changed", file=sys.stderr)
                return 2
        print(f"overlap {current.overlap} (annotators per item) · gold rate {current.gold_rate:g}"
              f" · recheck rate {current.recheck_rate:g} · {current.rank_size} answers per ranking")
        return 0
    finally:
        store.close()


def cli_suspects(args) -> int:
    from rpo_app import suspects
    from rpo_app.config import DataLayout

    store = _open(args)
    try:
        try:
            run_id, rows = suspect_labels(store, DataLayout(store.path.parent), args.run,
                                          args.confidence)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if args.json:
            print(json.dumps({"run": run_id, "suspects": rows}, indent=1, ensure_ascii=False))
        elif run_id is None:
            print("no run has checked its labels yet: train once, then look again")
        elif not rows:
            print(f"{run_id}: no judgment is contradicted with {args.confidence:.0%} confidence or more")
        else:
            print(f"{run_id}: {len(rows)} judgments the tuned model is at least "
                  f"{args.confidence:.0%} sure are the wrong way round")
            print(suspects.table(rows).to_string(index=False))
        return 0
    finally:
        store.close()
