"""The first ten minutes (issue 17): answers stored as they end, a small first batch,
the background generation job, the first-run path of the Label tab, run phases with
their own progress, the up-front estimate, and how the app and a run share the cores."""
from __future__ import annotations

import os
import statistics
import threading
import time

import pytest

from rpo_app import cpushare, progress
from rpo_app.generate import (TIMED_ROWS, DecodeSpeed, GenSettings, ModelHost, batch_sizes,
                              generate_candidates)
from rpo_app.genjob import GenerationJobs, GenJobStatus
from rpo_app.runfolder import PHASES, RunFolder

from test_train import main, tiny_args, write_jsonl, make_judgments

_SPEED = DecodeSpeed(((2, 0.058), (8, 0.082)))  # seconds per decoding step at 2 and 8 rows


@pytest.fixture(scope="module")
def tiny_host(tiny_model_dir) -> ModelHost:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return ModelHost.from_loaded(model, AutoTokenizer.from_pretrained(tiny_model_dir), "tiny")


# -- the batch plan and per-row storing ------------------------------------------------------
@pytest.mark.parametrize("n, size, first, want", [
    (24, 32, 2, [2, 8, 14]),
    (70, 32, 2, [2, 8, 32, 28]),
    (5, 32, None, [5]),
    (40, 16, None, [16, 16, 8]),
    (3, 32, 8, [3]),
    (10, 4, 8, [4, 4, 2]),  # a first batch no smaller than a full one changes nothing
    (0, 32, 2, []),
])
def test_batch_sizes(n, size, first, want):
    assert batch_sizes(n, size, first) == want
    assert sum(want) == n


def test_answers_are_stored_one_by_one_and_the_first_batch_is_one_prompt(store, tiny_host):
    ids, _ = store.add_prompts(["Hi.", "Name a colour.", "Tell me about the sea.", "Why?"], "t")
    seen_counts = []
    per_prompt_at_first = {}

    def progress_cb(done, total):
        seen_counts.append(done)
        if done == 2:
            per_prompt_at_first.update(store.response_counts(ids))

    stats = generate_candidates(store, tiny_host, ids, 2, GenSettings(max_new_tokens=6, seed=3),
                                progress=progress_cb, batch_size=8, first_batch=2)
    assert stats["generated"] == 8
    # every answer is counted as it is stored, not per batch
    assert seen_counts == list(range(0, 9))
    # after the first (small) batch one prompt has both answers: a pair to judge
    assert sorted(per_prompt_at_first.values()) == [2]
    assert sum(store.response_counts(ids).values()) == stats["new"]


def test_on_answer_gets_every_row_once_before_its_batch_ends(tiny_host):
    got, steps = [], []
    prompts = ["Hi.", "Name a colour.", "Why?"]
    batches = list(tiny_host.generate_batches(
        prompts, 2, GenSettings(max_new_tokens=5, seed=1), batch_size=4,
        on_answer=got.append, on_step=lambda d, t: steps.append((d, t))))
    flat = [row for batch in batches for row in batch]
    assert sorted(got) == sorted(flat)  # the same rows, texts and token counts
    assert len(got) == 6
    assert steps[-1] == (10, 10)  # 2 batches x 5 steps, ending at the total
    assert all(b[0] >= a[0] for a, b in zip(steps, steps[1:]))  # only forward


def test_answers_record_whether_they_were_cut_at_the_token_limit(store, tiny_host):
    """The store knows which answers hit max_new_tokens before their end-of-turn token."""
    ids, _ = store.add_prompts(["Hi.", "Name a colour."], "t")
    stops = tiny_host.stop_ids
    try:
        tiny_host.stop_ids = set()  # nothing ends: every answer runs to the limit
        generate_candidates(store, tiny_host, ids, 2, GenSettings(max_new_tokens=3, seed=1))
        tiny_host.stop_ids = set(range(tiny_host.base.config.vocab_size))  # every token ends a row
        generate_candidates(store, tiny_host, ids, 1, GenSettings(max_new_tokens=3, seed=2),
                            start_index=2)
    finally:
        tiny_host.stop_ids = stops
    rows = [r for pid in ids for r in store.responses_for_prompt(pid)]
    cut = [r["cut_off"] for r in rows if r["text"]]  # the 3-token answers
    ended = [r["cut_off"] for r in rows if not r["text"]]  # ended at the first token: empty
    assert cut == [1, 1, 1, 1] and ended == [0, 0]


