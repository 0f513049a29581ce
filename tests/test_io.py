"""Import (every shape, every format, every kind of bad input), export, CLI, seeding."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from rpo_app import io as rio
from rpo_app.io import (MAX_FIELD_CHARS, ExportError, ImportFileError, add_prompt_texts, export,
                        import_path, seed_if_empty)
from rpo_app.store import Store

REPO = Path(__file__).resolve().parent.parent
FORMATS = ["jsonl", "json", "csv", "parquet"]


def write(path: Path, rows: list[dict], fmt: str | None = None) -> Path:
    """Write rows as JSONL, JSON, CSV or Parquet (by fmt, else the path's extension)."""
    fmt = fmt or path.suffix.lstrip(".")
    path = path.with_suffix("." + fmt)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    elif fmt == "csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def user(text):
    return [{"role": "user", "content": text}]


def bot(text):
    return [{"role": "assistant", "content": text}]


def hh(*turns):
    """hh("q", "a") -> "\\n\\nHuman: q\\n\\nAssistant: a"."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


def triples(store):
    """(prompt, response_a, response_b, verdict) of every active judgment."""
    return [(j["prompt_a"], j["response_a_text"], j["response_b_text"], j["verdict"])
            for j in store.judgments()]


PAIRS = [{"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
         {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
         {"prompt": "What is 2+2?", "chosen": "Four.", "rejected": "5"}]


# -- shapes and formats -------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_import_prompts_every_format(store, tmp_path, fmt):
    rows = [{"prompt": "How do I boil an egg?", "family": "cooking"},
            {"prompt": "  Tell me a joke.  ", "family": ""},
            {"prompt": "How do I boil an egg?", "family": "cooking"}]
    report = import_path(store, write(tmp_path / "p", rows, fmt))
    assert (report.shape, report.rows) == ("prompts", 3)
    assert (report.prompts_added, report.prompts_duplicate) == (2, 1)
    assert [(p["text"], p["family"], p["source"]) for p in store.prompts()] == [
        ("How do I boil an egg?", "cooking", "import"), ("Tell me a joke.", None, "import")]
    assert store.count_judgments() == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_import_trl_preference_every_format(store, tmp_path, fmt):
    path = write(tmp_path / "prefs", PAIRS, fmt)
    report = import_path(store, path, annotator="alice")
    assert report.shape == "preference"
    assert report.added == {"prompts": 2, "responses": 5, "judgments": 3}
    assert report.duplicates == {"prompts": 1, "responses": 1, "judgments": 0}
    assert triples(store) == [("What is 2+2?", "4", "5", "a"),
                              ("Name a colour.", "Blue.", "Seven.", "a"),
                              ("What is 2+2?", "Four.", "5", "a")]
    j = store.judgments()[0]
    assert (j["kind"], j["annotator"], j["source"]) == ("paired", "alice", "import")
    assert j["request_id"].startswith("import:")
    assert (j["response_a_source"], j["import_file_a"]) == ("import", path.name)
    assert "added 2 prompts, 5 responses, 3 judgments" in report.summary()


@pytest.mark.parametrize("fmt", FORMATS)
def test_import_trl_unpaired_every_format(store, tmp_path, fmt):
    rows = [{"prompt": "Say hi.", "completion": "Hi!", "label": True},
            {"prompt": "Say hi.", "completion": "No.", "label": False}]
    if fmt == "csv":
        rows = [dict(r, label=lab) for r, lab in zip(rows, ["TRUE", "0"])]
    report = import_path(store, write(tmp_path / "kto", rows, fmt))
    assert report.shape == "unpaired"
    assert report.added == {"prompts": 1, "responses": 2, "judgments": 2}
    got = [(j["kind"], j["prompt_a"], j["response_a_text"], j["response_b"], j["verdict"])
           for j in store.judgments()]
    assert got == [("unpaired", "Say hi.", "Hi!", None, "up"),
                   ("unpaired", "Say hi.", "No.", None, "down")]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_import_conversational_trl(store, tmp_path, fmt):
    rows = [
        # explicit prompt, as TRL's conversational preference format
        {"prompt": user("Capital of France?"), "chosen": bot("Paris."), "rejected": bot("Rome.")},
        # a plain prompt, and answer lists that repeat the user turn (ultrafeedback style)
        {"prompt": "Capital of Spain?", "chosen": user("Capital of Spain?") + bot("Madrid."),
         "rejected": user("Capital of Spain?") + bot("Lisbon.")},
    ]
    for i, row in enumerate(rows):  # one file each: Parquet cannot mix lists and strings
        import_path(store, write(tmp_path / f"conv{i}", [row], fmt))
    implicit = [{"chosen": user("Capital of Italy?") + bot("Rome."),
                 "rejected": user("Capital of Italy?") + bot("Milan.")}]
    report = import_path(store, write(tmp_path / "implicit", implicit, fmt))
    assert report.shape == "implicit-preference"
    unpaired = [{"prompt": user("Capital of Peru?"), "completion": bot("Lima."), "label": True}]
    import_path(store, write(tmp_path / "conv_kto", unpaired, fmt))
    assert triples(store) == [("Capital of France?", "Paris.", "Rome.", "a"),
                              ("Capital of Spain?", "Madrid.", "Lisbon.", "a"),
                              ("Capital of Italy?", "Rome.", "Milan.", "a"),
                              ("Capital of Peru?", "Lima.", None, "up")]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
def test_import_anthropic_hh_transcripts(store, tmp_path, fmt):
    rows = [{"chosen": hh("What is 2+2?", "It is 4."), "rejected": hh("What is 2+2?", "5")},
            # no leading newlines is tolerated
            {"chosen": "Human: Hi!\n\nAssistant: Hello, how can I help?",
             "rejected": "Human: Hi!\n\nAssistant: What?"}]
    report = import_path(store, write(tmp_path / "hh", rows, fmt), annotator="hh")
    assert report.shape == "implicit-preference"
    assert triples(store) == [("What is 2+2?", "It is 4.", "5", "a"),
                              ("Hi!", "Hello, how can I help?", "What?", "a")]


def test_import_txt_one_prompt_per_line(store, tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffHow do I boil an egg?\r\n\n  Tell me a joke.  \nHow do I boil an egg?\n"
                     .encode("utf-8"))
    report = import_path(store, path)
    assert (report.shape, report.rows) == ("prompts", 3)
    assert (report.prompts_added, report.prompts_duplicate) == (2, 1)
    assert [p["text"] for p in store.prompts()] == ["How do I boil an egg?", "Tell me a joke."]


def test_prompts_of_a_file_of_every_shape(tmp_path):
    """What `generate --prompts` answers: each distinct prompt once, in file order, with
    the family of its first row; no answers or labels."""
    cases = {
        "preference": (PAIRS, ["What is 2+2?", "Name a colour."]),
        "unpaired": ([{"prompt": "Say hi.", "completion": "Hi!", "label": True, "family": "greet"},
                      {"prompt": "Say hi.", "completion": "No.", "label": False}], ["Say hi."]),
        "implicit-preference": ([{"chosen": hh("What is 2+2?", "4"), "rejected": hh("What is 2+2?", "5")}],
                                ["What is 2+2?"]),
        "prompts": ([{"prompt": "B?", "family": "x"}, {"prompt": "A?"}], ["B?", "A?"]),
    }
    for shape, (rows, want) in cases.items():
        parsed = rio.read_import_file(write(tmp_path / shape, rows, "jsonl"))
        assert parsed.shape == shape
        assert [p["prompt"] for p in parsed.prompts()] == want, shape
    families = rio.read_import_file(write(tmp_path / "fam", cases["unpaired"][0], "jsonl")).prompts()
    assert families == [{"prompt": "Say hi.", "family": "greet"}]


def test_multi_turn_is_kept_by_default_last_turn_or_refused_on_request(store, tmp_path):
    """More in test_io_multiturn.py."""
    rows = [{"chosen": hh("Hi", "Hello!", "What is 2+2?", "4"),
             "rejected": hh("Hi", "Hello!", "What is 2+2?", "22")}]
    path = write(tmp_path / "multi", rows, "jsonl")
    with pytest.raises(ImportFileError, match=r"multi\.jsonl: line 1: multi-turn conversation"):
        import_path(store, path, multi_turn="refuse")
    import_path(store, path, multi_turn="last")
    assert triples(store) == [("What is 2+2?", "4", "22", "a")]
    import_path(store, path)
    assert triples(store)[1] == ("User: Hi\n\nAssistant: Hello!\n\nUser: What is 2+2?", "4", "22",
                                 "a")
    conv = [{"prompt": [{"role": "system", "content": "Be terse."}] + user("Hi"),
             "chosen": bot("Hi."), "rejected": bot("Go away.")}]
    with pytest.raises(ImportFileError, match="system message"):
        import_path(store, write(tmp_path / "sys", conv, "jsonl"), multi_turn="refuse")


def test_reimport_adds_nothing(store, tmp_path):
    path = write(tmp_path / "prefs", PAIRS, "jsonl")
    import_path(store, path)
    before = store.snapshot()
    again = import_path(store, path, annotator="someone-else")
    assert again.added == {"prompts": 0, "responses": 0, "judgments": 0}
    assert again.duplicates == {"prompts": 3, "responses": 6, "judgments": 3}
    assert store.snapshot() == before
    # The same rows in another format are the same judgments.
    assert import_path(store, write(tmp_path / "prefs", PAIRS, "parquet")).judgments_added == 0


def test_a_retracted_import_stays_retracted_on_reimport(store, tmp_path):
    path = write(tmp_path / "prefs", PAIRS[:1], "jsonl")
    import_path(store, path)
    store.undo_last("import")
    assert import_path(store, path).judgments_added == 0
    assert store.count_judgments() == 0


# -- bad input ------------------------------------------------------------------------

GOOD = {"prompt": "Fine prompt?", "chosen": "Good.", "rejected": "Bad."}


def _jsonl(*rows) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


BAD_FILES = {
    # name: (file name, file bytes, [fragments the message must contain])
    "malformed-jsonl": ("bad.jsonl", _jsonl(GOOD, GOOD, '{"prompt": "x", "chosen": '),
                        ["bad.jsonl", "line 3", "malformed JSON"]),
    "malformed-json": ("bad.json", b'[\n {"prompt": "a"},\n {"prompt": }\n]',
                       ["bad.json", "line 3", "malformed JSON"]),
    "jsonl-not-object": ("bad.jsonl", _jsonl(GOOD, '["a", "b"]'),
                         ["bad.jsonl", "line 2", "expected a JSON object"]),
    "json-not-array": ("bad.json", b'{"prompt": "a"}', ["bad.json", "expected a JSON array"]),
    "missing-column": ("bad.jsonl", _jsonl({"prompt": "p", "chosen": "c"}),
                       ["bad.jsonl", "missing column(s) 'rejected'"]),
    "missing-label": ("bad.jsonl", _jsonl({"prompt": "p", "completion": "c"}),
                      ["bad.jsonl", "missing column(s) 'label'"]),
    "unknown-column": ("bad.jsonl", _jsonl(GOOD, dict(GOOD, score=3)),
                       ["bad.jsonl", "line 2", "unknown column(s) 'score'"]),
    "row-missing-value": ("bad.jsonl", _jsonl(GOOD, GOOD, {"prompt": "p", "chosen": "c"}),
                          ["bad.jsonl", "line 3", "'rejected' is missing"]),
    "wrong-type": ("bad.jsonl", _jsonl(GOOD, dict(GOOD, chosen=42)),
                   ["bad.jsonl", "line 2", "'chosen' must be text", "a number"]),
    "null-value": ("bad.jsonl", _jsonl(dict(GOOD, prompt=None)),
                   ["bad.jsonl", "line 1", "'prompt' is missing or null"]),
    "label-not-bool": ("bad.jsonl", _jsonl({"prompt": "p", "completion": "c", "label": "yes"}),
                       ["bad.jsonl", "line 1", "'label' must be true or false"]),
    "empty-text": ("bad.jsonl", _jsonl(GOOD, dict(GOOD, prompt="   ")),
                   ["bad.jsonl", "line 2", "'prompt' is empty"]),
    "too-long": ("bad.jsonl", _jsonl(GOOD, dict(GOOD, chosen="x" * (MAX_FIELD_CHARS + 1))),
                 ["bad.jsonl", "line 2", "'chosen' is 100,001 characters", "limit"]),
    "nul-char": ("bad.jsonl", _jsonl(dict(GOOD, rejected="a\x00b")),
                 ["bad.jsonl", "line 1", "NUL"]),
    "megabyte-prompt": ("bad.jsonl", _jsonl(GOOD, dict(GOOD, prompt="p" * (1 << 20))),
                        ["bad.jsonl", "line 2", "'prompt' is 1,048,576 characters", "limit"]),
    "control-char": ("bad.jsonl", _jsonl(dict(GOOD, prompt="ring \x07 the bell")),
                     ["bad.jsonl", "line 1", "'prompt' contains the control character U+0007"]),
    "escape-in-answer": ("bad.csv", b"prompt,chosen,rejected\na,b\x1b[2Jc,d\n",
                         ["bad.csv", "row 1", "'chosen' contains the control character U+001B"]),
    "lone-surrogate": ("bad.jsonl", b'{"prompt": "p", "chosen": "\\ud800", "rejected": "r"}\n',
                       ["bad.jsonl", "line 1", "'chosen' is not valid Unicode"]),
    "hh-control-char": ("bad.jsonl", _jsonl({"chosen": hh("a\x1b?", "x"),
                                             "rejected": hh("a\x1b?", "y")}),
                        ["bad.jsonl", "line 1", "control character U+001B"]),
    "same-answers": ("bad.jsonl", _jsonl(dict(GOOD, rejected=" Good. ")),
                     ["bad.jsonl", "line 1", "same text"]),
    "bad-encoding": ("bad.jsonl", _jsonl(GOOD) + '{"prompt": "café"}\n'.encode("latin-1"),
                     ["bad.jsonl", "line 2", "not valid UTF-8"]),
    "empty-file": ("bad.jsonl", b"", ["bad.jsonl", "empty"]),
    "blank-file": ("bad.csv", b"\n  \n", ["bad.csv", "empty"]),
    "empty-array": ("bad.json", b"[]", ["bad.json", "no data rows"]),
    "header-only-csv": ("bad.csv", b"prompt,chosen,rejected\n", ["bad.csv", "no data rows"]),
    "unknown-extension": ("bad.xml", b"hello\n", ["bad.xml", "unknown file type '.xml'"]),
    "txt-control-char": ("bad.txt", b"fine\n\nbell \x07 here\n",
                         ["bad.txt", "line 3", "control character U+0007"]),
    "no-extension": ("bad", b"hello\n", ["bad", "unknown file type"]),
    "csv-ragged": ("bad.csv", b"prompt,chosen,rejected\na,b,c\nd,e,f,g\n",
                   ["bad.csv", "malformed CSV", "line 3"]),
    "csv-empty-cell": ("bad.csv", b"prompt,chosen,rejected\na,b,c\nd,,f\n",
                       ["bad.csv", "row 2", "'chosen' is empty"]),
    "csv-bad-label": ("bad.csv", b"prompt,completion,label\na,b,true\nc,d,maybe\n",
                      ["bad.csv", "row 2", "'label' must be true/false"]),
    "not-parquet": ("bad.parquet", b"this is not parquet", ["bad.parquet", "not a readable Parquet"]),
    "hh-not-transcript": ("bad.jsonl", _jsonl({"chosen": "just text", "rejected": "other"}),
                          ["bad.jsonl", "line 1", "not a Human/Assistant transcript"]),
    "hh-different-prompts": ("bad.jsonl", _jsonl({"chosen": hh("a?", "x"), "rejected": hh("b?", "y")}),
                             ["bad.jsonl", "line 1", "do not answer the same prompt"]),
    "hh-empty-answer": ("bad.jsonl", _jsonl({"chosen": hh("a?", "x"), "rejected": hh("a?", " ")}),
                        ["bad.jsonl", "line 1", "empty"]),
    "hh-not-alternating": ("bad.jsonl", _jsonl({"chosen": hh("a?") + hh("b?", "y"),
                                                "rejected": hh("a?") + hh("b?", "z")}),
                           ["bad.jsonl", "line 1", "message 2 is a user turn"]),
    "conv-bad-role": ("bad.jsonl", _jsonl(dict(GOOD, chosen=[{"role": "robot", "content": "hi"}],
                                               rejected=bot("no"))),
                      ["bad.jsonl", "line 1", "role 'robot'"]),
    "conv-answer-not-assistant": ("bad.jsonl", _jsonl(dict(GOOD, chosen=user("hi"),
                                                           rejected=bot("no"))),
                                  ["bad.jsonl", "line 1", "last message must be the assistant"]),
    "conv-mixed": ("bad.jsonl", _jsonl(dict(GOOD, chosen=bot("hi"))),
                   ["bad.jsonl", "line 1", "both be text or both be message lists"]),
}


@pytest.fixture
def filled_store(store, tmp_path):
    """A store with some data in it, so 'unchanged' means something."""
    import_path(store, write(tmp_path / "existing", PAIRS, "jsonl"))
    store.add_prompt("already here", "ui")
    return store


def _assert_untouched(store, before_stats, before_snapshot):
    assert store.stats() == before_stats
    assert store.snapshot() == before_snapshot
    # And on disk, through a fresh connection: the judgments table did not move.
    other = Store(store.path)
    try:
        assert other.snapshot()["judgments"] == before_snapshot["judgments"]
        assert other.snapshot() == before_snapshot
    finally:
        other.close()


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_input_names_file_row_and_problem_and_writes_nothing(filled_store, tmp_path, case):
    name, data, fragments = BAD_FILES[case]
    path = tmp_path / name
    path.write_bytes(data)
    stats, snap = filled_store.stats(), filled_store.snapshot()
    with pytest.raises(ImportFileError) as info:
        import_path(filled_store, path)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    _assert_untouched(filled_store, stats, snap)


def test_missing_file(store, tmp_path):
    with pytest.raises(ImportFileError, match="nope.jsonl: no such file"):
        import_path(store, tmp_path / "nope.jsonl")


@pytest.mark.parametrize("fmt", FORMATS)
def test_bad_row_900_leaves_the_store_untouched(filled_store, tmp_path, fmt):
    rows = [{"prompt": f"prompt {i}?", "chosen": f"good {i}", "rejected": f"bad {i}"}
            for i in range(1, 900)]
    rows.append({"prompt": "prompt 900?", "chosen": "same", "rejected": "same"})
    path = write(tmp_path / "big", rows, fmt)
    stats, snap = filled_store.stats(), filled_store.snapshot()
    where = {"jsonl": "line 900", "json": "item 900"}.get(fmt, "row 900")
    with pytest.raises(ImportFileError, match=f"big.{fmt}: {where}: chosen and rejected are"):
        import_path(filled_store, path)
    _assert_untouched(filled_store, stats, snap)


def test_a_store_error_mid_write_rolls_back_the_whole_file(filled_store, tmp_path, monkeypatch):
    from rpo_app.store import StoreError

    path = write(tmp_path / "prefs", [dict(GOOD, prompt=f"new {i}?") for i in range(5)], "jsonl")
    calls = {"n": 0}
    real = filled_store.add_judgment

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise StoreError("simulated refusal")
        return real(*args, **kwargs)

    monkeypatch.setattr(filled_store, "add_judgment", flaky)
    stats, snap = filled_store.stats(), filled_store.snapshot()
    with pytest.raises(ImportFileError, match="prefs.jsonl: line 4: simulated refusal"):
        import_path(filled_store, path)
    _assert_untouched(filled_store, stats, snap)


# -- pasted prompts and seeding --------------------------------------------------------


def test_add_prompt_texts_lines_and_json(store):
    report = add_prompt_texts(store, "First prompt?\n\n  Second prompt?  \nFirst prompt?\n")
    assert (report.prompts_added, report.prompts_duplicate) == (2, 1)
    report = add_prompt_texts(store, '["Third?", {"prompt": "Fourth?", "family": "f"}]')
    assert report.prompts_added == 2
    assert [p["text"] for p in store.prompts()] == ["First prompt?", "Second prompt?", "Third?",
                                                    "Fourth?"]
    assert store.prompts()[0]["source"] == "ui"
    # Text that starts with "[" but is not JSON is just a prompt.
    assert add_prompt_texts(store, "[draft] write a haiku").prompts_added == 1
    before = store.snapshot()
    with pytest.raises(ImportFileError, match="pasted text: line 2: 'prompt' is 100,001"):
        add_prompt_texts(store, "ok\n" + "x" * (MAX_FIELD_CHARS + 1))
    with pytest.raises(ImportFileError, match="item 2: 'prompt' must be text"):
        add_prompt_texts(store, '["ok", 3]')
    with pytest.raises(ImportFileError, match="no prompts"):
        add_prompt_texts(store, "  \n ")
    assert store.snapshot() == before


def test_seed_if_empty_loads_the_seed_prompts_once(store):
    expected = sum(1 for line in (REPO / "data" / "prompts.jsonl").open() if line.strip())
    assert rio.SEED_PROMPTS == REPO / "data" / "prompts.jsonl"
    n = seed_if_empty(store)
    assert 150 <= n == expected
    assert store.count_prompts() == n
    assert all(p["family"] and p["source"] == "seed" for p in store.prompts())
    assert seed_if_empty(store) == 0
    assert store.count_prompts() == n


def test_seed_if_empty_leaves_a_used_store_alone(store, tmp_path):
    store.add_prompt("mine", "ui")
    assert seed_if_empty(store) == 0
    assert seed_if_empty(Store(tmp_path / "other"), path=tmp_path / "missing.jsonl") == 0


# -- export ---------------------------------------------------------------------------


@pytest.fixture
def judged_store(store):
    """Every kind and verdict, with provenance, plus one retracted judgment."""
    p1, _ = store.add_prompt("What is 2+2?", "seed", "math")
    p2, _ = store.add_prompt("What is 3+3?", "seed", "math")
    a = store.add_response(p1, "Four.", "generate", model="base", gen_settings={"temperature": 0.8})[0]
    b = store.add_response(p1, "Five.", "generate", model="base", adapter="tuned", cut_off=True)[0]
    c = store.add_response(p1, "Twenty-two.", "import", import_file="old.jsonl")[0]
    d = store.add_response(p2, "Six.", "generate", model="base")[0]
    e = store.add_response(p2, "Seven.", "generate", model="base")[0]
    store.add_judgment("paired", a, b, "a", "alice", strength="clearly", a_side="left",
                       seconds_spent=3.5)
    store.add_judgment("paired", b, c, "b", "bob", a_side="right")
    store.add_judgment("paired", a, c, "tie", "alice")
    store.add_judgment("paired", b, c, "both_bad", "alice")
    store.add_judgment("cross", a, e, "a", "alice")
    store.add_judgment("cross", b, e, "both_bad", "bob")
    store.add_judgment("unpaired", d, None, "up", "alice")
    store.add_judgment("unpaired", e, None, "down", "alice")
    gone, _ = store.add_judgment("paired", d, e, "a", "carol")
    store.retract(gone, by="carol")
    return store


def _load(path: Path, tmp_path: Path):
    from datasets import load_dataset

    return load_dataset("json", data_files=str(path), split="train",
                        cache_dir=str(tmp_path / "hf-cache"))


def test_export_trl_dpo_loads_with_datasets(judged_store, tmp_path):
    out = tmp_path / "out" / "dpo.jsonl"
    report = export(judged_store, "trl-dpo", out)
    ds = _load(out, tmp_path)
    assert ds.column_names == ["prompt", "chosen", "rejected"]
    assert ds.to_list() == [{"prompt": "What is 2+2?", "chosen": "Four.", "rejected": "Five."},
                            {"prompt": "What is 2+2?", "chosen": "Twenty-two.", "rejected": "Five."}]
    assert report.rows == 2
    assert sum(report.skipped.values()) == 6  # tie, both_bad, 2 cross, 2 thumbs; not retracted
    assert report.skipped["cross-prompt (DPO needs one prompt for both answers)"] == 2
    assert "wrote 2 rows" in report.summary() and "skipped 6" in report.summary()
    assert [p.name for p in out.parent.iterdir()] == ["dpo.jsonl"]  # no temp file left


def test_export_trl_kto_loads_with_datasets(judged_store, tmp_path):
    out = tmp_path / "kto.jsonl"
    report = export(judged_store, "trl-kto", out)
    ds = _load(out, tmp_path)
    assert ds.column_names == ["prompt", "completion", "label"]
    assert ds.features["label"].dtype == "bool"
    q2, q3 = "What is 2+2?", "What is 3+3?"
    assert [(r["prompt"], r["completion"], r["label"]) for r in ds] == [
        (q2, "Four.", True), (q2, "Five.", False),          # paired a
        (q2, "Five.", False), (q2, "Twenty-two.", True),         # paired b
        (q2, "Five.", False), (q2, "Twenty-two.", False),        # paired both_bad
        (q2, "Four.", True), (q3, "Seven.", False),          # cross a: each with its own prompt
        (q2, "Five.", False), (q3, "Seven.", False),         # cross both_bad
        (q3, "Six.", True), (q3, "Seven.", False),          # thumbs
    ]
    assert report.rows == 12 and report.skipped == {"tie (neither answer is better or worse)": 1}


@pytest.mark.parametrize("fmt", ["trl-dpo", "trl-kto"])
@pytest.mark.parametrize("ext", [".json", ".csv", ".parquet"])
def test_export_trl_other_file_types(judged_store, tmp_path, fmt, ext):
    out = tmp_path / f"out{ext}"
    report = export(judged_store, fmt, out)
    df = {".json": pd.read_json, ".csv": pd.read_csv, ".parquet": pd.read_parquet}[ext](out)
    cols = ["prompt", "chosen", "rejected"] if fmt == "trl-dpo" else ["prompt", "completion", "label"]
    assert list(df.columns) == cols and len(df) == report.rows
    if fmt == "trl-kto":
        assert df["label"].tolist()[:2] == [True, False]


@pytest.mark.parametrize("ext", [".csv", ".jsonl", ".parquet"])
def test_full_export_round_trips_with_provenance(judged_store, tmp_path, ext):
    out = tmp_path / f"full{ext}"
    report = export(judged_store, "full", out)
    df = pd.read_json(out, lines=True) if ext == ".jsonl" else (
        pd.read_csv(out) if ext == ".csv" else pd.read_parquet(out))
    assert report.rows == len(df) == 8
    assert list(df.columns) == rio.FULL_COLUMNS
    first = df.iloc[0]
    assert (first["kind"], first["verdict"], first["strength"], first["annotator"]) == (
        "paired", "a", "clearly", "alice")
    assert (first["a_side"], float(first["seconds_spent"]), first["source"]) == ("left", 3.5, "label")
    assert (first["prompt_a"], first["response_a"], first["response_b"]) == ("What is 2+2?", "Four.", "Five.")
    assert (first["model_a"], first["adapter_b"], first["family_a"]) == ("base", "tuned", "math")
    assert json.loads(first["gen_settings_a"]) == {"temperature": 0.8}
    assert str(first["created_at"]).startswith("20") and "+00:00" in str(first["created_at"])
    second = df.iloc[1]
    assert (second["response_b_source"], second["import_file_b"]) == ("import", "old.jsonl")
    kinds = df["kind"].tolist()
    assert kinds.count("cross") == 2 and kinds.count("unpaired") == 2
    thumbs = df[df["kind"] == "unpaired"].iloc[0]
    assert pd.isna(thumbs["response_b"]) and thumbs["verdict"] == "up"
    # Which answers stopped at their token limit ("Five." did), and none for a thumb's
    # missing side. pandas reads JSON's true as 1.0 and CSV's as text.
    flag = {True: True, "True": True, False: False, "False": False}
    assert [flag[v] for v in df[["response_a_cut_off", "response_b_cut_off"]].iloc[0]] == [
        False, True]
    assert pd.isna(thumbs["response_b_cut_off"])


def test_full_export_with_retracted(judged_store, tmp_path):
    out = tmp_path / "full.parquet"
    assert export(judged_store, "full", out, include_retracted=True).rows == 9
    df = pd.read_parquet(out)
    assert list(df.columns) == rio.FULL_COLUMNS + rio.RETRACTED_COLUMNS
    gone = df[df["retracted"]]
    assert len(gone) == 1 and gone.iloc[0]["retracted_by"] == "carol"
    assert gone.iloc[0]["retracted_at"] is not None


def test_export_refusals_and_atomic_write(judged_store, tmp_path, monkeypatch):
    with pytest.raises(ExportError, match="unknown output type '.txt'"):
        export(judged_store, "trl-dpo", tmp_path / "x.txt")
    with pytest.raises(ExportError, match="unknown export format"):
        export(judged_store, "trl-orpo", tmp_path / "x.jsonl")
    out = tmp_path / "dpo.parquet"
    out.write_bytes(b"previous export")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", crash)
    with pytest.raises(OSError, match="disk full"):
        export(judged_store, "trl-dpo", out)
    assert out.read_bytes() == b"previous export"  # untouched, no half file
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_trl_exports_count_the_rows_with_a_cut_answer_or_leave_them_out(judged_store, tmp_path):
    # "Five." hit its token limit: TRL would end it with an end-of-turn the model never wrote.
    dpo = export(judged_store, "trl-dpo", tmp_path / "dpo.jsonl")
    assert (dpo.rows, dpo.cut_rows) == (2, 2)  # both decided pairs hold "Five."
    assert "2 of them hold an answer cut at its token limit" in dpo.summary()
    kept = export(judged_store, "trl-kto", tmp_path / "kto.jsonl")
    rows = pd.read_json(tmp_path / "kto.jsonl", lines=True)
    assert kept.cut_rows == (rows["completion"] == "Five.").sum() == 4
    dropped = export(judged_store, "trl-kto", tmp_path / "kto-dropped.jsonl", cut="drop")
    left = pd.read_json(tmp_path / "kto-dropped.jsonl", lines=True)
    assert "Five." not in set(left["completion"]) and len(left) == len(rows) - 4
    assert (dropped.rows, dropped.cut_rows, dropped.cut_dropped) == (len(rows) - 4, 4, True)
    assert "left out 4 rows that hold an answer cut" in dropped.summary()
    # the row of "Five." goes, not its judgment's other answer
    assert ("What is 2+2?", "Four.", True) in set(left.itertuples(index=False, name=None))


def test_leaving_out_cut_answers_is_refused_outside_the_trl_formats(judged_store, tmp_path):
    with pytest.raises(ExportError, match="applies to the TRL formats.*keeps each answer's cut_off flag"):
        export(judged_store, "full", tmp_path / "full.jsonl", cut="drop")
    with pytest.raises(ExportError, match="unknown choice for cut answers 'maybe'"):
        export(judged_store, "trl-dpo", tmp_path / "dpo.jsonl", cut="maybe")
    assert not (tmp_path / "full.jsonl").exists() and not (tmp_path / "dpo.jsonl").exists()


def test_export_of_an_empty_store(store, tmp_path):
    report = export(store, "trl-dpo", tmp_path / "dpo.csv")
    assert report.rows == 0 and list(pd.read_csv(tmp_path / "dpo.csv").columns) == [
        "prompt", "chosen", "rejected"]


# -- CLI ------------------------------------------------------------------------------


def _cli(*args, data_dir):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "rpo_app", *args, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)


def test_cli_import_exit_codes(tmp_path):
    data_dir = tmp_path / "data"
    good = write(tmp_path / "good", PAIRS, "jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(_jsonl(GOOD, GOOD, dict(GOOD, prompt="")))
    ok = _cli("import", str(good), "--annotator", "cli-user", data_dir=data_dir)
    assert ok.returncode == 0, ok.stderr
    assert "added 2 prompts, 5 responses, 3 judgments" in ok.stdout
    # good + bad together: every file is checked first, so nothing at all is written.
    failed = _cli("import", str(bad), str(good), data_dir=data_dir)
    assert failed.returncode == 2
    assert "bad.jsonl: line 3: column 'prompt' is empty" in failed.stderr
    assert "nothing was imported" in failed.stderr
    s = Store(data_dir)
    assert s.stats()["judgments"] == 3 and s.stats()["annotators"] == {"cli-user": 3}
    s.close()


def test_cli_export_and_stats_in_process(tmp_path, capsys):
    from rpo_app.cli import main

    data_dir = tmp_path / "data"
    s = Store(data_dir)
    import_path(s, write(tmp_path / "p", PAIRS, "jsonl"), annotator="ann")
    s.close()
    out = tmp_path / "dpo.jsonl"
    assert main(["export", "--format", "trl-dpo", "--out", str(out),
                 "--data-dir", str(data_dir)]) == 0
    assert "wrote 3 rows" in capsys.readouterr().out
    assert main(["export", "--format", "full", "--out", str(tmp_path / "x.xlsx"),
                 "--data-dir", str(data_dir)]) == 2
    assert "unknown output type" in capsys.readouterr().err
    assert main(["stats", "--json", "--data-dir", str(data_dir)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["judgments"] == 3 and stats["by_kind"]["paired"] == {"a": 3}
    assert main(["stats", "--data-dir", str(data_dir)]) == 0
    table = capsys.readouterr().out
    assert "paired" in table and "ann" in table and "prompts" in table
    s = Store(data_dir)
    pid = s.prompts()[0]["id"]
    cut = s.add_response(pid, "An answer that ran out of", "generate", model="m", cut_off=True)[0]
    s.add_judgment("unpaired", cut, None, "down", "ann")
    s.close()
    assert main(["export", "--format", "trl-kto", "--out", str(tmp_path / "kto.jsonl"), "--cut", "drop",
                 "--data-dir", str(data_dir)]) == 0
    assert "left out 1 row that holds an answer cut" in capsys.readouterr().out
    assert "ran out of" not in (tmp_path / "kto.jsonl").read_text()


def test_right_to_left_text_and_tabs_import_unchanged(store, tmp_path):
    rows = [{"prompt": "كيف أتعلم الطبخ؟", "chosen": "ابدأ بوصفات بسيطة.\tStep 1.",
             "rejected": "לא יודע."}]
    import_path(store, write(tmp_path / "rtl", rows, "jsonl"))
    (judgment,) = store.judgments()
    assert store.prompt(judgment["prompt_a_id"])["text"] == rows[0]["prompt"]
    texts = {store.response(judgment[k])["text"] for k in ("response_a", "response_b")}
    assert texts == {rows[0]["chosen"], rows[0]["rejected"]}
