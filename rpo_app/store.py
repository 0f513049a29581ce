"""The judgment store: SQLite in WAL mode. The only SQL in the tree lives here.

Durability rule: a method that writes returns only after COMMIT, with
synchronous=FULL, so whatever the UI acknowledges survives a crash or power cut.
"""
from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

KINDS = ("paired", "cross", "unpaired")
PAIR_VERDICTS = ("a", "b", "tie", "both_bad")
THUMB_VERDICTS = ("up", "down")
STRENGTHS = ("slightly", "clearly")
SIDES = ("left", "right")
LEASE_SECONDS = 300.0
# Judgments the queue makes to check an annotator, not to label an item: a gold item
# (its answer is known) or an item re-shown to its own judge with sides swapped. They
# are not counted towards an item's annotators and are not trained on.
GOLD_CHECK_SOURCE = "gold-check"
RECHECK_SOURCE = "recheck"
CHECK_SOURCES = (GOLD_CHECK_SOURCE, RECHECK_SOURCE)
# A person's rewrite of an answer: the response's source, and the source of the judgment
# "the rewrite is better than the original" stored with it.
EDIT_SOURCE = "human-edit"
_COUNTED = f"source NOT IN ('{GOLD_CHECK_SOURCE}', '{RECHECK_SOURCE}')"
# Lease and skip keys name what an annotator holds, stored as text: a prefix, then ids.
PROMPT_KEY = "prompt:"  # a paired item: the prompt whose answers are compared
RESPONSE_KEY = "resp:"  # a thumbs item: one answer
CROSS_KEY = "cross:"  # one answer of a cross-prompt pair; each side is leased by itself
CROSS_PAIR_KEY = "crosspair:"  # a cross-prompt pair as a whole (skips), lower id first
RANK_KEY = "rank:"  # a ranking item: the prompt whose unranked answers are ordered
# Longest text accepted in any field: far above any real prompt or answer, low enough
# that a mis-parsed file (a whole document in one cell) is caught.
MAX_TEXT_CHARS = 100_000
# C0/C1 control characters other than tab and newlines: never part of a real prompt, and
# some (ESC, backspace) rewrite what a terminal or log viewer shows.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")