def test_a_cut_answer_is_scored_for_fluency_without_an_ending(tiny_host):
    """ModelHost.answers says which answers hit the limit, and the fluency score (the
    previews' garbled-answer warning, the benchmarks' base logp/token) of a cut answer
    is the mean over its own tokens: the end-of-turn token it never wrote is left out."""
    import torch

    from rpo_app.batches import Encoder, Item
    from rpo_app.scoring import base_token_logps

    stops = tiny_host.stop_ids
    try:
        tiny_host.stop_ids = set()
        settings = GenSettings(max_new_tokens=5, seed=1)
        [[answer]] = tiny_host.answers(["Name a colour."], 1, settings)
        assert tiny_host.generate(["Name a colour."], 1, settings) == [[answer.text]]
    finally:
        tiny_host.stop_ids = stops
    assert answer.cut_off and answer.text
    # Per-token log-probs of the whole ended sequence, from the model directly.
    enc = Encoder(tiny_host.tokenizer, 256, 128)
    seq = enc.encode(Item("Name a colour.", answer.text), 0)
    with torch.no_grad():
        logits = tiny_host.base(torch.tensor([seq.input_ids])).logits[0].float()
    token_logps = logits[:-1].log_softmax(-1).gather(
        -1, torch.tensor(seq.input_ids[1:])[:, None]).squeeze(-1)[seq.prompt_len - 1:]
    assert seq.input_ids[-1] == tiny_host.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def score(cut: bool) -> float:
        return base_token_logps(tiny_host.base, tiny_host.tokenizer, tiny_host.pad_id, "cpu",
                                ["Name a colour."], [answer.text], 256, cut_off=[cut])[0]

    assert score(True) == pytest.approx(token_logps[:-1].mean().item(), abs=1e-4)
    assert score(False) == pytest.approx(token_logps.mean().item(), abs=1e-4)


def test_estimate_follows_the_decode_timing(tiny_host):
    speed = tiny_host.decode_timing()
    assert [rows for rows, _ in speed.points] == list(TIMED_ROWS)
    assert all(sec > 0 for _, sec in speed.points)
    assert tiny_host.decode_timing(measure=False) is speed  # timed once, then kept
    one = tiny_host.estimate_seconds(2, 100, 32)
    assert one == pytest.approx(100 * speed.step_seconds(2))
    assert tiny_host.estimate_seconds(24, 100, 32, first_batch=2) == pytest.approx(
        100 * speed.step_seconds(2) + 100 * speed.step_seconds(8) + 100 * speed.step_seconds(14))


def test_a_caller_during_the_timing_waits_for_it_instead_of_timing_again(tiny_model_dir):
    """The app times the model in the background once it has loaded; a first-run click
    during that timing used to time the model a second time before its first batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    host = ModelHost.from_loaded(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(),
                                 AutoTokenizer.from_pretrained(tiny_model_dir), "tiny")
    real, started, timings = host._time_decoding, threading.Event(), []

    def counted():
        timings.append(threading.current_thread().name)
        started.set()
        time.sleep(0.5)  # the second caller comes while this one is still timing
        return real()

    host._time_decoding = counted
    background = threading.Thread(target=host.decode_timing, name="model-timing")
    background.start()
    assert started.wait(30)
    speed = host.decode_timing()
    background.join(60)
    assert timings == ["model-timing"]
    assert speed is host.decode_timing(measure=False) and speed.points


def test_a_click_during_the_timing_gets_its_first_batch_before_the_timing_ends(store, tiny_model_dir):
    """A first-run click at "model ready" found the app timing the model's decoding (about
    10 s on a 2-core AVX2 CPU) and waited for it: its first pair came 31-32 s after the
    click, against 22 s once the timing was done. The first batch now goes at once; the
    rest waits for the timing, so the ETA, which needs it, comes right after."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    host = ModelHost.from_loaded(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(),
                                 AutoTokenizer.from_pretrained(tiny_model_dir), "tiny")
    host.use_own_thread()  # as the app's: timing and batches take turns on one thread
    real, timing, release = host._time_decoding, threading.Event(), threading.Event()

    def held():  # the app's start-up timing, still running when the click comes
        timing.set()
        assert release.wait(60)
        return real()

    host._time_decoding = held
    background = threading.Thread(target=host.decode_timing, name="model-timing")
    background.start()
    assert timing.wait(30)
    ids, _ = store.add_prompts(["Hi.", "Name a colour.", "Tell me about the sea.", "Why?"], "t")
    jobs = GenerationJobs(store, lambda: host)
    try:
        jobs.start([(i, 0) for i in ids], 2, GenSettings(max_new_tokens=6), first_batch=2)
        deadline = time.time() + 60
        while jobs.status().done < 2 and time.time() < deadline:
            time.sleep(0.05)
        first = jobs.status()
        assert first.done == 2 and sum(store.response_counts(ids).values()) == 2
        assert "measuring the speed" in first.line() and not first.plan
        time.sleep(0.5)  # the tiny model would finish the other 6 answers in far less
        assert jobs.status().done == 2  # the rest waits for the timing
        # a job that is one batch has nothing to wait for
        other, more = GenerationJobs(store, lambda: host), store.add_prompts(["Say yes."], "t")[0]
        other.start([(more[0], 0)], 2, GenSettings(max_new_tokens=6), first_batch=2)
        alone = other.wait(60)
        assert alone.state == "finished" and alone.done == 2 and jobs.status().done == 2
    finally:
        release.set()
        background.join(60)
    st = jobs.wait(60)
    assert st.state == "finished" and st.done == 8
    assert [size for size, _ in st.plan] == [2, 6] and st.estimate_s > 0


