"""Prompts that are conversations, in and out: TRL's conversational preference,
"implicit prompt" and unpaired shapes, Anthropic-HH transcripts of several turns,
rankings of a conversation; bad conversations; the multi_turn policies; exports in
TRL's conversational format and their round trips into a fresh store."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from rpo_app import conversation
from rpo_app import io as rio
from rpo_app.io import ImportFileError, export, import_path, read_import_file
from rpo_app.store import Store


def write(path: Path, rows: list[dict], fmt: str) -> Path:
    """Rows as JSONL, JSON, CSV (lists as JSON text in the cell) or Parquet (native)."""
    path = path.with_suffix("." + fmt)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    elif fmt == "csv":
        pd.DataFrame([{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()}
                      for r in rows]).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def _jsonl(*rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def sys_(text):
    return [{"role": "system", "content": text}]


def user(text):
    return [{"role": "user", "content": text}]


def bot(text):
    return [{"role": "assistant", "content": text}]


def hh(*turns):
    """hh("q", "a") -> "\\n\\nHuman: q\\n\\nAssistant: a"."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}"
                   for i, t in enumerate(turns))


# A conversation with a system message and three user turns, and one without a system.
TRIP = (sys_("You are a travel agent.") + user("I want to go to Italy.") + bot("Rome or Venice?")
        + user("Rome. How many days?") + bot("Four is good.") + user("And the best month?"))
COOK = user("How do I boil an egg?") + bot("Soft or hard?") + user("Hard.")


def convs(store) -> list[tuple]:
    """(prompt messages or its text, answer a, answer b, verdict) of every active judgment."""
    out = []
    for j in store.judgments():
        prompt = (json.loads(j["prompt_a_messages"]) if j["prompt_a_messages"]
                  else j["prompt_a"])
        out.append((prompt, j["response_a_text"], j["response_b_text"], j["verdict"]))
    return out


def rank_orders(store) -> list[tuple]:
    by_id = {p["id"]: p for p in store.prompts()}
    return [(by_id[k["prompt_id"]]["messages"] or k["prompt"],
             [sorted(k["answers"][r] for r in tier) for tier in k["tiers"]], k["none_acceptable"])
            for k in store.rankings()]


# -- import: every shape ----------------------------------------------------------------


def test_trl_conversational_preference(store, tmp_path):
    rows = [{"prompt": TRIP, "chosen": bot("May or September."), "rejected": bot("August."),
             "family": "travel"},
            {"prompt": COOK, "chosen": bot("Ten minutes."), "rejected": bot("One minute.")},
            # one user turn as a list: a plain prompt, as always
            {"prompt": user("Say hi."), "chosen": bot("Hi!"), "rejected": bot("No.")}]
    report = import_path(store, write(tmp_path / "conv", rows, "jsonl"), annotator="alice")
    assert report.shape == "preference"
    assert report.added == {"prompts": 3, "responses": 6, "judgments": 3}
    assert convs(store) == [(TRIP, "May or September.", "August.", "a"),
                            (COOK, "Ten minutes.", "One minute.", "a"),
                            ("Say hi.", "Hi!", "No.", "a")]
    trip, cook, hi = store.prompts()
    assert trip["messages"] == TRIP and trip["family"] == "travel"
    assert trip["text"] == conversation.transcript(TRIP)
    assert trip["text"].startswith("System: You are a travel agent.\n\nUser: I want to go")
    assert cook["messages"] == COOK and cook["family"] is None
    assert (hi["text"], hi["messages"]) == ("Say hi.", None)
    # Training reads the whole history (the final assistant turn is the answer).
    assert store.training_judgments()[0]["prompt_a_messages"] == TRIP


