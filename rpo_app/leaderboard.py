"""A Bradley-Terry leaderboard of the app's models from human pair judgments, with
bootstrap confidence intervals.

Contestants are the base model and each adapter; answers that were imported or written
by people are not contestants. Simulated-judge results from bench-effect are shown in a
separate table and never enter the fit.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

from rpo_app.adapters import BASE_LABEL
from rpo_app.agreement import PAIR_KINDS, RECHECK_SOURCE

MODEL_SOURCES = ("model", "chat")  # response sources that mean "the app's model wrote it"
VOTE_COLUMNS = ["model_a", "model_b", "outcome"]
BOARD_COLUMNS = ["rank", "model", "rating", "ci_low", "ci_high", "votes", "wins", "losses", "ties"]
BENCH_COLUMNS = ["source", "loss", "seeds", "win_rate", "win_rate_std"]
ELO_SCALE = 400 / math.log(10)  # a 400-point gap means 10:1 odds, as in chess Elo
CENTRE = 1000.0
PRIOR_C = 1.0  # mild L2 prior: a model with only wins keeps a finite strength
CI_LEVEL = 0.95


def contestant(adapter: str | None, model: str | None, response_source: str | None) -> str | None:
    """Who wrote an answer, as a leaderboard name; None if not one of the app's models."""
    if adapter:
        return adapter
    if model and response_source in MODEL_SOURCES:
        return BASE_LABEL
    return None


def _outcome(verdict: str) -> str:
    # "Both bad" is a tie, as Chatbot Arena counts it: neither answer was preferred.
    return verdict if verdict in ("a", "b") else "tie"


def votes(rows: Iterable[dict], sources: Iterable[str] | None = None) -> pd.DataFrame:
    """One vote per pair judgment between two different contestants."""
    if isinstance(sources, str):  # one source name, not its letters
        sources = [sources]
    sources = set(sources) if sources is not None else None
    out = []
    for row in rows:
        if row["kind"] not in PAIR_KINDS or row["source"] == RECHECK_SOURCE:
            continue  # a recheck repeats an earlier vote
        if sources is not None and row["source"] not in sources:
            continue
        a = contestant(row.get("adapter_a"), row.get("model_a"), row.get("response_a_source"))
        b = contestant(row.get("adapter_b"), row.get("model_b"), row.get("response_b_source"))
        if a is None or b is None or a == b:
            continue
        out.append((a, b, _outcome(row["verdict"])))
    return pd.DataFrame(out, columns=VOTE_COLUMNS)


def models_in(votes_df: pd.DataFrame) -> list[str]:
    return sorted(set(votes_df["model_a"]) | set(votes_df["model_b"]))


