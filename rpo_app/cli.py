"""`python -m rpo_app <command>`: serve | import | export | stats | generate | train | merge | agreement | leaderboard | gold | team | bench | bench-effect.

Heavy libraries (torch, transformers, gradio) are imported inside the command that
needs them, so `--help` and `stats` answer at once.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def _data_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="data folder (default: $RPO_APP_DATA_DIR, else ./data)")


def _serve_args(p):
    _data_dir_arg(p)
    p.add_argument("--model", default=None,
                   help="Hugging Face id or local folder (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--auth", action="append", default=[],
                   help="user:password, or a file with one user:password per line (repeatable)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a model's own Python code to run (off by default)")


def _import_args(p):
    _data_dir_arg(p)
    p.add_argument("files", nargs="+", help="JSONL, JSON, CSV or Parquet files")
    p.add_argument("--annotator", default="import",
                   help="annotator name recorded on imported judgments (default: import)")
    p.add_argument("--gold", action="store_true",
                   help="mark the imported judgments as gold items: known answers the label "
                        "queue mixes in to measure each annotator's accuracy (not for "
                        "ranking files)")
    p.add_argument("--multi-turn", choices=["keep", "last", "refuse"], default="keep",
                   help="prompts that are conversations (a system message or earlier "
                        "turns): keep the whole conversation (default), keep only the last "
                        "user turn, or refuse them")


def _export_args(p):
    _data_dir_arg(p)
    p.add_argument("--format", required=True, choices=["trl-dpo", "trl-kto", "rankings", "full"],
                   help="trl-dpo: prompt/chosen/rejected; trl-kto: prompt/completion/label; "
                        "rankings: prompt/answers/ranks, one row per ranking (the import "
                        "shape); full: every judgment with provenance")
    p.add_argument("--out", required=True, help="output file; .jsonl, .json, .csv or .parquet")
    p.add_argument("--include-retracted", action="store_true",
                   help="full format only: also list undone judgments")
    p.add_argument("--cut", choices=["keep", "drop"], default="keep",
                   help="TRL formats: keep (default, counted in the summary) or drop the rows that "
                        "hold an answer cut at its token limit; TRL would train an end-of-turn "
                        "after it that the model never wrote")


def _stats_args(p):
    _data_dir_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _generate_args(p):
    _data_dir_arg(p)
    p.add_argument("--n", type=int, default=2, help="answers per prompt (default 2)")
    p.add_argument("--adapter", default=None, help="generate with this trained adapter")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompts", default=None, help="file of prompts to answer (import formats)")
    src.add_argument("--all-unanswered", action="store_true",
                     help="every prompt with fewer than --n answers (the default)")
    p.add_argument("--limit", type=int, default=None, help="at most this many prompts")
    p.add_argument("--model", default=None)
    p.add_argument("--device", default=None)
    from rpo_app.generate import GenSettings  # light: no torch

    d = GenSettings()
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help=f"0 = greedy (default {d.temperature})")
    p.add_argument("--top-p", type=float, default=d.top_p, help=f"default {d.top_p}")
    p.add_argument("--min-p", type=float, default=d.min_p,
                   help="drop tokens under this share of the likeliest one's probability "
                        f"(0 = off; default {d.min_p})")
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                   help=f"penalise tokens the answer already used (1 = off; default "
                        f"{d.repetition_penalty})")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32,
                   help="sequences per forward pass (default 32)")


def _merge_args(p):
    _data_dir_arg(p)
    p.add_argument("--adapter", required=True, help="adapter folder (PEFT format) or adapter name")
    p.add_argument("--out", required=True, help="folder for the merged model")
    p.add_argument("--model", default=None, help="base model (default: the adapter's own)")


def _bench_args(p):
    _data_dir_arg(p)
    p.add_argument("--out", default="bench-results", help="folder for the JSON results")
    p.add_argument("--only", choices=["search", "queue", "generate", "sampling", "first-run", "train", "memory",
                                      "score", "load"], default=None)
    p.add_argument("--quick", action="store_true", help="fewer steps, for a smoke run")


def _agreement_args(p):
    _data_dir_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")


def _leaderboard_args(p):
    _data_dir_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--source", action="append", default=[],
                   help="only judgments from this source, e.g. blind-chat (repeatable; "
                        "default: every pair between two of the app's models)")
    p.add_argument("--bootstrap", type=int, default=200,
                   help="resamples for the 95%% intervals (default 200; 0: none)")
    p.add_argument("--bench", default=None,
                   help="a bench-effect effect.json: its simulated-judge win rates are shown "
                        "as a separate, labelled table")


def _suspects_args(p):
    from rpo_app.suspects import CONFIDENCE

    _data_dir_arg(p)
    p.add_argument("--run", default=None, help="a run id (default: the newest run that checked "
                                               "its labels)")
    p.add_argument("--confidence", type=float, default=CONFIDENCE,
                   help=f"list judgments the model is at least this sure are wrong "
                        f"(default {CONFIDENCE})")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _score_args(p):
    from rpo_app.active import POOL_ANSWERS

    _data_dir_arg(p)
    p.add_argument("--adapter", default=None, help="adapter name (default: the newest)")
    p.add_argument("--pool", type=int, default=POOL_ANSWERS,
                   help=f"answers to score, whole prompts, fewest judgments first (default {POOL_ANSWERS})")
    p.add_argument("--model", default=None, help="base model (default: the bundled one)")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true", help="print the order's description as JSON")


def _gold_args(p):
    _data_dir_arg(p)
    p.add_argument("action", choices=["mark", "unmark", "list"])
    p.add_argument("ids", nargs="*", help="judgment ids")
    p.add_argument("--by", default="cli", help="who marks them (default: cli)")


def _team_args(p):
    _data_dir_arg(p)
    p.add_argument("--overlap", type=int, default=None, help="annotators who judge each item")
    p.add_argument("--gold-rate", type=float, default=None,
                   help="share of items that are gold checks (0 to 0.5)")
    p.add_argument("--recheck-rate", type=float, default=None,
                   help="share of items re-shown to their judge with sides swapped (0 to 0.5)")
    p.add_argument("--rank-size", type=int, default=None,
                   help="answers per ranking item in the Label tab's ranking mode (3 to 6)")


def _bench_effect_args(p):
    from rpo_app.bench.effect import add_args

    add_args(p)


def _bench_curve_args(p):
    from rpo_app.bench.curve import add_args

    add_args(p)


def _train_args(p):
    from rpo_app.trainconfig import add_train_args

    add_train_args(p)


def _mark_cut_args(p):
    _data_dir_arg(p)
    p.add_argument("--model", default=None,
                   help="the model that wrote the answers (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None)
    p.add_argument("--dry-run", action="store_true", help="say what would be marked; write nothing")


COMMANDS = {
    "serve": ("start the web app", _serve_args, "rpo_app.ui.app:main_from_args"),
    "import": ("import prompts, preference pairs, thumbs or rankings from files", _import_args,
               "rpo_app.io:cli_import"),
    "export": ("export judgments for TRL or with full provenance", _export_args,
               "rpo_app.io:cli_export"),
    "stats": ("count prompts, responses, judgments and annotators", _stats_args,
              "rpo_app.io:cli_stats"),
    "generate": ("generate candidate answers to judge", _generate_args,
                 "rpo_app.generate:cli_generate"),
    "train": ("fine-tune with LoRA + RPO (or DPO, IPO, KTO)", _train_args,
              "rpo_app.train:main_from_args"),
    "merge": ("merge an adapter into the base model (plain safetensors folder)", _merge_args,
              "rpo_app.adapters:cli_merge"),
    "agreement": ("agreement between annotators, bias per annotator, gold accuracy",
                  _agreement_args, "rpo_app.team:cli_agreement"),
    "leaderboard": ("Bradley-Terry leaderboard of the base model and the adapters",
                    _leaderboard_args, "rpo_app.team:cli_leaderboard"),
    "gold": ("mark judgments as gold items (known answers), unmark, list", _gold_args,
             "rpo_app.team:cli_gold"),
    "team": ("show or set the label queue's team settings", _team_args,
             "rpo_app.team:cli_team"),
    "suspects": ("judgments the newest tuned model contradicts with high confidence",
                 _suspects_args, "rpo_app.team:cli_suspects"),
    "mark-cut": ("mark answers stored before cut flags existed that hit their token limit",
                 _mark_cut_args, "rpo_app.cut_backfill:cli_mark_cut"),
    "score": ("score the unlabeled items with an adapter: the label queue's informative order",
              _score_args, "rpo_app.active:cli_score"),
    "bench": ("speed benchmarks: training vs TRL, batched vs one-by-one generation",
              _bench_args, "rpo_app.bench:cli_bench"),
    "bench-effect": ("effect benchmark: simulated annotators, fine-tune, judge tuned vs base",
                     _bench_effect_args, "rpo_app.bench.effect:main_from_args"),
    "bench-curve": ("learning curves: win rate against labels for each label order, loss and "
                    "data regime, simulated annotators labeling what the queue shows",
                    _bench_curve_args, "rpo_app.bench.curve:main_from_args"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Only the chosen command's arguments are built: `train`'s import torch."""
    parser = argparse.ArgumentParser(prog="python -m rpo_app", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command")
    for name, (help_text, add_args, _target) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            add_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "-v", "--verbose"):
        argv = ["serve", *argv]  # `python app.py --port 8000` means serve
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    if args.command is None:
        args = build_parser("serve").parse_args(["serve", *argv])
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module_name, func_name = COMMANDS[args.command][2].split(":")
    import importlib

    func = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
