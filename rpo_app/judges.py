"""Simulated annotators for the effect benchmark (`python -m rpo_app bench-effect`).

A judge is a plain function ``judge(prompt: str, response: str) -> float``: higher is
better. The benchmark scores every candidate answer with it, turns the scores into
the same judgments a person would click (A better / B better / tie, thumbs up /
down), trains on them, and asks the judge again whether the tuned model's answers
beat the base model's on prompts it never trained on.

Writing your own: put a function with that signature in any importable module (or
any .py file) and pass ``--judge my_module:my_judge`` or
``--judge path/to/file.py:my_judge``. Keep it pure (same input, same score) and
make sure it cannot be gamed by degenerate output: a judge that rewards an empty or
one-word answer teaches the model to say nothing. The shipped judges all score an
answer under ``MIN_WORDS`` words below any real answer, and ``caveat`` gives a refusal
no credit for the "However, I can ..." it ends with.
"""
from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path

from rpo_app.degeneration import is_refusal, word_count

Judge = Callable[[str, str], float]

# Answers shorter than this are degenerate for every shipped judge: they score below
# any answer of normal length, so no judge can be satisfied by saying nothing.
MIN_WORDS = 5
DEGENERATE = -1000.0

_LIST_ITEM = re.compile(r"^\s*(\d{1,2})[.)]\s+(\S.*)$")
CAVEAT_PHRASES = ("however", "note that", "keep in mind", "consult", "it depends", "depends on",
                  "may not", "might not", "not always", "be careful", "caution", "limitation",
                  "in some cases", "professional", "although")


def concise(prompt: str, response: str) -> float:
    """Shorter is better, down to 12 words; below that each missing word costs 10.

    The score is minus the word count, so the scale reads in words. The penalty for
    very short answers makes a 1-word answer worse than a 100-word one: shortness is
    wanted, saying nothing is not.
    """
    n = word_count(response)
    if n < MIN_WORDS:
        return DEGENERATE + n
    floor = 12
    return -float(n) if n >= floor else -float(floor) - 10.0 * (floor - n)


def numbered_list(prompt: str, response: str) -> float:
    """More numbered items ("1. ...", "2) ...") is better, up to 6; +0.5 when they count
    up from 1. Items need at least two words, so a bare "1. 2. 3." earns nothing."""
    if word_count(response) < MIN_WORDS:
        return DEGENERATE + word_count(response)
    numbers = []
    for line in (response or "").splitlines():
        m = _LIST_ITEM.match(line)
        if m and word_count(m.group(2)) >= 2:
            numbers.append(int(m.group(1)))
    score = float(min(len(numbers), 6))
    if numbers and numbers == list(range(1, len(numbers) + 1)):
        score += 0.5
    return score


def caveat(prompt: str, response: str) -> float:
    """Mentioning a caveat or limitation is better: one point per distinct caveat
    phrase (see CAVEAT_PHRASES), up to 3. A refusal (degeneration.is_refusal) scores 0:
    a caveat qualifies an answer, and a refusal gives none. Without that rule, the
    bundled model's refusals ("as a text-based AI, I don't have the ability to ...
    However, I can ...") scored as caveats, and the runs trained on its labels learned
    to refuse up to 47% of test prompts (the base model: 3-9%)."""
    n = word_count(response)
    if n < MIN_WORDS:
        return DEGENERATE + n
    if is_refusal(response):
        return 0.0
    text = (response or "").lower()
    return float(min(sum(1 for p in CAVEAT_PHRASES if p in text), 3))


SHIPPED: dict[str, Judge] = {"concise": concise, "numbered_list": numbered_list, "caveat": caveat}


class JudgeError(ValueError):
    """A --judge spec that does not name a usable function."""


def load_judge(spec: str) -> tuple[str, Judge]:
    """(name, function) for a shipped judge name, ``module:function`` or ``file.py:function``."""
    if spec in SHIPPED:
        return spec, SHIPPED[spec]
    if ":" not in spec:
        raise JudgeError(f"unknown judge {spec!r}: use one of {', '.join(SHIPPED)}, "
                         "module:function or path/to/file.py:function")
    target, func_name = spec.rsplit(":", 1)
    if not func_name.isidentifier():
        raise JudgeError(f"judge {spec!r}: {func_name!r} is not a function name")
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise JudgeError(f"judge {spec!r}: no such file {path}")
        module_name = f"rpo_app_judge_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            sys.modules[module_name] = module
            module_spec.loader.exec_module(module)
        except Exception as err:  # noqa: BLE001 - any failure means "not loadable"
            sys.modules.pop(module_name, None)
            raise JudgeError(f"judge {spec!r}: cannot load {path}: {err.__class__.__name__}: {err}") from err
    else:
        try:
            module = importlib.import_module(target)
        except Exception as err:  # noqa: BLE001
            raise JudgeError(f"judge {spec!r}: cannot import module {target!r}: "
                             f"{err.__class__.__name__}: {err}") from err
    func = getattr(module, func_name, None)
    if not callable(func):
        raise JudgeError(f"judge {spec!r}: module {target!r} has no function {func_name!r}")
    return func_name, func


def score(judge: Judge, name: str, prompt: str, response: str) -> float:
    """Call a judge and insist on a finite number back."""
    value = judge(prompt, response)
    try:
        value = float(value)
    except (TypeError, ValueError) as err:
        raise JudgeError(f"judge {name!r} returned {value!r}, not a number") from err
    if value != value or value in (float("inf"), float("-inf")):
        raise JudgeError(f"judge {name!r} returned {value}, not a finite number")
    return value