def test_decode_speed_between_and_beyond_the_timed_sizes():
    speed = DecodeSpeed(((2, 0.10), (8, 0.16), (32, 0.40)))
    assert speed.step_seconds(2) == pytest.approx(0.10)
    assert speed.step_seconds(1) == pytest.approx(0.10)  # one row: no cheaper than two
    assert speed.step_seconds(5) == pytest.approx(0.13)
    assert speed.step_seconds(20) == pytest.approx(0.28)
    assert speed.step_seconds(64) == pytest.approx(0.72)  # the last slope goes on
    # noise made 32 rows faster than 8: beyond 32 it stays flat, never falls
    assert DecodeSpeed(((2, 0.1), (8, 0.3), (32, 0.25))).step_seconds(64) == pytest.approx(0.25)
    for bad in ((), ((2, 0.1),), ((8, 0.1), (2, 0.2)), ((2, 0.1), (2, 0.2)), ((2, 0.1), (8, 0.0))):
        with pytest.raises(ValueError, match="decode timings"):
            DecodeSpeed(bad)


# -- ETAs never say 0 s while work remains --------------------------------------------------
def test_eta_rule():
    assert progress.eta_seconds(10, 2, 10) == pytest.approx(40)
    assert progress.eta_seconds(10, 0, 10) is None  # no speed to measure yet
    assert progress.eta_seconds(10, 10, 10) is None  # counted all, work may remain
    assert progress.eta_seconds(0, 1, 10) is None
    assert progress.human(12.4) == "12 s" and progress.human(600) == "10 min"
    assert progress.eta_words(0.3) == "ETA 1 s" and progress.eta_words(12.1) == "ETA 13 s"


def test_job_status_line_and_eta():
    st = GenJobStatus(state="running", total=24, done=0, started_at=time.time() - 5, estimate_s=30)
    assert 24 < st.eta_s() <= 25 and "ETA" in st.line()
    st.estimate_s = 3  # the estimate ran out before the first answer
    assert st.eta_s() is None and "measuring" in st.line()
    st.done = 24
    assert st.eta_s() is None and "finishing" in st.line()
    st.done, st.plan = 6, [(6, 7.5)] * 4
    assert st.eta_s() == pytest.approx(15, rel=0.2)
    st.plan = []  # answers but no plan yet (the decoding not timed): no pace to tell
    assert st.eta_s() is None and "measuring" in st.line()


def test_eta_counts_down_between_updates():
    assert progress.eta_between_updates(10, 2, 10, now=10) == pytest.approx(40)
    assert progress.eta_between_updates(10, 2, 10, now=30) == pytest.approx(20)
    assert progress.eta_between_updates(10, 2, 10, now=60) is None  # ran out: "finishing"
    assert progress.eta_between_updates(10, 0, 10, now=10) is None


