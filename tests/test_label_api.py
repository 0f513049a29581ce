"""The labeling API through gradio_client against the real server (app.py in a child
process): stable endpoint names, a scripted annotator, and six concurrent annotators
with double clicks. The store is checked afterwards; submit latency is reported."""
from __future__ import annotations

import json
import statistics
import threading
import time
from collections import Counter

import pytest

from apptools import artifacts_dir, seed_store, start_app
from rpo_app.bench.load import percentile
from rpo_app.models import link_model_cache
from rpo_app.netutil import gradio_client
from rpo_app.store import PROMPT_KEY

pytestmark = pytest.mark.slow

PAIRED_PROMPTS, SINGLE_PROMPTS = 40, 40
LABEL_ENDPOINTS = ("/next_item", "/submit_judgment", "/skip_item", "/undo_last", "/label_stats")
UI_ENDPOINTS = ("/label_left", "/label_right", "/label_tie", "/label_both_bad", "/label_up",
                "/label_down", "/label_skip", "/label_undo", "/label_mode")


@pytest.fixture(scope="module")
def api_app(tmp_path_factory, model_cache_dir):
    # Same as conftest's linked_data_dir, but for the whole module (one server).
    data = link_model_cache(model_cache_dir, tmp_path_factory.mktemp("label-api") / "data")
    paired = seed_store(data, PAIRED_PROMPTS, 2, prefix="Paired prompt")
    singles = seed_store(data, SINGLE_PROMPTS, 1, prefix="Single prompt")
    app = start_app(data)
    try:
        yield {"app": app, "data": data, "paired": paired, "singles": singles}
    finally:
        app.stop()


@pytest.fixture(scope="module")
def client(api_app):
    return gradio_client(api_app["app"].url)


def _store(data):
    from rpo_app.store import Store

    return Store(data)


def test_endpoints_exist_with_stable_names_and_parameters(client):
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    missing = [name for name in LABEL_ENDPOINTS + UI_ENDPOINTS if name not in api]
    assert not missing, f"missing endpoints: {missing}; have {sorted(api)}"

    def params(name):
        return [p["parameter_name"] for p in api[name]["parameters"]]

    assert params("/next_item") == ["annotator", "mode", "order"]
    # the order is optional: scripts written before it keep the queue order
    assert {p["parameter_name"]: p.get("parameter_default") for p in api["/next_item"]["parameters"]
            if p["parameter_has_default"]} == {"mode": "paired", "order": "queue"}
    assert params("/submit_judgment") == ["token", "verdict", "annotator", "strength",
                                          "seconds_spent"]
    assert params("/skip_item") == ["token", "annotator"]
    assert params("/undo_last") == ["annotator"]
    assert params("/label_stats") == []
    # Defaults a script may leave out.
    defaults = {p["parameter_name"]: p.get("parameter_default")
                for p in api["/submit_judgment"]["parameters"] if p["parameter_has_default"]}
    assert defaults == {"strength": "", "seconds_spent": -1.0}
    assert "verdict" in api["/submit_judgment"]["description"]


