"""The SQLite store: round trips, provenance, undo, idempotency, leases, concurrency."""
from __future__ import annotations

import sqlite3
import threading

import numpy as np
import pytest

from rpo_app import store as store_module
from rpo_app.store import MIGRATIONS, PROMPT_KEY, RESPONSE_KEY, Store, StoreError, item_key


def _two_answers(store, prompt="What is the capital of France?", family="geo"):
    pid, _ = store.add_prompt(prompt, "test", family)
    a, _ = store.add_response(pid, "Paris.", "generate", model="m", adapter="ad1",
                              gen_settings={"temperature": 0.8, "seed": 1})
    b, _ = store.add_response(pid, "Lyon.", "generate", model="m", adapter=None)
    return pid, a, b


class FakeClock:
    def __init__(self, t=1_000_000.0):
        self.t = t

    def __call__(self):
        return self.t


def test_schema_version_and_migration_from_empty_file(tmp_path):
    path = tmp_path / "rpo.sqlite3"
    path.write_bytes(b"")  # an empty file is a valid, empty SQLite database
    s = Store(path)
    assert s.schema_version() == len(MIGRATIONS)
    assert s.integrity_check() == "ok"
    assert s.stats()["prompts"] == 0
    s.close()
    # A data dir (no suffix) gets rpo.sqlite3 inside it.
    s2 = Store(tmp_path / "dir")
    assert s2.path == tmp_path / "dir" / "rpo.sqlite3"
    s2.close()


def test_migration_step_keeps_data_and_newer_schema_is_refused(tmp_path, monkeypatch):
    s = Store(tmp_path)
    s.add_prompt("kept across the migration", "test")
    s.close()
    # A new release adds a migration: the next open applies it and keeps the data.
    monkeypatch.setattr(store_module, "MIGRATIONS", MIGRATIONS + ["-- a no-op step\n"])
    s = Store(tmp_path)
    assert s.schema_version() == len(MIGRATIONS) + 1
    assert [p["text"] for p in s.prompts()] == ["kept across the migration"]
    s.close()
    # An older rpo_app refuses a database from the future instead of corrupting it.
    monkeypatch.setattr(store_module, "MIGRATIONS", MIGRATIONS)
    with pytest.raises(StoreError, match="newer"):
        Store(tmp_path)


def test_a_store_from_before_the_cut_flag_remembers_its_unchecked_answers(tmp_path, monkeypatch):
    import sqlite3

    monkeypatch.setattr(store_module, "MIGRATIONS", MIGRATIONS[:-1])  # the release before
    s = Store(tmp_path)
    pid, _ = s.add_prompt("old prompt", "seed")
    s.close()
    with sqlite3.connect(tmp_path / "rpo.sqlite3") as conn:  # as that release stored answers
        conn.executemany("INSERT INTO responses(prompt_id, text, source, model, gen_settings, "
                         "created_at) VALUES (?, ?, ?, ?, ?, 0)",
                         [(pid, "a model's", "model", "m", '{"max_new_tokens": 8}'),
                          (pid, "another", "model", "m", '{"max_new_tokens": 8}'),
                          (pid, "typed in", "import", None, None)])
    monkeypatch.setattr(store_module, "MIGRATIONS", MIGRATIONS)
    s = Store(tmp_path)
    # Only the two a model wrote could have been cut; an imported answer has no limit.
    assert s.answers_unchecked_for_cut() == 2 == s.stats()["answers_unchecked_for_cut"]
    assert s.state()["answers_unchecked_for_cut"] == 2
    # mark-cut could not check one (another model's): one stays unchecked; then none.
    s.mark_cut_off([], unchecked_left=1)
    assert s.answers_unchecked_for_cut() == 1
    s.mark_cut_off([], unchecked_left=0)
    assert s.answers_unchecked_for_cut() == 0 and s.setting(store_module.CUT_UNCHECKED_KEY) is None
    s.close()
    # A store that always recorded the flag has nothing to check, answers or not.
    fresh = Store(tmp_path / "new")
    fresh.add_response(fresh.add_prompt("p", "seed")[0], "t", "model", model="m",
                       gen_settings={"max_new_tokens": 8})
    assert fresh.answers_unchecked_for_cut() == 0
    fresh.mark_cut_off([], unchecked_left=3)  # nothing to update when nothing was unchecked
    assert fresh.answers_unchecked_for_cut() == 0