def test_trl_conversational_preference_parquet(store, tmp_path):
    rows = [{"prompt": TRIP, "chosen": bot("May or September."), "rejected": bot("August.")},
            {"prompt": COOK, "chosen": bot("Ten minutes."), "rejected": bot("One minute.")}]
    report = import_path(store, write(tmp_path / "conv", rows, "parquet"))
    assert report.added == {"prompts": 2, "responses": 4, "judgments": 2}
    assert convs(store) == [(TRIP, "May or September.", "August.", "a"),
                            (COOK, "Ten minutes.", "One minute.", "a")]
    # The same rows in JSONL are the same judgments.
    again = import_path(store, write(tmp_path / "conv", rows, "jsonl"))
    assert again.added == {"prompts": 0, "responses": 0, "judgments": 0}


def test_trl_implicit_prompt(store, tmp_path):
    rows = [{"chosen": TRIP + bot("May or September."), "rejected": TRIP + bot("August.")},
            {"chosen": COOK + bot("Ten minutes."), "rejected": COOK + bot("One minute.")}]
    report = import_path(store, write(tmp_path / "implicit", rows, "jsonl"))
    assert report.shape == "implicit-preference"
    assert convs(store) == [(TRIP, "May or September.", "August.", "a"),
                            (COOK, "Ten minutes.", "One minute.", "a")]
    # TRL's explicit shape of the same rows is the same judgments.
    explicit = [{"prompt": TRIP, "chosen": bot("May or September."), "rejected": bot("August.")}]
    assert import_path(store, write(tmp_path / "explicit", explicit, "jsonl")).judgments_added == 0


def test_answer_lists_that_repeat_the_prompt(store, tmp_path):
    rows = [{"prompt": COOK, "chosen": COOK + bot("Ten minutes."),
             "rejected": COOK + bot("One minute.")}]
    import_path(store, write(tmp_path / "uf", rows, "jsonl"))
    assert convs(store) == [(COOK, "Ten minutes.", "One minute.", "a")]


def test_trl_conversational_unpaired(store, tmp_path):
    rows = [{"prompt": TRIP, "completion": bot("May or September."), "label": True},
            {"prompt": TRIP, "completion": bot("August."), "label": False},
            {"prompt": COOK, "completion": bot("Ten minutes."), "label": True}]
    report = import_path(store, write(tmp_path / "kto", rows, "jsonl"))
    assert report.shape == "unpaired"
    assert report.added == {"prompts": 2, "responses": 3, "judgments": 3}
    assert convs(store) == [(TRIP, "May or September.", None, "up"),
                            (TRIP, "August.", None, "down"),
                            (COOK, "Ten minutes.", None, "up")]


def test_anthropic_hh_several_turns(store, tmp_path):
    history = ("I want to go to Italy.", "Rome or Venice?", "Rome. How many days?",
               "Four is good.", "And the best month?")
    rows = [{"chosen": hh(*history, "May or September."), "rejected": hh(*history, "August.")},
            {"chosen": hh("How do I boil an egg?", "Soft or hard?", "Hard.", "Ten minutes."),
             "rejected": hh("How do I boil an egg?", "Soft or hard?", "Hard.", "One minute.")}]
    report = import_path(store, write(tmp_path / "hh", rows, "jsonl"), annotator="hh")
    assert report.shape == "implicit-preference"
    assert convs(store) == [(TRIP[1:], "May or September.", "August.", "a"),
                            (COOK, "Ten minutes.", "One minute.", "a")]
    # The same conversation in TRL's shape is the same prompt and the same judgment.
    trl = [{"prompt": COOK, "chosen": bot("Ten minutes."), "rejected": bot("One minute.")}]
    again = import_path(store, write(tmp_path / "trl", trl, "jsonl"))
    assert again.added == {"prompts": 0, "responses": 0, "judgments": 0}


def test_prompts_and_rankings_of_conversations(store, tmp_path):
    import_path(store, write(tmp_path / "p", [{"prompt": TRIP, "family": "travel"},
                                              {"prompt": "Plain?"}], "jsonl"))
    assert [(p["messages"], p["family"]) for p in store.prompts()] == [(TRIP, "travel"),
                                                                        (None, None)]
    ranked = [{"prompt": COOK, "answers": ["Ten minutes.", "One minute.", "An hour."],
               "ranks": [1, 2, 3]}]
    report = import_path(store, write(tmp_path / "r", ranked, "jsonl"))
    assert (report.shape, report.rankings_added, report.judgments_added) == ("ranking", 1, 3)
    assert rank_orders(store) == [(COOK, [["Ten minutes."], ["One minute."], ["An hour."]], False)]


