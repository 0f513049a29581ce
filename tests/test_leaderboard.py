"""Bradley-Terry leaderboard (rpo_app.leaderboard)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from rpo_app import leaderboard as lb
from rpo_app.adapters import BASE_LABEL
from rpo_app.store import Store

TRUE = {BASE_LABEL: 0.0, "alpha": 0.5, "beta": 1.0, "gamma": 2.0}
TIE_RATE = 0.1


def tournament(n=3000, seed=7) -> pd.DataFrame:
    """Votes between random pairs with P(i beats j) = sigmoid(s_i - s_j), some of them ties.

    Ties are drawn so that a tie counted as half a win keeps the expected score of i at
    sigmoid(s_i - s_j): tie with probability t, else i wins with (sigmoid - t/2) / (1 - t).
    Ties drawn any other way would pull the fitted gaps towards zero."""
    rng = np.random.default_rng(seed)
    names = list(TRUE)
    out = []
    for _ in range(n):
        i, j = rng.choice(len(names), 2, replace=False)
        a, b = names[i], names[j]
        p = 1 / (1 + math.exp(-(TRUE[a] - TRUE[b])))
        if rng.random() < TIE_RATE:
            out.append((a, b, "tie"))
        else:
            out.append((a, b, "a" if rng.random() < (p - TIE_RATE / 2) / (1 - TIE_RATE) else "b"))
    return pd.DataFrame(out, columns=lb.VOTE_COLUMNS)


def true_rating(name):
    return 1000 + 400 / math.log(10) * (TRUE[name] - TRUE[BASE_LABEL])


def votes(*triples):
    return pd.DataFrame(list(triples), columns=lb.VOTE_COLUMNS)


# -- fit ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic():
    v = tournament()
    return v, lb.leaderboard(v, bootstrap=200, seed=0)


def test_fit_recovers_known_strengths(synthetic):
    v, _ = synthetic
    s = lb.strengths(v)
    for name, truth in TRUE.items():
        assert s[name] - s[BASE_LABEL] == pytest.approx(truth, abs=0.15), name
    assert sorted(s, key=s.get) == list(TRUE)


def test_leaderboard_order_anchor_and_intervals_cover_truth(synthetic):
    v, board = synthetic
    assert list(board.columns) == lb.BOARD_COLUMNS
    assert list(board["model"]) == ["gamma", "beta", "alpha", BASE_LABEL]
    assert list(board["rank"]) == [1, 2, 3, 4]
    base = board.set_index("model").loc[BASE_LABEL]
    assert base["rating"] == 1000 and base["ci_low"] == base["ci_high"] == 1000
    for _, r in board.iterrows():
        assert r["ci_low"] <= true_rating(r["model"]) <= r["ci_high"], r["model"]
        assert r["ci_low"] <= r["rating"] <= r["ci_high"]
        if r["model"] != BASE_LABEL:
            assert 10 < r["ci_high"] - r["ci_low"] < 150  # a real interval, not a point
    assert board["votes"].sum() == 2 * len(v)
    assert (board["wins"] + board["losses"] + board["ties"] == board["votes"]).all()
    assert board["ties"].sum() == 2 * (v["outcome"] == "tie").sum()


def test_bootstrap_is_seeded():
    v = tournament(300, seed=3)
    first = lb.leaderboard(v, bootstrap=50, seed=1)
    pd.testing.assert_frame_equal(first, lb.leaderboard(v, bootstrap=50, seed=1))
    assert not first["ci_low"].equals(lb.leaderboard(v, bootstrap=50, seed=2)["ci_low"])


def test_elo_scale_and_anchor():
    # 3000 votes, 3:1 for alpha: a gap of ln 3 in strength, 400 * log10(3) = 190.8 points.
    v = votes(*([("alpha", BASE_LABEL, "a")] * 2250 + [(BASE_LABEL, "alpha", "a")] * 750))
    r = lb.fit(v)
    assert r[BASE_LABEL] == 1000
    assert r["alpha"] == pytest.approx(1000 + 400 * math.log10(3), abs=2)
    other = lb.fit(v, anchor="alpha")
    assert other["alpha"] == 1000 and other[BASE_LABEL] == pytest.approx(1000 - 190.8, abs=2)


def test_without_anchor_ratings_centre_on_the_mean():
    r = lb.fit(votes(("x", "y", "a"), ("y", "z", "a"), ("x", "z", "b")))
    assert BASE_LABEL not in r
    assert np.mean(list(r.values())) == pytest.approx(1000)


def test_tie_is_half_a_win_each_way():
    # One win and two ties has the same likelihood as two wins and one loss. The ties
    # all list x first, so a tie counted for either side would change the result.
    with_ties = lb.fit(votes(("x", BASE_LABEL, "a"), ("x", BASE_LABEL, "tie"),
                             ("x", BASE_LABEL, "tie")))
    decided = lb.fit(votes(("x", BASE_LABEL, "a"), (BASE_LABEL, "x", "b"),
                           (BASE_LABEL, "x", "a")))
    assert with_ties["x"] == pytest.approx(decided["x"], abs=1e-3)
    assert with_ties["x"] > 1000
    only_ties = lb.fit(votes(*[("x", BASE_LABEL, "tie")] * 5))
    assert only_ties["x"] == pytest.approx(1000, abs=1e-3)


def test_only_wins_stays_finite():
    r = lb.fit(votes(*[("x", BASE_LABEL, "a")] * 50))
    assert math.isfinite(r["x"]) and r["x"] > 1000


def test_empty_and_single_model_input():
    empty = votes()
    assert lb.fit(empty) == {}
    board = lb.leaderboard(empty)
    assert board.empty and list(board.columns) == lb.BOARD_COLUMNS
    assert lb.format_table(board) == "no votes between two different models yet"
    one = votes(("x", "x", "a"))
    assert lb.fit(one) == {"x": 1000.0}
    single = lb.leaderboard(one)
    assert list(single["model"]) == ["x"] and math.isnan(single["ci_low"].iloc[0])
    assert "x" in lb.format_table(single)


def test_format_table_rounds_and_shows_intervals():
    board = lb.leaderboard(tournament(400, seed=5), bootstrap=30)
    text = lb.format_table(board)
    lo, hi = round(board["ci_low"].iloc[0]), round(board["ci_high"].iloc[0])
    assert f"[{lo}, {hi}]" in text and str(round(board["rating"].iloc[0])) in text
    assert "gamma" in text.splitlines()[1]


# -- contestants and votes ---------------------------------------------------------------
def test_contestant_rules():
    assert lb.contestant("sft-1", "SmolLM2", "model") == "sft-1"
    assert lb.contestant("sft-1", None, "import") == "sft-1"
    assert lb.contestant(None, "SmolLM2", "model") == BASE_LABEL
    assert lb.contestant(None, "SmolLM2", "chat") == BASE_LABEL
    assert lb.contestant(None, "gpt-x", "import") is None  # imported text: not the app's model
    assert lb.contestant(None, None, "model") is None
    assert lb.contestant(None, None, "human") is None


@pytest.fixture
def arena(tmp_path):
    """A store with base, adapter, chat and imported answers and judgments between them."""
    store = Store(tmp_path)
    pid, _ = store.add_prompt("question", source="test")
    base, _ = store.add_response(pid, "base answer", source="model", model="m")
    tuned, _ = store.add_response(pid, "tuned answer", source="model", model="m", adapter="t1")
    chat, _ = store.add_response(pid, "chat answer", source="chat", model="m")
    imported, _ = store.add_response(pid, "imported answer", source="import")
    other, _ = store.add_response(pid, "other tuned", source="chat", model="m", adapter="t2")
    store.add_judgment("paired", tuned, base, "a", annotator="x")
    store.add_judgment("paired", base, tuned, "both_bad", annotator="x", source="blind-chat")
    store.add_judgment("paired", other, tuned, "b", annotator="y", source="blind-chat")
    store.add_judgment("paired", tuned, base, "b", annotator="x", source=lb.RECHECK_SOURCE)
    store.add_judgment("paired", base, chat, "a", annotator="x")  # base vs base: no contest
    store.add_judgment("paired", imported, tuned, "a", annotator="x", source="import")
    store.add_judgment("unpaired", tuned, None, "up", annotator="x")
    yield store
    store.close()


def test_votes_from_store_rows(arena):
    v = lb.votes(arena.judgments())
    assert v.to_dict("records") == [
        {"model_a": "t1", "model_b": BASE_LABEL, "outcome": "a"},
        {"model_a": BASE_LABEL, "model_b": "t1", "outcome": "tie"},  # both bad counts as a tie
        {"model_a": "t2", "model_b": "t1", "outcome": "b"},
    ]


def test_votes_sources_filter(arena):
    blind = lb.votes(arena.judgments(), sources={"blind-chat"})
    assert blind["outcome"].tolist() == ["tie", "b"]
    assert lb.votes(arena.judgments(), sources="label")["outcome"].tolist() == ["a"]
    assert lb.votes(arena.judgments(), sources={lb.RECHECK_SOURCE}).empty
    assert lb.votes([]).columns.tolist() == lb.VOTE_COLUMNS


def test_leaderboard_from_store(arena):
    board = lb.leaderboard(lb.votes(arena.judgments()), bootstrap=20)
    assert set(board["model"]) == {"t1", "t2", BASE_LABEL}
    row = board.set_index("model").loc["t1"]
    assert (row["votes"], row["wins"], row["losses"], row["ties"]) == (3, 2, 0, 1)
    assert board.set_index("model").loc[BASE_LABEL, "rating"] == 1000


# -- bench-effect ------------------------------------------------------------------------
def test_bench_rows_are_a_separate_labelled_table():
    effect = {"summary": [
        {"judge": "length", "loss": "dpo", "seeds": 3, "win_rate": 0.7, "win_rate_std": 0.05,
         "score_tuned": 1.0},
        {"judge": "polite", "loss": "rpo", "seeds": 1},
    ]}
    bench = lb.bench_rows(effect)
    assert list(bench.columns) == lb.BENCH_COLUMNS
    assert bench["source"].tolist() == ["bench-effect, simulated judge length",
                                        "bench-effect, simulated judge polite"]
    assert bench.loc[0, "win_rate"] == 0.7 and math.isnan(bench.loc[1, "win_rate"])
    assert "simulated judge length" in lb.format_bench(bench)
    assert lb.bench_rows({}).empty and list(lb.bench_rows({}).columns) == lb.BENCH_COLUMNS
    assert lb.format_bench(lb.bench_rows({"summary": []})) == "no bench-effect results"