def test_prompt_round_trip_and_duplicates(store):
    ids, n_new = store.add_prompts(["one?", {"prompt": "two?", "family": "f"}, "one?"], "seed")
    assert n_new == 2 and ids[0] == ids[2] != ids[1]  # one id per item, in order
    p = store.prompt(ids[1])
    assert (p["text"], p["family"], p["source"]) == ("two?", "f", "seed")
    assert store.add_prompts(["one?"], "x") == ([ids[0]], 0)
    pid, created = store.add_prompt("three?", "ui", "g")
    assert created and store.add_prompt("three?", "other") == (pid, False)
    assert store.prompt(pid)["source"] == "ui"  # the first write wins
    assert [p["text"] for p in store.prompts(ids=[pid, ids[0]])] == ["three?", "one?"]
    assert store.count_prompts() == 3
    with pytest.raises(StoreError, match="empty"):
        store.add_prompt("   ", "ui")
    with pytest.raises(StoreError, match="NUL"):
        store.add_prompt("a\x00b", "ui")


def test_response_round_trip_with_provenance(store):
    pid, a, b = _two_answers(store)
    r = store.response(a)
    assert r["prompt"] == "What is the capital of France?" and r["family"] == "geo"
    assert (r["text"], r["source"], r["model"], r["adapter"]) == ("Paris.", "generate", "m", "ad1")
    assert r["gen_settings"] == {"temperature": 0.8, "seed": 1}
    assert store.add_response(pid, "Paris.", "import") == (a, False)
    assert [x["id"] for x in store.responses_for_prompt(pid)] == [a, b]
    rid, _ = store.add_response(pid, "from a file", "import", import_file="x.jsonl")
    assert store.response(rid)["import_file"] == "x.jsonl"
    assert store.count_responses() == 3
    assert [p["id"] for p in store.prompts_with_fewer_responses(4)] == [pid]
    assert store.prompts_with_fewer_responses(3) == []
    # An adapter's backlog counts only its own answers (one here: "Paris.").
    backlog = store.prompts_with_fewer_responses(2, adapter="ad1")
    assert [(p["id"], p["n"]) for p in backlog] == [(pid, 1)]
    assert store.prompts_with_fewer_responses(1, adapter="ad1") == []


def test_all_three_judgment_kinds_keep_provenance(store):
    pid, a, b = _two_answers(store)
    pid2, c, _ = _two_answers(store, "Capital of Italy?", "geo")
    j1, new = store.add_judgment("paired", a, b, "a", "alice", strength="clearly",
                                 a_side="right", seconds_spent=4.5)
    assert new
    j2, _ = store.add_judgment("cross", a, c, "tie", "bob", a_side="left")
    j3, _ = store.add_judgment("unpaired", b, None, "down", "alice", source="chat")
    got = store.judgment(j1)
    assert (got["kind"], got["verdict"], got["strength"], got["annotator"]) == (
        "paired", "a", "clearly", "alice")
    assert (got["a_side"], got["seconds_spent"], got["source"]) == ("right", 4.5, "label")
    assert got["created_at"] > 0 and got["retracted_at"] is None
    assert (got["prompt_a_id"], got["prompt_b_id"]) == (pid, pid)
    assert (got["response_a_text"], got["response_b_text"]) == ("Paris.", "Lyon.")
    assert (got["model_a"], got["adapter_a"], got["adapter_b"]) == ("m", "ad1", None)
    assert '"temperature": 0.8' in got["gen_settings_a"]
    cross = store.judgment(j2)
    assert (cross["prompt_a_id"], cross["prompt_b_id"]) == (pid, pid2)
    thumbs = store.judgment(j3)
    assert thumbs["response_b"] is None and thumbs["verdict"] == "down"
    assert thumbs["source"] == "chat"
    stats = store.stats()
    assert stats["judgments"] == 3
    assert stats["by_kind"] == {"paired": {"a": 1}, "cross": {"tie": 1}, "unpaired": {"down": 1}}
    assert stats["annotators"] == {"alice": 2, "bob": 1}
    rows = store.training_judgments(kinds=["paired"])
    assert [r["judgment_id"] for r in rows] == [j1]
    assert rows[0]["prompt_a_text"] == rows[0]["prompt_b_text"]
    # texts, never ids, in the fields training reads
    assert (rows[0]["response_a_text"], rows[0]["response_b_text"]) == ("Paris.", "Lyon.")
    assert (rows[0]["cut_off_a"], rows[0]["cut_off_b"]) == (False, False)
    cut, _ = store.add_response(pid, "Paris is the capital and", "model", cut_off=True)
    j4, _ = store.add_judgment("paired", cut, b, "b", "bob")
    assert store.response(cut)["cut_off"] == 1
    row = [r for r in store.training_judgments(kinds=["paired"]) if r["judgment_id"] == j4][0]
    assert (row["cut_off_a"], row["cut_off_b"]) == (True, False)  # training leaves its ending off


