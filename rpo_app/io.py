"""Import and export of prompts and judgments: JSONL, JSON, CSV and Parquet; TXT for prompts.

Import shapes, detected from the columns (a ``family`` column is allowed in all):

========================  ===============================================  ==================
columns                   values                                           becomes
========================  ===============================================  ==================
prompt                    text or a message list (a conversation)          prompts
prompt, chosen, rejected  text, or conversational message lists (TRL):     ``paired`` a > b
                          ``prompt`` a conversation, each answer a list
                          of one assistant message
chosen, rejected          Anthropic-HH transcripts ("\\n\\nHuman: ...",    ``paired`` a > b
                          any number of turns), or message lists with the
                          prompt inside (TRL "implicit prompt")
prompt, completion,       text / message lists, ``label`` true or false    ``unpaired`` up/down
label
prompt, answers, ranks    text or a message list; a list of 3 to 6         a ranking and its
                          different answer texts; a list of one whole      implied pairs
                          number per answer, 1 = best and equal numbers
                          tied (Argilla's convention), or the text
                          ``none``: no answer is acceptable
========================  ===============================================  ==================

A TXT file holds prompts, one per non-empty line (a prompt cannot span lines there).
``ParsedFile.prompts()`` gives the distinct prompts of a file of any shape: what
``generate --prompts`` answers, without storing the file's answers or labels.

Rules (documented choices):

* Prompts may be conversations (``rpo_app.conversation``): an optional system message,
  then user and assistant turns alternating, ending with a user turn (the answer is the
  assistant turn after it). They come as a message list in ``prompt`` (TRL's
  conversational formats); as the shared history of a TRL "implicit prompt" pair (all
  before the final assistant message, which is the answer; chosen and rejected must
  share that history exactly); or as the turns of two Anthropic-HH transcripts before
  their final Assistant turn (which must be the same text in both). An answer given as
  a message list is one assistant message (TRL's shape), or the prompt's messages
  followed by it. No flag is needed: by default (``multi_turn="keep"``) a conversation
  is stored whole, as its transcript text with its messages, and a single user turn
  stays a plain prompt. ``multi_turn="last"`` keeps only the last user turn (the system
  message and the history are dropped); ``multi_turn="refuse"`` refuses a row with more
  than one user turn or a system message. The CLI flag is ``--multi-turn``. Whatever
  the policy, a conversation that does not end with a user turn, has an unknown role or
  an empty message, or whose turns do not alternate is refused (the message says which
  message and why), and so is one whose transcript passes the text length limit.
* Leading and trailing whitespace of every text is removed.
* Rankings: only the order of the rank numbers counts (gaps are fine: ``[2, 1, 2, 4]``
  ranks B first, A and C tied second, D last). Answers are plain text (no message
  lists); the prompt may be a conversation. In CSV, ``answers`` and ``ranks`` are JSON
  lists written in the cell (``["first", "second", "third"]``, ``[1, 2, 2]``) or
  ``none``; Parquet takes native lists, and JSON text too, since a Parquet column holds
  one type and a file that mixes ``none`` with rank lists must write ranks as text.
  The file's order of the answers is not kept as a screen order (nobody was shown them
  in it), so the implied pairs carry no ``a_side``. A ranking is stored with its
  C(K, 2) implied pairs (``rpo_app.rankings``); the report counts those as judgments.
  ``gold`` is refused for ranking files: gold items are single judgments.
* Unknown columns are refused (drop them first), so a typo never imports half a row.
* CSV has no types: a ``prompt``, ``chosen``, ``rejected`` or ``completion`` cell that
  holds a JSON list of ``{"role", "content"}`` objects is a message list (an export of
  conversations writes them so); every other cell is text, and ``label`` is one of
  true/false/1/0/yes/no. JSON/JSONL ``label`` must be a JSON boolean.
* Each file is validated completely before anything is written, then written in one
  transaction: a bad row 900 leaves the store untouched.
* Idempotent: each judgment gets ``request_id = "import:" + sha256(kind, prompt,
  answers, label)``, where the prompt is its text, or a conversation's whole list of
  (role, content) turns; so importing the same file again (under any annotator name, in
  any format) adds nothing. A ranking's request id hashes ("ranking", prompt, each
  answer with its place) in an order-free way, so the same ranking with its answers
  listed in another order (a ``rankings`` export of it, say) is the same ranking.
  Prompts are unique by text (a conversation's text is its transcript, turns written
  "User: ...", "Assistant: ..." and separated by blank lines; a row whose prompt would
  join a stored prompt of the same text that is not the same conversation is refused)
  and responses by (prompt, text).

Errors name the file, the place and the problem: ``line N`` (1-based) for JSONL, and
for JSON syntax errors; ``item N`` (1-based) for the objects of a JSON array; ``row N``
for CSV and Parquet, counting data rows from 1 (the CSV header is not a row).

Export formats (the output format follows the file's extension: .jsonl, .json, .csv
or .parquet; files are written atomically; retracted judgments and rankings are left
out unless ``full`` is asked to include them):

============  ======================  =====================================================
format        columns                 rows
============  ======================  =====================================================
``trl-dpo``   prompt, chosen,         one per decided (a/b) pair judgment, TRL's standard
              rejected                preference format; a ranking gives one per pair of
                                      answers in different places (its implied pairs)
``trl-kto``   prompt, completion,     TRL's standard unpaired format: a thumb gives one
              label                   row, a decided or both-bad pair two; a ranking gives
                                      each answer once (``rankings.pool_sides``: upper
                                      places true, lower false, "none acceptable" all
                                      false; the middle place of an odd number of places,
                                      and an all-tied ranking, give none and are counted
                                      in ``skipped``)
``rankings``  prompt, answers, ranks  one per active ranking, in the import shape above:
                                      answers in the order they were shown when known,
                                      else best first; ranks 1-based places, or ``none``.
                                      CSV cells hold JSON lists; in Parquet the ranks
                                      column is JSON text when ``none`` and rank lists mix
``full``      FULL_COLUMNS            every judgment with its provenance; ``ranking_id``
                                      and ``ranking_order`` ("#12 > #10 = #11 > #13" by
                                      response id, or "none acceptable") are set on a
                                      ranking's implied pairs; ``prompt_a_messages`` and
                                      ``prompt_b_messages`` hold a conversation's messages
                                      as JSON text (null for a single-turn prompt);
                                      ``response_a_cut_off`` / ``response_b_cut_off``
                                      are true for an answer cut at its token limit
============  ======================  =====================================================

Conversations in exports: in ``trl-dpo``, ``trl-kto`` and ``rankings``, when any row's
prompt is a conversation, every row's prompt is written as a message list (a
single-turn prompt as one user message) and, in the TRL formats, every answer as a list
of one assistant message: TRL's conversational format, one type per column, so the file
loads with ``datasets``. When none is, the rows are plain text. CSV cells hold message
lists as JSON text; the import reads all of these back.

Cut answers in the TRL formats: TRL ends every answer with an end-of-turn token (it
appends the tokenizer's EOS to plain text; the chat template closes a conversational
turn), so an answer cut at its token limit trains an ending the model never wrote, which
rpo_app's own trainer leaves out (batches.Encoder). The TRL formats cannot say which
answers were cut: the export counts the rows that hold one, and ``cut="drop"`` leaves
them out (in ``trl-dpo`` a pair with either answer cut, in ``trl-kto`` the cut answer's
own row). ``full`` keeps the flags.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from rpo_app import conversation, rankings
from rpo_app.store import MAX_TEXT_CHARS, text_problem

log = logging.getLogger(__name__)

MAX_FIELD_CHARS = MAX_TEXT_CHARS
MAX_FAMILY_CHARS = 200
IMPORT_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
                     ".parquet": "parquet", ".txt": "txt"}
EXPORT_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
EXPORT_FORMATS = ("trl-dpo", "trl-kto", "rankings", "full")
TRL_FORMATS = ("trl-dpo", "trl-kto")
# What a TRL export does with rows that hold an answer cut at its token limit.
CUT_CHOICES = ("keep", "drop")
MULTI_TURN_POLICIES = ("keep", "last", "refuse")
SEED_PROMPTS = Path(__file__).resolve().parent.parent / "data" / "prompts.jsonl"

# Column sets (family aside) -> shape name.
SHAPES = {
    frozenset({"prompt"}): "prompts",
    frozenset({"prompt", "chosen", "rejected"}): "preference",
    frozenset({"chosen", "rejected"}): "implicit-preference",
    frozenset({"prompt", "completion", "label"}): "unpaired",
    frozenset({"prompt", "answers", "ranks"}): "ranking",
}
KNOWN_COLUMNS = {"prompt", "family", "chosen", "rejected", "completion", "label", "answers",
                 "ranks"}
SHAPES_HELP = ("prompt [+ family] | prompt, chosen, rejected | chosen, rejected "
               "(Anthropic-HH transcripts) | prompt, completion, label | prompt, answers, ranks")
_ROLES = conversation.ROLES
_TEXT_COLUMNS = ("prompt", "chosen", "rejected", "completion")
_HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_LABEL_STRINGS = {"true": True, "false": False, "1": True, "0": False, "yes": True,
                  "no": False}


class ImportFileError(ValueError):
    """An import file was refused; the message names the file, the row and the problem.
    Nothing from that file was written."""


class ExportError(ValueError):
    """An export was refused (unknown format or extension); nothing was written."""


# -- reports --------------------------------------------------------------------------


@dataclass
class ImportReport:
    file: str | None = None
    shape: str | None = None
    rows: int = 0
    prompts_added: int = 0
    prompts_duplicate: int = 0
    responses_added: int = 0
    responses_duplicate: int = 0
    judgments_added: int = 0
    judgments_duplicate: int = 0
    gold_marked: int = 0
    rankings_added: int = 0  # each with its implied pairs, counted in judgments_*
    rankings_duplicate: int = 0

    @property
    def added(self) -> dict[str, int]:
        return {"prompts": self.prompts_added, "responses": self.responses_added,
                "judgments": self.judgments_added}

    @property
    def duplicates(self) -> dict[str, int]:
        return {"prompts": self.prompts_duplicate, "responses": self.responses_duplicate,
                "judgments": self.judgments_duplicate}

    def summary(self) -> str:
        head = f"{self.file or 'input'} ({self.shape or 'empty'}, {self.rows} rows)"
        added, dups = dict(self.added), dict(self.duplicates)
        if self.shape == "ranking" or self.rankings_added or self.rankings_duplicate:
            added["rankings"], dups["rankings"] = self.rankings_added, self.rankings_duplicate
        added = ", ".join(f"{n} {what}" for what, n in added.items())
        dups = ", ".join(f"{n} {what}" for what, n in dups.items())
        gold = f"; marked {self.gold_marked} judgments as gold" if self.gold_marked else ""
        return f"{head}: added {added}; skipped as duplicates: {dups}{gold}"


@dataclass
class ExportReport:
    fmt: str
    out_path: str
    rows: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    # TRL formats: rows that hold an answer cut at its token limit, written or left out
    cut_rows: int = 0
    cut_dropped: bool = False

    def summary(self) -> str:
        text = f"wrote {self.rows} rows ({self.fmt}) to {self.out_path}"
        one = self.cut_rows == 1
        if self.cut_rows and self.cut_dropped:
            text += (f"; left out {self.cut_rows} row{'' if one else 's'} that "
                     f"hold{'s' if one else ''} an answer cut at its token limit")
        elif self.cut_rows:
            text += (f"; {self.cut_rows} of them hold{'s' if one else ''} an answer cut at its token "
                     "limit: TRL ends every answer with an end-of-turn token, so it will train an "
                     "ending the model never wrote there (rpo_app's trainer does not); export with "
                     "cut answers left out to avoid it")
        judgments = {w: n for w, n in self.skipped.items() if w not in RANKED_ANSWER_REASONS}
        answers = {w: n for w, n in self.skipped.items() if w in RANKED_ANSWER_REASONS}
        if judgments:
            parts = ", ".join(f"{n} {why}" for why, n in sorted(judgments.items()))
            text += f"; skipped {sum(judgments.values())} judgments: {parts}"
        if answers:
            parts = ", ".join(f"{n} {why}" for why, n in sorted(answers.items()))
            text += f"; left out {sum(answers.values())} ranked answers: {parts}"
        return text


# trl-kto: why a ranked answer gives no row (counted per answer, not per judgment).
SKIP_MIDDLE = "in the middle place of a ranking (neither liked nor disliked)"
SKIP_ALL_TIED = "in a ranking that ties every answer (nothing liked or disliked)"
RANKED_ANSWER_REASONS = (SKIP_MIDDLE, SKIP_ALL_TIED)


# -- reading files --------------------------------------------------------------------


@dataclass
class _Row:
    where: str  # "line 3", "row 3", "item 3"
    values: dict


@dataclass
class _Record:
    """One validated row, ready to write."""

    where: str
    kind: str  # "prompt" | "pair" | "unpaired" | "ranking"
    prompt: str  # the text the store keeps: a conversation's transcript
    family: str | None = None
    messages: list[dict] | None = None  # a conversation (rpo_app.conversation), else None
    chosen: str | None = None
    rejected: str | None = None
    completion: str | None = None
    label: bool | None = None
    answers: list[str] | None = None  # ranking: the texts, in file order
    tiers: list[list[int]] | None = None  # ranking: positions in `answers`, best place first
    none_acceptable: bool = False

    def prompt_item(self) -> dict:
        """The prompt as Store.add_prompts takes it; "prompt" is set for a conversation
        too (its transcript, which the store recomputes), for callers that read it."""
        item = {"prompt": self.prompt, "family": self.family}
        if self.messages is not None:
            item["messages"] = [dict(m) for m in self.messages]
        return item

    def request_id(self) -> str:
        # A single-turn prompt hashes as its text (the ids of earlier imports stay
        # valid); a conversation as its whole list of (role, content) turns.
        prompt = (self.prompt if self.messages is None
                  else [[m["role"], m["content"]] for m in self.messages])
        if self.kind == "pair":
            key = ["paired", prompt, self.chosen, self.rejected]
        elif self.kind == "ranking":
            # Free of the answers' order: each answer with its 1-based place (or "none").
            place = rankings.tier_of(self.tiers)
            key = ["ranking", prompt, sorted(
                [text, "none" if self.none_acceptable else place[i] + 1]
                for i, text in enumerate(self.answers))]
        else:
            key = ["unpaired", prompt, self.completion, self.label]
        blob = json.dumps(key, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return "import:" + hashlib.sha256(blob).hexdigest()


@dataclass
class ParsedFile:
    """A validated import file: nothing written yet."""

    name: str  # as the user gave it (for messages)
    shape: str
    records: list[_Record]

    def prompts(self) -> list[dict]:
        """The distinct prompts, in file order, as Store.add_prompts takes them:
        {"prompt", "family"}, plus "messages" for a conversation ("prompt" is then its
        transcript). A prompt's first row gives its family; the answers and labels of
        the rows are left out."""
        first: dict[str, dict] = {}
        for record in self.records:
            first.setdefault(record.prompt, record.prompt_item())
        return list(first.values())


def _decode(path: Path, data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ImportFileError(
            f"{path}: line {line}: not valid UTF-8 (byte 0x{data[err.start]:02x} at offset "
            f"{err.start}); save the file as UTF-8") from None
    return text.removeprefix("\ufeff")


def _to_python(value: Any) -> Any:
    """numpy/pandas scalars and arrays (from Parquet) -> plain Python; NaN/NA -> None."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return [_to_python(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_to_python(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_python(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is not None and not isinstance(value, (str, bool, int, float, list, dict)):
        import pandas as pd

        if value is pd.NA or value is pd.NaT:
            return None
    return value


