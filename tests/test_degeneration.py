"""The pure degeneration metrics and the Train tab's collapse warning."""
from __future__ import annotations

import pytest

from rpo_app import degeneration as dg


def test_word_count_and_short_share():
    assert dg.word_count("") == 0
    assert dg.word_count("  Hello,   world! \n") == 2
    s = dg.summarize(["", "Yes.", "This answer has five words.", "Two words"])
    assert s["short_share"] == pytest.approx(0.75)
    assert s["mean_words"] == pytest.approx((0 + 1 + 5 + 2) / 4)
    assert s["n"] == 4


def test_repeated_ngram_share():
    assert dg.repeated_ngram_share("") == 0.0
    assert dg.repeated_ngram_share("one two") == 0.0  # fewer words than one 3-gram
    assert dg.repeated_ngram_share("the cat sat on the mat today") == 0.0
    loop = "I am here. " * 10
    assert dg.repeated_ngram_share(loop) > 0.8
    # Case does not hide a loop.
    assert dg.repeated_ngram_share("A b c a B C") == pytest.approx(1 / 4)


def test_summarize_empty_list():
    assert dg.summarize([]) == {"mean_words": 0.0, "short_share": 0.0, "repeat_share": 0.0, "n": 0}


BASE = ["Sleep at the same time every night and keep the room dark and cool.",
        "Drink water during the day, and avoid caffeine after lunch to rest well."]


def test_no_warning_when_close_to_base():
    tuned = ["Keep a regular bedtime and a dark, cool room for better sleep.",
             "Drink water, skip late caffeine, and wind down before bed each night."]
    assert dg.collapse_warning(BASE, tuned) is None
    assert dg.collapse_warning([], tuned) is None
    assert dg.collapse_warning(BASE, []) is None


def test_warning_on_shrinking_answers():
    msg = dg.collapse_warning(BASE, ["Sleep.", "Water."])
    assert msg and "shrank" in msg and "fewer than 3 words" in msg


def test_warning_on_ballooning_answers():
    long = " ".join(f"word{i}" for i in range(100))
    msg = dg.collapse_warning(BASE, [long, long])
    assert msg and "grew" in msg


def test_warning_on_repetition():
    loop = " ".join(["sleep well tonight"] * 5)  # 15 words: length stays in the band
    msg = dg.collapse_warning(BASE, [loop, loop])
    assert msg and "repeat" in msg


def test_train_tab_collapse_line_uses_newest_previews():
    from rpo_app.ui.train import collapse_line

    assert collapse_line([]) is None
    healthy = [{"step": 50, "prompt": "p", "base": BASE[0], "tuned": BASE[0]},
               {"step": 50, "prompt": "q", "base": BASE[1], "tuned": BASE[1]}]
    collapsed = [{"step": 100, "prompt": "p", "base": BASE[0], "tuned": "Sleep."},
                 {"step": 100, "prompt": "q", "base": BASE[1], "tuned": float("nan")}]
    assert collapse_line(healthy) is None
    line = collapse_line(healthy + collapsed)
    assert line and "collapse warning" in line and "shrank" in line
    # Only the newest step counts: a recovered run shows no warning.
    recovered = [dict(r, step=150) for r in healthy]
    assert collapse_line(healthy + collapsed + recovered) is None
