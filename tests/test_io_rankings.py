"""Rankings in and out: the "ranking" import shape (every format, every kind of bad
input), the "rankings" export and its round trip, and what a ranking gives trl-dpo,
trl-kto and the full export."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from rpo_app import io as rio
from rpo_app.io import ImportFileError, export, import_path
from rpo_app.store import Store

FORMATS = ["jsonl", "json", "csv", "parquet"]


def write(path: Path, rows: list[dict], fmt: str) -> Path:
    """Rows as JSONL, JSON, CSV (lists as JSON text in the cell) or Parquet (native lists)."""
    path = path.with_suffix("." + fmt)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    elif fmt == "csv":
        cells = [{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()}
                 for r in rows]
        pd.DataFrame(cells).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def _jsonl(*rows) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def orders(store) -> list[tuple]:
    """(prompt, tiers as texts (sorted within a tier), none acceptable) of every active
    ranking, in id order."""
    return [(k["prompt"], [sorted(k["answers"][r] for r in tier) for tier in k["tiers"]],
             k["none_acceptable"]) for k in store.rankings()]


EGGS = {"prompt": "How do I boil an egg?", "family": "cooking",
        "answers": ["Boil it 9 minutes.", "Fry it.", "Boil it 7 minutes.", "Microwave it whole."],
        "ranks": [2, 1, 2, 4]}
COLOUR = {"prompt": "Name a colour.", "answers": ["Blue.", "Seven.", "Red."], "ranks": [1, 3, 2]}
NONE = {"prompt": "Say something kind.", "answers": ["Go away.", "No.", "Whatever."],
        "ranks": "none"}


# -- import: formats ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_import_rankings_every_format(store, tmp_path, fmt):
    path = write(tmp_path / "ranked", [EGGS, dict(COLOUR, family="")], fmt)
    report = import_path(store, path, annotator="alice")
    assert (report.shape, report.rows) == ("ranking", 2)
    assert (report.rankings_added, report.rankings_duplicate) == (2, 0)
    # 6 + 3 implied pairs are the judgments.
    assert report.added == {"prompts": 2, "responses": 7, "judgments": 9}
    assert "2 rankings" in report.summary()
    # [2, 1, 2, 4]: answer 2 first, answers 1 and 3 tied, answer 4 last.
    assert orders(store) == [
        ("How do I boil an egg?", [["Fry it."], ["Boil it 7 minutes.", "Boil it 9 minutes."],
                                   ["Microwave it whole."]], False),
        ("Name a colour.", [["Blue."], ["Red."], ["Seven."]], False)]
    (eggs, colour) = store.rankings()
    assert (eggs["annotator"], eggs["source"], eggs["request_id"][:7]) == ("alice", "import",
                                                                           "import:")
    assert eggs["shown"] == []  # the file's order is not a screen order
    assert [p["family"] for p in store.prompts()] == ["cooking", None]
    first = store.response(eggs["tiers"][0][0])
    assert (first["source"], first["import_file"]) == ("import", path.name)
    pairs = store.judgments()
    assert len(pairs) == 9 and {j["ranking_id"] for j in pairs} == {eggs["id"], colour["id"]}
    assert {(j["kind"], j["source"], j["annotator"], j["a_side"]) for j in pairs} == {
        ("paired", "import", "alice", None)}
    verdicts = sorted(j["verdict"] for j in pairs if j["ranking_id"] == eggs["id"])
    assert verdicts == ["a", "a", "a", "a", "b", "tie"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_import_none_acceptable_every_format(store, tmp_path, fmt):
    # One file with a "none" row and a ranked row; Parquet keeps one type per column, so
    # there the rank list goes in as JSON text.
    ranked = dict(COLOUR, ranks=json.dumps(COLOUR["ranks"])) if fmt == "parquet" else COLOUR
    import_path(store, write(tmp_path / "none", [dict(NONE, ranks="None"), ranked], fmt))
    assert orders(store) == [("Say something kind.", [["Go away.", "No.", "Whatever."]], True),
                             ("Name a colour.", [["Blue."], ["Red."], ["Seven."]], False)]
    none_id = store.rankings()[0]["id"]
    assert [j["verdict"] for j in store.judgments() if j["ranking_id"] == none_id] == [
        "both_bad"] * 3


def test_ranks_gaps_floats_and_six_answers(store, tmp_path):
    six = {"prompt": "Pick a number.", "answers": list("abcdef"),
           "ranks": [10, 10.0, 3, 7, 3, 100]}
    import_path(store, write(tmp_path / "six", [six], "jsonl"))
    assert orders(store) == [("Pick a number.", [["c", "e"], ["d"], ["a", "b"], ["f"]], False)]
    assert store.count_judgments() == 15


# -- import: bad input ----------------------------------------------------------------

GOOD = {"prompt": "Fine prompt?", "answers": ["One.", "Two.", "Three."], "ranks": [1, 2, 3]}

BAD_RANKINGS = {
    # name: (file name, bytes, [fragments the message must contain])
    "ranks-too-short": ("bad.jsonl", _jsonl(GOOD, dict(GOOD, ranks=[1, 2])),
                        ["bad.jsonl", "line 2", "'ranks' has 2 ranks for 3 answers"]),
    "ranks-too-long": ("bad.jsonl", _jsonl(dict(GOOD, ranks=[1, 2, 3, 4])),
                       ["bad.jsonl", "line 1", "'ranks' has 4 ranks for 3 answers"]),
    "rank-missing": ("bad.jsonl", _jsonl(GOOD, GOOD, dict(GOOD, ranks=[1, None, 2])),
                     ["bad.jsonl", "line 3", "the rank of answer 2 is missing"]),
    "ranks-null": ("bad.jsonl", _jsonl(dict(GOOD, ranks=None)),
                   ["bad.jsonl", "line 1", "'ranks' is missing"]),
    "rank-fraction": ("bad.jsonl", _jsonl(dict(GOOD, ranks=[1, 1.5, 2])),
                      ["bad.jsonl", "line 1", "answer 2 must be a whole number", "1.5"]),
    "rank-text": ("bad.jsonl", _jsonl(dict(GOOD, ranks=[1, "2", 3])),
                  ["bad.jsonl", "line 1", "answer 2 must be a whole number", "'2'"]),
    "rank-bool": ("bad.jsonl", _jsonl(dict(GOOD, ranks=[True, 2, 3])),
                  ["bad.jsonl", "line 1", "answer 1 must be a whole number"]),
    "rank-zero": ("bad.jsonl", _jsonl(dict(GOOD, ranks=[0, 1, 2])),
                  ["bad.jsonl", "line 1", "rank of answer 1 is 0", "start at 1"]),
    "rank-negative": ("bad.jsonl", _jsonl(dict(GOOD, ranks=[1, 2, -3])),
                      ["bad.jsonl", "line 1", "rank of answer 3 is -3"]),
    "ranks-not-list": ("bad.jsonl", _jsonl(dict(GOOD, ranks=3)),
                       ["bad.jsonl", "line 1", "'ranks' must be a list", "a number"]),
    "ranks-other-text": ("bad.jsonl", _jsonl(dict(GOOD, ranks="all bad")),
                         ["bad.jsonl", "line 1", "'ranks' must be a list", "'none'"]),
    "ranks-json-text-in-json": ("bad.jsonl", _jsonl(dict(GOOD, ranks="[1, 2, 3]")),
                                ["bad.jsonl", "line 1", "'ranks' must be a list"]),
    "two-answers": ("bad.json", json.dumps([GOOD, dict(GOOD, answers=["a", "b"], ranks=[1, 2])]
                                           ).encode(),
                    ["bad.json", "item 2", "holds 2 answers", "3 to 6"]),
    "seven-answers": ("bad.jsonl", _jsonl(dict(GOOD, answers=list("abcdefg"), ranks=[1] * 7)),
                      ["bad.jsonl", "line 1", "holds 7 answers", "3 to 6"]),
    "no-answers": ("bad.jsonl", _jsonl(dict(GOOD, answers=[], ranks=[])),
                   ["bad.jsonl", "line 1", "'answers' holds 0 answers"]),
    "answers-null": ("bad.jsonl", _jsonl(dict(GOOD, answers=None)),
                     ["bad.jsonl", "line 1", "'answers' is missing or empty"]),
    "repeated-answer": ("bad.jsonl", _jsonl(GOOD, dict(GOOD, answers=["One.", "Two.", " One. "])),
                        ["bad.jsonl", "line 2", "answers 1 and 3 are the same text"]),
    "empty-answer": ("bad.jsonl", _jsonl(dict(GOOD, answers=["One.", "  ", "Three."])),
                     ["bad.jsonl", "line 1", "'answers[2]' is empty"]),
    "null-answer": ("bad.jsonl", _jsonl(dict(GOOD, answers=["One.", "Two.", None])),
                    ["bad.jsonl", "line 1", "'answers[3]' is missing or null"]),
    "answer-not-text": ("bad.jsonl", _jsonl(dict(GOOD, answers=["One.", 2, "Three."])),
                        ["bad.jsonl", "line 1", "'answers[2]' must be text", "a number"]),
    "answer-messages": ("bad.jsonl", _jsonl(dict(GOOD, answers=[{"role": "assistant",
                                                                 "content": "hi"}, "b", "c"])),
                        ["bad.jsonl", "line 1", "'answers[1]' must be text", "an object"]),
    "answer-control-char": ("bad.jsonl", _jsonl(dict(GOOD, answers=["a\x1b[2J", "b", "c"])),
                            ["bad.jsonl", "line 1",
                             "'answers[1]' contains the control character U+001B"]),
    "answer-too-long": ("bad.jsonl", _jsonl(dict(GOOD, answers=["a", "b", "c" * 100_001])),
                        ["bad.jsonl", "line 1", "'answers[3]' is 100,001 characters", "limit"]),
    "answers-not-list": ("bad.jsonl", _jsonl(dict(GOOD, answers="One. Two. Three.")),
                         ["bad.jsonl", "line 1", "'answers' must be a list", "a string"]),
    "prompt-list": ("bad.jsonl", _jsonl(dict(GOOD, prompt=[{"role": "user", "content": "hi"},
                                                         {"role": "assistant", "content": "x"}])),
                    ["bad.jsonl", "line 1", "column 'prompt'", "must end with a user turn"]),
    "prompt-number": ("bad.jsonl", _jsonl(GOOD, dict(GOOD, prompt=7)),
                      ["bad.jsonl", "line 2", "'prompt' must be text", "a number"]),
    "prompt-empty": ("bad.jsonl", _jsonl(dict(GOOD, prompt=" ")),
                     ["bad.jsonl", "line 1", "'prompt' is empty"]),
    "family-not-text": ("bad.jsonl", _jsonl(dict(GOOD, family=3)),
                        ["bad.jsonl", "line 1", "'family' must be text"]),
    "missing-ranks-column": ("bad.jsonl", _jsonl({"prompt": "p", "answers": ["a", "b", "c"]}),
                             ["bad.jsonl", "missing column(s) 'ranks'"]),
    "missing-prompt-column": ("bad.jsonl", _jsonl({"answers": ["a", "b", "c"], "ranks": [1, 2, 3]}),
                              ["bad.jsonl", "missing column(s) 'prompt'"]),
    "mixed-with-pairs": ("bad.jsonl", _jsonl(GOOD, {"prompt": "p", "chosen": "a",
                                                    "rejected": "b"}),
                         ["bad.jsonl", "do not fit together"]),
    "csv-answers-not-json": ("bad.csv", (b'prompt,answers,ranks\np,"[""a"", ""b"", ""c""]",'
                                         b'"[1,2,3]"\nq,a; b; c,"[1,2,3]"\n'),
                             ["bad.csv", "row 2", "'answers' must be a JSON list",
                              "not valid JSON"]),
    "csv-answers-json-object": ("bad.csv", b'prompt,answers,ranks\np,"{""a"": 1}","[1,2,3]"\n',
                                ["bad.csv", "row 1", "'answers' must be a JSON list", "an object"]),
    "csv-ranks-not-json": ("bad.csv", b'prompt,answers,ranks\np,"[""a"", ""b"", ""c""]",1 2 3\n',
                           ["bad.csv", "row 1", "'ranks' must be a JSON list", "not valid JSON"]),
    "csv-ranks-empty-cell": ("bad.csv", b'prompt,answers,ranks\np,"[""a"", ""b"", ""c""]",\n',
                             ["bad.csv", "row 1", "'ranks' is missing or empty"]),
    "csv-rank-text": ("bad.csv", (b'prompt,answers,ranks\np,"[""a"", ""b"", ""c""]",'
                                  b'"[1, ""x"", 2]"\n'),
                      ["bad.csv", "row 1", "answer 2 must be a whole number"]),
}


@pytest.fixture
def filled_store(store, tmp_path):
    """A store with pairs and a ranking in it, so 'unchanged' means something."""
    import_path(store, write(tmp_path / "existing", [EGGS], "jsonl"))
    store.add_prompt("already here", "ui")
    return store


def _assert_untouched(store, before):
    assert store.snapshot() == before
    other = Store(store.path)  # and on disk, through a fresh connection
    try:
        assert other.snapshot() == before
    finally:
        other.close()


@pytest.mark.parametrize("case", sorted(BAD_RANKINGS))
def test_bad_ranking_names_file_row_and_problem_and_writes_nothing(filled_store, tmp_path, case):
    name, data, fragments = BAD_RANKINGS[case]
    path = tmp_path / name
    path.write_bytes(data)
    before = filled_store.snapshot()
    with pytest.raises(ImportFileError) as info:
        import_path(filled_store, path)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    _assert_untouched(filled_store, before)


def test_bad_parquet_row_writes_nothing(filled_store, tmp_path):
    rows = [dict(GOOD, prompt=f"prompt {i}?") for i in range(5)]
    rows[3] = dict(rows[3], ranks=[1, 2, 0])
    path = write(tmp_path / "bad", rows, "parquet")
    before = filled_store.snapshot()
    with pytest.raises(ImportFileError, match=r"bad.parquet: row 4: .*rank of answer 3 is 0"):
        import_path(filled_store, path)
    _assert_untouched(filled_store, before)


def test_a_store_refusal_mid_file_rolls_back_the_rankings_too(filled_store, tmp_path,
                                                              monkeypatch):
    from rpo_app.store import StoreError

    path = write(tmp_path / "r", [dict(GOOD, prompt=f"new {i}?") for i in range(4)], "jsonl")
    calls = {"n": 0}
    real = filled_store.add_ranking

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise StoreError("simulated refusal")
        return real(*args, **kwargs)

    monkeypatch.setattr(filled_store, "add_ranking", flaky)
    before = filled_store.snapshot()
    with pytest.raises(ImportFileError, match="r.jsonl: line 3: simulated refusal"):
        import_path(filled_store, path)
    _assert_untouched(filled_store, before)


def test_gold_is_refused_for_a_ranking_file(filled_store, tmp_path):
    before = filled_store.snapshot()
    with pytest.raises(ImportFileError, match="ranking file cannot be imported as gold"):
        import_path(filled_store, write(tmp_path / "g", [GOOD], "jsonl"), gold=True)
    _assert_untouched(filled_store, before)


# -- re-import ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_reimport_adds_nothing(store, tmp_path, fmt):
    path = write(tmp_path / "r", [EGGS, COLOUR, NONE], fmt)
    import_path(store, path, annotator="alice")
    before = store.snapshot()
    report = import_path(store, path, annotator="bob")
    assert (report.rankings_added, report.rankings_duplicate) == (0, 3)
    assert report.added == {"prompts": 0, "responses": 0, "judgments": 0}
    assert report.duplicates == {"prompts": 3, "responses": 10, "judgments": 12}
    assert store.snapshot() == before
    # The same ranking with its answers listed in another order is the same ranking.
    shuffled = dict(EGGS, answers=EGGS["answers"][::-1], ranks=EGGS["ranks"][::-1])
    assert import_path(store, write(tmp_path / "s", [shuffled], "jsonl")).rankings_added == 0
    # Another order of the same answers is another ranking.
    other = dict(EGGS, ranks=[1, 2, 3, 4])
    assert import_path(store, write(tmp_path / "o", [other], "jsonl")).rankings_added == 1


def test_a_retracted_ranking_stays_retracted_on_reimport(store, tmp_path):
    path = write(tmp_path / "r", [COLOUR], "jsonl")
    import_path(store, path)
    store.retract_ranking(store.rankings()[0]["id"], by="import")
    assert import_path(store, path).rankings_added == 0
    assert store.rankings() == [] and store.count_judgments() == 0


# -- export: rankings, and the round trip ---------------------------------------------


@pytest.fixture
def ranked_store(store):
    """Rankings as the Label tab stores them (with a screen order), one 'none
    acceptable', one retracted, and a plain pair judgment."""
    p, _ = store.add_prompt("What is 2+2?", "seed", "math")
    a, b, c, d = (store.add_response(p, t, "generate", model="base")[0]
                  for t in ("Four.", "Five.", "4", "Twenty-two."))
    q, _ = store.add_prompt("Tell me a joke.", "seed")
    x, y, z = (store.add_response(q, t, "generate")[0] for t in ("Knock knock.", "No.", "..."))
    # shown C, A, D, B; ranked A = C > B > D
    store.add_ranking([[a, c], [b], [d]], "alice", shown=[c, a, d, b], seconds_spent=9.0)
    store.add_ranking([[x, y, z]], "bob", none_acceptable=True, shown=[z, y, x])
    gone, _ = store.add_ranking([[d], [c], [b]], "carol")
    store.retract_ranking(gone, by="carol")
    store.add_judgment("paired", x, y, "a", "alice")
    return store