def _read_rows(path: Path) -> tuple[list[_Row], dict[str, str]]:
    """Rows of the file and, for every column, where it first appears."""
    ext = path.suffix.lower()
    kind = IMPORT_EXTENSIONS.get(ext)
    if kind is None:
        raise ImportFileError(
            f"{path}: unknown file type {ext or '(no extension)'!r}; use one of "
            f"{', '.join(IMPORT_EXTENSIONS)}")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImportFileError(f"{path}: no such file") from None
    except OSError as err:
        raise ImportFileError(f"{path}: cannot read: {err.strerror or err}") from None
    if not data.strip():
        raise ImportFileError(f"{path}: the file is empty")

    rows: list[_Row] = []
    if kind == "txt":
        text = _decode(path, data)
        rows = [_Row(f"line {n}", {"prompt": line})
                for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
    elif kind == "jsonl":
        text = _decode(path, data)
        # split on "\n" only: str.splitlines() also splits on U+2028 etc., which JSON
        # strings may contain raw.
        for n, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ImportFileError(
                    f"{path}: line {n}: malformed JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(obj, dict):
                raise ImportFileError(
                    f"{path}: line {n}: expected a JSON object, got {_json_type(obj)}")
            rows.append(_Row(f"line {n}", obj))
    elif kind == "json":
        text = _decode(path, data)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise ImportFileError(f"{path}: line {err.lineno} column {err.colno}: "
                                  f"malformed JSON: {err.msg}") from None
        if not isinstance(obj, list):
            raise ImportFileError(
                f"{path}: expected a JSON array of objects, got {_json_type(obj)} "
                "(for one object per line use .jsonl)")
        for n, item in enumerate(obj, start=1):
            if not isinstance(item, dict):
                raise ImportFileError(
                    f"{path}: item {n}: expected a JSON object, got {_json_type(item)}")
            rows.append(_Row(f"item {n}", item))
    elif kind == "csv":
        import pandas as pd

        text = _decode(path, data)
        try:
            df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as err:
            raise ImportFileError(
                f"{path}: malformed CSV: {str(err).strip().splitlines()[-1]}") from None
        rows = [_Row(f"row {n}", {k: _to_python(v) for k, v in rec.items()})
                for n, rec in enumerate(df.to_dict("records"), start=1)]
        if not rows:
            raise ImportFileError(f"{path}: no data rows (only a header)")
        return rows, {c: "the header" for c in df.columns}
    else:  # parquet
        import pandas as pd

        try:
            df = pd.read_parquet(io.BytesIO(data))
        except Exception as err:  # pyarrow raises several unrelated types here
            raise ImportFileError(f"{path}: not a readable Parquet file: "
                                  f"{str(err).strip().splitlines()[0]}") from None
        rows = [_Row(f"row {n}", {str(k): _to_python(v) for k, v in rec.items()})
                for n, rec in enumerate(df.to_dict("records"), start=1)]
        if not rows:
            raise ImportFileError(f"{path}: no data rows")
        return rows, {str(c): "the schema" for c in df.columns}
    if not rows:
        raise ImportFileError(f"{path}: no data rows")
    first_seen: dict[str, str] = {}
    for row in rows:
        for key in row.values:
            first_seen.setdefault(key, row.where)
    return rows, first_seen


def _json_type(obj) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             type(None): "null", int: "a number", float: "a number"}
    return names.get(type(obj), type(obj).__name__)


def _detect_shape(path: Path, columns: dict[str, str]) -> str:
    unknown = [c for c in columns if c not in KNOWN_COLUMNS]
    if unknown:
        first = columns[unknown[0]]
        raise ImportFileError(
            f"{path}: {first}: unknown column(s) {', '.join(repr(c) for c in unknown)}; "
            f"rpo_app imports these shapes: {SHAPES_HELP} (plus an optional 'family'); "
            "drop the other columns first")
    cols = frozenset(columns) - {"family"}
    shape = SHAPES.get(cols)
    if shape:
        return shape
    # Name what is missing for the shape the columns come closest to.
    if cols & {"answers", "ranks"}:
        want = {"prompt", "answers", "ranks"}
    elif cols & {"completion", "label"}:
        want = {"prompt", "completion", "label"}
    elif cols & {"chosen", "rejected"}:
        want = {"chosen", "rejected"} | ({"prompt"} if "prompt" in cols else set())
    else:
        want = {"prompt"}
    missing = sorted(want - cols)
    extra = sorted(cols - want)
    problem = f"missing column(s) {', '.join(repr(c) for c in missing)}" if missing else (
        f"column(s) {', '.join(repr(c) for c in extra)} do not fit together")
    raise ImportFileError(f"{path}: {problem}; rpo_app imports these shapes: {SHAPES_HELP}")


class _RowError(Exception):
    pass


def _check_len(value: str, column: str) -> None:
    if len(value) > MAX_FIELD_CHARS:
        raise _RowError(f"column {column!r} is {len(value):,} characters long; the limit is "
                        f"{MAX_FIELD_CHARS:,}")


def _text(value, column: str) -> str:
    if value is None:
        raise _RowError(f"column {column!r} is missing or null")
    if not isinstance(value, str):
        raise _RowError(f"column {column!r} must be text, got {_json_type(value)}")
    problem = text_problem(value, f"column {column!r}")
    if problem:
        raise _RowError(problem)
    return value.strip()


def _messages(value, column: str) -> list[dict]:
    """Each message of a list checked on its own: an object with a known role and a text
    (the shape of the whole conversation is conversation.check's, in _prompt_of)."""
    out = []
    if not value:
        raise _RowError(f"column {column!r} is an empty message list")
    for i, msg in enumerate(value, start=1):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise _RowError(f"column {column!r}: message {i} must be an object with 'role' "
                            "and 'content'")
        role = msg["role"]
        if role not in _ROLES:
            raise _RowError(f"column {column!r}: message {i} has role {role!r}; expected one "
                            f"of {', '.join(_ROLES)}")
        if msg["content"] is not None and not isinstance(msg["content"], str):
            raise _RowError(f"column {column!r}: message {i} content must be text, got "
                            f"{_json_type(msg['content'])}")
        out.append({"role": role, "content": _text(msg["content"], f"{column}[{i}].content")})
    return out


def _messages_cell(value):
    """A CSV cell holding a JSON list of {"role", ...} objects (what an export of
    conversations writes there) as that list; any other value as it is."""
    if not isinstance(value, str) or not value.lstrip().startswith("["):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return value
    if isinstance(parsed, list) and parsed and all(
            isinstance(m, dict) and "role" in m for m in parsed):
        return parsed
    return value


def _answer_and_context(value, column: str) -> tuple[str, list[dict]]:
    """A completion given as a message list: (last assistant text, messages before it)."""
    msgs = _messages(value, column)
    if msgs[-1]["role"] != "assistant":
        raise _RowError(f"column {column!r}: the last message must be the assistant's answer, "
                        f"got role {msgs[-1]['role']!r}")
    return msgs[-1]["content"], msgs[:-1]


def _prompt_of(context: list[dict], multi_turn: str, what: str) -> tuple[str, list[dict] | None]:
    """(prompt text, messages) from the conversation before the answer: messages is None
    for a single user turn, and for multi_turn="last" (the last user turn alone)."""
    if not context:
        raise _RowError(f"{what}: there is no user turn before the answer")
    try:
        msgs = conversation.check(context)
    except conversation.ConversationError as err:
        raise _RowError(f"{what}: {err}") from None
    if conversation.is_single_turn(msgs):
        return msgs[0]["content"], None
    if multi_turn == "last":
        return msgs[-1]["content"], None
    if multi_turn == "refuse":
        users = sum(m["role"] == "user" for m in msgs)
        system = " and a system message" if msgs[0]["role"] == "system" else ""
        raise _RowError(
            f"multi-turn conversation ({users} user turn{'s' if users != 1 else ''}{system}) "
            "refused (multi_turn='refuse'); import with multi_turn='keep' (the default) to keep "
            "the whole conversation, or 'last' to keep only the last user message")
    text = conversation.transcript(msgs)
    if len(text) > MAX_FIELD_CHARS:
        raise _RowError(f"{what}: the conversation is {len(text):,} characters long as a "
                        f"transcript; the limit is {MAX_FIELD_CHARS:,}")
    return text, msgs


def _family(value) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise _RowError(f"column 'family' must be text, got {_json_type(value)}")
    if len(value) > MAX_FAMILY_CHARS:
        raise _RowError(f"column 'family' is longer than {MAX_FAMILY_CHARS} characters")
    return value.strip()


def _label(value, csv: bool) -> bool:
    if isinstance(value, bool):
        return value
    if csv and isinstance(value, str) and value.strip().lower() in _LABEL_STRINGS:
        return _LABEL_STRINGS[value.strip().lower()]
    if value is None or value == "":
        raise _RowError("column 'label' is missing or null")
    allowed = "true/false (also 1/0, yes/no in CSV)" if csv else "true or false (a boolean)"
    raise _RowError(f"column 'label' must be {allowed}, got {value!r}")


def _parse_hh(chosen: str, rejected: str) -> tuple[list[dict], str, str]:
    """(the turns before the final Assistant turn, chosen answer, rejected answer) from
    two Anthropic-HH transcripts."""
    parts = []
    for column, text in (("chosen", chosen), ("rejected", rejected)):
        _check_len(text, column)
        idx = text.rfind(_HH_ASSISTANT)
        if idx < 0:
            raise _RowError(f"column {column!r} is not a Human/Assistant transcript "
                            "(no '\\n\\nAssistant:' turn)")
        answer = text[idx + len(_HH_ASSISTANT):]
        if "\n\nHuman:" in answer:
            raise _RowError(f"column {column!r}: the transcript ends with a Human turn, "
                            "not an Assistant answer")
        parts.append((text[:idx], answer))
    (prefix, chosen_answer), (prefix_r, rejected_answer) = parts
    if prefix != prefix_r:
        raise _RowError("chosen and rejected differ before their final '\\n\\nAssistant:' "
                        "turn, so they do not answer the same prompt")
    body = prefix.lstrip()
    if not body.startswith("Human:"):
        raise _RowError("the transcript must start with 'Human:'")
    pieces = _HH_TURN.split("\n\n" + body)
    turns = [{"role": "user" if role == "Human" else "assistant", "content": content.strip()}
             for role, content in zip(pieces[1::2], pieces[2::2])]
    for turn in turns:
        if not turn["content"]:
            raise _RowError(f"the transcript has an empty {turn['role']} turn")
    return (turns, _text(chosen_answer, "chosen (final Assistant turn)"),
            _text(rejected_answer, "rejected (final Assistant turn)"))


def _record(shape: str, row: _Row, multi_turn: str, csv: bool) -> _Record:
    v = row.values
    if csv:  # a JSON message list in a cell is a message list (an export writes them so)
        v = {k: _messages_cell(x) if k in _TEXT_COLUMNS else x for k, x in v.items()}
    family = _family(v.get("family"))
    for column in _TEXT_COLUMNS:
        if column in v and isinstance(v[column], str):
            _check_len(v[column], column)

    def prompt_context() -> list[dict]:
        value = v.get("prompt")
        if isinstance(value, list):
            return _messages(value, "prompt")
        return [{"role": "user", "content": _text(value, "prompt")}]

    if shape == "prompts":
        prompt, messages = _prompt_of(prompt_context(), multi_turn, "column 'prompt'")
        return _Record(row.where, "prompt", prompt, family, messages)

    def answer(column: str, context: list[dict]) -> tuple[str, list[dict], str]:
        """(answer text, the conversation before it, what to call that conversation)."""
        value = v.get(column)
        if isinstance(value, list):
            text, extra = _answer_and_context(value, column)
            if not context:  # TRL "implicit prompt": the list is the whole conversation
                return text, extra, f"column {column!r} before its final assistant message"
            if not extra:  # TRL's shape: one assistant message
                return text, context, "column 'prompt'"
            if extra[:len(context)] == context:
                return text, extra, f"column {column!r} before its final assistant message"
            return text, context + extra, f"column 'prompt' with the earlier turns in {column!r}"
        if value is not None and not isinstance(value, str):
            raise _RowError(f"column {column!r} must be text or a list of messages, got "
                            f"{_json_type(value)}")
        return _text(value, column), context, "column 'prompt'"

    if shape == "unpaired":
        label = _label(v.get("label"), csv)
        text, context, what = answer("completion", prompt_context())
        prompt, messages = _prompt_of(context, multi_turn, what)
        return _Record(row.where, "unpaired", prompt, family, messages, completion=text,
                       label=label)

    chosen_v, rejected_v = v.get("chosen"), v.get("rejected")
    if isinstance(chosen_v, list) != isinstance(rejected_v, list):
        raise _RowError("chosen and rejected must both be text or both be message lists")
    if shape == "implicit-preference" and not isinstance(chosen_v, list):
        context, chosen, rejected = _parse_hh(_text(chosen_v, "chosen"),
                                              _text(rejected_v, "rejected"))
        what = "the transcript before its final Assistant turn"
    else:
        base = prompt_context() if shape == "preference" else []
        chosen, context, what = answer("chosen", base)
        rejected, ctx_r, _ = answer("rejected", base)
        if context != ctx_r:
            raise _RowError("chosen and rejected continue different conversations, so they do "
                            "not answer the same prompt")
    prompt, messages = _prompt_of(context, multi_turn, what)
    if chosen == rejected:
        raise _RowError("chosen and rejected are the same text")
    return _Record(row.where, "pair", prompt, family, messages, chosen=chosen, rejected=rejected)


_ANSWERS_EXAMPLE = '["first answer", "second answer", "third answer"]'
_RANKS_EXAMPLE = "[2, 1, 2] (1 = best, equal numbers tied)"


def _json_list_cell(value: str, column: str, example: str) -> list:
    """A CSV (or Parquet text) cell that holds a JSON list."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        shown = value if len(value) <= 60 else value[:57] + "..."
        raise _RowError(f"column {column!r} must be a JSON list such as {example}; {shown!r} is "
                        f"not valid JSON ({err.msg} at character {err.pos + 1})") from None
    if not isinstance(parsed, list):
        raise _RowError(f"column {column!r} must be a JSON list such as {example}, got "
                        f"{_json_type(parsed)}")
    return parsed


def _ranking_answers(value, text_lists: bool) -> list[str]:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise _RowError("column 'answers' is missing or empty")
    if isinstance(value, str) and text_lists:
        value = _json_list_cell(value, "answers", _ANSWERS_EXAMPLE)
    if not isinstance(value, list):
        raise _RowError(f"column 'answers' must be a list of {rankings.MIN_ANSWERS} to "
                        f"{rankings.MAX_ANSWERS} answer texts, got {_json_type(value)}")
    n = len(value)
    if not rankings.MIN_ANSWERS <= n <= rankings.MAX_ANSWERS:
        raise _RowError(f"column 'answers' holds {n} answer{'s' if n != 1 else ''}; a ranking "
                        f"takes {rankings.MIN_ANSWERS} to {rankings.MAX_ANSWERS}")
    texts = []
    for i, item in enumerate(value, start=1):
        column = f"answers[{i}]"
        if isinstance(item, str):
            _check_len(item, column)
        texts.append(_text(item, column))
    for i, text in enumerate(texts):
        if text in texts[:i]:
            raise _RowError(f"answers {texts.index(text) + 1} and {i + 1} are the same text; "
                            "a ranking orders different answers")
    return texts


def _ranking_tiers(value, n: int, text_lists: bool) -> tuple[list[list[int]], bool]:
    """ranks -> (tiers of 0-based answer positions, best first; none acceptable)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise _RowError("column 'ranks' is missing or empty")
    if isinstance(value, str):
        if " ".join(value.split()).lower() in rankings.NONE_WORDS:
            return [list(range(n))], True
        if not text_lists:
            raise _RowError(f"column 'ranks' must be a list of ranks such as {_RANKS_EXAMPLE}, "
                            f"or 'none' if no answer is acceptable; got the text {value!r}")
        value = _json_list_cell(value, "ranks", _RANKS_EXAMPLE + " or none")
    if not isinstance(value, list):
        raise _RowError(f"column 'ranks' must be a list of ranks such as {_RANKS_EXAMPLE}, or "
                        f"'none' if no answer is acceptable; got {_json_type(value)}")
    if len(value) != n:
        raise _RowError(f"column 'ranks' has {len(value)} rank{'s' if len(value) != 1 else ''} "
                        f"for {n} answers; give every answer a rank (equal numbers for ties)")
    ranks = []
    for i, rank in enumerate(value, start=1):
        if rank is None:
            raise _RowError(f"column 'ranks': the rank of answer {i} is missing")
        if (isinstance(rank, bool) or not isinstance(rank, (int, float))
                or isinstance(rank, float) and not rank.is_integer()):
            raise _RowError(f"column 'ranks': the rank of answer {i} must be a whole number, "
                            f"got {rank!r}")
        if rank < 1:
            raise _RowError(f"column 'ranks': the rank of answer {i} is {int(rank)}; ranks "
                            "start at 1 (the best)")
        ranks.append(int(rank))
    return [[i for i, r in enumerate(ranks) if r == number]
            for number in sorted(set(ranks))], False


def _ranking_record(row: _Row, text_lists: bool, multi_turn: str, csv: bool) -> _Record:
    v = row.values
    family = _family(v.get("family"))
    prompt = _messages_cell(v.get("prompt")) if csv else v.get("prompt")
    if isinstance(prompt, list):  # a conversation (a rankings export writes them so)
        context = _messages(prompt, "prompt")
    else:
        if isinstance(prompt, str):
            _check_len(prompt, "prompt")
        context = [{"role": "user", "content": _text(prompt, "prompt")}]
    prompt, messages = _prompt_of(context, multi_turn, "column 'prompt'")
    answers = _ranking_answers(v.get("answers"), text_lists)
    tiers, none_acceptable = _ranking_tiers(v.get("ranks"), len(answers), text_lists)
    return _Record(row.where, "ranking", prompt, family, messages, answers=answers, tiers=tiers,
                   none_acceptable=none_acceptable)


def read_import_file(path: str | os.PathLike, multi_turn: str = "keep") -> ParsedFile:
    """Read and validate a whole file; raise ImportFileError on the first problem."""
    if multi_turn not in MULTI_TURN_POLICIES:
        raise ValueError(f"multi_turn is one of {MULTI_TURN_POLICIES}, got {multi_turn!r}")
    path = Path(path)
    rows, columns = _read_rows(path)
    shape = _detect_shape(path, columns)
    csv = path.suffix.lower() == ".csv"
    text_lists = csv or path.suffix.lower() == ".parquet"  # list cells may be JSON text
    records = []
    for row in rows:
        try:
            if shape == "ranking":
                records.append(_ranking_record(row, text_lists, multi_turn, csv))
            else:
                records.append(_record(shape, row, multi_turn, csv))
        except _RowError as err:
            raise ImportFileError(f"{path}: {row.where}: {err}") from None
    return ParsedFile(str(path), shape, records)


# -- writing imports ------------------------------------------------------------------


def write_parsed(store, parsed: ParsedFile, annotator: str = "import",
                 import_file: str | None = None, gold: bool = False) -> ImportReport:
    """Write a validated file in one transaction (all or nothing). gold=True marks its
    judgments as gold items: known answers the label queue tests annotators on."""
    from rpo_app.store import StoreError

    annotator = (annotator or "").strip()
    if not annotator:
        raise ImportFileError(f"{parsed.name}: the annotator name is empty")
    if gold:
        _check_gold(parsed)
    import_file = import_file or Path(parsed.name).name
    report = ImportReport(file=parsed.name, shape=parsed.shape, rows=len(parsed.records))
    record = None
    try:
        with store.transaction():
            for record in parsed.records:
                ids, created = store.add_prompts([record.prompt_item()], "import")
                prompt_id = ids[0]
                if not created:
                    _check_same_prompt(store, record, prompt_id)
                report.prompts_added += created
                report.prompts_duplicate += not created
                if record.kind == "prompt":
                    continue
                if record.kind == "ranking":
                    _write_ranking(store, record, prompt_id, annotator, import_file, report)
                    continue
                answers = ([record.chosen, record.rejected] if record.kind == "pair"
                           else [record.completion])
                ids = []
                for text in answers:
                    rid, created = store.add_response(prompt_id, text, "import",
                                                      import_file=import_file)
                    ids.append(rid)
                    report.responses_added += created
                    report.responses_duplicate += not created
                if record.kind == "pair":
                    jid, created = store.add_judgment(
                        "paired", ids[0], ids[1], "a", annotator, source="import",
                        request_id=record.request_id())
                else:
                    jid, created = store.add_judgment(
                        "unpaired", ids[0], None, "up" if record.label else "down", annotator,
                        source="import", request_id=record.request_id())
                report.judgments_added += created
                report.judgments_duplicate += not created
                if gold:
                    report.gold_marked += store.mark_gold([jid], by=annotator)
    except (StoreError, _RowError) as err:
        where = f"{record.where}: " if record is not None else ""
        raise ImportFileError(f"{parsed.name}: {where}{err}") from None
    return report


def _check_same_prompt(store, record: _Record, prompt_id: int) -> None:
    """Prompts are unique by text and a conversation's text is its transcript: refuse a
    row whose prompt would join a stored prompt of the same text that is not the same
    conversation (or is one, where the row's prompt is a single turn)."""
    if record.messages is None and not record.prompt.startswith(("User: ", "System: ")):
        return  # no transcript starts otherwise, so the text cannot be taken by one
    stored = store.prompt(prompt_id)["messages"]
    if conversation.frozen(stored) != conversation.frozen(record.messages):
        have = "a single-turn prompt" if stored is None else "another conversation"
        want = "a single-turn prompt" if record.messages is None else "a conversation"
        raise _RowError(f"the prompt is {want} whose text is already stored as {have} (the "
                        "store keeps prompts unique by text, and a conversation's text is "
                        "its transcript); rename one of them")


def _check_gold(parsed: ParsedFile) -> None:
    if parsed.shape == "ranking":
        raise ImportFileError(f"{parsed.name}: gold items are single judgments with a known "
                              "answer; a ranking file cannot be imported as gold")


def _write_ranking(store, record: _Record, prompt_id: int, annotator: str, import_file: str,
                   report: ImportReport) -> None:
    """The answers, then the ranking with its implied pairs (inside write_parsed's
    transaction: Store.transaction nests)."""
    ids = []
    for text in record.answers:
        rid, created = store.add_response(prompt_id, text, "import", import_file=import_file)
        ids.append(rid)
        report.responses_added += created
        report.responses_duplicate += not created
    # No `shown`: the file's order is not an order anyone saw the answers in.
    _, created = store.add_ranking([[ids[i] for i in tier] for tier in record.tiers], annotator,
                                   none_acceptable=record.none_acceptable, source="import",
                                   request_id=record.request_id())
    pairs = len(ids) * (len(ids) - 1) // 2
    report.rankings_added += created
    report.rankings_duplicate += not created
    report.judgments_added += pairs if created else 0
    report.judgments_duplicate += 0 if created else pairs


def import_path(store, path: str | os.PathLike, annotator: str = "import",
                multi_turn: str = "keep", gold: bool = False) -> ImportReport:
    """Import one file (any supported shape and format). Raises ImportFileError."""
    return write_parsed(store, read_import_file(path, multi_turn), annotator, gold=gold)


def add_prompt_texts(store, text: str, source: str = "ui") -> ImportReport:
    """Pasted prompts: a JSON list (of strings or {"prompt", "family"} objects), or one
    prompt per non-empty line."""
    name = "pasted text"
    items: list[tuple[str, Any]] = []
    stripped = (text or "").strip()
    if not stripped:
        raise ImportFileError(f"{name}: no prompts given")
    parsed_json = None
    if stripped.startswith("["):
        try:
            parsed_json = json.loads(stripped)
        except json.JSONDecodeError:
            parsed_json = None  # a prompt that happens to start with "["
    if isinstance(parsed_json, list):
        for n, item in enumerate(parsed_json, start=1):
            items.append((f"item {n}", item))
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                items.append((f"line {n}", line))
    records = []
    for where, item in items:
        try:
            if isinstance(item, dict):
                extra = set(item) - {"prompt", "family"}
                if extra:
                    raise _RowError(f"unknown key(s) {sorted(extra)}")
                records.append((_text(item.get("prompt"), "prompt"), _family(item.get("family"))))
            else:
                records.append((_text(item, "prompt"), None))
        except _RowError as err:
            raise ImportFileError(f"{name}: {where}: {str(err).replace('column ', '')}") from None
    report = ImportReport(file=name, shape="prompts", rows=len(records))
    ids, n_new = store.add_prompts([{"prompt": t, "family": f} for t, f in records], source)
    report.prompts_added, report.prompts_duplicate = n_new, len(ids) - n_new
    return report


def seed_if_empty(store, path: str | os.PathLike | None = None) -> int:
    """Load the seed prompts when the store has none yet; return how many were added."""
    if store.count_prompts():
        return 0
    path = Path(path) if path is not None else SEED_PROMPTS
    if not path.exists():
        log.warning("seed prompts not found at %s; starting with an empty store", path)
        return 0
    parsed = read_import_file(path)
    if parsed.shape != "prompts":
        raise ImportFileError(f"{path}: seed file must hold prompts only, found {parsed.shape}")
    _, n_new = store.add_prompts(parsed.prompts(), "seed")
    return n_new


# -- export ---------------------------------------------------------------------------


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds")


def _count(skipped: dict[str, int], why: str) -> None:
    skipped[why] = skipped.get(why, 0) + 1


def _conversational(rows: list[dict], answer_columns: tuple[str, ...]) -> list[dict]:
    """Rows carry their prompt's messages under "_messages" (a conversation's, as a list or
    the store's JSON text; None for a single turn). When any row's prompt is a
    conversation, every row is written in TRL's conversational format: the prompt as a
    message list (a single turn as one user message), each answer as a list of one
    assistant message; a file has one type per column, so `datasets` loads it. Otherwise
    the rows are plain text, as always."""
    if not any(r["_messages"] for r in rows):
        return [{k: x for k, x in r.items() if k != "_messages"} for r in rows]
    out = []
    for r in rows:
        r = dict(r)
        r["prompt"] = conversation.as_messages(r["prompt"], r.pop("_messages"))
        for column in answer_columns:
            r[column] = [{"role": "assistant", "content": r[column]}]
        out.append(r)
    return out


def _csv_cells(rows: list[dict]) -> list[dict]:
    """Message lists as JSON text in CSV cells (the import reads them back as lists)."""
    return [{k: json.dumps(x, ensure_ascii=False) if isinstance(x, list) else x
             for k, x in r.items()} for r in rows]


def _with_messages(store, ks: list[dict]) -> list[dict]:
    """Rankings with their prompt's messages under "messages" (None for a single turn)."""
    ids = sorted({k["prompt_id"] for k in ks})
    messages = {p["id"]: p["messages"] for p in store.prompts(ids=ids)} if ids else {}
    return [dict(k, messages=messages.get(k["prompt_id"])) for k in ks]


def _dpo_rows(judgments: list[dict], skipped: dict[str, int]) -> list[dict]:
    rows = []
    for j in judgments:
        if j["kind"] == "unpaired":
            _count(skipped, "unpaired (thumbs; export them with trl-kto)")
        elif j["kind"] == "cross":
            _count(skipped, "cross-prompt (DPO needs one prompt for both answers)")
        elif j["verdict"] in ("a", "b"):
            win, lose = ("a", "b") if j["verdict"] == "a" else ("b", "a")
            rows.append({"prompt": j["prompt_a"], "chosen": j[f"response_{win}_text"],
                         "rejected": j[f"response_{lose}_text"],
                         "_messages": j["prompt_a_messages"],
                         "_cut": bool(j["cut_off_a"]) or bool(j["cut_off_b"])})
        else:
            _count(skipped, f"{j['verdict']} (no preferred answer)")
    return rows


def _ranking_kto_rows(ranking: dict, skipped: dict[str, int]) -> list[dict]:
    """Each answer of a ranking once (rankings.pool_sides), best place first."""
    tiers = ranking["tiers"]
    liked, disliked = rankings.pool_sides(rankings.tier_of(tiers), len(tiers),
                                          ranking["none_acceptable"])
    liked, disliked = set(liked), set(disliked)
    rows = []
    for tier in tiers:
        for rid in tier:
            if rid in liked or rid in disliked:
                rows.append({"prompt": ranking["prompt"], "completion": ranking["answers"][rid],
                             "label": rid in liked, "_messages": ranking["messages"],
                             "_cut": rid in ranking["cut_off"]})
            else:
                _count(skipped, SKIP_ALL_TIED if len(tiers) == 1 else SKIP_MIDDLE)
    return rows


def _kto_rows(judgments: list[dict], skipped: dict[str, int],
              ranked: dict[int, dict] | None = None) -> list[dict]:
    """`ranked`: the active rankings by id; their implied pairs give each answer once, in
    place of two rows per pair."""
    ranked = ranked or {}
    rows, done = [], set()
    for j in judgments:
        if j.get("ranking_id") in ranked:
            if j["ranking_id"] not in done:  # at the ranking's first pair, in id order
                done.add(j["ranking_id"])
                rows += _ranking_kto_rows(ranked[j["ranking_id"]], skipped)
            continue
        if j["kind"] == "unpaired":
            rows.append({"prompt": j["prompt_a"], "completion": j["response_a_text"],
                         "label": j["verdict"] == "up", "_messages": j["prompt_a_messages"],
                         "_cut": bool(j["cut_off_a"])})
            continue
        labels = {"a": (True, False), "b": (False, True), "both_bad": (False, False)}
        if j["verdict"] not in labels:
            _count(skipped, f"{j['verdict']} (neither answer is better or worse)")
            continue
        for side, label in zip(("a", "b"), labels[j["verdict"]]):
            rows.append({"prompt": j[f"prompt_{side}"], "completion": j[f"response_{side}_text"],
                         "label": label, "_messages": j[f"prompt_{side}_messages"],
                         "_cut": bool(j[f"cut_off_{side}"])})
    return rows


FULL_COLUMNS = [
    "judgment_id", "kind", "verdict", "strength", "annotator", "source", "created_at",
    "seconds_spent", "a_side", "request_id",
    "prompt_a_id", "prompt_a", "family_a", "response_a_id", "response_a", "response_a_source",
    "model_a", "adapter_a", "gen_settings_a", "import_file_a",
    "prompt_b_id", "prompt_b", "family_b", "response_b_id", "response_b", "response_b_source",
    "model_b", "adapter_b", "gen_settings_b", "import_file_b",
    "response_a_parent_id", "response_b_parent_id", "gold", "used_by_runs",
    "ranking_id", "ranking_order", "prompt_a_messages", "prompt_b_messages",
    "response_a_cut_off", "response_b_cut_off",
]
RETRACTED_COLUMNS = ["retracted", "retracted_at", "retracted_by"]


def _full_rows(store, judgments: list[dict], include_retracted: bool) -> list[dict]:
    prompt_ids = {j[k] for j in judgments for k in ("prompt_a_id", "prompt_b_id")
                  if j[k] is not None}
    families = {p["id"]: p["family"] for p in store.prompts(ids=sorted(prompt_ids))}
    gold = store.gold_ids()
    used = store.runs_using([j["id"] for j in judgments])
    ranked = ({k["id"]: k for k in store.rankings(include_retracted=include_retracted)}
              if any(j["ranking_id"] is not None for j in judgments) else {})
    rows = []
    for j in judgments:
        row = {
            "judgment_id": j["id"], "kind": j["kind"], "verdict": j["verdict"],
            "strength": j["strength"], "annotator": j["annotator"], "source": j["source"],
            "created_at": _iso(j["created_at"]), "seconds_spent": j["seconds_spent"],
            "a_side": j["a_side"], "request_id": j["request_id"], "gold": j["id"] in gold,
            # Lineage: the runs (and their adapters) that trained on it or held it out.
            # JSON text, so CSV and Parquet carry it the same way as JSONL.
            "used_by_runs": json.dumps(used.get(j["id"], [])),
            # An implied pair of a ranking: which one, and its whole order by response id.
            "ranking_id": j["ranking_id"],
            "ranking_order": (rankings.format_order(
                ranked[j["ranking_id"]]["tiers"], lambda r: f"#{r}",
                ranked[j["ranking_id"]]["none_acceptable"])
                if j["ranking_id"] in ranked else None),
            # A conversation's messages as JSON text (rpo_app.conversation); null for a
            # single-turn prompt, whose text is all there is.
            "prompt_a_messages": j["prompt_a_messages"] or None,
            "prompt_b_messages": j["prompt_b_messages"] or None,
        }
        for side in ("a", "b"):
            row.update({
                f"prompt_{side}_id": j[f"prompt_{side}_id"], f"prompt_{side}": j[f"prompt_{side}"],
                f"family_{side}": families.get(j[f"prompt_{side}_id"]),
                f"response_{side}_id": j[f"response_{side}"],
                f"response_{side}": j[f"response_{side}_text"],
                f"response_{side}_source": j[f"response_{side}_source"],
                f"model_{side}": j[f"model_{side}"], f"adapter_{side}": j[f"adapter_{side}"],
                f"gen_settings_{side}": j[f"gen_settings_{side}"],
                f"import_file_{side}": j[f"import_file_{side}"],
                # Set when the answer is a person's edit: the answer it was made from.
                f"response_{side}_parent_id": j[f"parent_{side}"],
                # A model's answer that hit its token limit before it ended; null for
                # a thumb's missing side.
                f"response_{side}_cut_off": (None if j[f"cut_off_{side}"] is None
                                             else bool(j[f"cut_off_{side}"])),
            })
        if include_retracted:
            row.update({"retracted": j["retracted_at"] is not None,
                        "retracted_at": _iso(j["retracted_at"]),
                        "retracted_by": j["retracted_by"]})
        rows.append(row)
    return rows


RANKING_COLUMNS = ["prompt", "answers", "ranks"]


def _ranking_rows(store) -> list[dict]:
    """One row per active ranking, in the import shape: answers in their shown order when
    known, else best place first; ranks 1-based places, or "none". When any ranking's
    prompt is a conversation, every prompt is a message list (as in trl-dpo)."""
    rows = []
    ks = _with_messages(store, store.rankings())
    conversational = any(k["messages"] for k in ks)
    for k in ks:
        ids = [r for tier in k["tiers"] for r in tier]
        order = k["shown"] if sorted(k["shown"]) == sorted(ids) else ids
        place = rankings.tier_of(k["tiers"])
        prompt = (conversation.as_messages(k["prompt"], k["messages"]) if conversational
                  else k["prompt"])
        rows.append({"prompt": prompt, "answers": [k["answers"][r] for r in order],
                     "ranks": "none" if k["none_acceptable"] else [place[r] + 1 for r in order]})
    return rows


def _ranking_cells(rows: list[dict], ext: str) -> list[dict]:
    """Lists as JSON text where the file type needs it: every list in CSV; in Parquet the
    ranks when "none" and rank lists share the column (a Parquet column holds one type)."""
    mixed = len({isinstance(r["ranks"], str) for r in rows}) > 1
    out = []
    for r in rows:
        r = dict(r)
        if ext == ".csv":
            r["answers"] = json.dumps(r["answers"], ensure_ascii=False)
            if isinstance(r["prompt"], list):
                r["prompt"] = json.dumps(r["prompt"], ensure_ascii=False)
        if isinstance(r["ranks"], list) and (ext == ".csv" or ext == ".parquet" and mixed):
            r["ranks"] = json.dumps(r["ranks"])
        out.append(r)
    return out


def _write_table(df, out: Path) -> None:
    """Write by extension into a temp file next to `out`, then os.replace (atomic)."""
    ext = out.suffix.lower()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if ext in (".jsonl", ".json"):
            records = [{k: _to_python(v) for k, v in rec.items()}
                       for rec in df.to_dict("records")]
            with open(tmp, "w", encoding="utf-8") as f:
                if ext == ".jsonl":
                    for rec in records:
                        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                else:
                    json.dump(records, f, ensure_ascii=False, indent=1)
                    f.write("\n")
        elif ext == ".csv":
            df.to_csv(tmp, index=False, encoding="utf-8")
        else:
            df.to_parquet(tmp, index=False)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def export(store, fmt: str, out_path: str | os.PathLike,
           include_retracted: bool = False, cut: str = "keep") -> ExportReport:
    """Write judgments as a TRL dataset (trl-dpo, trl-kto), the rankings in their import
    shape (rankings) or every judgment with full provenance (full).

    Retracted judgments are never in the TRL or rankings formats; `include_retracted`
    adds them (with retracted/retracted_at/retracted_by columns) to the full format.
    `cut` (TRL formats): "keep" or "drop" the rows that hold an answer cut at its token
    limit (see the module's note); the report counts them either way.
    """
    import pandas as pd

    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    if cut not in CUT_CHOICES:
        raise ExportError(f"unknown choice for cut answers {cut!r}; use one of {', '.join(CUT_CHOICES)}")
    if cut == "drop" and fmt not in TRL_FORMATS:
        kept = ("the full export keeps each answer's cut_off flag" if fmt == "full"
                else "the rankings export keeps every ranked answer")
        raise ExportError(f"leaving out cut answers applies to the TRL formats "
                          f"({', '.join(TRL_FORMATS)}); {kept}")
    out = Path(out_path)
    if out.suffix.lower() not in EXPORT_EXTENSIONS:
        raise ExportError(f"{out}: unknown output type {out.suffix or '(no extension)'!r}; use "
                          f"one of {', '.join(EXPORT_EXTENSIONS)}")
    skipped: dict[str, int] = {}
    cut_rows = 0
    if fmt == "full":
        judgments = store.judgments(include_retracted=include_retracted)
        columns = FULL_COLUMNS + (RETRACTED_COLUMNS if include_retracted else [])
        rows = _full_rows(store, judgments, include_retracted)
    elif fmt == "trl-dpo":
        columns = ["prompt", "chosen", "rejected"]
        rows, cut_rows = _sort_out_cut(_dpo_rows(store.judgments(), skipped), cut)
        rows = _conversational(rows, ("chosen", "rejected"))
    elif fmt == "rankings":
        columns, rows = RANKING_COLUMNS, _ranking_cells(_ranking_rows(store), out.suffix.lower())
    else:
        judgments = store.judgments()
        ranked = ({k["id"]: k for k in _with_messages(store, store.rankings())}
                  if any(j["ranking_id"] is not None for j in judgments) else {})
        columns = ["prompt", "completion", "label"]
        rows, cut_rows = _sort_out_cut(_kto_rows(judgments, skipped, ranked), cut)
        rows = _conversational(rows, ("completion",))
    if fmt in ("trl-dpo", "trl-kto") and out.suffix.lower() == ".csv":
        rows = _csv_cells(rows)
    df = pd.DataFrame(rows, columns=columns)
    for column in columns:
        if column == "judgment_id" or column.endswith("_id") and column != "request_id":
            df[column] = df[column].astype("Int64")  # ids stay integers next to nulls
    if fmt == "trl-kto":
        df["label"] = df["label"].astype(bool)
    if fmt == "full":  # true/false, and null for a thumb's missing side
        for side in ("a", "b"):
            df[f"response_{side}_cut_off"] = df[f"response_{side}_cut_off"].astype("boolean")
    _write_table(df, out)
    return ExportReport(fmt, str(out), len(df), skipped, cut_rows=cut_rows, cut_dropped=cut == "drop")


def _sort_out_cut(rows: list[dict], cut: str) -> tuple[list[dict], int]:
    """TRL rows without their `_cut` mark, less the marked ones when `cut` is "drop";
    and how many were marked."""
    marked = sum(r["_cut"] for r in rows)
    kept = [{k: x for k, x in r.items() if k != "_cut"} for r in rows
            if cut == "keep" or not r["_cut"]]
    return kept, marked


# -- CLI ------------------------------------------------------------------------------


def _open_store(args):
    from rpo_app.config import DataLayout, resolve_data_dir
    from rpo_app.store import Store

    return Store(DataLayout(resolve_data_dir(getattr(args, "data_dir", None))).db)


def cli_import(args) -> int:
    multi_turn = getattr(args, "multi_turn", None) or "keep"
    parsed, errors = [], []
    for name in args.files:  # validate every file before writing any
        try:
            parsed.append(read_import_file(name, multi_turn))
            if getattr(args, "gold", False):
                _check_gold(parsed[-1])
        except ImportFileError as err:
            errors.append(str(err))
    if errors:
        for message in errors:
            print(f"error: {message}", file=sys.stderr)
        print("nothing was imported", file=sys.stderr)
        return 2
    store = _open_store(args)
    try:
        for p in parsed:
            try:
                report = write_parsed(store, p, args.annotator, gold=getattr(args, "gold", False))
            except ImportFileError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            print(report.summary())
    finally:
        store.close()
    return 0


def cli_export(args) -> int:
    store = _open_store(args)
    try:
        if args.include_retracted and args.format != "full":
            print("note: --include-retracted only applies to --format full; retracted "
                  "judgments are never in TRL or rankings exports", file=sys.stderr)
        report = export(store, args.format, args.out, include_retracted=args.include_retracted,
                        cut=getattr(args, "cut", "keep"))
    except (ExportError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        store.close()
    print(report.summary())
    return 0


def format_stats(stats: dict) -> str:
    lines = [f"{'prompts':<12}{stats['prompts']:>8}",
             f"{'responses':<12}{stats['responses']:>8}",
             f"{'judgments':<12}{stats['judgments']:>8}  (active)",
             f"{'retracted':<12}{stats['retracted']:>8}",
             f"{'rankings':<12}{stats['rankings']:>8}  (active; {stats['ranking_pairs']} of the "
             "judgments are their implied pairs)", ""]
    lines.append(f"{'kind':<10}{'verdict':<10}{'count':>8}")
    any_kind = False
    for kind, verdicts in stats["by_kind"].items():
        for verdict, n in sorted(verdicts.items()):
            lines.append(f"{kind:<10}{verdict:<10}{n:>8}")
            any_kind = True
    if not any_kind:
        lines.append("(no judgments)")
    lines += ["", f"{'annotator':<24}{'judgments':>10}"]
    for name, n in stats["annotators"].items():
        lines.append(f"{name:<24}{n:>10}")
    if not stats["annotators"]:
        lines.append("(none)")
    return "\n".join(lines)


def cli_stats(args) -> int:
    store = _open_store(args)
    try:
        stats = store.stats()
    finally:
        store.close()
    if getattr(args, "json", False):
        print(json.dumps(stats, indent=2, ensure_ascii=False))
    else:
        print(format_stats(stats))
    return 0


__all__: Iterable[str] = [
    "ImportFileError", "ExportError", "ImportReport", "ExportReport", "read_import_file",
    "write_parsed", "import_path", "add_prompt_texts", "seed_if_empty", "export",
    "cli_import", "cli_export", "cli_stats", "format_stats", "MAX_FIELD_CHARS",
]
