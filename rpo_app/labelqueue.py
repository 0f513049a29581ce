"""What to show an annotator next, and turning a click into a stored judgment.

Shared by the Label tab and the scripted API, so both follow the same rules:
unlabeled items first, spread over prompt families, one annotator per item at a time
(leases), sides randomised, and every submission idempotent through the item's token.

The team settings (rpo_app.config.TeamSettings) add: each item goes to `overlap`
different annotators (an item someone else started is offered before a fresh one, so
agreement figures come early), never twice to one person; and a share of items are
checks: a gold item whose answer is known, or one of the annotator's own earlier items
shown again with the sides swapped. The annotator is not told which items are checks.
"""
from __future__ import annotations

import hashlib
import random
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from rpo_app import rankings
from rpo_app.config import TeamSettings
from rpo_app.store import (CHECK_SOURCES, CROSS_KEY, CROSS_PAIR_KEY, GOLD_CHECK_SOURCE,
                           PROMPT_KEY, RANK_KEY, RECHECK_SOURCE, RESPONSE_KEY, StorageError,
                           Store, StoreError, item_key, judgment_lease_keys)

# "mixed" draws from the three kinds of single judgment; a ranking is asked for by name.
MODES = ("paired", "cross", "unpaired", "mixed", "ranking")
# The order items come in. queue: unlabeled prompts first, spread over prompt families;
# random: any open item, uniformly; informative: the items the newest adapter would learn
# most from (rpo_app.informative), once they are scored (rpo_app.active), else queue.
ORDERS = ("informative", "queue", "random")
SIDES = ("left", "right")
UI_VERDICTS = ("left", "right", "tie", "both_bad", "up", "down")
_SCAN = 40  # candidates read per look-up; enough to find a fresh family


@dataclass
class Item:
    """One thing on screen. `left`/`right` are response dicts (right is None for thumbs
    and rankings); a ranking's `answers` are in shown order (labels A, B, C, ...), with
    the first also in `left`."""

    kind: str
    token: str
    left: dict
    right: dict | None
    lease_keys: list[str]
    shown_at: float = field(default_factory=time.time)
    source: str = "label"  # or a check source: the judgment is stored with it
    answers: list[dict] = field(default_factory=list)
    order: str = "queue"  # the order that picked it (ORDERS); a check says "queue"

    @property
    def family(self) -> str | None:
        return self.left.get("family")

    def public(self) -> dict:
        """The JSON the UI and API clients see."""
        def side(r):
            if r is None:
                return None
            out = {"response_id": r["id"], "prompt_id": r["prompt_id"], "prompt": r["prompt"],
                   "text": r["text"]}
            if r.get("prompt_messages"):  # a conversation: "prompt" is its transcript
                out["messages"] = r["prompt_messages"]
            return out
        out = {"kind": self.kind, "token": self.token, "left": side(self.left),
               "right": side(self.right), "shown_at": self.shown_at, "order": self.order}
        if self.kind == "ranking":
            out["answers"] = [{"label": label, **side(r)}
                              for label, r in zip(rankings.LABELS, self.answers)]
        return out


