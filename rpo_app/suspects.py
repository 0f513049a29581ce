"""Suspect labels: judgments the tuned model contradicts with high confidence.

At the end of a run the trainer scores every decided pair it saw, training and held
out, with the final adapter and the reference model: the implicit reward margin
m = beta * ((policy - ref)[chosen] - (policy - ref)[rejected]) is the model's log-odds
that the chosen answer is better (DPO's Bradley-Terry reading). sigmoid(-m) is how sure
it is of the opposite. A judgment is a suspect when that is at least CONFIDENCE: the
model learned from everything else that the other answer wins, and a person should look
again (a slip of the key, a side mix-up, or a real disagreement worth keeping).

Held-out suspects are the stronger sign: the model never trained on them. A training
suspect is one the model could not fit while fitting everything else.

Pure functions here; the trainer writes the rows (RunFolder.label_checks) and the CLI
and the Data tab read them.
"""
from __future__ import annotations

import math

CONFIDENCE = 0.9  # the model's probability that the other answer is better


def check_rows(pairs: list[tuple[int | None, int, int, str]], policy, ref, beta: float) -> list[dict]:
    """One row per decided pair: (judgment id, chosen seq, rejected seq, split) with the
    sequences' policy and reference log-probs (indexable by seq) -> {judgment_id, split,
    margin, other_prob}."""
    out = []
    for jid, c, r, split in pairs:
        if jid is None:
            continue
        margin = beta * ((float(policy[c]) - float(ref[c])) - (float(policy[r]) - float(ref[r])))
        out.append({"judgment_id": int(jid), "split": split, "margin": round(margin, 4),
                    "other_prob": round(_sigmoid(-margin), 4)})
    return out


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def suspects(rows: list[dict], confidence: float = CONFIDENCE) -> list[dict]:
    """The rows the model contradicts with at least `confidence`, surest first; held-out
    before training at equal confidence."""
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence is a probability from 0.5 to below 1, got {confidence}")
    hits = [r for r in rows if r["other_prob"] >= confidence]
    return sorted(hits, key=lambda r: (-r["other_prob"], r["split"] != "held_out", r["judgment_id"]))


def with_judgments(rows: list[dict], judgments: dict[int, dict]) -> list[dict]:
    """Suspect rows joined with the store's judgments (by id), for display: who made it,
    the prompt, the answer they chose and the one the model prefers. Rows whose judgment
    is no longer active (retracted since) are dropped."""
    out = []
    for r in rows:
        j = judgments.get(r["judgment_id"])
        if j is None:
            continue
        chosen, other = ("a", "b") if j["verdict"] == "a" else ("b", "a")
        out.append({**r, "annotator": j["annotator"], "kind": j["kind"],
                    "prompt": j["prompt_a"], "chosen": j[f"response_{chosen}_text"],
                    "model_prefers": j[f"response_{other}_text"]})
    return out


def table(rows: list[dict]):
    """The suspects as a display table (CLI and Data tab)."""
    import pandas as pd

    def short(text: str, n: int = 80) -> str:
        text = " ".join((text or "").split())
        return text if len(text) <= n else text[: n - 1] + "…"

    return pd.DataFrame({
        "judgment": [r["judgment_id"] for r in rows],
        "annotator": [r["annotator"] for r in rows],
        "split": [r["split"].replace("_", "-") for r in rows],
        "model sure of the other": [f"{r['other_prob']:.0%}" for r in rows],
        "prompt": [short(r["prompt"]) for r in rows],
        "chosen": [short(r["chosen"]) for r in rows],
        "model prefers": [short(r["model_prefers"]) for r in rows],
    }, columns=["judgment", "annotator", "split", "model sure of the other", "prompt", "chosen",
                "model prefers"])