# Each entry moves the schema one version up; never edit a released entry.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE prompts(
        id INTEGER PRIMARY KEY,
        text TEXT NOT NULL UNIQUE,
        family TEXT,
        source TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX prompts_family ON prompts(family);
    CREATE TABLE prompt_embeddings(
        prompt_id INTEGER PRIMARY KEY REFERENCES prompts(id) ON DELETE CASCADE,
        embedder TEXT NOT NULL,
        vec BLOB NOT NULL
    );
    CREATE TABLE responses(
        id INTEGER PRIMARY KEY,
        prompt_id INTEGER NOT NULL REFERENCES prompts(id),
        text TEXT NOT NULL,
        source TEXT NOT NULL,
        model TEXT,
        adapter TEXT,
        gen_settings TEXT,
        import_file TEXT,
        created_at REAL NOT NULL,
        UNIQUE(prompt_id, text)
    );
    CREATE TABLE judgments(
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL CHECK(kind IN ('paired', 'cross', 'unpaired')),
        response_a INTEGER NOT NULL REFERENCES responses(id),
        response_b INTEGER REFERENCES responses(id),
        verdict TEXT NOT NULL CHECK(verdict IN ('a', 'b', 'tie', 'both_bad', 'up', 'down')),
        strength TEXT CHECK(strength IS NULL OR strength IN ('slightly', 'clearly')),
        annotator TEXT NOT NULL,
        source TEXT NOT NULL,
        a_side TEXT CHECK(a_side IS NULL OR a_side IN ('left', 'right')),
        seconds_spent REAL,
        created_at REAL NOT NULL,
        request_id TEXT UNIQUE,
        retracted_at REAL,
        retracted_by TEXT,
        CHECK((kind = 'unpaired') = (response_b IS NULL)),
        CHECK((kind = 'unpaired') = (verdict IN ('up', 'down')))
    );
    CREATE INDEX judgments_a ON judgments(response_a);
    CREATE INDEX judgments_b ON judgments(response_b);
    CREATE INDEX judgments_annotator ON judgments(annotator, created_at);
    CREATE TABLE skips(
        annotator TEXT NOT NULL,
        item_key TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY(annotator, item_key)
    );
    CREATE TABLE leases(
        item_key TEXT PRIMARY KEY,
        annotator TEXT NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE TABLE runs(
        id TEXT PRIMARY KEY,
        created_at REAL NOT NULL,
        config TEXT NOT NULL,
        out_dir TEXT NOT NULL,
        state TEXT NOT NULL,
        pid INTEGER,
        final_metrics TEXT,
        deleted_at REAL
    );
    CREATE TABLE adapters(
        name TEXT PRIMARY KEY,
        path TEXT NOT NULL,
        run_id TEXT REFERENCES runs(id),
        base_model TEXT,
        created_at REAL NOT NULL
    );
    """,
    """
    CREATE TABLE settings(
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        updated_by TEXT,
        updated_at REAL NOT NULL
    );
    CREATE TABLE gold(
        judgment_id INTEGER PRIMARY KEY REFERENCES judgments(id),
        marked_by TEXT NOT NULL,
        marked_at REAL NOT NULL
    );
    CREATE TABLE lineage(
        run_id TEXT NOT NULL REFERENCES runs(id),
        judgment_id INTEGER NOT NULL REFERENCES judgments(id),
        role TEXT NOT NULL CHECK(role IN ('train', 'held_out')),
        PRIMARY KEY(run_id, judgment_id)
    );
    CREATE INDEX lineage_judgment ON lineage(judgment_id);
    CREATE INDEX judgments_pair ON judgments(response_a, response_b);
    """,
    """
    ALTER TABLE responses ADD COLUMN parent_id INTEGER REFERENCES responses(id);
    ALTER TABLE responses ADD COLUMN editor TEXT;
    CREATE INDEX responses_parent ON responses(parent_id);
    """,
    """
    CREATE TABLE rankings(
        id INTEGER PRIMARY KEY,
        prompt_id INTEGER NOT NULL REFERENCES prompts(id),
        none_acceptable INTEGER NOT NULL DEFAULT 0 CHECK(none_acceptable IN (0, 1)),
        annotator TEXT NOT NULL,
        source TEXT NOT NULL,
        seconds_spent REAL,
        created_at REAL NOT NULL,
        request_id TEXT UNIQUE,
        retracted_at REAL,
        retracted_by TEXT
    );
    CREATE TABLE ranking_items(
        ranking_id INTEGER NOT NULL REFERENCES rankings(id),
        response_id INTEGER NOT NULL REFERENCES responses(id),
        tier INTEGER NOT NULL CHECK(tier >= 0),
        shown_pos INTEGER,
        PRIMARY KEY(ranking_id, response_id)
    );
    CREATE INDEX ranking_items_response ON ranking_items(response_id);
    CREATE INDEX rankings_annotator ON rankings(annotator, created_at);
    ALTER TABLE judgments ADD COLUMN ranking_id INTEGER REFERENCES rankings(id);
    CREATE INDEX judgments_ranking ON judgments(ranking_id);
    """,
    """
    ALTER TABLE prompts ADD COLUMN messages TEXT;
    """,
    """
    CREATE TABLE answer_logps(
        scorer TEXT NOT NULL,
        response_id INTEGER NOT NULL REFERENCES responses(id),
        logp REAL NOT NULL,
        tokens INTEGER NOT NULL,
        PRIMARY KEY(scorer, response_id)
    );
    CREATE TABLE item_scores(
        scorer TEXT NOT NULL,
        kind TEXT NOT NULL CHECK(kind IN ('paired', 'cross', 'unpaired')),
        response_a INTEGER NOT NULL REFERENCES responses(id),
        response_b INTEGER NOT NULL DEFAULT 0,
        margin REAL NOT NULL,
        score REAL NOT NULL,
        PRIMARY KEY(scorer, kind, response_a, response_b)
    );
    CREATE INDEX item_scores_order ON item_scores(scorer, kind, score DESC);
    """,
    # 1: the model's answer was cut at its token limit before its end-of-turn token.
    # Answers stored before this column existed read 0 (as they were trained on then);
    # the store remembers how many a model wrote, until `mark-cut` has checked them.
    """
    ALTER TABLE responses ADD COLUMN cut_off INTEGER NOT NULL DEFAULT 0 CHECK(cut_off IN (0, 1));
    INSERT INTO settings(key, value, updated_by, updated_at)
        SELECT 'cut_off_unchecked',
               '{"answers": ' || (SELECT COUNT(*) FROM responses WHERE gen_settings IS NOT NULL) || '}',
               'migration', CAST(strftime('%s', 'now') AS REAL)
        WHERE EXISTS (SELECT 1 FROM responses WHERE gen_settings IS NOT NULL);
    """,
]
# The settings key under which a store migrated from before `responses.cut_off` keeps
# how many generated answers no one has checked for a cut (rpo_app.cut_backfill).
CUT_UNCHECKED_KEY = "cut_off_unchecked"
# The settings key under which the label queue finds the newest informative scores
# (rpo_app.active writes it when a scoring job completes).
INFORMATIVE_KEY = "informative"


class StoreError(ValueError):
    """A write was refused; the message says why. Nothing was written."""


class StorageError(StoreError):
    """The disk refused a write (full, read-only, I/O error). Nothing was written; the
    same call succeeds once the disk is fixed."""


# SQLite's messages for a disk that refuses writes, and what to tell the user.
_DISK_PROBLEMS = (
    ("disk is full", "the disk is full; free some space and try again"),
    ("readonly", "the data folder is read-only; make it writable and try again"),
    ("read-only", "the data folder is read-only; make it writable and try again"),
    ("unable to open", "the database file cannot be opened (missing or not writable)"),
    ("disk i/o error", "the disk reported an I/O error (full, read-only or failing)"),
)


def storage_error(err: sqlite3.Error, path: Path) -> StorageError | None:
    """A StorageError for an SQLite error that comes from the disk, else None."""
    text = str(err).lower()
    for needle, advice in _DISK_PROBLEMS:
        if needle in text:
            return StorageError(f"could not save to {path}: {advice} ({err}). "
                                "Nothing was saved; everything saved before is intact.")
    return None


def _now() -> float:
    return time.time()


class Store:
    """One SQLite database. Safe to share across threads: each thread gets its own
    connection; writers serialise through BEGIN IMMEDIATE + busy timeout."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir() or path.suffix == "":
            path = path / "rpo.sqlite3"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(f"cannot create the data folder {path.parent}: {err.strerror}") from err
        self.path = path
        self._local = threading.local()
        if not os.access(path.parent, os.W_OK):  # also False on a read-only mount, even for root
            raise StorageError(f"the data folder {path.parent} is read-only (or not writable "
                               "by this user); judgments could not be saved. Make it writable "
                               "or pass another --data-dir.")
        try:
            self._migrate()
        except sqlite3.Error as err:
            self.close()
            raise (storage_error(err, path) or err) from err

    # -- connections and transactions -------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
            self._local.depth = 0
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All-or-nothing. Nested calls join the outer transaction."""
        try:
            conn = self._conn()
        except sqlite3.Error as err:
            self.close()
            raise (storage_error(err, self.path) or err) from err
        if self._local.depth:
            self._local.depth += 1
            try:
                yield conn
            finally:
                self._local.depth -= 1
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as err:
            raise (storage_error(err, self.path) or err) from err
        self._local.depth = 1
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as err:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # SQLite already rolled back (it does on a full disk or I/O error)
            if isinstance(err, sqlite3.Error):
                disk = storage_error(err, self.path)
                if disk is not None:
                    raise disk from err
            raise
        finally:
            self._local.depth = 0

    def _read(self, sql: str, params: Iterable = ()) -> list[sqlite3.Row]:
        return self._conn().execute(sql, tuple(params)).fetchall()

    def _one(self, sql: str, params: Iterable = ()):
        row = self._conn().execute(sql, tuple(params)).fetchone()
        return row

    def _migrate(self) -> None:
        conn = self._conn()
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this rpo_app "
                f"({len(MIGRATIONS)}); upgrade rpo_app"
            )
        for target, script in enumerate(MIGRATIONS[version:], start=version + 1):
            with self.transaction() as tx:
                for statement in script.split(";"):
                    if statement.strip():
                        tx.execute(statement)
                tx.execute(f"PRAGMA user_version={target}")

    def schema_version(self) -> int:
        return self._one("PRAGMA user_version")[0]

    def integrity_check(self) -> str:
        return self._one("PRAGMA integrity_check")[0]

    # -- prompts ------------------------------------------------------------------------
    def add_prompts(self, items: Iterable[str | dict], source: str) -> tuple[list[int], int]:
        """Store prompts (text, {"prompt", "family"}, or {"messages", "family"} for a
        conversation: rpo_app.conversation) in one transaction; return (the id of each
        item, in order, how many were new). A prompt already stored keeps its family and
        source: the first write wins. A conversation of one user turn is stored as that
        turn's text; a longer one as its transcript, with its messages."""
        from rpo_app import conversation

        ids, n_new = [], 0
        with self.transaction() as tx:
            for item in items:
                text, family = (item, None) if isinstance(item, str) else (
                    item.get("prompt"), item.get("family"))
                messages = None if isinstance(item, str) else item.get("messages")
                if messages is not None:
                    try:
                        messages = conversation.check(messages)
                    except conversation.ConversationError as err:
                        raise StoreError(str(err)) from None
                    for m in messages:
                        m["content"] = _clean_text(m["content"], f"the {m['role']} message")
                    if conversation.is_single_turn(messages):
                        text, messages = messages[0]["content"], None
                    else:
                        text = conversation.transcript(messages)
                text = _clean_text(text, "prompt")
                cur = tx.execute(
                    "INSERT OR IGNORE INTO prompts(text, family, source, created_at, messages) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (text, family, source, _now(),
                     None if messages is None else json.dumps(messages, ensure_ascii=False)))
                if cur.rowcount:
                    ids.append(cur.lastrowid)
                    n_new += 1
                else:
                    ids.append(tx.execute("SELECT id FROM prompts WHERE text = ?",
                                          (text,)).fetchone()[0])
        return ids, n_new

    def add_prompt(self, text: str, source: str, family: str | None = None) -> tuple[int, bool]:
        """add_prompts for one text: (prompt id, created)."""
        ids, n_new = self.add_prompts([{"prompt": text, "family": family}], source)
        return ids[0], bool(n_new)

    def prompt(self, prompt_id: int) -> dict | None:
        row = self._one("SELECT * FROM prompts WHERE id = ?", (prompt_id,))
        return _prompt_dict(row) if row else None

    def prompts(self, ids: Iterable[int] | None = None, limit: int | None = None,
                offset: int = 0) -> list[dict]:
        if ids is not None:
            ids = list(ids)
            rows = []
            for chunk in _chunks(ids, 500):
                rows += self._read(
                    f"SELECT * FROM prompts WHERE id IN ({','.join('?' * len(chunk))})", chunk)
            by_id = {r["id"]: _prompt_dict(r) for r in rows}
            return [by_id[i] for i in ids if i in by_id]
        sql = "SELECT * FROM prompts ORDER BY id"
        params: list = []
        if limit is not None:
            sql += " LIMIT ? OFFSET ?"
            params = [limit, offset]
        return [_prompt_dict(r) for r in self._read(sql, params)]

    def count_prompts(self) -> int:
        return self._one("SELECT COUNT(*) FROM prompts")[0]

    def prompts_with_fewer_responses(self, n: int, limit: int | None = None,
                                     adapter: str | None = None) -> list[dict]:
        """Prompts with fewer than n responses, as dicts with that count as "n", fewest
        first (the generation backlog); with `adapter`, counting only that adapter's."""
        extra, params = ("AND r.adapter = ?", [adapter]) if adapter else ("", [])
        sql = (f"SELECT p.*, (SELECT COUNT(*) FROM responses r WHERE r.prompt_id = p.id "
               f"{extra}) AS n FROM prompts p WHERE n < ? ORDER BY n, p.id")
        params.append(n)
        if limit:
            sql += " LIMIT ?"
            params.append(limit)
        return [dict(r) for r in self._read(sql, params)]

    # -- responses ----------------------------------------------------------------------
    def add_response(self, prompt_id: int, text: str, source: str, model: str | None = None,
                     adapter: str | None = None, gen_settings: dict | None = None,
                     import_file: str | None = None, cut_off: bool = False) -> tuple[int, bool]:
        """Return (response id, created). The same text for the same prompt is one row.
        `cut_off`: a model's answer that hit its token limit before it ended (training
        must not teach the model to end there, see batches.Encoder)."""
        text = _clean_text(text, "response", allow_empty=True, allow_control=True)
        with self.transaction() as tx:
            cur = tx.execute(
                "INSERT OR IGNORE INTO responses(prompt_id, text, source, model, adapter, "
                "gen_settings, import_file, created_at, cut_off) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (prompt_id, text, source, model, adapter,
                 json.dumps(gen_settings) if gen_settings else None, import_file, _now(),
                 int(bool(cut_off))))
            if cur.rowcount:
                return cur.lastrowid, True
            row = tx.execute("SELECT id FROM responses WHERE prompt_id = ? AND text = ?",
                             (prompt_id, text)).fetchone()
            return row[0], False

    def response(self, response_id: int) -> dict | None:
        row = self._one(
            "SELECT r.*, p.text AS prompt, p.family AS family, p.messages AS prompt_messages "
            "FROM responses r JOIN prompts p ON p.id = r.prompt_id WHERE r.id = ?", (response_id,))
        return _response_dict(row) if row else None

    def responses_for_prompt(self, prompt_id: int) -> list[dict]:
        rows = self._read(
            "SELECT r.*, p.text AS prompt, p.family AS family, p.messages AS prompt_messages "
            "FROM responses r JOIN prompts p ON p.id = r.prompt_id WHERE r.prompt_id = ? "
            "ORDER BY r.id",
            (prompt_id,))
        return [_response_dict(r) for r in rows]

    def count_responses(self) -> int:
        return self._one("SELECT COUNT(*) FROM responses")[0]

    # -- judgments ----------------------------------------------------------------------
    def add_judgment(self, kind: str, response_a: int, response_b: int | None, verdict: str,
                     annotator: str, source: str = "label", strength: str | None = None,
                     a_side: str | None = None, seconds_spent: float | None = None,
                     request_id: str | None = None,
                     overlap: int | None = None) -> tuple[int, bool]:
        """Record a judgment; return (id, created).

        request_id makes the write idempotent: a double click or a retried request
        with the same id returns the first judgment instead of adding a second.
        overlap=k refuses a judgment of an item (a pair, or a single answer) that already
        has k counted active judgments, or one by this annotator: the label queue passes
        its setting so an item whose lease expired while someone else judged it is not
        judged more often than asked, and nobody judges an item twice.
        """
        _check_judgment(kind, response_a, response_b, verdict, strength, a_side, annotator)
        with self.transaction() as tx:
            if request_id is not None:
                row = tx.execute("SELECT id FROM judgments WHERE request_id = ?",
                                 (request_id,)).fetchone()
                if row:
                    return row[0], False
            pa = tx.execute("SELECT prompt_id FROM responses WHERE id = ?",
                            (response_a,)).fetchone()
            pb = None if response_b is None else tx.execute(
                "SELECT prompt_id FROM responses WHERE id = ?", (response_b,)).fetchone()
            if pa is None or (response_b is not None and pb is None):
                raise StoreError("judgment refers to a response that does not exist")
            if kind == "paired" and pa[0] != pb[0]:
                raise StoreError("a paired judgment needs two responses to the same prompt")
            if kind == "cross" and pa[0] == pb[0]:
                raise StoreError("a cross-prompt judgment needs responses to different prompts")
            if response_a == response_b:
                raise StoreError("a judgment cannot compare a response with itself")
            if overlap is not None:
                judges = [r[0] for r in tx.execute(
                    f"SELECT annotator FROM judgments WHERE retracted_at IS NULL AND {_COUNTED} "
                    "AND kind = ? AND ((response_a = ? AND response_b IS ?) OR "
                    "(response_a = ? AND response_b IS ?))",
                    (kind, response_a, response_b, response_b, response_a))]
                if annotator in judges:
                    raise StoreError("you have judged this item already; here is the next one")
                if len(judges) >= overlap:
                    raise StoreError("this item was judged meanwhile by someone else; "
                                     "here is the next one")
            cur = tx.execute(
                "INSERT INTO judgments(kind, response_a, response_b, verdict, strength, "
                "annotator, source, a_side, seconds_spent, created_at, request_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (kind, response_a, response_b, verdict, strength, annotator, source, a_side,
                 seconds_spent, _now(), request_id))
            keys = judgment_lease_keys(kind, response_a, response_b, pa[0])
            tx.execute(f"DELETE FROM leases WHERE annotator = ? "
                       f"AND item_key IN ({','.join('?' * len(keys))})", (annotator, *keys))
            return cur.lastrowid, True

    def add_edit(self, parent_id: int, text: str, editor: str,
                 request_id: str | None = None) -> dict:
        """Store a person's better version of an answer and the judgment that it beats
        the original, in one transaction. Returns {"response_id", "judgment_id", "created"}.
        Refused (nothing stored): an unknown answer, empty text, text that changes nothing,
        no editor."""
        if not editor or not str(editor).strip():
            raise StoreError("an edit needs an editor name")
        text = _clean_text(text, "the edited answer")
        with self.transaction() as tx:
            if request_id is not None:
                row = tx.execute("SELECT id, response_b FROM judgments WHERE request_id = ?",
                                 (request_id,)).fetchone()
                if row:
                    return {"response_id": row[1], "judgment_id": row[0], "created": False}
            parent = tx.execute("SELECT prompt_id, text FROM responses WHERE id = ?",
                                (parent_id,)).fetchone()
            if parent is None:
                raise StoreError(f"there is no answer #{parent_id} to edit")
            if text.strip() == parent["text"].strip():
                raise StoreError("the edited answer is the same as the original; change it "
                                 "or cancel")
            if tx.execute("SELECT 1 FROM responses WHERE prompt_id = ? AND text = ?",
                          (parent["prompt_id"], text)).fetchone():
                raise StoreError("this prompt already has an answer with exactly that text")
            rid = tx.execute(
                "INSERT INTO responses(prompt_id, text, source, parent_id, editor, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (parent["prompt_id"], text, EDIT_SOURCE, parent_id, editor, _now())).lastrowid
            # The original has the lower id, so it is A and the rewrite, B, wins.
            jid, _ = self.add_judgment("paired", parent_id, rid, "b", editor, source=EDIT_SOURCE,
                                       strength="clearly", request_id=request_id)
            return {"response_id": rid, "judgment_id": jid, "created": True}

    def add_ranking(self, tiers: list[list[int]], annotator: str, none_acceptable: bool = False,
                    source: str = "label", shown: list[int] | None = None,
                    seconds_spent: float | None = None, request_id: str | None = None,
                    overlap: int | None = None) -> tuple[int, bool]:
        """Store a ranking of answers to one prompt (tiers of response ids, best first) and
        its implied pairs (rpo_app.rankings), in one transaction; return (ranking id,
        created). `shown` is the order on screen: an implied pair's a_side is "left" when
        its A was shown first. request_id and overlap work as in add_judgment, counted per
        answer: nobody ranks an answer twice, and no answer is in more than `overlap`
        rankings."""
        from rpo_app import rankings

        if not annotator or not str(annotator).strip():
            raise StoreError("a ranking needs an annotator name")
        ids = [r for tier in tiers for r in tier]
        try:
            rankings.labels(len(ids))
            rankings.check_tiers(tiers, sorted(set(ids)), lambda r: f"#{r}")
            if shown is not None:
                rankings.check_tiers([shown], ids, lambda r: f"#{r}")
        except rankings.RankingError as err:
            raise StoreError(str(err)) from None
        with self.transaction() as tx:
            if request_id is not None:
                row = tx.execute("SELECT id FROM rankings WHERE request_id = ?",
                                 (request_id,)).fetchone()
                if row:
                    return row[0], False
            marks = ",".join("?" * len(ids))
            found = {r[0]: r[1] for r in tx.execute(
                f"SELECT id, prompt_id FROM responses WHERE id IN ({marks})", ids)}
            missing = [r for r in ids if r not in found]
            if missing:
                raise StoreError(f"the ranking refers to answers that do not exist: "
                                 f"{', '.join(f'#{r}' for r in missing)}")
            if len(set(found.values())) > 1:
                raise StoreError("a ranking orders answers to one prompt; these answer "
                                 "different prompts")
            if overlap is not None:
                rankers = [r[0] for r in tx.execute(
                    f"SELECT k.annotator FROM ranking_items ri JOIN rankings k "
                    f"ON k.id = ri.ranking_id WHERE ri.response_id IN ({marks}) "
                    f"AND k.retracted_at IS NULL AND k.{_COUNTED}", ids)]
                if annotator in rankers:
                    raise StoreError("you have ranked some of these answers already; here is "
                                     "the next item")
                per_answer = tx.execute(
                    f"SELECT MAX(n) FROM (SELECT COUNT(*) AS n FROM ranking_items ri "
                    f"JOIN rankings k ON k.id = ri.ranking_id WHERE ri.response_id IN ({marks}) "
                    f"AND k.retracted_at IS NULL AND k.{_COUNTED} GROUP BY ri.response_id)",
                    ids).fetchone()[0] or 0
                if per_answer >= overlap:
                    raise StoreError("these answers were ranked meanwhile by someone else; "
                                     "here is the next item")
            now = _now()
            rid = tx.execute(
                "INSERT INTO rankings(prompt_id, none_acceptable, annotator, source, "
                "seconds_spent, created_at, request_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (next(iter(found.values())), int(none_acceptable), annotator, source,
                 seconds_spent, now, request_id)).lastrowid
            pos = {r: i for i, r in enumerate(shown)} if shown is not None else {}
            place = rankings.tier_of(tiers)
            tx.executemany(
                "INSERT INTO ranking_items(ranking_id, response_id, tier, shown_pos) "
                "VALUES (?, ?, ?, ?)", [(rid, r, place[r], pos.get(r)) for r in ids])
            for a, b, verdict in rankings.implied_pairs(tiers, none_acceptable):
                a_side = None if not pos else ("left" if pos[a] < pos[b] else "right")
                tx.execute(
                    "INSERT INTO judgments(kind, response_a, response_b, verdict, annotator, "
                    "source, a_side, created_at, ranking_id) VALUES ('paired', ?, ?, ?, ?, ?, ?, "
                    "?, ?)", (a, b, verdict, annotator, source, a_side, now, rid))
            tx.execute("DELETE FROM leases WHERE annotator = ? AND item_key = ?",
                       (annotator, item_key(RANK_KEY, next(iter(found.values())))))
            return rid, True

    def ranking_by_request(self, request_id: str) -> dict | None:
        row = self._one("SELECT id FROM rankings WHERE request_id = ?", (request_id,))
        return self.ranking(row[0]) if row else None

    def ranking(self, ranking_id: int) -> dict | None:
        rows = self.rankings(ids=[ranking_id], include_retracted=True)
        return rows[0] if rows else None

    def rankings(self, include_retracted: bool = False, ids: Iterable[int] | None = None
                 ) -> list[dict]:
        """Rankings with their prompt and answers: `tiers` (response ids, best first),
        `shown` (screen order, when known), `answers` (id -> text) and `cut_off` (the ids
        of answers cut at their token limit)."""
        where, params = [], []
        if not include_retracted:
            where.append("k.retracted_at IS NULL")
        if ids is not None:
            ids = list(ids)
            where.append(f"k.id IN ({','.join('?' * len(ids))})")
            params += ids
        rows = self._read(
            "SELECT k.*, p.text AS prompt FROM rankings k JOIN prompts p ON p.id = k.prompt_id "
            + ("WHERE " + " AND ".join(where) if where else "") + " ORDER BY k.id", params)
        out = {r["id"]: {**dict(r), "none_acceptable": bool(r["none_acceptable"]),
                         "tiers": [], "shown": [], "answers": {}, "cut_off": []} for r in rows}
        if not out:
            return []
        # The same filter again rather than an id list, which SQLite caps at 32k values.
        items = self._read(
            "SELECT ri.*, r.text, r.cut_off FROM ranking_items ri JOIN responses r ON r.id = ri.response_id "
            "JOIN rankings k ON k.id = ri.ranking_id "
            + ("WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY ri.ranking_id, ri.tier, ri.response_id", params)
        for it in items:
            k = out[it["ranking_id"]]
            while len(k["tiers"]) <= it["tier"]:
                k["tiers"].append([])
            k["tiers"][it["tier"]].append(it["response_id"])
            k["answers"][it["response_id"]] = it["text"]
            if it["cut_off"]:
                k["cut_off"].append(it["response_id"])
            if it["shown_pos"] is not None:
                k["shown"].append((it["shown_pos"], it["response_id"]))
        for k in out.values():
            k["shown"] = [r for _, r in sorted(k["shown"])]
        return list(out.values())

    def ranking_places(self) -> dict[int, dict[int, int]]:
        """{ranking id: {response id: tier}} over active rankings: what the pools need."""
        out: dict[int, dict[int, int]] = {}
        for r in self._read("SELECT ri.ranking_id, ri.response_id, ri.tier FROM ranking_items ri "
                            "JOIN rankings k ON k.id = ri.ranking_id WHERE k.retracted_at IS NULL"):
            out.setdefault(r[0], {})[r[1]] = r[2]
        return out

    def retract(self, judgment_id: int, by: str) -> bool:
        """Undo keeps history: the row stays, marked retracted. A pair implied by a
        ranking takes its whole ranking with it: a ranking is one judgment."""
        with self.transaction() as tx:
            row = tx.execute("SELECT ranking_id FROM judgments WHERE id = ? "
                             "AND retracted_at IS NULL", (judgment_id,)).fetchone()
            if row is None:
                return False
            if row[0] is not None:
                return self._retract_ranking(tx, row[0], by)
            tx.execute("UPDATE judgments SET retracted_at = ?, retracted_by = ? WHERE id = ?",
                       (_now(), by, judgment_id))
            return True

    def retract_ranking(self, ranking_id: int, by: str) -> bool:
        with self.transaction() as tx:
            return self._retract_ranking(tx, ranking_id, by)

    @staticmethod
    def _retract_ranking(tx, ranking_id: int, by: str) -> bool:
        now = _now()
        cur = tx.execute("UPDATE rankings SET retracted_at = ?, retracted_by = ? "
                         "WHERE id = ? AND retracted_at IS NULL", (now, by, ranking_id))
        tx.execute("UPDATE judgments SET retracted_at = ?, retracted_by = ? "
                   "WHERE ranking_id = ? AND retracted_at IS NULL", (now, by, ranking_id))
        return bool(cur.rowcount)

    def undo_last(self, annotator: str) -> dict | None:
        """Retract the annotator's most recent active judgment and return it (for a
        ranking: its last implied pair, with `ranking_id`; the whole ranking is retracted)."""
        with self.transaction() as tx:
            row = tx.execute(
                "SELECT id FROM judgments WHERE annotator = ? AND retracted_at IS NULL "
                "ORDER BY id DESC LIMIT 1", (annotator,)).fetchone()
            if row is None:
                return None
            self.retract(row[0], annotator)
        return self.judgment(row[0])

    def judgment(self, judgment_id: int) -> dict | None:
        rows = self._judgment_rows("WHERE j.id = ?", (judgment_id,))
        return rows[0] if rows else None

    def judgment_by_request(self, request_id: str) -> dict | None:
        rows = self._judgment_rows("WHERE j.request_id = ?", (request_id,))
        return rows[0] if rows else None

    def judgments(self, include_retracted: bool = False, annotator: str | None = None,
                  limit: int | None = None, newest_first: bool = False) -> list[dict]:
        where, params = [], []
        if not include_retracted:
            where.append("j.retracted_at IS NULL")
        if annotator is not None:
            where.append("j.annotator = ?")
            params.append(annotator)
        sql = ("WHERE " + " AND ".join(where)) if where else ""
        sql += " ORDER BY j.id" + (" DESC" if newest_first else "")
        if limit:
            sql += " LIMIT ?"
            params.append(limit)
        return self._judgment_rows(sql, params)

    def _judgment_rows(self, tail: str, params) -> list[dict]:
        rows = self._read(
            "SELECT j.*, ra.text AS response_a_text, rb.text AS response_b_text, "
            "pa.id AS prompt_a_id, pa.text AS prompt_a, pb.id AS prompt_b_id, pb.text AS prompt_b, "
            "ra.model AS model_a, ra.adapter AS adapter_a, rb.model AS model_b, "
            "rb.adapter AS adapter_b, ra.source AS response_a_source, "
            "rb.source AS response_b_source, ra.gen_settings AS gen_settings_a, "
            "rb.gen_settings AS gen_settings_b, ra.import_file AS import_file_a, "
            "rb.import_file AS import_file_b, ra.parent_id AS parent_a, rb.parent_id AS parent_b, "
            "ra.cut_off AS cut_off_a, rb.cut_off AS cut_off_b, "
            "pa.messages AS prompt_a_messages, pb.messages AS prompt_b_messages "
            "FROM judgments j JOIN responses ra ON ra.id = j.response_a "
            "JOIN prompts pa ON pa.id = ra.prompt_id "
            "LEFT JOIN responses rb ON rb.id = j.response_b "
            "LEFT JOIN prompts pb ON pb.id = rb.prompt_id " + tail, params)
        return [dict(r) for r in rows]

    def training_judgments(self, kinds: Iterable[str] | None = None,
                           annotators: Iterable[str] | None = None) -> list[dict]:
        """Active judgments in the shape batches.py takes (texts in *_text fields)."""
        kinds = list(kinds) if kinds else list(KINDS)
        annotators = list(annotators) if annotators else None
        places = self.ranking_places()
        out = []
        for row in self.judgments():
            if row["kind"] not in kinds or (annotators and row["annotator"] not in annotators):
                continue
            if row["source"] in CHECK_SOURCES:  # the item's own judgments carry its label
                continue
            out.append({
                "judgment_id": row["id"], "kind": row["kind"], "verdict": row["verdict"],
                "strength": row["strength"], "annotator": row["annotator"],
                "source": row["source"],
                "prompt_a_text": row["prompt_a"], "response_a_text": row["response_a_text"],
                "prompt_b_text": row["prompt_b"], "response_b_text": row["response_b_text"],
                "prompt_a_id": row["prompt_a_id"], "prompt_b_id": row["prompt_b_id"],
                # An answer cut at its token limit is trained on without an ending.
                "cut_off_a": bool(row["cut_off_a"]), "cut_off_b": bool(row["cut_off_b"]),
                # Conversations (rpo_app.conversation): the whole history, for the template.
                "prompt_a_messages": _messages(row["prompt_a_messages"]),
                "prompt_b_messages": _messages(row["prompt_b_messages"]),
            })
            if row["ranking_id"] is not None:  # where each side sits in its ranking (pools)
                place = places[row["ranking_id"]]
                out[-1].update(ranking_id=row["ranking_id"], tier_a=place[row["response_a"]],
                               tier_b=place[row["response_b"]],
                               ranking_tiers=max(place.values()) + 1)
        return out

    def state(self) -> dict:
        """What the store held at a moment: enough to tell later whether it changed."""
        row = self._one("SELECT COUNT(*), COALESCE(MAX(id), 0), "
                        "COALESCE(MAX(MAX(created_at), MAX(COALESCE(retracted_at, 0))), 0) "
                        "FROM judgments")
        return {"path": str(self.path), "schema_version": self.schema_version(),
                "active_judgments": self.count_judgments(), "all_judgments": row[0],
                "max_judgment_id": row[1], "last_change_at": row[2],
                "answers_unchecked_for_cut": self.answers_unchecked_for_cut(), "read_at": _now()}

    def count_judgments(self, include_retracted: bool = False) -> int:
        sql = "SELECT COUNT(*) FROM judgments"
        if not include_retracted:
            sql += " WHERE retracted_at IS NULL"
        return self._one(sql)[0]

    def stats(self, since: float | None = None) -> dict:
        """Counts for the CLI and the progress line in the UI."""
        by_kind = {k: {} for k in KINDS}
        for row in self._read(
                "SELECT kind, verdict, COUNT(*) AS n FROM judgments WHERE retracted_at IS NULL "
                "GROUP BY kind, verdict"):
            by_kind[row["kind"]][row["verdict"]] = row["n"]
        annotators = {r["annotator"]: r["n"] for r in self._read(
            "SELECT annotator, COUNT(*) AS n FROM judgments WHERE retracted_at IS NULL "
            "GROUP BY annotator ORDER BY n DESC")}
        out = {
            "prompts": self.count_prompts(),
            "responses": self.count_responses(),
            "judgments": self.count_judgments(),
            "retracted": self._one(
                "SELECT COUNT(*) FROM judgments WHERE retracted_at IS NOT NULL")[0],
            "by_kind": by_kind,
            "annotators": annotators,
            # A ranking is stored with its implied pairs, which by_kind counts as paired.
            "rankings": self._one("SELECT COUNT(*) FROM rankings WHERE retracted_at IS NULL")[0],
            "ranking_pairs": self._one("SELECT COUNT(*) FROM judgments "
                                       "WHERE retracted_at IS NULL AND ranking_id IS NOT NULL")[0],
            "answers_unchecked_for_cut": self.answers_unchecked_for_cut(),
        }
        if since is not None:
            out["since"] = {r["kind"]: r["n"] for r in self._read(
                "SELECT kind, COUNT(*) AS n FROM judgments WHERE retracted_at IS NULL "
                "AND created_at >= ? GROUP BY kind", (since,))}
        return out

    def annotator_counts(self, annotator: str, since: float) -> dict:
        """{kind: n} of the annotator's active judgments since then; a ranking counts once,
        under "ranking", not as its implied pairs."""
        out = {r["kind"]: r["n"] for r in self._read(
            "SELECT kind, COUNT(*) AS n FROM judgments WHERE retracted_at IS NULL "
            "AND ranking_id IS NULL AND annotator = ? AND created_at >= ? GROUP BY kind",
            (annotator, since))}
        ranked = self._one("SELECT COUNT(*) FROM rankings WHERE retracted_at IS NULL "
                           "AND annotator = ? AND created_at >= ?", (annotator, since))[0]
        if ranked:
            out["ranking"] = ranked
        return out

    # -- label queue support ------------------------------------------------------------
    def next_prompts_for_pairs(self, annotator: str, start_id: int, limit: int,
                               unjudged_only: bool, overlap: int = 1,
                               partial: bool = False) -> list[dict]:
        """Prompts with >= 2 responses, not leased to someone else, not skipped by
        this annotator, scanning ids from start_id (callers pass a random start so
        annotators spread out; the index on ids keeps this fast at 100k prompts).

        unjudged_only: no counted paired judgment yet. partial (with overlap > 1): a
        counted paired judgment by someone else, so the item can get its next annotator;
        whether a pair is still open is the caller's check (pair_judges)."""
        judged = (f"SELECT 1 FROM responses r JOIN judgments j ON j.response_a = r.id "
                  f"WHERE r.prompt_id = p.id AND j.kind = 'paired' AND j.retracted_at IS NULL "
                  f"AND j.{_COUNTED}")
        where, params = "", []
        if partial and overlap > 1:
            where = f"AND EXISTS ({judged} AND j.annotator != ?) "
            params = [annotator]
        elif unjudged_only:
            where = f"AND NOT EXISTS ({judged}) "
        rows = self._read(
            "SELECT p.* FROM prompts p WHERE p.id >= ? "
            "AND (SELECT COUNT(*) FROM responses r WHERE r.prompt_id = p.id) >= 2 "
            "AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.item_key = ? || p.id "
            "AND l.annotator != ? AND l.expires_at > ?) "
            "AND NOT EXISTS (SELECT 1 FROM skips s WHERE s.annotator = ? "
            "AND s.item_key = ? || p.id) " + where + "ORDER BY p.id LIMIT ?",
            (start_id, PROMPT_KEY, annotator, _now(), annotator, PROMPT_KEY, *params, limit))
        return [dict(r) for r in rows]

    def next_responses_for_thumbs(self, annotator: str, start_id: int, limit: int,
                                  unjudged_only: bool, overlap: int = 1,
                                  partial: bool = False) -> list[dict]:
        """Answers not leased to someone else and not skipped by this annotator.

        unjudged_only: open to this annotator (fewer than `overlap` counted thumbs, none
        theirs); partial: of those, only answers someone else has judged already."""
        judged = ""
        params: list = []
        if unjudged_only:
            count = (f"(SELECT COUNT(*) FROM judgments j WHERE j.response_a = r.id "
                     f"AND j.kind = 'unpaired' AND j.retracted_at IS NULL AND j.{_COUNTED})")
            judged = (f"AND {count} BETWEEN ? AND ? AND NOT EXISTS (SELECT 1 FROM judgments j "
                      f"WHERE j.response_a = r.id AND j.kind = 'unpaired' "
                      f"AND j.retracted_at IS NULL AND j.annotator = ?) ")
            params = [1 if partial else 0, max(overlap, 1) - 1, annotator]
        rows = self._read(
            "SELECT r.*, p.text AS prompt, p.family AS family, p.messages AS prompt_messages "
            "FROM responses r JOIN prompts p ON p.id = r.prompt_id WHERE r.id >= ? "
            "AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.item_key = ? || r.id "
            "AND l.annotator != ? AND l.expires_at > ?) "
            "AND NOT EXISTS (SELECT 1 FROM skips s WHERE s.annotator = ? "
            "AND s.item_key = ? || r.id) " + judged + "ORDER BY r.id LIMIT ?",
            (start_id, RESPONSE_KEY, annotator, _now(), annotator, RESPONSE_KEY, *params, limit))
        return [_response_dict(r) for r in rows]

    # An answer is open for ranking by this annotator: in fewer than `overlap` counted
    # active rankings, none of them theirs.
    _RANK_OPEN = ("(SELECT COUNT(*) FROM ranking_items ri JOIN rankings k ON k.id = ri.ranking_id "
                  f"WHERE ri.response_id = r.id AND k.retracted_at IS NULL AND k.{_COUNTED}) < ? "
                  "AND NOT EXISTS (SELECT 1 FROM ranking_items ri JOIN rankings k "
                  "ON k.id = ri.ranking_id WHERE ri.response_id = r.id "
                  "AND k.retracted_at IS NULL AND k.annotator = ?)")

    def next_prompts_for_ranking(self, annotator: str, start_id: int, limit: int,
                                 min_answers: int, overlap: int = 1,
                                 partial: bool = False) -> list[dict]:
        """Prompts with at least `min_answers` answers open for ranking by this annotator,
        not leased to someone else, not skipped, scanning ids from start_id. partial: of
        those, prompts where someone else has ranked an open answer already."""
        where, params = "", []
        if partial:
            where = ("AND EXISTS (SELECT 1 FROM responses r JOIN ranking_items ri "
                     "ON ri.response_id = r.id JOIN rankings k ON k.id = ri.ranking_id "
                     f"WHERE r.prompt_id = p.id AND k.retracted_at IS NULL AND k.{_COUNTED} "
                     f"AND k.annotator != ? AND {self._RANK_OPEN}) ")
            params = [annotator, overlap, annotator]
        rows = self._read(
            "SELECT p.* FROM prompts p WHERE p.id >= ? "
            f"AND (SELECT COUNT(*) FROM responses r WHERE r.prompt_id = p.id "
            f"AND {self._RANK_OPEN}) >= ? "
            "AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.item_key = ? || p.id "
            "AND l.annotator != ? AND l.expires_at > ?) "
            "AND NOT EXISTS (SELECT 1 FROM skips s WHERE s.annotator = ? "
            "AND s.item_key = ? || p.id) " + where + "ORDER BY p.id LIMIT ?",
            (start_id, overlap, annotator, min_answers, RANK_KEY, annotator, _now(), annotator,
             RANK_KEY, *params, limit))
        return [dict(r) for r in rows]

    def answers_open_for_ranking(self, prompt_id: int, annotator: str, overlap: int = 1
                                 ) -> list[dict]:
        """The prompt's answers open for ranking by this annotator; those someone else has
        ranked first (so their rankings overlap), then by id."""
        rows = self._read(
            "SELECT r.*, p.text AS prompt, p.family AS family, p.messages AS prompt_messages, "
            "(SELECT COUNT(*) FROM ranking_items ri JOIN rankings k ON k.id = ri.ranking_id "
            f"WHERE ri.response_id = r.id AND k.retracted_at IS NULL AND k.{_COUNTED}) AS n "
            "FROM responses r JOIN prompts p ON p.id = r.prompt_id "
            f"WHERE r.prompt_id = ? AND {self._RANK_OPEN} ORDER BY n DESC, r.id",
            (prompt_id, overlap, annotator))
        return [_response_dict(r) for r in rows]

    def pair_judges(self, response_ids: list[int]) -> dict[tuple[int, int], list[str]]:
        """Unordered response pairs among these with counted active judgments, and who
        made them (an annotator once per judgment)."""
        if not response_ids:
            return {}
        marks = ",".join("?" * len(response_ids))
        rows = self._read(
            f"SELECT response_a, response_b, annotator FROM judgments WHERE retracted_at IS NULL "
            f"AND {_COUNTED} AND response_b IS NOT NULL AND response_a IN ({marks}) "
            f"AND response_b IN ({marks})", response_ids + response_ids)
        out: dict[tuple[int, int], list[str]] = {}
        for r in rows:
            out.setdefault(tuple(sorted((r[0], r[1]))), []).append(r[2])
        return out

    def max_prompt_id(self) -> int:
        return self._one("SELECT COALESCE(MAX(id), 0) FROM prompts")[0]

    def max_response_id(self) -> int:
        return self._one("SELECT COALESCE(MAX(id), 0) FROM responses")[0]

    def try_lease(self, item_key: str, annotator: str, seconds: float = LEASE_SECONDS) -> bool:
        """Reserve an item for one annotator; False if someone else holds it."""
        now = _now()
        with self.transaction() as tx:
            row = tx.execute("SELECT annotator, expires_at FROM leases WHERE item_key = ?",
                             (item_key,)).fetchone()
            if row and row["annotator"] != annotator and row["expires_at"] > now:
                return False
            tx.execute("INSERT OR REPLACE INTO leases(item_key, annotator, expires_at) "
                       "VALUES (?, ?, ?)", (item_key, annotator, now + seconds))
            return True

    def release_leases(self, annotator: str) -> None:
        with self.transaction() as tx:
            tx.execute("DELETE FROM leases WHERE annotator = ?", (annotator,))

    def release_lease(self, item_key: str, annotator: str) -> None:
        with self.transaction() as tx:
            tx.execute("DELETE FROM leases WHERE item_key = ? AND annotator = ?",
                       (item_key, annotator))

    def skipped(self, annotator: str, item_keys: list[str]) -> set[str]:
        if not item_keys:
            return set()
        marks = ",".join("?" * len(item_keys))
        rows = self._read(f"SELECT item_key FROM skips WHERE annotator = ? AND item_key IN ({marks})",
                          [annotator, *item_keys])
        return {r[0] for r in rows}

    def record_skip(self, annotator: str, item_key: str) -> None:
        with self.transaction() as tx:
            tx.execute("INSERT OR REPLACE INTO skips(annotator, item_key, created_at) "
                       "VALUES (?, ?, ?)", (annotator, item_key, _now()))
            tx.execute("DELETE FROM leases WHERE item_key = ? AND annotator = ?",
                       (item_key, annotator))

    # -- checks: gold items and re-shown items ------------------------------------------
    def mark_gold(self, judgment_ids: Iterable[int], by: str) -> int:
        """Mark judgments as gold (their verdict is the known answer); returns how many
        were newly marked. All or nothing: an unknown, retracted or check judgment is
        refused by id."""
        ids = [int(i) for i in judgment_ids]
        with self.transaction() as tx:
            n = 0
            for jid in ids:
                row = tx.execute("SELECT retracted_at, source FROM judgments WHERE id = ?",
                                 (jid,)).fetchone()
                if row is None:
                    raise StoreError(f"there is no judgment #{jid}")
                if row["retracted_at"] is not None:
                    raise StoreError(f"judgment #{jid} was retracted; it cannot be gold")
                if row["source"] in CHECK_SOURCES:
                    raise StoreError(f"judgment #{jid} is an annotator's answer to a check "
                                     f"({row['source']}); mark the original judgment instead")
                n += tx.execute("INSERT OR IGNORE INTO gold(judgment_id, marked_by, marked_at) "
                                "VALUES (?, ?, ?)", (jid, by, _now())).rowcount
            return n

    def unmark_gold(self, judgment_ids: Iterable[int]) -> int:
        with self.transaction() as tx:
            return sum(tx.execute("DELETE FROM gold WHERE judgment_id = ?", (int(i),)).rowcount
                       for i in judgment_ids)

    def gold_ids(self) -> set[int]:
        """Gold judgments that are still active."""
        return {r[0] for r in self._read(
            "SELECT g.judgment_id FROM gold g JOIN judgments j ON j.id = g.judgment_id "
            "WHERE j.retracted_at IS NULL")}

    _SAME_ITEM = ("m.kind = j.kind AND m.retracted_at IS NULL AND "
                  "((m.response_a = j.response_a AND m.response_b IS j.response_b) OR "
                  "(m.response_a = j.response_b AND m.response_b IS j.response_a))")

    def gold_candidates(self, annotator: str, kinds: Iterable[str], limit: int = 20) -> list[dict]:
        """Gold judgments whose item this annotator has not judged and did not make."""
        kinds = list(kinds)
        # From the gold table outwards: it is small, the judgments table is not.
        return self._judgment_rows(
            f"WHERE j.id IN (SELECT judgment_id FROM gold) AND j.retracted_at IS NULL "
            f"AND j.annotator != ? AND j.kind IN ({','.join('?' * len(kinds))}) "
            f"AND NOT EXISTS (SELECT 1 FROM judgments m WHERE m.annotator = ? AND "
            f"{self._SAME_ITEM}) ORDER BY random() LIMIT ?",
            [annotator, *kinds, annotator, limit])

    def recheck_candidates(self, annotator: str, kinds: Iterable[str], limit: int = 20,
                           skip_recent: int = 5) -> list[dict]:
        """This annotator's own counted judgments to show them again, leaving out their
        most recent ones (still in mind) and items they were re-shown already."""
        kinds = list(kinds)
        return self._judgment_rows(
            f"WHERE j.retracted_at IS NULL AND j.annotator = ? AND j.{_COUNTED} "
            f"AND j.kind IN ({','.join('?' * len(kinds))}) "
            f"AND j.id NOT IN (SELECT id FROM judgments WHERE annotator = ? "
            f"AND retracted_at IS NULL ORDER BY id DESC LIMIT ?) "
            f"AND NOT EXISTS (SELECT 1 FROM judgments m WHERE m.annotator = ? "
            f"AND m.source = '{RECHECK_SOURCE}' AND {self._SAME_ITEM}) ORDER BY random() LIMIT ?",
            [annotator, *kinds, annotator, skip_recent, annotator, limit])

    # -- settings shared by everyone using this store -----------------------------------
    def setting(self, key: str) -> dict | None:
        row = self._one("SELECT value FROM settings WHERE key = ?", (key,))
        return json.loads(row[0]) if row else None

    def put_setting(self, key: str, value: dict, by: str | None = None) -> None:
        with self.transaction() as tx:
            tx.execute("INSERT OR REPLACE INTO settings(key, value, updated_by, updated_at) "
                       "VALUES (?, ?, ?, ?)", (key, json.dumps(value), by, _now()))

    # -- lineage: which judgments trained which run --------------------------------------
    def record_lineage(self, run_id: str, train_ids: Iterable[int],
                       held_out_ids: Iterable[int]) -> int:
        """Index a run's judgments (its lineage.json is the record); ids this store does
        not hold (a run trained from a file) are left out. Returns rows written."""
        with self.transaction() as tx:
            n = 0
            for role, ids in (("train", train_ids), ("held_out", held_out_ids)):
                for jid in ids:
                    n += tx.execute(
                        "INSERT OR IGNORE INTO lineage(run_id, judgment_id, role) "
                        "SELECT ?, id, ? FROM judgments WHERE id = ?",
                        (run_id, role, int(jid))).rowcount
            return n

    def has_lineage(self, run_id: str) -> bool:
        return self._one("SELECT 1 FROM lineage WHERE run_id = ? LIMIT 1", (run_id,)) is not None

    def runs_using(self, judgment_ids: Iterable[int]) -> dict[int, list[dict]]:
        """For each judgment id: the runs that used it, their role, and the adapter each
        made (under its current name; None while a run has none)."""
        ids = [int(i) for i in judgment_ids]
        out: dict[int, list[dict]] = {i: [] for i in ids}
        for chunk in _chunks(ids, 500):
            for r in self._read(
                    f"SELECT l.judgment_id, l.run_id, l.role, a.name AS adapter FROM lineage l "
                    f"JOIN runs r ON r.id = l.run_id AND r.deleted_at IS NULL "
                    f"LEFT JOIN adapters a ON a.run_id = l.run_id "
                    f"WHERE l.judgment_id IN ({','.join('?' * len(chunk))}) "
                    f"ORDER BY l.run_id", chunk):
                out[r["judgment_id"]].append(
                    {"run_id": r["run_id"], "role": r["role"], "adapter": r["adapter"]})
        return out

    # -- embeddings ---------------------------------------------------------------------
    def prompts_missing_embedding(self, embedder: str) -> list[dict]:
        rows = self._read(
            "SELECT p.id, p.text, p.messages FROM prompts p LEFT JOIN prompt_embeddings e "
            "ON e.prompt_id = p.id AND e.embedder = ? WHERE e.prompt_id IS NULL ORDER BY p.id",
            (embedder,))
        return [_prompt_dict(r) for r in rows]

    def save_embeddings(self, embedder: str, ids: list[int], vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        with self.transaction() as tx:
            tx.executemany(
                "INSERT OR REPLACE INTO prompt_embeddings(prompt_id, embedder, vec) VALUES (?, ?, ?)",
                [(int(i), embedder, v.tobytes()) for i, v in zip(ids, vectors)])

    def load_embeddings(self, embedder: str, after_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
        rows = self._read("SELECT prompt_id, vec FROM prompt_embeddings WHERE embedder = ? "
                          "AND prompt_id > ? ORDER BY prompt_id", (embedder, after_id))
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        mat = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32)
        return ids, mat.reshape(len(rows), -1).copy()

    # -- answers stored before cut_off existed (rpo_app.cut_backfill) --------------------
    def generated_answers_marked_ended(self) -> list[dict]:
        """Every answer a model wrote here (it has generation settings) that the store
        counts as ended, with its prompt (text and conversation), model and settings."""
        rows = self._read(
            "SELECT r.id, r.prompt_id, r.text, r.cut_off, r.model, r.adapter, r.gen_settings, "
            "p.text AS prompt, p.messages AS prompt_messages "
            "FROM responses r JOIN prompts p ON p.id = r.prompt_id "
            "WHERE r.gen_settings IS NOT NULL AND r.cut_off = 0 ORDER BY r.id")
        return [_response_dict(r) for r in rows]

    def answers_unchecked_for_cut(self) -> int:
        """Generated answers stored before the store recorded cut answers that `mark-cut`
        has not checked yet (0 for a store that always recorded them)."""
        return int((self.setting(CUT_UNCHECKED_KEY) or {}).get("answers", 0))

    def mark_cut_off(self, ids: Iterable[int], unchecked_left: int | None = None) -> int:
        """Mark answers as cut at their token limit, in one transaction; returns how many
        changed. Their cached log-probs go too: they were scored with an ending.
        `unchecked_left`: how many stored answers the check could not cover (another
        model's); 0 records that every one was checked."""
        ids = sorted({int(i) for i in ids})
        changed = 0
        with self.transaction() as tx:
            for k in range(0, len(ids), 500):
                part = ids[k:k + 500]
                marks = ",".join("?" * len(part))
                changed += tx.execute(f"UPDATE responses SET cut_off = 1 WHERE cut_off = 0 "
                                      f"AND id IN ({marks})", part).rowcount
                tx.execute(f"DELETE FROM answer_logps WHERE response_id IN ({marks})", part)
            if unchecked_left == 0:
                tx.execute("DELETE FROM settings WHERE key = ?", (CUT_UNCHECKED_KEY,))
            elif unchecked_left is not None:  # a store with nothing unchecked has no row to update
                tx.execute("UPDATE settings SET value = ?, updated_by = 'mark-cut', updated_at = ? "
                           "WHERE key = ?", (json.dumps({"answers": int(unchecked_left)}), _now(),
                                             CUT_UNCHECKED_KEY))
        return changed

    # -- informative order: log-probs per answer and scorer, scores per item -------------
    def answers_to_score(self) -> list[dict]:
        """Every answer with its prompt (text and conversation) and `judged`, how many
        counted active judgments it is in, for scoring."""
        rows = self._read(
            "SELECT r.id, r.prompt_id, r.text, r.cut_off, p.text AS prompt, "
            "p.messages AS prompt_messages, "
            "(SELECT COUNT(*) FROM judgments j WHERE (j.response_a = r.id OR j.response_b = r.id) "
            f"AND j.retracted_at IS NULL AND j.{_COUNTED}) AS judged "
            "FROM responses r JOIN prompts p ON p.id = r.prompt_id ORDER BY r.id")
        return [_response_dict(r) for r in rows]

    def answer_logps(self, scorer: str) -> dict[int, float]:
        """Answer id -> summed log-prob of its tokens under `scorer` (a model or adapter key)."""
        return {r[0]: r[1] for r in self._read(
            "SELECT response_id, logp FROM answer_logps WHERE scorer = ?", (scorer,))}

    def save_answer_logps(self, scorer: str, rows: Iterable[tuple[int, float, int]]) -> None:
        """(answer id, log-prob, tokens scored) under `scorer`; one commit per call."""
        with self.transaction() as tx:
            tx.executemany("INSERT OR REPLACE INTO answer_logps(scorer, response_id, logp, tokens) "
                           "VALUES (?, ?, ?, ?)", [(scorer, int(i), float(v), int(n)) for i, v, n in rows])

    def forget_answer_logps(self, scorer: str) -> int:
        """Drop every log-prob cached under `scorer` (they are scored again when next
        needed); returns how many went."""
        with self.transaction() as tx:
            return tx.execute("DELETE FROM answer_logps WHERE scorer = ?", (scorer,)).rowcount

    def replace_item_scores(self, scorer: str, rows: Iterable, meta: dict) -> None:
        """Make `rows` (informative.Scored) the queue's informative order, and `meta` (which
        adapter, when, how many) its description, in one transaction. Older scorers' item
        rows go: only the newest adapter orders the queue."""
        with self.transaction() as tx:
            tx.execute("DELETE FROM item_scores")
            tx.executemany(
                "INSERT OR REPLACE INTO item_scores(scorer, kind, response_a, response_b, margin, score) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(scorer, r.kind, *sorted((r.a, r.b)), r.margin, r.score) if r.b is not None
                 else (scorer, r.kind, r.a, 0, r.margin, r.score) for r in rows])
            tx.execute("INSERT OR REPLACE INTO settings(key, value, updated_by, updated_at) "
                       "VALUES (?, ?, ?, ?)", (INFORMATIVE_KEY, json.dumps({**meta, "scorer": scorer}),
                                               "scoring", _now()))

    def informative_meta(self) -> dict | None:
        """What the current informative order was scored with, or None before any."""
        return self.setting(INFORMATIVE_KEY)

    def next_informative(self, annotator: str, scorer: str, kind: str, limit: int,
                         overlap: int = 1, offset: int = 0) -> list[dict]:
        """The highest-scored items of `kind` still open to this annotator: fewer than
        `overlap` counted judgments of that item, none theirs, not leased to someone
        else, not skipped by them. Rows: response_a, response_b (None for a single
        answer), prompt_a, prompt_b, score, margin."""
        judged = ("(SELECT COUNT(*) FROM judgments j WHERE j.response_a = s.response_a "
                  "AND j.kind = s.kind AND j.retracted_at IS NULL AND j." + _COUNTED +
                  " AND COALESCE(j.response_b, 0) = s.response_b) < ? "
                  "AND NOT EXISTS (SELECT 1 FROM judgments j WHERE j.response_a = s.response_a "
                  "AND j.kind = s.kind AND j.retracted_at IS NULL AND j.annotator = ? "
                  "AND COALESCE(j.response_b, 0) = s.response_b) ")
        lease = ("NOT EXISTS (SELECT 1 FROM leases l WHERE l.item_key = ? || {id} "
                 "AND l.annotator != ? AND l.expires_at > ?) ")
        skip = "NOT EXISTS (SELECT 1 FROM skips k WHERE k.annotator = ? AND k.item_key = {key}) "
        now = _now()
        if kind == "paired":
            held = lease.format(id="ra.prompt_id")
            params = [PROMPT_KEY, annotator, now, annotator, PROMPT_KEY]
            skipped = skip.format(key="? || ra.prompt_id")
        elif kind == "unpaired":
            held = lease.format(id="s.response_a")
            params = [RESPONSE_KEY, annotator, now, annotator, RESPONSE_KEY]
            skipped = skip.format(key="? || s.response_a")
        else:
            held = lease.format(id="s.response_a") + "AND " + lease.format(id="s.response_b")
            params = [CROSS_KEY, annotator, now, CROSS_KEY, annotator, now, annotator, CROSS_PAIR_KEY]
            skipped = skip.format(key="? || s.response_a || ':' || s.response_b")
        rows = self._read(
            "SELECT s.response_a, NULLIF(s.response_b, 0) AS response_b, ra.prompt_id AS prompt_a, "
            "rb.prompt_id AS prompt_b, s.score, s.margin FROM item_scores s "
            "JOIN responses ra ON ra.id = s.response_a "
            "LEFT JOIN responses rb ON rb.id = s.response_b "
            "WHERE s.scorer = ? AND s.kind = ? AND " + judged + "AND " + held + "AND " + skipped +
            "ORDER BY s.score DESC, s.response_a, s.response_b LIMIT ? OFFSET ?",
            (scorer, kind, overlap, annotator, *params, limit, offset))
        return [dict(r) for r in rows]

    def count_item_scores(self, scorer: str) -> dict[str, int]:
        return {r[0]: r[1] for r in self._read(
            "SELECT kind, COUNT(*) FROM item_scores WHERE scorer = ? GROUP BY kind", (scorer,))}

    # -- runs and adapters --------------------------------------------------------------
    def record_run(self, run_id: str, config: dict, out_dir: str, state: str = "queued",
                   pid: int | None = None) -> None:
        with self.transaction() as tx:
            tx.execute("INSERT INTO runs(id, created_at, config, out_dir, state, pid) "
                       "VALUES (?, ?, ?, ?, ?, ?)",
                       (run_id, _now(), json.dumps(config), out_dir, state, pid))

    def update_run(self, run_id: str, **fields) -> None:
        allowed = {"state", "pid", "final_metrics", "deleted_at"}
        bad = set(fields) - allowed
        if bad:
            raise StoreError(f"unknown run fields: {sorted(bad)}")
        if "final_metrics" in fields and not isinstance(fields["final_metrics"], (str, type(None))):
            fields["final_metrics"] = json.dumps(fields["final_metrics"])
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self.transaction() as tx:
            tx.execute(f"UPDATE runs SET {cols} WHERE id = ?", (*fields.values(), run_id))

    def runs(self, include_deleted: bool = False) -> list[dict]:
        sql = "SELECT * FROM runs"
        if not include_deleted:
            sql += " WHERE deleted_at IS NULL"
        return [_run_dict(r) for r in self._read(sql + " ORDER BY created_at DESC")]

    def run(self, run_id: str) -> dict | None:
        row = self._one("SELECT * FROM runs WHERE id = ?", (run_id,))
        return _run_dict(row) if row else None

    def register_adapter(self, name: str, path: str, run_id: str | None,
                         base_model: str | None) -> None:
        with self.transaction() as tx:
            tx.execute("INSERT OR REPLACE INTO adapters(name, path, run_id, base_model, created_at) "
                       "VALUES (?, ?, ?, ?, ?)", (name, path, run_id, base_model, _now()))

    def adapters(self) -> list[dict]:
        return [dict(r) for r in self._read("SELECT * FROM adapters ORDER BY created_at")]

    def adapter(self, name: str) -> dict | None:
        row = self._one("SELECT * FROM adapters WHERE name = ?", (name,))
        return dict(row) if row else None

    def adapter_for_run(self, run_id: str) -> dict | None:
        """The adapter a run made, whatever it has been renamed to since."""
        row = self._one("SELECT * FROM adapters WHERE run_id = ? ORDER BY created_at DESC LIMIT 1",
                        (run_id,))
        return dict(row) if row else None

    def rename_adapter(self, old: str, new: str, new_path: str) -> None:
        with self.transaction() as tx:
            if tx.execute("SELECT 1 FROM adapters WHERE name = ?", (new,)).fetchone():
                raise StoreError(f"an adapter named {new!r} already exists")
            cur = tx.execute("UPDATE adapters SET name = ?, path = ? WHERE name = ?",
                             (new, new_path, old))
            if not cur.rowcount:
                raise StoreError(f"no adapter named {old!r}")
            # The answers it made go with it: the leaderboard and the generation backlog
            # know a model by the name its answers carry.
            tx.execute("UPDATE responses SET adapter = ? WHERE adapter = ?", (new, old))

    def delete_adapter(self, name: str) -> None:
        with self.transaction() as tx:
            tx.execute("DELETE FROM adapters WHERE name = ?", (name,))

    def copy_to(self, path: str | Path) -> None:
        """A consistent copy of the whole store at `path` (SQLite's online backup), for a
        benchmark that labels the same answers several ways."""
        target = sqlite3.connect(str(path))
        try:
            self._conn().backup(target)
        finally:
            target.close()

    # -- for the tests -------------------------------------------------------------------
    def snapshot(self) -> dict[str, list[tuple]]:
        """Every row of every table, in rowid order (tests compare before/after)."""
        names = [r[0] for r in self._read(
            "SELECT name FROM sqlite_master WHERE type = 'table' "
            "AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        return {name: [tuple(r) for r in self._read(f'SELECT * FROM "{name}" ORDER BY rowid')]
                for name in names}

    # -- added for generate.py (candidate top-up per adapter) ---------------------------
    def response_counts(self, prompt_ids: Iterable[int],
                        adapter: str | None = None) -> dict[int, int]:
        """Responses per prompt id; with `adapter`, only those that adapter generated."""
        out: dict[int, int] = {}
        extra, params = ("AND adapter = ?", [adapter]) if adapter else ("", [])
        for chunk in _chunks(list(prompt_ids), 500):
            rows = self._read(
                f"SELECT prompt_id, COUNT(*) AS n FROM responses WHERE prompt_id IN "
                f"({','.join('?' * len(chunk))}) {extra} GROUP BY prompt_id", [*chunk, *params])
            out.update({r["prompt_id"]: r["n"] for r in rows})
        return out


def text_problem(text, what: str, allow_empty: bool = False,
                 allow_control: bool = False) -> str | None:
    """Why `text` cannot be stored as `what`, or None. Shared with io.py's import checks.

    Model output may hold control characters (it is stored as generated); text people
    type or import may not."""
    if not isinstance(text, str):
        return f"{what} must be text, got {type(text).__name__}"
    if len(text) > MAX_TEXT_CHARS:
        return f"{what} is {len(text):,} characters long; the limit is {MAX_TEXT_CHARS:,}"
    if "\x00" in text:
        return f"{what} contains a NUL character"
    if not allow_control:
        bad = _CONTROL.search(text)
        if bad:
            return (f"{what} contains the control character U+{ord(bad.group()):04X} at "
                    f"position {bad.start() + 1}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"{what} is not valid Unicode at position {err.start + 1} (a lone surrogate)"
    if not allow_empty and not text.strip():
        return f"{what} is empty"
    return None


def _clean_text(text, what: str, allow_empty: bool = False, allow_control: bool = False) -> str:
    problem = text_problem(text, what, allow_empty, allow_control)
    if problem:
        raise StoreError(problem)
    return text


def _check_judgment(kind, response_a, response_b, verdict, strength, a_side, annotator) -> None:
    if kind not in KINDS:
        raise StoreError(f"unknown judgment kind {kind!r}; expected one of {KINDS}")
    if kind == "unpaired":
        if response_b is not None:
            raise StoreError("an unpaired judgment has one response")
        if verdict not in THUMB_VERDICTS:
            raise StoreError(f"an unpaired verdict is 'up' or 'down', got {verdict!r}")
    else:
        if response_b is None:
            raise StoreError(f"a {kind} judgment needs two responses")
        if verdict not in PAIR_VERDICTS:
            raise StoreError(f"a {kind} verdict is one of {PAIR_VERDICTS}, got {verdict!r}")
    if strength is not None and strength not in STRENGTHS:
        raise StoreError(f"strength is one of {STRENGTHS}, got {strength!r}")
    if a_side is not None and a_side not in SIDES:
        raise StoreError(f"a_side is one of {SIDES}, got {a_side!r}")
    if not annotator or not str(annotator).strip():
        raise StoreError("a judgment needs an annotator name")


def item_key(prefix: str, *ids: int) -> str:
    """The lease or skip key for an item: item_key(PROMPT_KEY, 12) -> "prompt:12"; a cross
    pair takes both ids. next_prompts_for_pairs and next_responses_for_thumbs build the
    same text in SQL (`? || p.id`), so a change here is a change there."""
    return prefix + ":".join(str(int(i)) for i in ids)


def judgment_lease_keys(kind: str, response_a: int, response_b: int | None,
                        prompt_id: int) -> list[str]:
    """The keys an item of this judgment kind is leased under (`prompt_id`: response_a's)."""
    if kind == "paired":
        return [item_key(PROMPT_KEY, prompt_id)]
    if kind == "cross":
        return [item_key(CROSS_KEY, response_a), item_key(CROSS_KEY, response_b)]
    return [item_key(RESPONSE_KEY, response_a)]


def _response_dict(row) -> dict:
    d = dict(row)
    if d.get("gen_settings"):
        d["gen_settings"] = json.loads(d["gen_settings"])
    if d.get("prompt_messages"):
        d["prompt_messages"] = json.loads(d["prompt_messages"])
    return d


def _messages(text: str | None) -> list[dict] | None:
    return json.loads(text) if text else None


def _prompt_dict(row) -> dict:
    """A prompt row; `messages` is the conversation (a list) or None for one user turn."""
    d = dict(row)
    d["messages"] = _messages(d.get("messages"))
    return d


def _run_dict(row) -> dict:
    d = dict(row)
    d["config"] = json.loads(d["config"]) if d.get("config") else {}
    if d.get("final_metrics"):
        d["final_metrics"] = json.loads(d["final_metrics"])
    return d


def _chunks(seq: list, n: int):
    for i in range(0, len(seq), n):
        yield seq[i:i + n]