def test_a_small_first_batch_does_not_inflate_the_eta():
    """The first-run job: 2 answers alone (planned 20 s), then 8 and 22 (planned 40 s and
    80 s). Measured before: an ETA of 3-9 min after the first pair, for 96 s of work left,
    because every answer was taken to cost what the small batch's did, and an answer that
    ended early in a batch was taken as a share of it."""
    now = time.time()
    st = GenJobStatus(state="running", total=32, done=2, started_at=now - 24, updated_at=now,
                      plan=[(2, 20.0), (8, 40.0), (22, 80.0)])
    assert st.work(2) == 20 and st.work(6) == 20 and st.work(10) == 60 and st.work(32) == 140
    assert st.eta_s() == pytest.approx(24 / 20 * 120, rel=0.02)  # 144 s, not 24/2*30 = 360
    st.done = 6  # answers ending early in the second batch change nothing
    assert st.eta_s() == pytest.approx(144, rel=0.02)
    st.started_at, st.updated_at = now - 124, now - 100  # 100 s later: counted down
    assert st.eta_s() == pytest.approx(44, rel=0.05)
    st.started_at, st.updated_at = now - 224, now - 200  # the second batch is late
    assert st.eta_s() is None and "slower than measured" in st.line()
    st.done, st.updated_at = 10, now  # it ended at 224 s: 60 planned s took 224
    assert st.eta_s() == pytest.approx(224 / 60 * 80, rel=0.02)
    assert "ETA" in st.line()


def test_generation_job_runs_in_the_background_one_at_a_time(store, tiny_host):
    ids, _ = store.add_prompts(["Hi.", "Name a colour."], "t")
    gate = threading.Event()
    real = tiny_host.generate_batches

    def slow(*args, **kwargs):  # hold the job until the test has looked at it
        gate.wait(30)
        yield from real(*args, **kwargs)

    jobs = GenerationJobs(store, lambda: tiny_host)
    tiny_host.generate_batches = slow
    try:
        st = jobs.start([(i, 0) for i in ids], 2, GenSettings(max_new_tokens=4))
        assert st.running and st.total == 4
        with pytest.raises(RuntimeError, match="already being generated"):
            jobs.start([(i, 0) for i in ids], 2, GenSettings(max_new_tokens=4))
        gate.set()
        st = jobs.wait(60)
    finally:
        del tiny_host.generate_batches
    assert st.state == "finished" and st.done == 4 and st.new + st.duplicates == 4
    assert "new answers" in st.line()


def test_generation_job_failure_is_reported_and_keeps_what_was_stored(store):
    ids, _ = store.add_prompts(["Hi."], "t")

    def no_model():
        raise RuntimeError("model failed to load: out of memory")

    jobs = GenerationJobs(store, no_model)
    jobs.start([(ids[0], 0)], 2, GenSettings())
    st = jobs.wait(30)
    assert st.state == "failed" and "out of memory" in st.error
    assert st.line().startswith("⚠ Generation failed") and not st.running
    jobs.start([(ids[0], 0)], 2, GenSettings())  # a failed job does not block the next one
    assert jobs.wait(30).state == "failed"