def test_scripted_annotator_loop(client, api_app):
    name = "script-bot"
    seen, results = set(), []
    serial = []
    for n in range(6):
        item = client.predict(name, "paired", api_name="/next_item")
        assert item["kind"] == "paired" and item["token"] not in seen
        assert item["left"]["prompt_id"] == item["right"]["prompt_id"]
        assert item["left"]["response_id"] != item["right"]["response_id"]
        assert item["left"]["text"] and item["left"]["prompt"].startswith("Paired prompt")
        # Asking again (a retry, a reload) returns the same item.
        assert client.predict(name, "paired", api_name="/next_item")["token"] == item["token"]
        seen.add(item["token"])
        verdict = ["left", "right", "tie", "both_bad"][n % 4]
        t0 = time.perf_counter()
        res = client.predict(item["token"], verdict, name, "clearly", 4.0,
                             api_name="/submit_judgment")
        serial.append(time.perf_counter() - t0)
        assert res["created"] is True
        results.append((item, verdict, res["judgment_id"]))
        # A retried request stores nothing new.
        again = client.predict(item["token"], verdict, name, api_name="/submit_judgment")
        assert again == {"judgment_id": res["judgment_id"], "created": False}

    print(f"\nsubmit_judgment round trip, one annotator: median "
          f"{statistics.median(serial) * 1000:.1f} ms over {len(serial)} submits")

    # Thumbs for a single answer.
    thumb = client.predict(name, "unpaired", api_name="/next_item")
    assert thumb["kind"] == "unpaired" and thumb["right"] is None
    t_res = client.predict(thumb["token"], "down", name, api_name="/submit_judgment")

    # Skip: nothing stored; undo: the last judgment (the thumb) comes back.
    skipped = client.predict(name, "paired", api_name="/next_item")
    assert client.predict(skipped["token"], name, api_name="/skip_item") == \
        {"skipped": skipped["token"]}
    undone = client.predict(name, api_name="/undo_last")
    assert undone["undone_id"] == t_res["judgment_id"]
    assert undone["item"]["left"]["response_id"] == thumb["left"]["response_id"]
    assert client.predict(name, "unpaired", api_name="/next_item")["token"] == \
        undone["item"]["token"]

    # Errors come back as messages a script can read.
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="unknown verdict 'maybe'"):
        client.predict(undone["item"]["token"], "maybe", name, api_name="/submit_judgment")
    with pytest.raises(AppError, match="enter your name"):
        client.predict("", "paired", api_name="/next_item")
    with pytest.raises(AppError, match="unknown mode"):
        client.predict(name, "sideways", api_name="/next_item")
    with pytest.raises(AppError, match="no longer open"):
        client.predict("0" * 32, "left", name, api_name="/submit_judgment")

    stats = client.predict(api_name="/label_stats")
    assert stats["annotators"][name] == 6
    assert stats["prompts"] == PAIRED_PROMPTS + SINGLE_PROMPTS
    assert stats["responses"] == 2 * PAIRED_PROMPTS + SINGLE_PROMPTS

    store = _store(api_app["data"])
    try:
        rows = {r["id"]: r for r in store.judgments(annotator=name, include_retracted=True)}
        assert len(rows) == 7 and sum(r["retracted_at"] is not None for r in rows.values()) == 1
        for item, verdict, jid in results:
            r = rows[jid]
            assert r["request_id"] == item["token"] and r["seconds_spent"] == 4.0
            ids = {item["left"]["response_id"], item["right"]["response_id"]}
            assert {r["response_a"], r["response_b"]} == ids
            left_id = item["left"]["response_id"]
            assert r["a_side"] == ("left" if r["response_a"] == left_id else "right")
            if verdict in ("left", "right"):
                shown = item[verdict]["response_id"]
                assert (r["response_a"] if r["verdict"] == "a" else r["response_b"]) == shown
                assert r["strength"] == "clearly"
            else:
                assert r["verdict"] == verdict and r["strength"] is None
    finally:
        store.close()


def test_ui_button_endpoints_judge_the_item_in_the_session(api_app):
    """The buttons' own endpoints work from a script too: the token lives in the
    session's state, so /label_mode shows an item and /label_left judges it."""
    c = gradio_client(api_app["app"].url)
    name = "button-bot"
    api = c.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert [p["parameter_name"] for p in api["/label_left"]["parameters"]] == \
        ["mode_value", "strength_value", "typed", "order_value", "shown_value"]
    shown = c.predict("paired", name, api_name="/label_mode")
    # Outputs (state and layout left out): prompt, left prompt, left answer, right prompt,
    # right answer, question, related, history, progress, status.
    prompt_text, left_text = _value(shown[0]), _value(shown[2])
    assert prompt_text.startswith("Paired prompt") and left_text.startswith("Synthetic answer")
    out = c.predict("paired", "slightly", name, api_name="/label_left")
    status = out[-1]
    assert status.startswith("Saved judgment #"), out
    jid = int(status.split("#")[1].split()[0])
    store = _store(api_app["data"])
    try:
        row = store.judgment(jid)
        assert row["annotator"] == name and row["strength"] == "slightly"
        shown_left = row["response_a_text"] if row["a_side"] == "left" else row["response_b_text"]
        assert shown_left == left_text
        assert (row["verdict"] == "a") == (row["a_side"] == "left")
    finally:
        store.close()
    undo = c.predict("paired", name, api_name="/label_undo")
    assert undo[-1].startswith(f"Undid judgment #{jid}")
    assert _value(undo[2]) == left_text  # the same item, the same sides
    again = c.predict("paired", "none", name, api_name="/label_right")
    assert again[-1].startswith("Saved judgment #") and f"#{jid} " not in again[-1]


def _value(out):
    """A component's value from an endpoint output (plain, or a gr.update dict)."""
    return out.get("value") if isinstance(out, dict) else out