def test_parsed_prompts_are_what_add_prompts_takes(store, tmp_path):
    """`generate --prompts` stores a file's prompts, conversations included."""
    from rpo_app.generate import _prompt_ids_from_file

    rows = [{"prompt": TRIP, "completion": bot("May."), "label": True, "family": "travel"},
            {"prompt": TRIP, "completion": bot("August."), "label": False},
            {"prompt": user("Say hi."), "completion": bot("Hi!"), "label": True}]
    path = write(tmp_path / "kto", rows, "jsonl")
    items = read_import_file(path).prompts()
    assert items == [{"prompt": conversation.transcript(TRIP), "family": "travel",
                      "messages": TRIP},
                     {"prompt": "Say hi.", "family": None}]
    ids = _prompt_ids_from_file(store, path)
    assert [store.prompt(i)["messages"] for i in ids] == [TRIP, None]
    assert store.count_judgments() == 0 and store.count_responses() == 0


def test_reimport_adds_nothing_and_the_id_covers_the_whole_conversation(store, tmp_path):
    rows = [{"prompt": TRIP, "chosen": bot("May or September."), "rejected": bot("August.")}]
    path = write(tmp_path / "conv", rows, "jsonl")
    import_path(store, path)
    before = store.snapshot()
    again = import_path(store, path, annotator="someone-else")
    assert again.added == {"prompts": 0, "responses": 0, "judgments": 0}
    assert store.snapshot() == before
    # The same last turn after another history is another prompt and another judgment.
    other = [dict(rows[0], prompt=sys_("You are a pirate.") + TRIP[1:])]
    report = import_path(store, write(tmp_path / "other", other, "jsonl"))
    assert report.added == {"prompts": 1, "responses": 2, "judgments": 1}
    (j1, j2) = store.judgments()
    assert j1["request_id"] != j2["request_id"]


# -- multi_turn policies --------------------------------------------------------------


def test_multi_turn_last_and_refuse(store, tmp_path):
    rows = [{"prompt": TRIP, "chosen": bot("May or September."), "rejected": bot("August.")},
            {"chosen": hh("How do I boil an egg?", "Soft or hard?", "Hard.", "Ten minutes."),
             "rejected": hh("How do I boil an egg?", "Soft or hard?", "Hard.", "One minute.")}]
    trl, hh_file = (write(tmp_path / f"f{i}", [r], "jsonl") for i, r in enumerate(rows))
    before = store.snapshot()
    for path in (trl, hh_file):
        with pytest.raises(ImportFileError, match=r"line 1: multi-turn conversation .* refused"):
            import_path(store, path, multi_turn="refuse")
    assert store.snapshot() == before
    import_path(store, trl, multi_turn="last")
    import_path(store, hh_file, multi_turn="last")
    assert convs(store) == [("And the best month?", "May or September.", "August.", "a"),
                            ("Hard.", "Ten minutes.", "One minute.", "a")]
    assert all(p["messages"] is None for p in store.prompts())
    # A single user turn is fine under every policy.
    single = write(tmp_path / "s", [{"prompt": user("Hi?"), "chosen": bot("Hi."),
                                     "rejected": bot("No.")}], "jsonl")
    assert import_path(store, single, multi_turn="refuse").judgments_added == 1
    with pytest.raises(ValueError, match="multi_turn is one of"):
        read_import_file(single, multi_turn="first")