def test_undo_and_retract_keep_history(store):
    _, a, b = _two_answers(store)
    j1, _ = store.add_judgment("paired", a, b, "a", "alice")
    j2, _ = store.add_judgment("unpaired", a, None, "up", "alice")
    undone = store.undo_last("alice")
    assert undone["id"] == j2 and undone["retracted_by"] == "alice"
    assert undone["retracted_at"] is not None
    assert store.count_judgments() == 1
    assert store.count_judgments(include_retracted=True) == 2
    assert store.retract(j1, by="admin") is True
    assert store.retract(j1, by="admin") is False  # already retracted
    assert store.undo_last("alice") is None
    history = store.judgments(include_retracted=True)
    assert [j["id"] for j in history] == [j1, j2]
    assert store.judgment(j1)["retracted_by"] == "admin"
    assert store.judgments() == []
    assert store.stats()["retracted"] == 2


def test_request_id_makes_double_submit_idempotent(store):
    _, a, b = _two_answers(store)
    first = store.add_judgment("paired", a, b, "b", "alice", request_id="req-1")
    again = store.add_judgment("paired", a, b, "b", "alice", request_id="req-1")
    assert first[1] is True and again == (first[0], False)
    assert store.count_judgments() == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="ranked", verdict="a"), "unknown judgment kind"),
    (dict(kind="paired", verdict="up"), "verdict"),
    (dict(kind="unpaired", verdict="a", response_b=None), "verdict"),
    (dict(kind="unpaired", verdict="up"), "one response"),
    (dict(kind="paired", verdict="a", strength="very"), "strength"),
    (dict(kind="paired", verdict="a", a_side="top"), "a_side"),
    (dict(kind="paired", verdict="a", annotator=" "), "annotator"),
    (dict(kind="cross", verdict="a"), "different prompts"),
])
def test_invalid_judgments_are_refused_and_write_nothing(store, kwargs, match):
    _, a, b = _two_answers(store)
    before = store.snapshot()
    args = dict(response_a=a, response_b=b, annotator="alice") | kwargs
    with pytest.raises(StoreError, match=match):
        store.add_judgment(**args)
    assert store.snapshot() == before


def test_judgment_on_missing_response_is_refused(store):
    _, a, b = _two_answers(store)
    before = store.snapshot()
    with pytest.raises(StoreError, match="does not exist"):
        store.add_judgment("paired", a, 9999, "a", "alice")
    with pytest.raises(StoreError, match="does not exist"):
        store.add_judgment("unpaired", 9999, None, "up", "alice")
    with pytest.raises(StoreError, match="itself"):
        store.add_judgment("paired", a, a, "a", "alice")
    # The schema's foreign keys back this up for responses too.
    with pytest.raises(sqlite3.IntegrityError):
        store.add_response(9999, "orphan", "test")
    assert store.snapshot() == before


def test_failed_transaction_rolls_back_everything(store):
    before = store.snapshot()
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.add_prompt("inside the transaction", "test")
            raise RuntimeError("boom")
    assert store.snapshot() == before