def _distinct(votes_df: pd.DataFrame, models: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (model_a index, model_b index, score of a) votes and how often each
    occurs. Fits and resamples work on these counts: a few dozen rows however many votes."""
    col = {m: i for i, m in enumerate(models)}
    score = votes_df["outcome"].map({"a": 1.0, "b": 0.0, "tie": 0.5})
    keys = pd.DataFrame({"a": votes_df["model_a"].map(col), "b": votes_df["model_b"].map(col),
                         "s": score})
    counts = keys.value_counts(sort=False)
    return counts.index.to_frame(index=False).to_numpy(float), counts.to_numpy(float)


def _fit_counts(distinct: np.ndarray, counts: np.ndarray, n_models: int) -> np.ndarray:
    """Bradley-Terry log-strengths by L2 logistic regression; a model without votes in
    `counts` gets 0 from the prior (callers leave it out)."""
    keep = counts > 0
    distinct, counts = distinct[keep], counts[keep]
    n = len(counts)
    x = np.zeros((n, n_models))
    x[np.arange(n), distinct[:, 0].astype(int)] = 1.0
    x[np.arange(n), distinct[:, 1].astype(int)] = -1.0
    score = distinct[:, 2]
    # A vote scoring s for model_a enters as (x, a won) at weight s and (x, a lost) at
    # 1 - s, so a tie is half a win each way. Each also enters mirrored (-x, 1 - y) at
    # half weight: the likelihood is unchanged and both classes are always present,
    # which the solver needs (a model with only wins would otherwise leave one class).
    xs = np.vstack([x, x, -x, -x])
    ys = np.concatenate([np.ones(n), np.zeros(n), np.zeros(n), np.ones(n)])
    ws = np.concatenate([score, 1 - score, score, 1 - score]) * np.tile(counts, 4) * 0.5
    used = ws > 0
    model = LogisticRegression(fit_intercept=False, C=PRIOR_C, l1_ratio=0.0, max_iter=1000)
    model.fit(xs[used], ys[used], sample_weight=ws[used])
    return model.coef_[0]


def strengths(votes_df: pd.DataFrame) -> dict[str, float]:
    """Bradley-Terry log-strengths (natural log-odds scale), not anchored."""
    models = models_in(votes_df)
    if len(models) < 2:
        return {m: 0.0 for m in models}
    distinct, counts = _distinct(votes_df, models)
    return dict(zip(models, (float(s) for s in _fit_counts(distinct, counts, len(models)))))


def to_ratings(strength: dict[str, float], anchor: str = BASE_LABEL) -> dict[str, float]:
    """Elo-like ratings: the anchor at 1000 when present, else the mean at 1000."""
    if not strength:
        return {}
    zero = strength[anchor] if anchor in strength else float(np.mean(list(strength.values())))
    return {m: CENTRE + ELO_SCALE * (s - zero) for m, s in strength.items()}


def fit(votes_df: pd.DataFrame, anchor: str = BASE_LABEL) -> dict[str, float]:
    """Ratings per model from a votes table (see votes())."""
    return to_ratings(strengths(votes_df), anchor)


def _bootstrap(votes_df: pd.DataFrame, models: list[str], anchor: str, n: int,
               seed: int) -> np.ndarray:
    """n x models ratings refitted on votes resampled with replacement; NaN where a
    model drew no votes. Drawing counts of the distinct votes from a multinomial is the
    same as resampling the vote rows, and far cheaper."""
    rng = np.random.default_rng(seed)
    distinct, counts = _distinct(votes_df, models)
    index = {m: i for i, m in enumerate(models)}
    out = np.full((n, len(models)), np.nan)
    for i in range(n):
        drawn = rng.multinomial(int(counts.sum()), counts / counts.sum()).astype(float)
        voted = np.zeros(len(models), bool)
        voted[distinct[drawn > 0][:, :2].astype(int).ravel()] = True
        if voted.sum() < 2 or (anchor in index and not voted[index[anchor]]):
            continue  # without the anchor this draw is on another scale; leave it out
        s = _fit_counts(distinct, drawn, len(models))
        rated = to_ratings({m: s[j] for j, m in enumerate(models) if voted[j]}, anchor)
        out[i] = [rated.get(m, np.nan) for m in models]
    return out


def _tallies(votes_df: pd.DataFrame, model: str) -> dict[str, int]:
    as_a, as_b = votes_df["model_a"] == model, votes_df["model_b"] == model
    outcome = votes_df["outcome"]
    return {"votes": int((as_a | as_b).sum()),
            "wins": int(((as_a & (outcome == "a")) | (as_b & (outcome == "b"))).sum()),
            "losses": int(((as_a & (outcome == "b")) | (as_b & (outcome == "a"))).sum()),
            "ties": int(((as_a | as_b) & (outcome == "tie")).sum())}


def leaderboard(votes_df: pd.DataFrame, bootstrap: int = 200, seed: int = 0,
                anchor: str = BASE_LABEL) -> pd.DataFrame:
    """Ranked ratings with 95% percentile-bootstrap intervals and vote counts."""
    models = models_in(votes_df) if len(votes_df) else []
    if not models:
        return pd.DataFrame(columns=BOARD_COLUMNS)
    rated = fit(votes_df, anchor)
    draws = _bootstrap(votes_df, models, anchor, bootstrap, seed) if bootstrap else None
    tail = (1 - CI_LEVEL) / 2 * 100
    records = []
    for j, model in enumerate(models):
        column = draws[:, j][~np.isnan(draws[:, j])] if draws is not None else np.array([])
        low, high = (np.percentile(column, [tail, 100 - tail]) if len(column)
                     else (np.nan, np.nan))
        records.append({"model": model, "rating": rated[model], "ci_low": float(low),
                        "ci_high": float(high), **_tallies(votes_df, model)})
    board = pd.DataFrame(records).sort_values(["rating", "model"], ascending=[False, True])
    board.insert(0, "rank", range(1, len(board) + 1))
    return board.reset_index(drop=True)[BOARD_COLUMNS]


def bench_rows(effect_json: dict) -> pd.DataFrame:
    """bench-effect's simulated-judge win rates, labelled as such, for a separate table."""
    records = [{"source": f"bench-effect, simulated judge {e.get('judge')}",
                "loss": e.get("loss"), "seeds": e.get("seeds"),
                "win_rate": e.get("win_rate", np.nan), "win_rate_std": e.get("win_rate_std", np.nan)}
               for e in effect_json.get("summary") or []]
    return pd.DataFrame(records, columns=BENCH_COLUMNS)


def _ci(low: float, high: float) -> str:
    if math.isnan(low) or math.isnan(high):
        return "-"
    return f"[{round(low)}, {round(high)}]"


def display(board: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard as people read it: whole-point ratings, the interval as "[lo, hi]"."""
    return pd.DataFrame({
        "rank": board["rank"], "model": board["model"],
        "rating": [round(r) for r in board["rating"]],
        "95% CI": [_ci(lo, hi) for lo, hi in zip(board["ci_low"], board["ci_high"])],
        "votes": board["votes"], "wins": board["wins"], "losses": board["losses"],
        "ties": board["ties"]},
        columns=["rank", "model", "rating", "95% CI", "votes", "wins", "losses", "ties"])


def format_table(board: pd.DataFrame) -> str:
    """The leaderboard as plain text for the CLI."""
    if board.empty:
        return "no votes between two different models yet"
    return display(board).to_string(index=False)


def format_bench(bench: pd.DataFrame) -> str:
    """bench_rows() as plain text, kept apart from the human leaderboard."""
    if bench.empty:
        return "no bench-effect results"
    shown = bench.assign(win_rate=[f"{w:.2f}" if not math.isnan(w) else "-" for w in bench["win_rate"]],
                         win_rate_std=[f"{s:.2f}" if not math.isnan(s) else "-"
                                       for s in bench["win_rate_std"]])
    return shown.to_string(index=False)