def test_trl_kto_export_leaves_out_a_ranked_answer_that_was_cut(store, tmp_path):
    p, _ = store.add_prompt("Name a prime.", "seed")
    a, b = (store.add_response(p, t, "generate", model="base")[0] for t in ("Two.", "Nine."))
    c = store.add_response(p, "Seven is a prime because", "generate", model="base", cut_off=True)[0]
    store.add_ranking([[a], [c], [b]], "alice")
    assert store.rankings()[0]["cut_off"] == [c]
    kept = export(store, "trl-kto", tmp_path / "kept.jsonl")
    assert kept.cut_rows == 0  # the cut answer sits in the middle place: no row either way
    store.add_ranking([[c], [a, b]], "bob")
    report = export(store, "trl-kto", tmp_path / "kto.jsonl", cut="drop")
    rows = pd.read_json(tmp_path / "kto.jsonl", lines=True)
    assert report.cut_rows == 1 and "Seven is a prime because" not in set(rows["completion"])
    assert sorted(rows["completion"]) == ["Nine.", "Nine.", "Two.", "Two."]


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".csv", ".parquet"])
def test_export_rankings_round_trips(ranked_store, tmp_path, ext):
    out = tmp_path / f"rankings{ext}"
    report = export(ranked_store, "rankings", out)
    assert report.rows == 2 and report.skipped == {}
    df = {".jsonl": lambda f: pd.read_json(f, lines=True), ".json": pd.read_json,
          ".csv": pd.read_csv, ".parquet": pd.read_parquet}[ext](out)
    assert list(df.columns) == ["prompt", "answers", "ranks"]
    if ext == ".jsonl":
        # Shown order; ranks are 1-based places.
        assert [json.loads(line) for line in out.read_text().splitlines()] == [
            {"prompt": "What is 2+2?", "answers": ["4", "Four.", "Twenty-two.", "Five."],
             "ranks": [1, 1, 3, 2]},
            {"prompt": "Tell me a joke.", "answers": ["...", "No.", "Knock knock."],
             "ranks": "none"}]
    fresh = Store(tmp_path / "fresh")
    try:
        back = import_path(fresh, out)
        assert (back.shape, back.rankings_added) == ("ranking", 2)
        assert orders(fresh) == orders(ranked_store)
        assert orders(fresh) == [
            ("What is 2+2?", [["4", "Four."], ["Five."], ["Twenty-two."]], False),
            ("Tell me a joke.", [["...", "Knock knock.", "No."]], True)]
        # Exported again, the imported rankings give the same file (best place first,
        # since an import keeps no screen order) and re-import as duplicates.
        again = tmp_path / f"again{ext}"
        export(fresh, "rankings", again)
        assert import_path(fresh, again).rankings_added == 0
    finally:
        fresh.close()