def test_six_concurrent_annotators_with_double_clicks(api_app):
    app, data = api_app["app"], api_app["data"]
    n_threads, per_annotator = 6, 15
    modes = ["paired"] * 4 + ["unpaired"] * 2
    clients = [gradio_client(app.url) for _ in range(n_threads)]
    acked: list[dict] = []  # every submit answer, with who and which token
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(n_threads)

    def annotator(i: int) -> None:
        c, name, mode = clients[i], f"conc-{i}", modes[i]
        try:
            start.wait()
            for n in range(per_annotator):
                item = c.predict(name, mode, api_name="/next_item")
                if not item:
                    break
                verdict = (["left", "right", "tie", "both_bad"][n % 4] if mode == "paired"
                           else ["up", "down"][n % 2])
                answers = []
                t0 = time.perf_counter()
                if n % 3 == 1:
                    # A double click: two requests with the same token at once.
                    jobs = [c.submit(item["token"], verdict, name, api_name="/submit_judgment")
                            for _ in range(2)]
                    answers = [job.result(timeout=60) for job in jobs]
                else:
                    answers.append(c.predict(item["token"], verdict, name,
                                             api_name="/submit_judgment"))
                dt = time.perf_counter() - t0
                if n % 3 == 2:  # a retried request after the answer came back
                    answers.append(c.predict(item["token"], verdict, name,
                                             api_name="/submit_judgment"))
                with lock:
                    if n % 3 != 1:  # single requests only; a double click is not timed
                        latencies.append(dt)
                    for a in answers:
                        acked.append({**a, "token": item["token"], "annotator": name,
                                      "kind": item["kind"], "verdict": verdict,
                                      "left": item["left"]["response_id"],
                                      "right": (item["right"] or {}).get("response_id")})
        except BaseException as err:  # reported below
            errors.append(err)

    t_start = time.perf_counter()
    threads = [threading.Thread(target=annotator, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    wall = time.perf_counter() - t_start
    assert not any(t.is_alive() for t in threads), "an annotator thread hung"
    assert not errors, errors

    by_token: dict[str, list[dict]] = {}
    for a in acked:
        by_token.setdefault(a["token"], []).append(a)
    # Every token got one judgment id, created exactly once.
    for token, answers in by_token.items():
        assert len({a["judgment_id"] for a in answers}) == 1, answers
        assert sum(a["created"] for a in answers) == 1, answers
    created = {a["judgment_id"]: a for a in acked if a["created"]}
    assert len(created) == len(by_token)

    store = _store(data)
    try:
        names = {f"conc-{i}" for i in range(n_threads)}
        rows = [r for r in store.judgments(include_retracted=True) if r["annotator"] in names]
        assert all(r["retracted_at"] is None for r in rows)
        assert {r["id"] for r in rows} == set(created), "stored != acknowledged"
        for r in rows:
            a = created[r["id"]]
            assert r["request_id"] == a["token"] and r["annotator"] == a["annotator"]
            assert r["kind"] == a["kind"]
            assert r["response_a"] in (a["left"], a["right"])
        assert len({r["request_id"] for r in rows}) == len(rows)
        # No pair and no single answer judged twice, by anyone, in the whole store.
        active = store.judgments()
        pair_keys = [(r["response_a"], r["response_b"]) for r in active if r["response_b"]]
        thumb_keys = [r["response_a"] for r in active if r["kind"] == "unpaired"]
        dup_pairs = [k for k, v in Counter(pair_keys).items() if v > 1]
        dup_thumbs = [k for k, v in Counter(thumb_keys).items() if v > 1]
        assert not dup_pairs and not dup_thumbs, (dup_pairs, dup_thumbs)
        # The paired queue drains (4 annotators x 15 > 40 pairs): every paired prompt is
        # judged, or held by a lease of an annotator outside this test (the button test
        # leaves its on-screen item leased).
        leases = store.snapshot()["leases"]  # (item_key, annotator, expires_at)
        assert not [row for row in leases if row[1] in names], leases
        held = {int(row[0].removeprefix(PROMPT_KEY)) for row in leases
                if row[0].startswith(PROMPT_KEY) and row[2] > time.time()}
        judged = {r["prompt_a_id"] for r in active if r["kind"] == "paired"}
        assert set(api_app["paired"]["prompts"]) <= judged | held, (judged, held)
        assert store.integrity_check() == "ok"
    finally:
        store.close()

    p50, p95 = percentile(latencies, 0.5), percentile(latencies, 0.95)
    report = {"submits_timed": len(latencies), "p50_ms": round(p50 * 1000, 1),
              "p95_ms": round(p95 * 1000, 1), "max_ms": round(max(latencies) * 1000, 1),
              "mean_ms": round(statistics.mean(latencies) * 1000, 1),
              "judgments": len(created), "answers": len(acked), "wall_s": round(wall, 1),
              "threads": n_threads}
    (artifacts_dir() / "label_api_latency.json").write_text(json.dumps(report, indent=2))
    print(f"\nsubmit_judgment round trip over {len(latencies)} submits with {n_threads} "
          f"concurrent annotators: p50 {report['p50_ms']} ms, p95 {report['p95_ms']} ms "
          f"(max {report['max_ms']} ms); {len(created)} judgments in {wall:.1f} s")
    assert api_app["app"].alive, api_app["app"].log_tail()