def test_leases_block_a_second_annotator_until_they_expire(store, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(store_module, "_now", clock)
    pid, a, b = _two_answers(store)
    key = item_key(PROMPT_KEY, pid)
    assert store.try_lease(key, "alice", seconds=60)
    assert not store.try_lease(key, "bob")
    assert store.try_lease(key, "alice")  # renewing your own lease is fine
    assert store.next_prompts_for_pairs("bob", 0, 10, unjudged_only=False) == []
    assert [p["id"] for p in store.next_prompts_for_pairs("alice", 0, 10, False)] == [pid]
    clock.t += 301  # past alice's renewed LEASE_SECONDS lease
    assert [p["id"] for p in store.next_prompts_for_pairs("bob", 0, 10, False)] == [pid]
    assert store.try_lease(key, "bob")
    assert not store.try_lease(key, "alice")
    # Judging the item releases the judge's lease.
    store.add_judgment("paired", a, b, "a", "bob")
    assert store.try_lease(key, "alice")
    store.release_leases("alice")
    assert store.try_lease(key, "carol")


def test_skips_hide_an_item_from_that_annotator_only(store):
    pid, a, b = _two_answers(store)
    store.record_skip("alice", item_key(PROMPT_KEY, pid))
    store.record_skip("alice", item_key(PROMPT_KEY, pid))  # skipping twice is harmless
    assert store.next_prompts_for_pairs("alice", 0, 10, unjudged_only=True) == []
    assert [p["id"] for p in store.next_prompts_for_pairs("bob", 0, 10, True)] == [pid]
    store.record_skip("alice", item_key(RESPONSE_KEY, a))
    assert [r["id"] for r in store.next_responses_for_thumbs("alice", 0, 10, True)] == [b]
    store.add_judgment("paired", a, b, "tie", "bob")
    assert store.next_prompts_for_pairs("bob", 0, 10, unjudged_only=True) == []
    assert set(store.pair_judges([a, b])) == {tuple(sorted((a, b)))}


def test_runs_and_adapters(store):
    store.record_run("r1", {"loss": "rpo-paired", "beta": 0.1}, "/runs/r1")
    store.update_run("r1", state="done", final_metrics={"accuracy": 0.75}, pid=123)
    run = store.run("r1")
    assert run["config"] == {"loss": "rpo-paired", "beta": 0.1}
    assert (run["state"], run["pid"], run["final_metrics"]) == ("done", 123, {"accuracy": 0.75})
    with pytest.raises(StoreError, match="unknown run fields"):
        store.update_run("r1", out_dir="/elsewhere")
    store.register_adapter("tuned", "/adapters/tuned", "r1", "SmolLM2")
    assert store.adapter("tuned")["run_id"] == "r1"
    store.register_adapter("other", "/adapters/other", None, None)
    with pytest.raises(StoreError, match="already exists"):
        store.rename_adapter("tuned", "other", "/x")
    with pytest.raises(StoreError, match="no adapter"):
        store.rename_adapter("missing", "new", "/x")
    store.rename_adapter("tuned", "tuned-v2", "/adapters/tuned-v2")
    assert [a["name"] for a in store.adapters()] == ["tuned-v2", "other"]
    store.delete_adapter("other")
    assert store.adapter("other") is None
    store.update_run("r1", deleted_at=1.0)
    assert store.runs() == [] and len(store.runs(include_deleted=True)) == 1


def test_embeddings_save_and_load(store):
    ids, _ = store.add_prompts([f"prompt {i}" for i in range(5)], "test")
    assert [p["id"] for p in store.prompts_missing_embedding("emb")] == ids
    vecs = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    store.save_embeddings("emb", ids[:3], vecs)
    got_ids, got = store.load_embeddings("emb")
    assert got_ids.tolist() == ids[:3]
    np.testing.assert_array_equal(got, vecs)
    assert [p["id"] for p in store.prompts_missing_embedding("emb")] == ids[3:]
    assert store.load_embeddings("emb", after_id=ids[1])[0].tolist() == [ids[2]]
    assert len(store.load_embeddings("other-embedder")[0]) == 0
    assert len(store.prompts_missing_embedding("other-embedder")) == 5


def test_eight_concurrent_writers_lose_and_duplicate_nothing(store):
    pid, a, b = _two_answers(store)
    thumbs = [store.add_response(pid, f"answer {i}", "test")[0] for i in range(4)]
    per_thread, errors = 30, []
    start = threading.Barrier(8)

    def worker(t: int) -> None:
        try:
            start.wait()
            for i in range(per_thread):
                rid = f"t{t}-{i}"
                if i % 2:
                    store.add_judgment("paired", a, b, "ab"[i % 2], f"ann{t}", request_id=rid)
                else:
                    store.add_judgment("unpaired", thumbs[i % 4], None, "up", f"ann{t}",
                                       request_id=rid)
                # A double submit of every third judgment must not add a second row.
                if i % 3 == 0:
                    store.add_judgment("unpaired", thumbs[0], None, "down", f"ann{t}",
                                       request_id=rid)
            store.add_prompt(f"thread {t} prompt", "test")
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)
        finally:
            store.close()  # this thread's connection

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    rows = store.judgments()
    assert len(rows) == 8 * per_thread
    assert len({r["request_id"] for r in rows}) == 8 * per_thread
    assert store.stats()["annotators"] == {f"ann{t}": per_thread for t in range(8)}
    assert store.count_prompts() == 1 + 8  # _two_answers' prompt + one per thread
    assert store.integrity_check() == "ok"


def test_forget_answer_logps_drops_one_scorers_cache_only(store):
    pid, _ = store.add_prompt("Hi.", "t")
    a, _ = store.add_response(pid, "Hello.", "t")
    b, _ = store.add_response(pid, "Hey there.", "t")
    store.save_answer_logps("base:m", [(a, -3.0, 2), (b, -5.0, 3)])
    store.save_answer_logps("run:1", [(a, -2.0, 2)])
    assert store.forget_answer_logps("base:m") == 2
    assert store.answer_logps("base:m") == {}
    assert store.answer_logps("run:1") == {a: -2.0}
    assert store.forget_answer_logps("base:m") == 0