def test_export_rankings_without_shown_order_is_best_first(store, tmp_path):
    import_path(store, write(tmp_path / "in", [EGGS], "jsonl"))
    export(store, "rankings", tmp_path / "out.jsonl")
    assert json.loads((tmp_path / "out.jsonl").read_text()) == {
        "prompt": "How do I boil an egg?",
        "answers": ["Fry it.", "Boil it 9 minutes.", "Boil it 7 minutes.", "Microwave it whole."],
        "ranks": [1, 2, 2, 3]}


def test_export_rankings_parquet_types(ranked_store, tmp_path):
    # Mixed "none" and rank lists: ranks is JSON text; only rank lists: native lists.
    mixed = tmp_path / "mixed.parquet"
    export(ranked_store, "rankings", mixed)
    assert pd.read_parquet(mixed)["ranks"].tolist() == ["[1, 1, 3, 2]", "none"]
    other = Store(tmp_path / "other")
    import_path(other, write(tmp_path / "in", [EGGS, COLOUR], "jsonl"))
    native = tmp_path / "native.parquet"
    export(other, "rankings", native)
    other.close()
    df = pd.read_parquet(native)
    assert [list(r) for r in df["ranks"]] == [[1, 2, 2, 3], [1, 2, 3]]
    assert list(df["answers"][1]) == ["Blue.", "Red.", "Seven."]