class LabelQueue:
    def __init__(self, store: Store, index=None, seed: int | None = None):
        self.store = store
        self.index = index  # PromptIndex or None (then cross-prompt items are unavailable)
        self._rng = random.Random(seed)
        # Its own stream: whether a check comes up does not change which items come next.
        self._check_rng = random.Random(None if seed is None else seed + 1)
        self._lock = threading.Lock()
        self._items: dict[str, Item] = {}  # token -> item handed out and not yet judged
        self._current: dict[str, str] = {}  # annotator -> token on their screen
        self._recent_families: dict[str, deque] = {}

    # -- choosing -----------------------------------------------------------------------
    def next_item(self, annotator: str, mode: str = "paired", order: str = "queue") -> Item | None:
        """The item on the annotator's screen if still open (reload resumes), else a new one
        in the given order (ORDERS; "informative" falls back to "queue" where nothing is
        scored, and the item's `order` says which one picked it)."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        if order not in ORDERS:
            raise ValueError(f"unknown order {order!r}; expected one of {ORDERS}")
        annotator = _check_annotator(annotator)
        with self._lock:
            token = self._current.get(annotator)
            item = self._items.get(token) if token else None
            if item is not None and (mode == "mixed" or item.kind == mode):
                return item
            if item is not None:
                self._drop(item, annotator)
        kinds = [mode] if mode != "mixed" else self._rng.sample(["paired", "cross", "unpaired"], 3)
        team = TeamSettings.load(self.store)
        check = self._next_check(annotator, kinds, team)
        if mode == "ranking":
            check, kinds = None, ["ranking"]
        for kind in ([None] if check else []) + kinds:
            item = check if kind is None else self._next_ranking(annotator, team) \
                if kind == "ranking" else self._next_of_kind(kind, annotator, team.overlap, order)
            if item is not None:
                with self._lock:
                    self._items[item.token] = item
                    self._current[annotator] = item.token
                    self._recent(annotator).append(item.family)
                return item
        return None

    def _next_of_kind(self, kind: str, annotator: str, overlap: int, order: str) -> Item | None:
        if order == "informative":
            item = self._next_informative(kind, annotator, overlap)
            if item is not None:
                return item
        fresh = order != "random"
        item = {"paired": self._next_paired, "cross": self._next_cross,
                "unpaired": self._next_thumb}[kind](annotator, overlap, fresh)
        if item is not None and not fresh:
            item.order = "random"
        return item

    def _next_informative(self, kind: str, annotator: str, overlap: int) -> Item | None:
        """The highest-scored open item of this kind (Store.next_informative), leased."""
        meta = self.store.informative_meta()
        if not meta:
            return None
        for row in self.store.next_informative(annotator, meta["scorer"], kind, _SCAN, overlap):
            a = self.store.response(row["response_a"])
            b = self.store.response(row["response_b"]) if row["response_b"] else None
            keys = judgment_lease_keys(kind, a["id"], b and b["id"], a["prompt_id"])
            taken = [k for k in keys if self.store.try_lease(k, annotator)]
            # Under the lease, look again: the last holder may have judged it meanwhile.
            if len(taken) < len(keys) or not self._still_open(kind, a, b, annotator, overlap):
                for key in taken:
                    self.store.release_lease(key, annotator)
                continue
            if b is None:
                return Item(kind, _token(), a, None, keys, order="informative")
            left, right = self._shuffle(a, b)
            return Item(kind, _token(), left, right, keys, order="informative")
        return None

    def _still_open(self, kind: str, a: dict, b: dict | None, annotator: str, overlap: int) -> bool:
        if b is None:
            still = self.store.next_responses_for_thumbs(annotator, a["id"], 1, True, overlap)
            return bool(still) and still[0]["id"] == a["id"]
        return _open(_judges_of(self.store.pair_judges([a["id"], b["id"]]), a, b), annotator, overlap)

    def _recent(self, annotator: str) -> deque:
        return self._recent_families.setdefault(annotator, deque(maxlen=6))

    def _prefer_fresh_family(self, annotator: str, rows: list[dict]) -> list[dict]:
        # Least recently shown family first; the family just shown goes last.
        order = {f: i for i, f in enumerate(self._recent(annotator)) if f is not None}
        return sorted(rows, key=lambda r: order.get(r.get("family"), -1))

    def _scan(self, fetch, top: int) -> list[dict]:
        """Rows from a random starting id, wrapping round once."""
        start = self._rng.randint(1, max(top, 1))
        rows = fetch(start)
        if len(rows) < _SCAN and start > 1:
            rows += [r for r in fetch(1) if r["id"] < start]
        return rows

    def _next_check(self, annotator: str, kinds: list[str], team: TeamSettings) -> Item | None:
        """Now and then (the team's rates), a gold item or a re-shown one of theirs."""
        roll = self._check_rng.random()
        if roll < team.gold_rate:
            rows, source = self.store.gold_candidates(annotator, kinds, 1), GOLD_CHECK_SOURCE
        elif roll < team.gold_rate + team.recheck_rate:
            rows, source = self.store.recheck_candidates(annotator, kinds, 1), RECHECK_SOURCE
        else:
            return None
        if not rows:
            return None
        row = rows[0]
        a = self.store.response(row["response_a"])
        b = self.store.response(row["response_b"]) if row["response_b"] else None
        if b is None:
            left, right = a, None
        elif source == RECHECK_SOURCE and row["a_side"] in ("left", "right"):
            left, right = (b, a) if row["a_side"] == "left" else (a, b)  # swapped
        else:
            left, right = self._shuffle(a, b)
        # No lease: a check takes nobody's item away, and any number may see it at once.
        return Item(row["kind"], _token(), left, right, [], source=source)

    def _arrange(self, annotator: str, rows: list[dict], fresh: bool) -> list[dict]:
        """Queue order: the least recently shown family first; random order: shuffled."""
        if fresh:
            return self._prefer_fresh_family(annotator, rows)
        rows = list(rows)
        self._rng.shuffle(rows)
        return rows

    def _next_paired(self, annotator: str, overlap: int = 1, fresh: bool = True) -> Item | None:
        # (partial, unjudged_only): items someone started, then fresh ones, then the rest.
        # Random order: any prompt with an open pair.
        passes = [(True, False), (False, True), (False, False)] if overlap > 1 \
            else [(False, True), (False, False)]
        if not fresh:
            passes = passes[:1] + [(False, False)] if overlap > 1 else [(False, False)]
        for partial, unjudged_only in passes:
            rows = self._scan(lambda s: self.store.next_prompts_for_pairs(
                annotator, s, _SCAN, unjudged_only, overlap, partial), self.store.max_prompt_id())
            for prompt in self._arrange(annotator, rows, fresh):
                pair = self._open_pair(self.store.responses_for_prompt(prompt["id"]),
                                       annotator, overlap)
                if pair is None:
                    continue
                key = item_key(PROMPT_KEY, prompt["id"])
                if self.store.try_lease(key, annotator):
                    # Look again under the lease: the last holder may have judged it since.
                    pair = self._open_pair(self.store.responses_for_prompt(prompt["id"]),
                                           annotator, overlap)
                    if pair is None:
                        self.store.release_lease(key, annotator)
                        continue
                    left, right = self._shuffle(*pair)
                    return Item("paired", _token(), left, right, [key])
        return None

    def _open_pair(self, responses: list[dict], annotator: str,
                   overlap: int = 1) -> tuple[dict, dict] | None:
        """A pair of responses to one prompt that needs another annotator and that this
        one has not judged; of those, one that others started (so it completes first)."""
        if len(responses) < 2:
            return None
        judges = self.store.pair_judges([r["id"] for r in responses])
        pairs = [(a, b) for i, a in enumerate(responses) for b in responses[i + 1:]
                 if _open(_judges_of(judges, a, b), annotator, overlap)]
        if not pairs:
            return None
        most = max(len(_judges_of(judges, a, b)) for a, b in pairs)
        return self._rng.choice([p for p in pairs if len(_judges_of(judges, *p)) == most])

    def _next_cross(self, annotator: str, overlap: int = 1, fresh: bool = True) -> Item | None:
        if self.index is None:
            return None
        rows = self._scan(lambda s: self.store.next_responses_for_thumbs(
            annotator, s, _SCAN, False), self.store.max_response_id())
        for first in self._arrange(annotator, rows, fresh):
            for prompt_id, _score in self.index.related(first["prompt_id"], k=5):
                others = self.store.responses_for_prompt(prompt_id)
                if not others:
                    continue
                judges = self.store.pair_judges([first["id"]] + [o["id"] for o in others])
                skipped = self.store.skipped(annotator, [_cross_key(first["id"], o["id"])
                                                         for o in others])
                fresh = [o for o in others
                         if _open(_judges_of(judges, first, o), annotator, overlap)
                         and _cross_key(first["id"], o["id"]) not in skipped]
                if not fresh:
                    continue
                second = self._rng.choice(fresh)
                keys = [item_key(CROSS_KEY, first["id"]), item_key(CROSS_KEY, second["id"])]
                taken = [k for k in keys if self.store.try_lease(k, annotator)]
                now = self.store.pair_judges([first["id"], second["id"]])
                if len(taken) < len(keys) or not _open(_judges_of(now, first, second),
                                                       annotator, overlap):
                    # Someone holds half of it, or judged it meanwhile: give back what we took.
                    for key in taken:
                        self.store.release_lease(key, annotator)
                    continue
                left, right = self._shuffle(first, second)
                return Item("cross", _token(), left, right, keys)
        return None

    def _next_thumb(self, annotator: str, overlap: int = 1, fresh: bool = True) -> Item | None:
        for partial in ((True, False) if overlap > 1 else (False,)):
            rows = self._scan(lambda s: self.store.next_responses_for_thumbs(
                annotator, s, _SCAN, True, overlap, partial), self.store.max_response_id())
            for resp in self._arrange(annotator, rows, fresh):
                key = item_key(RESPONSE_KEY, resp["id"])
                if self.store.try_lease(key, annotator):
                    # Still open now that we hold the lease? (The last holder may have judged it.)
                    still = self.store.next_responses_for_thumbs(annotator, resp["id"], 1, True,
                                                                 overlap)
                    if still and still[0]["id"] == resp["id"]:
                        return Item("unpaired", _token(), resp, None, [key])
                    self.store.release_lease(key, annotator)
        return None

    def _next_ranking(self, annotator: str, team: TeamSettings) -> Item | None:
        """Up to team.rank_size answers to one prompt that this annotator has not ranked and
        that need another ranking; answers others ranked first, so rankings overlap."""
        overlap = team.overlap
        for partial in ((True, False) if overlap > 1 else (False,)):
            rows = self._scan(lambda s: self.store.next_prompts_for_ranking(
                annotator, s, _SCAN, rankings.MIN_ANSWERS, overlap, partial),
                self.store.max_prompt_id())
            for prompt in self._prefer_fresh_family(annotator, rows):
                key = item_key(RANK_KEY, prompt["id"])
                if not self.store.try_lease(key, annotator):
                    continue
                # Read under the lease: the last holder may have ranked some since.
                answers = self.store.answers_open_for_ranking(prompt["id"], annotator,
                                                              overlap)[:team.rank_size]
                if len(answers) < rankings.MIN_ANSWERS:
                    self.store.release_lease(key, annotator)
                    continue
                self._rng.shuffle(answers)
                return Item("ranking", _token(), answers[0], None, [key], answers=answers)
        return None

    def _shuffle(self, a: dict, b: dict) -> tuple[dict, dict]:
        return (a, b) if self._rng.random() < 0.5 else (b, a)

    # -- acting -------------------------------------------------------------------------
    def item(self, token: str) -> Item | None:
        with self._lock:
            return self._items.get(token)

    def submit(self, token: str, verdict: str, annotator: str, strength: str | None = None,
               seconds_spent: float | None = None, source: str = "label") -> dict:
        """Store the judgment for this item. Repeating a token returns the first result."""
        annotator = _check_annotator(annotator)
        if verdict not in UI_VERDICTS:
            raise ValueError(f"unknown verdict {verdict!r}; expected one of {UI_VERDICTS}")
        item = self.item(token)
        if item is None:
            # Already judged (double click, retried request) or unknown: idempotent answer.
            existing = self.store.judgment_by_request(token)
            if existing is None:
                raise ValueError("this item is no longer open; fetch the next one")
            return {"judgment_id": existing["id"], "created": False}
        if item.kind == "ranking":
            raise ValueError("a ranking takes an order of its answers (submit_ranking), not "
                             "a verdict")
        if item.kind == "unpaired":
            if verdict not in ("up", "down"):
                raise ValueError("a single answer takes 'up' or 'down'")
            a, b, stored, a_side = item.left["id"], None, verdict, None
        else:
            if verdict not in ("left", "right", "tie", "both_bad"):
                raise ValueError("a pair takes 'left', 'right', 'tie' or 'both_bad'")
            a, b, stored, a_side = canonical_pair(item.left["id"], item.right["id"], verdict)
        if seconds_spent is None:
            seconds_spent = round(time.time() - item.shown_at, 3)
        if item.source != "label":  # a check keeps its own source whoever asked
            source = item.source
        jid, created = self._close(item, annotator, lambda: self._store_judgment(
            item, a, b, stored, annotator, source, strength, a_side, seconds_spent, token))
        return {"judgment_id": jid, "created": created}

    def _close(self, item: Item, annotator: str, write):
        """Run the item's store write and close the item. A disk that refuses keeps the
        item open, so the same click can be retried; a refusal by the store drops it."""
        try:
            result = write()
        except StorageError:
            raise
        except StoreError:
            with self._lock:
                self._drop(item, annotator)
            raise
        with self._lock:
            self._items.pop(item.token, None)
            if self._current.get(annotator) == item.token:
                del self._current[annotator]
        return result

    def _store_judgment(self, item, a, b, stored, annotator, source, strength, a_side,
                        seconds_spent, token):
        return self.store.add_judgment(
            item.kind, a, b, stored, annotator, source=source,
            strength=strength if item.kind != "unpaired" and stored in ("a", "b") else None,
            a_side=a_side, seconds_spent=seconds_spent, request_id=token,
            overlap=None if source in CHECK_SOURCES else TeamSettings.load(self.store).overlap)

    def submit_ranking(self, token: str, order: str, annotator: str,
                       seconds_spent: float | None = None) -> dict:
        """Store the ranking typed as `order` over the item's answers, by their labels
        (rpo_app.rankings.ORDER_HELP). Returns {ranking_id, created, pairs, decided, order}. A bad
        order raises RankingError and keeps the item open; repeating a token stores
        nothing new. `pairs` counts the implied pairs, `decided` those with a winner."""
        annotator = _check_annotator(annotator)
        item = self.item(token)
        if item is None:
            existing = self.store.ranking_by_request(token)
            if existing is None:
                raise ValueError("this item is no longer open; fetch the next one")
            return self._ranking_result(existing, created=False)
        if item.kind != "ranking":
            raise ValueError(f"this item is a {item.kind} item; judge it with a verdict")
        tiers, none_ok = rankings.parse_order(order, len(item.answers))
        ids = [[item.answers[p]["id"] for p in tier] for tier in tiers]
        if seconds_spent is None:
            seconds_spent = round(time.time() - item.shown_at, 3)
        rid, created = self._close(item, annotator, lambda: self.store.add_ranking(
            ids, annotator, none_acceptable=none_ok, shown=[r["id"] for r in item.answers],
            seconds_spent=seconds_spent, request_id=token,
            overlap=TeamSettings.load(self.store).overlap))
        return self._ranking_result(self.store.ranking(rid), created)

    @staticmethod
    def _ranking_result(ranking: dict, created: bool) -> dict:
        pairs = rankings.implied_pairs(ranking["tiers"], ranking["none_acceptable"])
        return {"ranking_id": ranking["id"], "created": created, "pairs": len(pairs),
                "decided": sum(v in ("a", "b") for _, _, v in pairs),
                "order": rankings.in_letters(ranking)}

    def submit_edit(self, token: str, side: str, text: str, annotator: str) -> dict:
        """Store the annotator's better version of one answer on screen, with the
        judgment "edited ≻ original". The item stays open: the shown answers can still be
        judged. The same text sent twice for one item and side is stored once."""
        annotator = _check_annotator(annotator)
        item = self.item(token)
        if item is None:
            raise ValueError("this item is no longer open; fetch the next one")
        if side not in SIDES or (side == "right" and item.right is None):
            raise ValueError("edit 'left' or 'right' of a pair, or 'left' of a single answer")
        original = item.left if side == "left" else item.right
        digest = hashlib.sha1((text or "").encode("utf-8", "surrogatepass")).hexdigest()[:16]
        out = self.store.add_edit(original["id"], text, annotator,
                                  request_id=f"edit:{token}:{side}:{digest}")
        return {**out, "original_id": original["id"], "original_text": original["text"]}

    def skip(self, token: str, annotator: str) -> None:
        """Skip is not a judgment: nothing is learned from it, the item leaves this
        annotator's queue only."""
        annotator = _check_annotator(annotator)
        item = self.item(token)
        if item is None:
            return
        keys = ([_cross_key(item.left["id"], item.right["id"])] if item.kind == "cross"
                else item.lease_keys)
        for key in keys:
            self.store.record_skip(annotator, key)
        with self._lock:
            self._drop(item, annotator)

    def undo(self, annotator: str) -> dict | None:
        """Retract the annotator's last judgment and put that item back on their screen."""
        annotator = _check_annotator(annotator)
        undone = self.store.undo_last(annotator)
        if undone is None:
            return None
        return self._show_again(annotator, undone)

    def rejudge(self, judgment_id: int, annotator: str) -> dict:
        """Retract a judgment (a suspect label, say) and put its item on this annotator's
        screen to judge again; a pair from a ranking brings back the whole ranking."""
        annotator = _check_annotator(annotator)
        judgment = self.store.judgment(judgment_id)
        if judgment is None or judgment["retracted_at"] is not None:
            raise ValueError(f"there is no active judgment #{judgment_id}")
        self.store.retract(judgment_id, annotator)
        return self._show_again(annotator, self.store.judgment(judgment_id))

    def _show_again(self, annotator: str, undone: dict) -> dict:
        """A retracted judgment's item, back on the annotator's screen under its lease."""
        if undone.get("ranking_id") is not None:
            return self._undo_ranking(annotator, undone)
        left = self.store.response(undone["response_a"])
        right = self.store.response(undone["response_b"]) if undone["response_b"] else None
        if right is not None and undone["a_side"] == "right":
            left, right = right, left
        check = undone["source"] in CHECK_SOURCES
        keys = [] if check else judgment_lease_keys(undone["kind"], left["id"],
                                                    right and right["id"], left["prompt_id"])
        for key in keys:
            self.store.try_lease(key, annotator)
        item = Item(undone["kind"], _token(), left, right, keys,
                    source=undone["source"] if check else "label")
        self._put_back(annotator, item)
        return {"undone": undone, "item": item}

    def _undo_ranking(self, annotator: str, undone: dict) -> dict:
        ranking = self.store.ranking(undone["ranking_id"])
        order = ranking["shown"] or [r for tier in ranking["tiers"] for r in tier]
        answers = [self.store.response(r) for r in order]
        key = item_key(RANK_KEY, ranking["prompt_id"])
        self.store.try_lease(key, annotator)
        item = Item("ranking", _token(), answers[0], None, [key], answers=answers)
        self._put_back(annotator, item)
        return {"undone": undone, "ranking": ranking, "item": item}

    def _put_back(self, annotator: str, item: Item) -> None:
        with self._lock:
            old = self._current.get(annotator)
            if old in self._items:
                self._drop(self._items[old], annotator)
            self._items[item.token] = item
            self._current[annotator] = item.token

    def _drop(self, item: Item, annotator: str) -> None:
        """Caller holds the lock. Frees the item for other annotators at once."""
        self._items.pop(item.token, None)
        if self._current.get(annotator) == item.token:
            del self._current[annotator]
        for key in item.lease_keys:
            self.store.release_lease(key, annotator)


def canonical_pair(left_id: int, right_id: int, verdict: str) -> tuple[int, int, str, str]:
    """(response_a, response_b, stored verdict, a_side) for a pair shown left/right.

    Canonical order (lower id is A) makes the same pair one key whichever side it was
    shown on; a_side keeps where A actually appeared, and left/right become a/b.
    """
    a, b = min(left_id, right_id), max(left_id, right_id)
    a_side = "left" if a == left_id else "right"
    left_is_a = a_side == "left"
    stored = {"left": "a" if left_is_a else "b", "right": "b" if left_is_a else "a"}
    return a, b, stored.get(verdict, verdict), a_side


def _judges_of(judges: dict, a: dict, b: dict) -> list[str]:
    """Who judged the pair of responses a and b (Store.pair_judges keys: lower id first)."""
    return judges.get(tuple(sorted((a["id"], b["id"]))), [])


def _open(judges: list[str], annotator: str, overlap: int) -> bool:
    """Can this annotator judge an item these people judged?"""
    return len(judges) < overlap and annotator not in judges


def _cross_key(first: int, second: int) -> str:
    """One key per cross-prompt pair, whichever side each answer was on."""
    return item_key(CROSS_PAIR_KEY, *sorted((first, second)))


def _token() -> str:
    return uuid.uuid4().hex


def _check_annotator(name: str) -> str:
    name = (name or "").strip()
    if not name:
        raise ValueError("enter your name (annotator) before judging")
    if len(name) > 64:
        raise ValueError("annotator name is longer than 64 characters")
    return name

