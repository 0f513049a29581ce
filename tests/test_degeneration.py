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
    assert dg.summarize([]) == {"mean_words": 0.0, "short_share": 0.0, "repeat_share": 0.0,
                                "loop_share": 0.0, "refusal_share": 0.0, "n": 0}
    assert tuple(k for k in dg.summarize([]) if k != "n") == dg.FIGURES


# Refusals as the bundled model wrote them after training on a caveat judge's labels
REFUSALS = ["I'm sorry for any confusion, but as a text-based AI, I don't have the ability to "
            "provide grammatical assistance. However, I can help with other tasks.",
            "I'm sorry for the misunderstanding, but as a chatbot designed to assist with customer "
            "inquiries, I don't have the ability to provide personal advice. However, I can help.",
            "I’m unable to provide a 20% tip in real time. However, I can explain how to work it out."]


@pytest.mark.parametrize("text", REFUSALS)
def test_a_refusal_is_one(text):
    assert dg.is_refusal(text)


@pytest.mark.parametrize("text", [
    "I'm sorry to hear that. It's completely normal to feel hurt when a friend forgets.",
    "I can't help but admire how the leaves turn gold in autumn.",
    "Use it as a chatbot backend: the model answers each message in turn.",
    "As an AI assistant, here is a short poem about the sea.",
    "",
])
def test_sympathy_and_talk_about_chatbots_are_not_refusals(text):
    assert not dg.is_refusal(text)


def test_warning_when_the_answers_turn_into_refusals():
    helpful = ["Start with a clear goal, then practise in front of a friend and ask for feedback.",
               "Twenty percent of 45 dollars is 9 dollars, so the total comes to 54 dollars."]
    assert dg.summarize(REFUSALS[:2] + helpful)["refusal_share"] == pytest.approx(0.5)
    msg = dg.collapse_warning(helpful, REFUSALS[:2])
    assert msg and "100% of answers decline the task" in msg and "vs 0% for the base model" in msg
    assert "taught it to decline" in msg
    # as many refusals as the base model wrote: nothing learned there
    assert dg.collapse_warning(REFUSALS[:1] + helpful[:1], REFUSALS[1:2] + helpful[1:]) is None


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


# Loops the bundled model wrote after preference training (bench-curve test answers),
# which word 3-grams do not see: inside one word, or a small part of a longer answer.
CHAR_LOOPS = ["1. Sustainable and eco-friendly: 1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1",
              "SmolLM, you're right, I'm not a full-out-Jump-Jump-Jump-Jump-Jump-Jump-Jump-Jump-Jump",
              "Merging creates a new branch with a different origin origin.git.git.git.git.git.git.git."]


def test_looped_char_share():
    assert dg.looped_char_share("") == 0.0
    assert dg.looped_char_share("Mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm") == 1.0
    for text in CHAR_LOOPS:
        assert dg.looped_char_share(text) >= dg.LOOPING_ANSWER, text
        assert dg.repeated_ngram_share(text) < dg.REPEAT_MARGIN, text
    # Short runs, whitespace, rules and a small table are not loops that make an answer loop.
    prose = ("Wait... really?!! Yes - see below.\n\n----\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
             "                indented code\n" + BASE[0])
    assert dg.looped_char_share(prose) < dg.LOOPING_ANSWER
    assert dg.looped_char_share("hahaha, nice") == 0.0  # under LOOP_MIN_CHARS
    for text in BASE:
        assert dg.looped_char_share(text) == 0.0


def test_warning_on_character_loops_the_other_rules_miss():
    tuned = BASE[:1] + CHAR_LOOPS[:1]
    assert dg.summarize(tuned)["loop_share"] == pytest.approx(0.5)
    msg = dg.collapse_warning(BASE[:2], tuned)
    assert msg and "loop on a few characters" in msg and '"1.1.1.1.1.1' in msg
    assert "repeat themselves" not in msg and "shrank" not in msg
    # The same share of loops in the base model's answers is no drift.
    assert dg.collapse_warning(tuned, tuned[::-1]) is None


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


def test_train_tab_collapse_line_shows_a_quoted_loop_as_written():
    from rpo_app.ui.train import collapse_line

    looping = [{"step": 60, "prompt": "p", "base": BASE[0], "tuned": "1. **1. **1. **1. **1. **1. **1. **"},
               {"step": 60, "prompt": "q", "base": BASE[1], "tuned": BASE[1]}]
    line = collapse_line(looping)
    assert line.startswith("⚠ **collapse warning:**") and "loop on a few characters" in line
    # Markdown would make the model's asterisks bold; they come out escaped, the rest as it was.
    assert "1. \\*\\*1. \\*\\*1." in line and "**1." not in line


def test_warning_on_garbled_answers_only_with_a_large_fluency_drop():
    tuned = ["The auskure tipping is a poor aarnous spelling that I can sobify on Monday.",
             "A 20% rule-of-two environment is a beautiful multi-purpose tool for sleep."]
    # measured ranges (bench-effect): fluent tuned answers -1.1 to -1.5, garbled -2.4 to -3.6
    assert dg.collapse_warning(BASE, tuned, base_logp=-1.02, tuned_logp=-1.41) is None
    msg = dg.collapse_warning(BASE, tuned, base_logp=-1.02, tuned_logp=-3.60)
    assert msg and "garbled" in msg and "-3.60 vs -1.02" in msg
    assert dg.collapse_warning(BASE, tuned, base_logp=None, tuned_logp=-3.60) is None


def test_train_tab_collapse_line_reads_preview_log_probs():
    from rpo_app.ui.train import collapse_line

    rows = [{"step": 60, "prompt": "p", "base": BASE[0], "tuned": BASE[1], "base_logp": -1.0, "tuned_logp": -3.2},
            {"step": 60, "prompt": "q", "base": BASE[1], "tuned": BASE[0], "base_logp": -1.1, "tuned_logp": -3.0}]
    line = collapse_line(rows)
    assert line and "garbled" in line and "-3.10 vs -1.05" in line
    # runs written before the log-probs were recorded (or a NaN cell) fall back to text checks
    assert collapse_line([dict(r, tuned_logp=float("nan")) for r in rows]) is None
    assert collapse_line([{k: v for k, v in r.items() if not k.endswith("logp")} for r in rows]) is None
