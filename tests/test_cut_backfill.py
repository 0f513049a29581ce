"""`mark-cut`: answers stored before the cut flag existed, found by their length and by
how unlikely the bundled model finds an ending right after them."""
from __future__ import annotations

import pytest

from rpo_app.cli import main
from rpo_app.generate import GenSettings, ModelHost
from rpo_app.models import DEFAULT_MODEL_NAME

GREEDY = {"temperature": 0.0, "top_p": 1.0}


@pytest.fixture(scope="module")
def host(default_model_dir) -> ModelHost:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(default_model_dir).eval()
    return ModelHost.from_loaded(model, AutoTokenizer.from_pretrained(default_model_dir),
                                 DEFAULT_MODEL_NAME)


def _answer(host, prompt: str, max_new_tokens: int):
    return host.answers([prompt], 1, GenSettings(max_new_tokens=max_new_tokens, **GREEDY))[0][0]


def test_an_old_store_gets_its_cut_answers_marked_and_nothing_else(host, linked_data_dir, capsys):
    from rpo_app.store import CUT_UNCHECKED_KEY, Store

    store = Store(linked_data_dir)
    p1, _ = store.add_prompt("Explain how a bicycle works.", "seed")
    p2, _ = store.add_prompt("What is 2+2? Reply with the number only.", "seed")
    cut = _answer(host, "Explain how a bicycle works.", 24)
    ended = _answer(host, "What is 2+2? Reply with the number only.", 64)
    assert cut.cut_off and not ended.cut_off  # what today's generation records
    n_ended = len(host.tokenizer(ended.text, add_special_tokens=False)["input_ids"])
    # As a store from before the flag holds them: every answer counts as ended. The ended
    # answer's limit is one above its length, so its length alone looks cut.
    settings = {**GREEDY, "max_new_tokens": 24}
    a = store.add_response(p1, cut.text, "model", model=DEFAULT_MODEL_NAME, gen_settings=settings)[0]
    b = store.add_response(p2, ended.text, "model", model=DEFAULT_MODEL_NAME,
                           gen_settings={**settings, "max_new_tokens": n_ended + 1})[0]
    other = store.add_response(p1, cut.text + " Also", "model", model="another-model",
                               gen_settings=settings)[0]
    imported = store.add_response(p1, cut.text + " Imported", "import")[0]
    store.save_answer_logps("base", [(a, -50.0, 24), (b, -3.0, 2)])
    # What the migration to the flag records for such a store (tests/test_store.py).
    store.put_setting(CUT_UNCHECKED_KEY, {"answers": 3}, by="migration")

    assert main(["mark-cut", "--data-dir", str(linked_data_dir), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 answers by SmolLM2-135M-Instruct marked as ended, 2 near their token limit: " \
           "1 was cut and would be marked (dry run: nothing written)" in out
    assert "1 answer written by another model was skipped" in out
    assert not any(r["cut_off"] for r in store.answers_to_score())
    assert store.answers_unchecked_for_cut() == 3  # a dry run writes nothing

    assert main(["mark-cut", "--data-dir", str(linked_data_dir)]) == 0
    assert "marked 1 as cut at their token limit" in capsys.readouterr().out
    assert store.answers_unchecked_for_cut() == 1  # the other model's, until --model checks it
    flags = {r["id"]: bool(r["cut_off"]) for r in store.answers_to_score()}
    assert flags == {a: True, b: False, other: False, imported: False}
    # The cut answer's cached log-prob was scored with an ending: it goes, the other stays.
    assert store.answer_logps("base") == {b: -3.0}

    assert main(["mark-cut", "--data-dir", str(linked_data_dir)]) == 0
    assert "1 answer by SmolLM2-135M-Instruct marked as ended" in capsys.readouterr().out
    store.close()


def test_the_ending_after_a_cut_answer_is_unlikely_and_after_an_ended_one_likely(host):
    from rpo_app.batches import Item
    from rpo_app.cut_backfill import MAX_LENGTH, UNLIKELY_END
    from rpo_app.scoring import end_of_turn_logps

    cut = _answer(host, "Explain how a bicycle works.", 24)
    ended = _answer(host, "What is 2+2? Reply with the number only.", 64)
    logps = end_of_turn_logps(host.base, host.tokenizer, host.pad_id, host.device,
                              [Item("Explain how a bicycle works.", cut.text),
                               Item("What is 2+2? Reply with the number only.", ended.text)],
                              MAX_LENGTH)
    assert logps[0] < UNLIKELY_END < logps[1]