def test_export_rankings_of_an_empty_store(store, tmp_path):
    assert export(store, "rankings", tmp_path / "r.csv").rows == 0
    assert list(pd.read_csv(tmp_path / "r.csv").columns) == ["prompt", "answers", "ranks"]


# -- export: trl-dpo, trl-kto, full ---------------------------------------------------


def test_trl_dpo_gets_one_row_per_strict_implied_pair(ranked_store, tmp_path):
    out = tmp_path / "dpo.jsonl"
    report = export(ranked_store, "trl-dpo", out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # A = C > B > D: 6 pairs, 1 tie -> 5 rows; plus the plain pair; the none-acceptable
    # ranking's 3 pairs are both_bad, and the retracted ranking is left out.
    ranked = [(r["chosen"], r["rejected"]) for r in rows if r["prompt"] == "What is 2+2?"]
    assert sorted(ranked) == sorted([("Four.", "Five."), ("Four.", "Twenty-two."),
                                     ("4", "Five."), ("4", "Twenty-two."),
                                     ("Five.", "Twenty-two.")])
    assert report.rows == len(rows) == 6
    assert report.skipped == {"tie (no preferred answer)": 1,
                              "both_bad (no preferred answer)": 3}


def test_trl_kto_gets_each_ranked_answer_once(ranked_store, tmp_path):
    p = ranked_store.prompts()[0]["id"]
    e, f = (ranked_store.add_response(p, t, "generate")[0] for t in ("IV.", "2+2"))
    ids = [r["id"] for r in ranked_store.responses_for_prompt(p)]
    ranked_store.add_ranking([ids[:2], ids[2:4], [e], [f]], "dave")  # 4 places: 2 up, 2 down
    ranked_store.add_ranking([[e, f, ids[0]]], "erin")  # all tied: nothing learned
    out = tmp_path / "kto.jsonl"
    report = export(ranked_store, "trl-kto", out)
    rows = [(r["prompt"], r["completion"], r["label"])
            for r in map(json.loads, out.read_text().splitlines())]
    q2, joke = "What is 2+2?", "Tell me a joke."
    assert rows == [
        (q2, "Four.", True), (q2, "4", True), (q2, "Twenty-two.", False),  # A = C > B > D
        (joke, "Knock knock.", False), (joke, "No.", False), (joke, "...", False),  # none
        (joke, "Knock knock.", True), (joke, "No.", False),  # the plain pair: two rows
        (q2, "Four.", True), (q2, "Five.", True), (q2, "4", True), (q2, "Twenty-two.", True),
        (q2, "IV.", False), (q2, "2+2", False),
    ]
    # B sits in the middle of three places; erin's ranking ties all three.
    assert report.skipped == {rio.SKIP_MIDDLE: 1, rio.SKIP_ALL_TIED: 3}
    assert "left out 4 ranked answers" in report.summary()
    assert "skipped" not in report.summary()


@pytest.mark.parametrize("ext", [".parquet", ".csv", ".jsonl"])
def test_full_export_names_the_ranking_of_each_implied_pair(ranked_store, tmp_path, ext):
    out = tmp_path / f"full{ext}"
    export(ranked_store, "full", out)
    df = {".jsonl": lambda f: pd.read_json(f, lines=True),
          ".csv": pd.read_csv, ".parquet": pd.read_parquet}[ext](out)
    assert list(df.columns) == rio.FULL_COLUMNS
    assert {"ranking_id", "ranking_order"} <= set(rio.FULL_COLUMNS)
    k1, k2 = (k["id"] for k in ranked_store.rankings())
    a, c = ranked_store.rankings()[0]["tiers"][0]
    (b,), (d,) = ranked_store.rankings()[0]["tiers"][1:]
    by_ranking = df.groupby(df["ranking_id"].fillna(0).astype(int))
    assert by_ranking.size().to_dict() == {0: 1, k1: 6, k2: 3}
    assert set(df[df["ranking_id"] == k1]["ranking_order"]) == {f"#{a} = #{c} > #{b} > #{d}"}
    assert set(df[df["ranking_id"] == k2]["ranking_order"]) == {"none acceptable"}
    plain = df[df["ranking_id"].isna()].iloc[0]
    assert pd.isna(plain["ranking_order"]) and plain["verdict"] == "a"
    if ext == ".parquet":
        assert str(df["ranking_id"].dtype) == "Int64"


def test_full_export_with_retracted_names_the_retracted_ranking(ranked_store, tmp_path):
    out = tmp_path / "full.parquet"
    export(ranked_store, "full", out, include_retracted=True)
    df = pd.read_parquet(out)
    gone = df[df["retracted"]]
    assert len(gone) == 3 and gone["ranking_order"].nunique() == 1
    assert " > " in gone.iloc[0]["ranking_order"]


# -- CLI ------------------------------------------------------------------------------


def test_cli_import_and_export_rankings(tmp_path, capsys):
    from rpo_app.cli import main

    data_dir = tmp_path / "data"
    path = write(tmp_path / "r", [EGGS, NONE], "jsonl")
    assert main(["import", str(path), "--annotator", "cli", "--data-dir", str(data_dir)]) == 0
    assert "2 rankings" in capsys.readouterr().out
    assert main(["import", str(path), "--gold", "--data-dir", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert "cannot be imported as gold" in err and "nothing was imported" in err
    out = tmp_path / "out.csv"
    assert main(["export", "--format", "rankings", "--out", str(out),
                 "--data-dir", str(data_dir)]) == 0
    assert "wrote 2 rows (rankings)" in capsys.readouterr().out
    assert pd.read_csv(out)["ranks"].tolist() == ["[1, 2, 2, 3]", "none"]