def test_cli_multi_turn_flag(tmp_path, capsys):
    from rpo_app.cli import main

    path = write(tmp_path / "conv", [{"prompt": COOK, "chosen": bot("Ten minutes."),
                                      "rejected": bot("One minute.")}], "jsonl")
    data_dir = str(tmp_path / "data")
    assert main(["import", str(path), "--multi-turn", "refuse", "--data-dir", data_dir]) == 2
    assert "multi-turn conversation" in capsys.readouterr().err
    assert main(["import", str(path), "--data-dir", data_dir]) == 0
    assert main(["import", str(path), "--multi-turn", "last", "--data-dir", data_dir]) == 0
    s = Store(data_dir)
    try:
        assert [p["messages"] for p in s.prompts()] == [COOK, None]
    finally:
        s.close()


# -- bad conversations ----------------------------------------------------------------

GOOD = {"prompt": COOK, "chosen": bot("Ten minutes."), "rejected": bot("One minute.")}

BAD = {
    # name: (file name, file bytes, [fragments the message must contain])
    "ends-with-assistant": ("bad.jsonl", _jsonl(GOOD, dict(GOOD, prompt=COOK[:2])),
                            ["bad.jsonl", "line 2", "column 'prompt'",
                             "must end with a user turn"]),
    "bad-role": ("bad.jsonl", _jsonl(dict(GOOD, prompt=user("a") + [
                     {"role": "robot", "content": "b"}] + user("c"))),
                 ["bad.jsonl", "line 1", "message 2 has role 'robot'"]),
    "empty-message": ("bad.jsonl", _jsonl(dict(GOOD, prompt=user("a") + bot("  ") + user("c"))),
                      ["bad.jsonl", "line 1", "'prompt[2].content' is empty"]),
    "null-message": ("bad.jsonl", _jsonl(dict(GOOD, prompt=user("a") + [
                         {"role": "assistant", "content": None}] + user("c"))),
                     ["bad.jsonl", "line 1", "'prompt[2].content' is missing or null"]),
    "not-alternating": ("bad.jsonl", _jsonl(GOOD, GOOD, dict(GOOD, prompt=user("a") + user("b"))),
                        ["bad.jsonl", "line 3", "message 2 is a user turn"]),
    "system-not-first": ("bad.jsonl", _jsonl(dict(GOOD, prompt=user("a") + sys_("b") + user("c"))),
                         ["bad.jsonl", "line 1", "message 2 is a system turn"]),
    "only-system": ("bad.jsonl", _jsonl(dict(GOOD, prompt=sys_("Be kind."))),
                    ["bad.jsonl", "line 1", "needs a user turn after the system message"]),
    "empty-list": ("bad.jsonl", _jsonl(dict(GOOD, prompt=[])),
                   ["bad.jsonl", "line 1", "'prompt' is an empty message list"]),
    "implicit-different-history": (
        "bad.jsonl", _jsonl({"chosen": COOK + bot("Ten minutes."),
                             "rejected": TRIP + bot("One minute.")}),
        ["bad.jsonl", "line 1", "do not answer the same prompt"]),
    "implicit-not-ending-in-assistant": (
        "bad.jsonl", _jsonl({"chosen": COOK, "rejected": COOK}),
        ["bad.jsonl", "line 1", "last message must be the assistant's answer"]),
    "implicit-two-answers": (
        "bad.jsonl", _jsonl({"chosen": COOK + bot("Ten.") + bot("Minutes."),
                             "rejected": COOK + bot("Ten.") + bot("Seconds.")}),
        ["bad.jsonl", "line 1", "column 'chosen' before its final assistant message",
         "must end with a user turn"]),
    "implicit-answer-only": ("bad.jsonl", _jsonl({"chosen": bot("Ten."), "rejected": bot("One.")}),
                             ["bad.jsonl", "line 1", "no user turn before the answer"]),
    "hh-different-history": (
        "bad.jsonl", _jsonl({"chosen": hh("a?", "x", "b?", "y"),
                             "rejected": hh("a?", "z", "b?", "y2")}),
        ["bad.jsonl", "line 1", "do not answer the same prompt"]),
    "unpaired-ends-with-assistant": (
        "bad.jsonl", _jsonl({"prompt": COOK[:2], "completion": bot("x"), "label": True}),
        ["bad.jsonl", "line 1", "must end with a user turn"]),
    "ranking-ends-with-assistant": (
        "bad.jsonl", _jsonl({"prompt": COOK[:2], "answers": ["a", "b", "c"], "ranks": [1, 2, 3]}),
        ["bad.jsonl", "line 1", "column 'prompt'", "must end with a user turn"]),
    "prompts-bad-role": ("bad.jsonl", _jsonl({"prompt": [{"role": "tool", "content": "x"}]}),
                         ["bad.jsonl", "line 1", "role 'tool'"]),
    "csv-ends-with-assistant": (
        "bad.csv", pd.DataFrame([{k: json.dumps(v) for k, v in row.items()}
                                 for row in (GOOD, dict(GOOD, prompt=COOK[:2]))])
        .to_csv(index=False).encode(),
        ["bad.csv", "row 2", "must end with a user turn"]),
    "parquet-not-alternating": ("bad.parquet", None, ["bad.parquet", "row 2", "message 3 is"]),
    "too-long-transcript": (
        "bad.jsonl", _jsonl(dict(GOOD, prompt=user("a" * 60_000) + bot("b") + user("c" * 60_000))),
        ["bad.jsonl", "line 1", "as a transcript", "limit"]),
}


