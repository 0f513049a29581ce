"""Batched generation, seeding, padding correctness, mixed-adapter streaming chat, CLI."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from apptools import make_lora_adapter
from rpo_app.adapters import AdapterError
from rpo_app.generate import (BASE, GenerationError, GenSettings, ModelHost,
                              generate_candidates)

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Hi.",
    "How can I fall asleep faster when my mind keeps racing at night?",
    "Name a colour.",
]
GREEDY = GenSettings(temperature=0, max_new_tokens=16)


def _tiny_host(tiny_model_dir) -> ModelHost:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return ModelHost.from_loaded(model, tok, "tiny-llama")


@pytest.fixture(scope="module")
def tiny_host(tiny_model_dir) -> ModelHost:
    return _tiny_host(tiny_model_dir)


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    return make_lora_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "tuned")


@pytest.fixture
def host_with_adapter(tiny_model_dir, tiny_adapter) -> ModelHost:
    host = _tiny_host(tiny_model_dir)
    host.load_adapter("tuned", tiny_adapter)
    return host


def _one_by_one_greedy(host: ModelHost, prompt: str, max_new_tokens: int) -> list[int]:
    """Plain transformers generate on one unpadded prompt."""
    import torch

    ids = torch.tensor([host.encode_prompt(prompt)])
    with torch.inference_mode():
        out = host.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  do_sample=False, max_new_tokens=max_new_tokens,
                                  eos_token_id=sorted(host.stop_ids),
                                  pad_token_id=host.tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    cut = next((i for i, t in enumerate(new) if t in host.stop_ids), len(new))
    return new[:cut]


# -- settings ----------------------------------------------------------------------------
def test_settings_dict_and_validation():
    s = GenSettings(temperature=0.5, top_p=0.9, max_new_tokens=10, seed=3, system_prompt="Be brief.")
    assert s.to_dict() == {"temperature": 0.5, "top_p": 0.9, "max_new_tokens": 10, "seed": 3,
                           "system_prompt": "Be brief."}
    assert GenSettings(temperature=0).greedy and not s.greedy
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"max_new_tokens": 0}):
        with pytest.raises(ValueError):
            GenSettings(**bad)


# -- batched generation --------------------------------------------------------------------
def test_returns_n_answers_per_prompt_in_order(tiny_host):
    calls = []
    out = tiny_host.generate(PROMPTS, n=2, settings=GenSettings(max_new_tokens=8),
                             batch_size=4, progress=lambda d, t: calls.append((d, t)))
    assert len(out) == len(PROMPTS)
    assert all(len(answers) == 2 and all(isinstance(a, str) for a in answers) for answers in out)
    assert calls[0] == (0, 6) and calls[-1] == (6, 6)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_same_seed_reproducible_whatever_the_batching(tiny_host):
    s = GenSettings(temperature=1.0, top_p=0.95, max_new_tokens=8, seed=7)
    a = tiny_host.generate(PROMPTS, n=2, settings=s, batch_size=16)
    b = tiny_host.generate(PROMPTS, n=2, settings=s, batch_size=16)
    assert a == b
    # Each answer has its own seeded generator: batch size and neighbours don't matter.
    c = tiny_host.generate(PROMPTS, n=2, settings=s, batch_size=4)
    assert a == c
    assert tiny_host.generate(PROMPTS[1:2], n=2, settings=s)[0] == a[1]


def test_different_seed_gives_different_samples(tiny_host):
    a = tiny_host.generate(PROMPTS, n=2, settings=GenSettings(max_new_tokens=12, seed=1))
    b = tiny_host.generate(PROMPTS, n=2, settings=GenSettings(max_new_tokens=12, seed=2))
    assert a != b
    # The n samples of one prompt differ from each other too.
    assert any(x != y for x, y in a)


def test_greedy_batched_equals_one_at_a_time(tiny_host):
    """Left padding + attention mask: a padded row decodes like the prompt alone."""
    batched = tiny_host.generate(PROMPTS, n=1, settings=GREEDY, batch_size=8)
    for prompt, (text,) in zip(PROMPTS, batched):
        alone = tiny_host.tokenizer.decode(_one_by_one_greedy(tiny_host, prompt, 16),
                                           skip_special_tokens=True).strip()
        assert text == alone


def test_shared_prefill_matches_plain_padding(tiny_host):
    """The prefix-sharing prefill gives the same answers as plain left padding."""
    sampled = GenSettings(temperature=0.7, top_p=0.9, max_new_tokens=8, seed=3)
    shared_greedy = tiny_host.generate(PROMPTS, n=2, settings=GREEDY)
    shared_sampled = tiny_host.generate(PROMPTS, n=2, settings=sampled)
    tiny_host.share_prefill = False
    try:
        assert tiny_host.generate(PROMPTS, n=2, settings=GREEDY) == shared_greedy
        assert tiny_host.generate(PROMPTS, n=2, settings=sampled) == shared_sampled
    finally:
        tiny_host.share_prefill = True
    assert all(a == b for a, b in shared_greedy)  # greedy: both samples are the same


def test_system_prompt_changes_the_input(tiny_host):
    plain = tiny_host.encode_prompt("Hi.")
    system = tiny_host.encode_prompt("Hi.", system_prompt="Answer in French.")
    assert "Answer in French." in tiny_host.tokenizer.decode(system)
    assert plain != system


@pytest.mark.slow
def test_greedy_padding_on_default_model(default_model_dir):
    host = ModelHost(str(default_model_dir), data_dir=default_model_dir.parent.parent,
                     device="cpu")
    prompts = PROMPTS[:2]  # a short and a long one: the short row is padded
    batched = host.generate(prompts, n=1, settings=GenSettings(temperature=0, max_new_tokens=16))
    for prompt, (text,) in zip(prompts, batched):
        alone = _one_by_one_greedy(host, prompt, 16)
        batched_ids = host.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert batched_ids[:16] == alone[:16], prompt
        assert text  # the real model says something


# -- writing to the store ------------------------------------------------------------------
def test_generate_candidates_writes_with_provenance(store, tiny_host):
    ids, _ = store.add_prompts(PROMPTS, source="test")
    settings = GenSettings(max_new_tokens=8, seed=5)
    seen = []
    stats = generate_candidates(store, tiny_host, ids, n=2, settings=settings, batch_size=4,
                                progress=lambda d, t: seen.append((d, t)))
    assert stats["generated"] == 6 and stats["new"] + stats["duplicates"] == 6
    assert stats["tokens"] > 0 and stats["seconds"] > 0
    assert seen[-1] == (6, 6)
    assert store.count_responses() == stats["new"]
    for pid in ids:
        rows = store.responses_for_prompt(pid)
        assert 1 <= len(rows) <= 2
        for r in rows:
            assert r["source"] == "model" and r["model"] == "tiny-llama"
            assert r["adapter"] is None
            assert r["gen_settings"] == settings.to_dict()
    # Same seed again: the same texts, so nothing new is stored.
    again = generate_candidates(store, tiny_host, ids, n=2, settings=settings)
    assert again["new"] == 0 and again["duplicates"] == 6


def test_generate_candidates_with_adapter_and_unknown_ids(store, host_with_adapter):
    ids, _ = store.add_prompts(PROMPTS[:2], source="test")
    stats = generate_candidates(store, host_with_adapter, ids, n=1, adapter="tuned",
                                settings=GenSettings(max_new_tokens=6))
    assert stats["generated"] == 2
    assert {r["adapter"] for pid in ids for r in store.responses_for_prompt(pid)} == {"tuned"}
    assert store.response_counts(ids, adapter="tuned") == {ids[0]: 1, ids[1]: 1}
    with pytest.raises(ValueError, match="unknown prompt ids"):
        generate_candidates(store, host_with_adapter, [999999], n=1)


def test_batches_are_stored_as_they_finish(store, tiny_host, monkeypatch):
    """An interruption keeps the answers of the batches already done."""
    ids, _ = store.add_prompts(PROMPTS, source="test")
    real = tiny_host.generate_batches

    def interrupted(*args, **kwargs):
        gen = real(*args, **kwargs)
        yield next(gen)
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny_host, "generate_batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate_candidates(store, tiny_host, ids, n=2, batch_size=2,
                            settings=GenSettings(max_new_tokens=4))
    assert 1 <= store.count_responses() <= 2


# -- adapters on the host ------------------------------------------------------------------
def test_adapter_changes_output_and_unloads(tiny_model_dir, tiny_adapter):
    host = _tiny_host(tiny_model_dir)
    before = host.generate(PROMPTS, settings=GREEDY)
    host.load_adapter("tuned", tiny_adapter)
    host.load_adapter("tuned2", tiny_adapter)
    assert host.adapter_names() == ["tuned", "tuned2"]
    assert host.generate(PROMPTS, settings=GREEDY) == before  # no adapter = base model
    tuned = host.generate(PROMPTS, settings=GREEDY, adapter="tuned")
    assert tuned != before
    assert host.generate(PROMPTS, settings=GREEDY, adapter="tuned2") == tuned
    with pytest.raises(GenerationError, match="not loaded"):
        host.generate(PROMPTS, settings=GREEDY, adapter="nope")
    host.unload_adapter("tuned")
    host.unload_adapter("tuned2")
    assert host.adapter_names() == []
    assert host.generate(PROMPTS, settings=GREEDY) == before
    with pytest.raises(KeyError):
        host.unload_adapter("tuned")


def test_load_adapter_refuses_bad_folders(tiny_host, tiny_adapter, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AdapterError, match="adapter_config.json"):
        tiny_host.load_adapter("x", empty)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((tiny_adapter / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(AdapterError, match="safetensors"):
        tiny_host.load_adapter("x", pickled)
    with pytest.raises(ValueError, match="invalid adapter name"):
        tiny_host.load_adapter("../x", tiny_adapter)
    assert tiny_host.adapter_names() == []


# -- streaming chat ------------------------------------------------------------------------
def test_chat_stream_mixed_adapters_in_one_batch(host_with_adapter):
    host = host_with_adapter
    convs = [[{"role": "user", "content": PROMPTS[0]}],
             [{"role": "user", "content": PROMPTS[1]}],
             [{"role": "user", "content": PROMPTS[0]}]]
    updates = list(host.chat_stream(convs, [None, "tuned", "tuned"], GREEDY))
    assert len(updates) > 1 and all(len(u) == 3 for u in updates)
    final = updates[-1]
    base_alone = host.generate([PROMPTS[0]], settings=GREEDY, adapter=None)[0][0]
    tuned_alone = host.generate([PROMPTS[1]], settings=GREEDY, adapter="tuned")[0][0]
    tuned_same = host.generate([PROMPTS[0]], settings=GREEDY, adapter="tuned")[0][0]
    assert final[0] == base_alone
    assert final[1] == tuned_alone
    assert final[2] == tuned_same
    assert final[0] != final[2]  # same prompt, base row vs adapter row differ


def test_chat_stream_all_base_and_reader_leaving_early(host_with_adapter):
    host = host_with_adapter
    conv = [[{"role": "user", "content": "Hello"}]]
    final = list(host.chat_stream(conv * 2, [None, None], GREEDY))[-1]
    assert final[0] == final[1] == host.generate(["Hello"], settings=GREEDY)[0][0]
    stream = host.chat_stream(conv, ["tuned"], GenSettings(temperature=0, max_new_tokens=200))
    next(stream)
    stream.close()  # the reader goes away: generation stops and the model is free
    assert host.lock.acquire(timeout=30)
    host.lock.release()
    assert not [t for t in threading.enumerate() if t.name == "chat-stream"]


def test_chat_stream_no_adapters_and_errors(tiny_host):
    conv = [{"role": "user", "content": "Hi."}]
    final = list(tiny_host.chat_stream([conv], [None], GREEDY))[-1]
    assert final == [tiny_host.generate(["Hi."], settings=GREEDY)[0][0]]
    with pytest.raises(GenerationError, match="not loaded"):
        list(tiny_host.chat_stream([conv], ["nope"], GREEDY))
    with pytest.raises(ValueError):
        list(tiny_host.chat_stream([conv], [None, None], GREEDY))
    assert BASE == "__base__"


# -- CLI -------------------------------------------------------------------------------------
def _run_cli(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "rpo_app", "generate", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_cli_generate_default_model(linked_data_dir):
    from rpo_app.store import Store

    s = Store(linked_data_dir)
    s.add_prompts(["Say hi.", "Name a fruit.", "Count to three.", "Name a river."], source="test")
    s.close()
    proc = _run_cli("--n", "2", "--limit", "3", "--max-new-tokens", "16",
                    "--data-dir", str(linked_data_dir))
    assert proc.returncode == 0, proc.stderr
    s = Store(linked_data_dir)
    rows = [r for pid in range(1, 5) for r in s.responses_for_prompt(pid)]
    assert len(rows) == 6
    assert {r["model"] for r in rows} == {"SmolLM2-135M-Instruct"}
    assert {r["prompt_id"] for r in rows} == {1, 2, 3}
    assert "generated 6 answers" in proc.stdout


def test_cli_generate_prompts_file_and_adapter(tiny_model_dir, tiny_adapter, data_dir):
    """--prompts FILE with a tiny model and a registered adapter; a rerun tops up only."""
    import shutil

    from rpo_app.store import Store

    (data_dir / "adapters").mkdir()
    shutil.copytree(tiny_adapter, data_dir / "adapters" / "tuned")
    prompts = data_dir.parent / "p.txt"
    prompts.write_text("First prompt\n\nSecond prompt\n")
    args = ["--prompts", str(prompts), "--n", "1", "--max-new-tokens", "4", "--adapter", "tuned",
            "--model", str(tiny_model_dir), "--data-dir", str(data_dir)]
    proc = _run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    s = Store(data_dir)
    texts = {p["text"]: p["id"] for p in s.prompts()}
    assert set(texts) == {"First prompt", "Second prompt"}
    rows = [r for pid in texts.values() for r in s.responses_for_prompt(pid)]
    assert len(rows) == 2 and {r["adapter"] for r in rows} == {"tuned"}
    assert {r["model"] for r in rows} == {str(tiny_model_dir)}
    proc = _run_cli(*args)
    assert proc.returncode == 0 and "nothing to do" in proc.stdout


def test_cli_generate_refuses_bad_adapter(data_dir, capsys):
    from rpo_app.cli import main

    assert main(["generate", "--adapter", "../x", "--data-dir", str(data_dir)]) == 2
    assert main(["generate", "--adapter", "missing", "--data-dir", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "no adapter named 'missing'" in err


def test_top_up_continues_samples_and_counts_per_adapter(store, host_with_adapter):
    """The iterative loop: prompts the base model already answered still get fresh
    answers from the tuned adapter, and a top-up adds only what is missing."""
    from rpo_app.generate import top_up

    ids, _ = store.add_prompts(["Name a fruit.", "Name a colour.", "Name a tool."], "test")
    settings = GenSettings(max_new_tokens=6, seed=3)
    base = top_up(store, host_with_adapter, [(pid, 0) for pid in ids], 2, settings)
    assert base["generated"] == 6
    assert store.prompts_with_fewer_responses(2) == []
    # One prompt already has a tuned answer: it gets one more, the others two.
    adapter = host_with_adapter.adapter_names()[0]
    top_up(store, host_with_adapter, [(ids[0], 0)], 1, settings, adapter=adapter)
    todo = [(r["id"], r["n"]) for r in store.prompts_with_fewer_adapter_responses(2, adapter)]
    assert sorted(todo) == sorted([(ids[0], 1), (ids[1], 0), (ids[2], 0)])
    seen = []
    tuned = top_up(store, host_with_adapter, todo, 2, settings, adapter=adapter,
                   progress=lambda done, total: seen.append((done, total)))
    assert tuned["generated"] == 5 and seen[-1] == (5, 5)
    assert store.response_counts(ids, adapter=adapter) == {pid: 2 for pid in ids}
