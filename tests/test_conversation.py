"""Prompts that are conversations: what is valid, how they are stored, templated (only the
final assistant turn is scored), embedded, answered and trained on."""
from __future__ import annotations

import json
import time

import pytest

from apptools import seed_store
from rpo_app import conversation
from rpo_app.batches import Encoder, build_data, collate, judgment_pairs
from rpo_app.store import Store, StoreError

CONV = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "I need a dinner idea."},
        {"role": "assistant", "content": "What do you like?"},
        {"role": "user", "content": "Something vegan, please."}]


@pytest.mark.parametrize("messages, words", [
    ([], "non-empty list"),
    (CONV[:3], "end with a user turn"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 2 is a user turn"),
    ([{"role": "bot", "content": "a"}], "role 'bot'"),
    ([{"role": "user", "content": "  "}], "has no text"),
    ([{"role": "system", "content": "x"}], "needs a user turn"),
    ([{"role": "user", "content": "a", "name": "x"}], "exactly 'role' and 'content'"),
    ([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "a"}],
     "message 1 is an assistant turn"),
])
def test_bad_conversations_name_the_problem(messages, words):
    with pytest.raises(conversation.ConversationError, match=words):
        conversation.check(messages)


def test_transcript_and_embed_text():
    msgs = conversation.check(CONV)
    assert conversation.transcript(msgs) == ("System: You are terse.\n\nUser: I need a dinner "
                                             "idea.\n\nAssistant: What do you like?\n\nUser: "
                                             "Something vegan, please.")
    # The final user turn first: the embedder's length limit cuts the oldest context.
    assert conversation.embed_text(msgs).startswith("Something vegan, please.\n\nWhat do you like?")
    assert conversation.is_single_turn([{"role": "user", "content": "hi"}])


def test_store_keeps_a_conversation_and_a_single_turn_stays_text(store):
    ids, new = store.add_prompts([{"messages": CONV, "family": "food"},
                                  {"messages": [{"role": "user", "content": " Just this. "}]}],
                                 "test")
    assert new == 2
    conv, single = store.prompts(ids)
    assert conv["messages"] == CONV and conv["text"] == conversation.transcript(CONV)
    assert single["messages"] is None and single["text"] == "Just this."
    # The same conversation again is the same prompt.
    assert store.add_prompts([{"messages": CONV}], "test") == ([ids[0]], 0)


def test_a_bad_conversation_stores_nothing(store):
    store.add_prompts(["already here"], "test")
    before = store.snapshot()
    with pytest.raises(StoreError, match="end with a user turn"):
        store.add_prompts([{"messages": CONV}, {"messages": CONV[:3]}], "test")
    with pytest.raises(StoreError, match="control characters|control"):
        store.add_prompts([{"messages": [{"role": "user", "content": "a\x1bb"}]}], "test")
    assert store.snapshot() == before


def _conv_judgment(store) -> dict:
    (pid,), _ = store.add_prompts([{"messages": CONV}], "test")
    a, _ = store.add_response(pid, "Try a lentil curry.", "test")
    b, _ = store.add_response(pid, "Eat a steak.", "test")
    store.add_judgment("paired", a, b, "a", "ada")
    return store.training_judgments()[0]


def test_template_covers_the_whole_history_and_scores_only_the_final_answer(store, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    row = _conv_judgment(store)
    assert row["prompt_a_messages"] == CONV
    data = build_data([row], Encoder(tok, 512, 256), "dpo")
    assert data.messages[row["prompt_a_text"]] == conversation.frozen(CONV)
    chosen = data.seqs[data.pairs[0][0]]
    full = tok.apply_chat_template(CONV + [{"role": "assistant", "content": "Try a lentil curry."}],
                                   tokenize=False)
    text = tok.decode(list(chosen.input_ids))
    # Every earlier turn is in the sequence, in the template's own form...
    for m in CONV:
        assert m["content"] in text
    assert full.startswith(tok.decode(list(chosen.input_ids[:chosen.prompt_len])))
    # ...and the scored positions predict exactly the final answer and its end of turn.
    batch = collate([chosen], pad_id=0)
    scored = batch["input_ids"][0].roll(-1)[batch["score_mask"][0]].tolist()
    assert scored == list(chosen.input_ids[chosen.prompt_len:])
    assert tok.decode(scored[:-1]) == "Try a lentil curry."
    assert "What do you like?" not in tok.decode(scored)
    # The embedder reads the final user turn first.
    assert data.embed_texts()[0].startswith("Something vegan, please.")


def test_pairs_of_a_conversation_keep_its_messages(store):
    row = _conv_judgment(store)
    pair = judgment_pairs([row])[0]
    assert pair.chosen.messages == pair.rejected.messages == conversation.frozen(CONV)
    assert pair.chosen.response == "Try a lentil curry."


def test_candidates_for_a_conversation_answer_its_final_turn(store, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rpo_app.chat_template import chat_ids
    from rpo_app.generate import GenSettings, ModelHost, generate_candidates

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    host = ModelHost.from_loaded(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(),
                                 tok, "tiny")
    assert host.encode_prompt(CONV) == chat_ids(tok, CONV)
    assert host.encode_prompt(CONV) != host.encode_prompt(conversation.transcript(CONV))
    (pid,), _ = store.add_prompts([{"messages": CONV}], "test")
    stats = generate_candidates(store, host, [pid], 2, GenSettings(max_new_tokens=4, seed=1))
    assert stats["generated"] == 2
    answers = store.responses_for_prompt(pid)
    assert answers and all(r["prompt_messages"] == CONV for r in answers)


@pytest.mark.slow
def test_a_run_trains_on_conversation_judgments(data_dir, tiny_model_dir):
    from rpo_app.config import DataLayout
    from rpo_app.runs import RunManager
    from rpo_app.trainconfig import TrainConfig

    seed_store(data_dir, n_prompts=4, answers_per_prompt=2)
    store = Store(data_dir)
    for k in range(6):
        msgs = [{"role": "user", "content": f"Question {k}?"},
                {"role": "assistant", "content": f"Tell me more about {k}."},
                {"role": "user", "content": f"It is about topic {k}."}]
        (pid,), _ = store.add_prompts([{"messages": msgs}], "test")
        a, _ = store.add_response(pid, f"Here is a careful answer on topic {k}.", "test")
        b, _ = store.add_response(pid, "No.", "test")
        store.add_judgment("paired", a, b, "a", "ada")
    runs = RunManager(store, DataLayout(data_dir))
    cfg = TrainConfig(loss="rpo-paired", model=str(tiny_model_dir), max_steps=2, batch_size=2,
                      max_length=96, max_prompt_length=64, eval_every=0, sample_every=0,
                      sample_max_new_tokens=4, eval_fraction=0.0, early_stop_patience=0,
                      save_every=0, preview_count=1)
    rid = runs.start(cfg)
    deadline = time.time() + 300
    while store.adapter_for_run(rid) is None:
        assert time.time() < deadline, runs.log_tail(rid)
        time.sleep(0.3)
    run_dir = runs.layout.run_dir(rid)
    rows = [json.loads(line) for line in (run_dir / "judgments.jsonl").read_text().splitlines()]
    assert sum(bool(r.get("prompt_a_messages")) for r in rows) == 6
    assert store.run(rid)["state"] == "finished"
    store.close()