@pytest.fixture
def filled_store(store, tmp_path):
    import_path(store, write(tmp_path / "existing", [GOOD], "jsonl"))
    store.add_prompt("already here", "ui")
    return store


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_conversation_names_file_row_and_problem_and_stores_nothing(filled_store, tmp_path,
                                                                        case):
    name, data, fragments = BAD[case]
    path = tmp_path / name
    if data is None:  # Parquet: native message lists
        path = write(tmp_path / "bad", [GOOD, dict(GOOD, prompt=user("a") + bot("b") + bot("c"))],
                     "parquet")
    else:
        path.write_bytes(data)
    before = filled_store.snapshot()
    with pytest.raises(ImportFileError) as info:
        import_path(filled_store, path)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert filled_store.snapshot() == before


def test_a_conversation_cannot_join_a_plain_prompt_of_the_same_text(store, tmp_path):
    store.add_prompt(conversation.transcript(COOK), "ui")  # someone typed a transcript in
    before = store.snapshot()
    with pytest.raises(ImportFileError, match="line 1: the prompt is a conversation whose text is "
                                              "already stored as a single-turn prompt"):
        import_path(store, write(tmp_path / "c", [GOOD], "jsonl"))
    assert store.snapshot() == before


# -- export ---------------------------------------------------------------------------


@pytest.fixture
def conv_store(store):
    """A conversation, a system-prompted conversation and a plain prompt, with pairs,
    thumbs and a ranking on them."""
    (trip, cook, plain), _ = store.add_prompts(
        [{"messages": TRIP, "family": "travel"}, {"messages": COOK}, {"prompt": "Say hi."}], "seed")
    a, b, c = (store.add_response(trip, t, "generate")[0] for t in ("May.", "August.", "Never."))
    d, e = (store.add_response(cook, t, "generate")[0] for t in ("Ten minutes.", "One minute."))
    f, g = (store.add_response(plain, t, "generate")[0] for t in ("Hi!", "No."))
    store.add_judgment("paired", a, b, "a", "alice")
    store.add_judgment("paired", d, e, "b", "alice")
    store.add_judgment("paired", f, g, "a", "bob")
    store.add_judgment("unpaired", a, None, "up", "alice")
    store.add_judgment("unpaired", g, None, "down", "alice")
    store.add_ranking([[c], [a, b]], "carol", shown=[c, a, b])
    return store


def _rows(path: Path) -> list[dict]:
    ext = path.suffix
    if ext == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    df = pd.read_json(path) if ext == ".json" else pd.read_parquet(path)
    return [{k: rio._to_python(v) for k, v in r.items()} for r in df.to_dict("records")]