# -- phases ---------------------------------------------------------------------------------
def test_phases_record_their_own_time_and_order(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.update_status(state="running")
    run.begin_phase("loading the model")
    run.begin_phase("scoring the answers with the base model", total=1000, unit="tokens")
    run.phase_progress(250, force=True)
    st = run.status()
    assert st.phase_done == 250 and st.phase_total == 1000 and st.phase_unit == "tokens"
    assert st.phase_eta_s() is not None and st.phase_eta_s() >= 0
    run.begin_phase("training", total=10, unit="steps")
    run.update_status(step=3, max_steps=10, eta_s=70.0)
    assert run.status().phase_eta_s() == 70.0  # the steps' own timing
    with pytest.raises(ValueError, match="unknown phase"):
        run.begin_phase("thinking")
    st = run.end_phases(state="finished")
    assert [p["phase"] for p in st.phases] == ["loading the model",
                                               "scoring the answers with the base model", "training"]
    assert st.phase is None and all(p["seconds"] >= 0 for p in st.phases)
    # the phase that counted tokens keeps them, so a later estimate reads its speed; the
    # steps count across the training phase's pieces, so they are not kept
    assert [(p.get("work"), p.get("unit")) for p in st.phases] == [(None, None), (1000, "tokens"),
                                                                    (None, None)]
    ref = st.phases[1]
    assert st.phase_rates() == {ref["phase"]: pytest.approx(ref["seconds"] / 1000)}


@pytest.mark.slow
def test_a_run_reports_every_phase_in_order(tmp_path, tiny_model_dir, data_dir):
    judgments = write_jsonl(tmp_path / "j.jsonl", make_judgments())
    out = tmp_path / "run"
    seen = []
    real = RunFolder.update_status

    def spy(self, **fields):  # every status write the trainer makes, as the UI would poll it
        st = real(self, **fields)
        if not seen or seen[-1] != st.phase:
            seen.append(st.phase)
        return st

    RunFolder.update_status = spy
    try:
        assert main(tiny_args(out, judgments, tiny_model_dir, data_dir, **{
            "max-steps": 4, "eval-every": 2, "sample-every": 2, "preview-count": 1,
            "early-stop-patience": 0})) == 0
    finally:
        RunFolder.update_status = real
    st = RunFolder(out, writable=False).status()
    names = [p["phase"] for p in st.phases]
    assert names == ["loading the model", "scoring the answers with the base model",
                     "the base model's previews", "training", "evaluating", "training", "previews",
                     "training", "evaluating", "checking the labels", "the final previews",
                     "saving the adapter"]
    assert [p for p in seen if p] == names  # the status line named each one while it ran
    assert set(names) <= set(PHASES)
    assert st.state == "finished" and st.phase is None


def test_estimate_covers_every_phase():
    from rpo_app.runestimate import STEP_FORWARDS, estimate_phases, run_shape
    from rpo_app.trainconfig import TrainConfig

    cfg = TrainConfig()  # the defaults: 60 steps, eval every 20, previews every 50
    shape = run_shape(cfg, n_examples=80, train_seqs=160, eval_seqs=4, mean_tokens=170,
                      preview_count=2, embeds=True)
    assert shape.steps == 60 and shape.evals == 3 and shape.mid_previews == 1
    phases = estimate_phases(shape, forward_s_per_token=0.002, decode_timing=_SPEED,
                             past={"loading the model": 9.0})
    assert list(phases) == list(PHASES)  # every phase, in run order
    assert phases["loading the model"] == 9.0
    assert phases["training"] == pytest.approx(60 * STEP_FORWARDS["fp32"] * 0.002 * 16 * 170)
    assert phases["previews"] == pytest.approx(phases["the final previews"])
    # the label check scores the training answers; the last evaluation scored the held-out ones
    assert phases["checking the labels"] == pytest.approx(0.002 * 160 * 170)
    unevaluated = run_shape(cfg, 80, 164, 0, 170, 2, embeds=True)
    assert estimate_phases(unevaluated, 0.002, _SPEED)["checking the labels"] == pytest.approx(0.002 * 164 * 170)
    # bf16 autocast: its backward gains less than its forward, so more forwards per step
    bf16 = estimate_phases(shape, 0.002, _SPEED, precision="bf16")
    assert STEP_FORWARDS["bf16"] > STEP_FORWARDS["fp32"]
    assert bf16["training"] == pytest.approx(60 * STEP_FORWARDS["bf16"] * 0.002 * 16 * 170)
    # a step speed measured by an earlier run here wins over the forward-pass rule
    measured = estimate_phases(shape, 0.002, _SPEED, step_s_per_token=0.004)
    assert measured["training"] == pytest.approx(60 * 0.004 * 16 * 170)
    # gradient checkpointing: its measured step factor, whichever way the speed was taken
    from rpo_app.runestimate import CHECKPOINTING_STEP_FACTOR as F

    saving = run_shape(TrainConfig(gradient_checkpointing=True), 80, 160, 4, 170, 2, embeds=True)
    assert estimate_phases(saving, 0.002, _SPEED)["training"] == pytest.approx(
        F * 60 * 2.5 * 0.002 * 16 * 170)
    assert estimate_phases(saving, 0.002, _SPEED, step_s_per_token=0.004,
                           measured_with_checkpointing=True)["training"] == pytest.approx(measured["training"])
    assert estimate_phases(shape, 0.002, _SPEED, step_s_per_token=0.004,
                           measured_with_checkpointing=True)["training"] == pytest.approx(
        measured["training"] / F)
    # LoRA on the top 8 of 30 layers: the steps, the evaluation and the label check run
    # those layers only; a speed measured by such a run counts for an every-layer one
    from rpo_app.runestimate import FIXED_STEP_SHARE, step_share

    top = run_shape(TrainConfig(lora_layers=8), 80, 160, 4, 170, 2, embeds=True, n_layers=30)
    share = FIXED_STEP_SHARE + (1 - FIXED_STEP_SHARE) * 8 / 30
    assert top.step_share == pytest.approx(share) == step_share(30, 8)
    assert step_share(30, 0) == step_share(30, 30) == 1.0
    fast = estimate_phases(top, 0.002, _SPEED)
    assert fast["training"] == pytest.approx(share * phases["training"])
    assert fast["checking the labels"] == pytest.approx(share * phases["checking the labels"])
    assert fast["scoring the answers with the base model"] == phases["scoring the answers with the base model"]
    assert estimate_phases(shape, 0.002, _SPEED, step_s_per_token=share * 0.004,
                           measured_step_share=share)["training"] == pytest.approx(measured["training"])
    no_eval = run_shape(cfg, 80, 160, 0, 170, 2, embeds=False)
    assert no_eval.evals == 0 and "embedding the prompts" not in estimate_phases(
        no_eval, 0.002, _SPEED)
    # a small label set: the small-set schedule (rpo_app.trainconfig), in its smaller batches
    small = TrainConfig()
    small.batch_size = small.small_set_batch  # as check_data sets it
    shape = run_shape(small, 30, 60, 4, 170, 2, embeds=True)
    assert shape.steps == small.small_set_steps and shape.batch_size == small.small_set_batch
    # no label check asked for: no such phase
    no_check = run_shape(TrainConfig(check_labels=False), 80, 160, 4, 170, 2, embeds=True)
    assert "checking the labels" not in estimate_phases(no_check, 0.002, _SPEED)



def test_the_train_tabs_estimate_reads_the_data_and_the_loaded_models_timings(tiny_model_dir):
    """runestimate.estimate_run, what the Train tab and the first-run benchmark quote: the
    run's shape from the judgments themselves (check_data's split and small-set batch), the
    phases from the app model's timings, the previews at the app's own decoding speed."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rpo_app.batches import Encoder, build_data
    from rpo_app.runestimate import estimate_run
    from rpo_app.trainconfig import TrainConfig, check_data, resolve_for_model

    host = SimpleNamespace(device="cpu", model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir),
                           decode_timing=lambda: _SPEED, seconds_per_token=lambda precision: 0.002)
    cfg = resolve_for_model(TrainConfig(), n_layers=2)
    judgments = [j for j in make_judgments() if j["kind"] == "paired" and j["verdict"] in ("a", "b")]
    train_j, eval_j = check_data(cfg, judgments, world_size=1)
    est = estimate_run(host, cfg, train_j, eval_j, n_examples=len(train_j))
    assert est.shape.steps == cfg.small_set_steps and est.shape.batch_size == cfg.small_set_batch
    assert list(est.phases) == [p for p in PHASES if p in est.phases] and est.total == sum(est.phases.values())
    previews = est.shape.preview_count
    assert previews == min(cfg.preview_count, len({j["prompt_a_text"] for j in eval_j or train_j}))
    # no factor for LoRA: its add runs inside the matrix product (rpo_app.lora_fused)
    assert est.phases["the final previews"] == pytest.approx(
        cfg.sample_max_new_tokens * _SPEED.step_seconds(previews))
    scored = est.phases["scoring the answers with the base model"]
    assert scored == pytest.approx(0.002 * 2 * (len(train_j) + len(eval_j)) * est.shape.mean_tokens)
    assert not est.memory.checkpointing and est.memory.need_gb < est.memory.free_gb
    # the sequences as the trainer tokenizes them: the chat template's system turn included
    data = build_data(train_j, Encoder(host.tokenizer, cfg.max_length, cfg.max_prompt_length), cfg.loss)
    assert est.shape.mean_tokens == pytest.approx(statistics.fmean(len(q) for q in data.seqs))
    # after a run here: the phases that counted tokens at that run's own speed
    rates = {"scoring the answers with the base model": 0.005, "checking the labels": 0.001}
    again = estimate_run(host, cfg, train_j, eval_j, len(train_j),
                         {"past": {}, "rates": rates, "lora_layers": cfg.lora_layers})
    tokens = 2 * (len(train_j) + len(eval_j)) * est.shape.mean_tokens
    assert again.phases["scoring the answers with the base model"] == pytest.approx(0.005 * tokens)
    # the label check scores the training answers; the final evaluation, the held-out ones
    checked = 2 * (len(train_j) + (0 if est.shape.evals else len(eval_j))) * est.shape.mean_tokens
    assert again.phases["checking the labels"] == pytest.approx(0.001 * checked)
    assert again.phases["evaluating"] == pytest.approx(est.phases["evaluating"])  # not measured then

# -- sharing the cores ---------------------------------------------------------------------------
@pytest.mark.parametrize("cores, app_idle_run, app_busy_run, app_with_run, app_alone", [
    (2, 2, 1, 1, 2), (4, 4, 3, 1, 4), (16, 16, 12, 4, 16), (1, 1, 1, 1, 1)])
def test_core_split(cores, app_idle_run, app_busy_run, app_with_run, app_alone):
    assert cpushare.run_threads(cores, app_busy=False) == app_idle_run
    assert cpushare.run_threads(cores, app_busy=True) == app_busy_run
    assert cpushare.app_threads(cores, run_active=True) == app_with_run
    assert cpushare.app_threads(cores, run_active=False) == app_alone
    if cores > 1:  # together they never ask for more threads than cores
        assert app_with_run + app_busy_run <= cores


def test_app_marker_and_run_threads(tmp_path):
    import torch

    active = {"run": True}
    app = cpushare.AppShare(tmp_path, run_active=lambda: active["run"], cores=4)
    run = cpushare.RunShare(tmp_path, cores=4)
    before = torch.get_num_threads()
    try:
        assert run.adjust() == 4
        inside = {}

        def compute():  # the app computes in its own thread, as Gradio's workers do
            with app.busy() as n:
                with app.busy():
                    inside["threads"], inside["torch"] = n, torch.get_num_threads()
                inside["marker_after_inner"] = app.marker.exists()
                inside["run"] = run.adjust()

        t = threading.Thread(target=compute)
        t.start()
        t.join()
        assert inside == {"threads": 1, "torch": 1, "marker_after_inner": True, "run": 3}
        assert not app.marker.exists()  # the last user left
        assert run.adjust() == 4
        active["run"] = False
        assert app.threads() == 4
        assert cpushare.RunShare(tmp_path, fixed=2, cores=4).adjust() == 2  # --cpu-threads wins
    finally:
        torch.set_num_threads(before)


def test_a_marker_left_by_an_app_that_is_gone_counts_for_nothing(tmp_path):
    """An app stopped in the middle of a job leaves its marker: a later run in the data
    dir keeps every core, and the next app clears it. A marker without a process id (an
    older app's) still counts."""
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    marker = cpushare.marker_path(tmp_path)
    marker.write_text(str(gone.pid))
    assert not cpushare.app_busy(marker)
    assert cpushare.RunShare(tmp_path, cores=4).adjust() == 4
    marker.write_text(str(os.getpid()))
    assert cpushare.app_busy(marker)
    assert cpushare.RunShare(tmp_path, cores=4).adjust() == 3
    marker.write_text("")
    assert cpushare.app_busy(marker)
    marker.write_text(str(gone.pid))
    app = cpushare.AppShare(tmp_path, run_active=lambda: False, cores=4)
    assert not marker.exists()
    with app.busy():
        assert marker.read_text() == str(os.getpid())


def test_long_work_takes_the_share_as_it_is_now(tmp_path, monkeypatch):
    """A run that starts while the app is in the middle of long work (a batch of answers)
    gets its share at once from the marker, and the app drops to its own share at its
    next step (rebalance), not when the work ends; when the run ends it takes the cores
    back. rebalance does nothing outside busy() and looks at most every REBALANCE_EVERY_S."""
    import torch

    monkeypatch.setattr(cpushare, "REBALANCE_EVERY_S", 0.0)
    active = {"run": False}
    app = cpushare.AppShare(tmp_path, run_active=lambda: active["run"], cores=4)
    run = cpushare.RunShare(tmp_path, cores=4)
    seen = {}

    def work():
        with app.busy():
            seen["start"] = torch.get_num_threads()
            active["run"] = True
            seen["run"] = run.adjust()
            app.rebalance()
            seen["run started"] = torch.get_num_threads()
            active["run"] = False
            app.rebalance()
            seen["run ended"] = torch.get_num_threads()
            monkeypatch.setattr(cpushare, "REBALANCE_EVERY_S", 3600.0)
            active["run"] = True
            app.rebalance()
            seen["looked just now"] = torch.get_num_threads()
        app.rebalance()
        seen["outside"] = torch.get_num_threads()

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen == {"start": 4, "run": 3, "run started": 1, "run ended": 4, "looked just now": 4,
                    "outside": 4}


def test_a_run_follows_the_app_inside_its_previews(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    """A preview decodes for seconds: an app that starts computing in the middle of one
    gets its share within half a second, and the run takes the cores back when the app is
    done, both before the preview ends (it once looked only before each step)."""
    import torch

    monkeypatch.setattr(cpushare, "REBALANCE_EVERY_S", 0.0)
    monkeypatch.setattr(cpushare, "available_cores", lambda: 4)
    judgments = write_jsonl(tmp_path / "j.jsonl", make_judgments())
    argv = tiny_args(tmp_path / "run", judgments, tiny_model_dir, data_dir, **{
        "max-steps": 2, "preview-count": 1, "sample-max-new-tokens": 12})
    at = argv.index("--cpu-threads")
    del argv[at:at + 2]  # the run's threads follow the share
    marker = cpushare.marker_path(data_dir)
    threads: list[int] = []  # at each decoding step of the base model's previews
    real = RunFolder.phase_progress

    def spy(self, done, total=None, force=False):
        if self.status().phase == "the base model's previews":
            threads.append(torch.get_num_threads())
            if len(threads) == 3:
                marker.write_text(str(os.getpid()))  # the app starts computing
            elif len(threads) == 6:
                marker.unlink()  # and stops
        return real(self, done, total, force)

    monkeypatch.setattr(RunFolder, "phase_progress", spy)
    before = torch.get_num_threads()
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(before)
        marker.unlink(missing_ok=True)
    assert len(threads) >= 8, threads
    assert threads[:3] == [4, 4, 4] and threads[3:6] == [3, 3, 3] and threads[6] == 4, threads


def test_timings_hold_the_share_and_are_not_kept_beside_a_run(tmp_path, tiny_model_dir):
    """The Train tab's forward timing once computed without the marker: a run started
    during it kept every core beside the app's threads. A timing taken while a run trains
    measures the share, so it is given to its caller but not kept; the next one, alone, is."""
    import contextlib

    from transformers import AutoModelForCausalLM, AutoTokenizer

    host = ModelHost.from_loaded(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(),
                                 AutoTokenizer.from_pretrained(tiny_model_dir), "tiny")
    active = {"run": True}
    app = cpushare.AppShare(tmp_path, run_active=lambda: active["run"])
    marked = []
    real_busy = app.busy

    @contextlib.contextmanager
    def busy():
        with real_busy() as n:
            marked.append(app.marker.exists())
            yield n

    app.busy = busy
    host.share = app
    assert host.seconds_per_token("fp32") > 0
    assert host.decode_timing() is not None
    assert marked and all(marked)
    assert "fp32" not in host.__dict__.get("_seconds_per_token", {})
    assert host.decode_timing(measure=False) is None
    active["run"] = False
    kept = host.seconds_per_token("fp32")
    assert host._seconds_per_token["fp32"] == kept
    speed = host.decode_timing()
    assert host.decode_timing(measure=False) is speed
    assert not app.marker.exists()


def test_the_app_host_computes_inside_the_share(tmp_path, tiny_host):
    calls = []
    app = cpushare.AppShare(tmp_path, run_active=lambda: False, cores=cpushare.available_cores())

    real_busy = app.busy

    def busy():
        calls.append(app.marker)
        return real_busy()

    app.busy = busy
    saved, tiny_host.share = tiny_host.share, app
    try:
        tiny_host.generate(["Hi."], 1, GenSettings(temperature=0, max_new_tokens=2))
    finally:
        tiny_host.share = saved
    assert calls and not app.marker.exists()