def _load(path: Path, tmp_path: Path):
    from datasets import load_dataset

    return load_dataset("json", data_files=str(path), split="train",
                        cache_dir=str(tmp_path / "hf-cache"))


def test_trl_dpo_export_is_conversational(conv_store, tmp_path):
    out = tmp_path / "dpo.jsonl"
    report = export(conv_store, "trl-dpo", out)
    rows = _rows(out)
    assert report.rows == len(rows) == 5  # 3 pairs + the ranking's 2 strict pairs
    assert rows[:3] == [
        {"prompt": TRIP, "chosen": bot("May."), "rejected": bot("August.")},
        {"prompt": COOK, "chosen": bot("One minute."), "rejected": bot("Ten minutes.")},
        {"prompt": user("Say hi."), "chosen": bot("Hi!"), "rejected": bot("No.")}]
    ds = _load(out, tmp_path)  # one type per column: datasets loads it
    assert ds.column_names == ["prompt", "chosen", "rejected"] and len(ds) == 5
    assert ds[0]["prompt"] == TRIP


def test_trl_kto_export_is_conversational(conv_store, tmp_path):
    out = tmp_path / "kto.parquet"
    report = export(conv_store, "trl-kto", out)
    rows = _rows(out)
    assert report.rows == len(rows)
    assert {"prompt": TRIP, "completion": bot("May."), "label": True} in rows
    assert {"prompt": user("Say hi."), "completion": bot("No."), "label": False} in rows
    assert all(isinstance(r["prompt"], list) and len(r["completion"]) == 1 for r in rows)
    assert pd.read_parquet(out)["label"].dtype == bool


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".csv", ".parquet"])
def test_trl_dpo_round_trip(conv_store, tmp_path, ext):
    out = tmp_path / f"dpo{ext}"
    export(conv_store, "trl-dpo", out)
    fresh = Store(tmp_path / "fresh")
    try:
        report = import_path(fresh, out)
        assert report.judgments_added == 5
        assert convs(fresh) == [(p, *sorted_pair(a, b, v)) for p, a, b, v in
                                convs_of_decided_pairs(conv_store)]
        assert sorted((p["text"], p["messages"]) for p in fresh.prompts()) == sorted(
            (p["text"], p["messages"]) for p in conv_store.prompts())
        assert import_path(fresh, out).judgments_added == 0
    finally:
        fresh.close()


def sorted_pair(a, b, verdict):
    """A decided pair as an import stores it: chosen first, verdict a."""
    return (a, b, "a") if verdict == "a" else (b, a, "a")


def convs_of_decided_pairs(store):
    return [c for c, j in zip(convs(store), store.judgments())
            if j["kind"] == "paired" and j["verdict"] in ("a", "b")]


@pytest.mark.parametrize("ext", [".jsonl", ".csv", ".parquet"])
def test_trl_kto_round_trip(store, tmp_path, ext):
    (trip, plain), _ = store.add_prompts([{"messages": TRIP}, "Say hi."], "seed")
    for pid, text, verdict in ((trip, "May.", "up"), (trip, "August.", "down"),
                               (plain, "Hi!", "up")):
        store.add_judgment("unpaired", store.add_response(pid, text, "generate")[0], None,
                           verdict, "alice")
    out = tmp_path / f"kto{ext}"
    export(store, "trl-kto", out)
    fresh = Store(tmp_path / "fresh")
    try:
        assert import_path(fresh, out).judgments_added == 3
        assert convs(fresh) == convs(store) == [(TRIP, "May.", None, "up"),
                                                (TRIP, "August.", None, "down"),
                                                ("Say hi.", "Hi!", None, "up")]
    finally:
        fresh.close()


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".csv", ".parquet"])
def test_rankings_round_trip(conv_store, tmp_path, ext):
    plain = conv_store.prompts()[2]["id"]
    x, y, z = (conv_store.add_response(plain, t, "generate")[0] for t in ("Hello.", "Hey.", "Go."))
    conv_store.add_ranking([[x, y, z]], "dave", none_acceptable=True)
    out = tmp_path / f"rankings{ext}"
    assert export(conv_store, "rankings", out).rows == 2
    if ext == ".jsonl":
        assert _rows(out) == [
            {"prompt": TRIP, "answers": ["Never.", "May.", "August."], "ranks": [1, 2, 2]},
            {"prompt": user("Say hi."), "answers": ["Hello.", "Hey.", "Go."], "ranks": "none"}]
    fresh = Store(tmp_path / "fresh")
    try:
        back = import_path(fresh, out)
        assert (back.shape, back.rankings_added) == ("ranking", 2)
        assert rank_orders(fresh) == rank_orders(conv_store) == [
            (TRIP, [["Never."], ["August.", "May."]], False),
            ("Say hi.", [["Go.", "Hello.", "Hey."]], True)]
        again = tmp_path / f"again{ext}"
        export(fresh, "rankings", again)
        assert import_path(fresh, again).rankings_added == 0
    finally:
        fresh.close()


def test_full_export_has_the_messages(conv_store, tmp_path):
    out = tmp_path / "full.parquet"
    export(conv_store, "full", out)
    df = pd.read_parquet(out)
    assert list(df.columns) == rio.FULL_COLUMNS
    assert {"prompt_a_messages", "prompt_b_messages"} <= set(rio.FULL_COLUMNS)
    first, third = df.iloc[0], df.iloc[2]
    assert json.loads(first["prompt_a_messages"]) == json.loads(first["prompt_b_messages"]) == TRIP
    assert first["prompt_a"] == conversation.transcript(TRIP)
    assert third["prompt_a"] == "Say hi." and pd.isna(third["prompt_a_messages"])
    thumbs = df[df["kind"] == "unpaired"].iloc[0]
    assert json.loads(thumbs["prompt_a_messages"]) == TRIP and pd.isna(thumbs["prompt_b_messages"])


# -- single-turn stores export exactly as before ----------------------------------------


@pytest.fixture
def plain_store(store):
    p, _ = store.add_prompt("What is 2+2?", "seed")
    a, b, c = (store.add_response(p, t, "generate")[0] for t in ("Four.", "Five.", "4"))
    store.add_judgment("paired", a, b, "a", "alice")
    store.add_judgment("unpaired", c, None, "down", "alice")
    store.add_ranking([[c], [a], [b]], "bob")
    return store


def test_single_turn_exports_are_plain_text_as_before(plain_store, tmp_path):
    q = "What is 2+2?"
    expected = {
        "trl-dpo": [{"prompt": q, "chosen": "Four.", "rejected": "Five."},
                    {"prompt": q, "chosen": "Four.", "rejected": "Five."},  # the ranking's
                    {"prompt": q, "chosen": "4", "rejected": "Four."},
                    {"prompt": q, "chosen": "4", "rejected": "Five."}],
        "trl-kto": [{"prompt": q, "completion": "Four.", "label": True},
                    {"prompt": q, "completion": "Five.", "label": False},
                    {"prompt": q, "completion": "4", "label": False},
                    {"prompt": q, "completion": "4", "label": True},
                    {"prompt": q, "completion": "Five.", "label": False}],
        "rankings": [{"prompt": q, "answers": ["4", "Four.", "Five."], "ranks": [1, 2, 3]}],
    }
    for fmt, want in expected.items():
        out = tmp_path / f"{fmt}.jsonl"
        export(plain_store, fmt, out)
        assert out.read_text(encoding="utf-8") == "".join(
            json.dumps(r, ensure_ascii=False) + "\n" for r in want), fmt
    export(plain_store, "trl-dpo", tmp_path / "dpo.csv")
    assert (tmp_path / "dpo.csv").read_text().splitlines()[:2] == [
        "prompt,chosen,rejected", "What is 2+2?,Four.,Five."]
    export(plain_store, "full", tmp_path / "full.jsonl")
    rows = _rows(tmp_path / "full.jsonl")
    assert all(r["prompt_a_messages"] is None and r["prompt_b_messages"] is None for r in rows)
