"""`python -m rpo_app bench --only first-run`: the first minutes of a new user, timed.

From an empty data dir (the seed prompts, no answers), with the app's own parts:

1. load the bundled model and start timing its decoding in the background (what the
   first-run estimate needs), as the app does once its model has loaded;
2. at once, as a newcomer who clicks when the model line says ready, the Label tab's
   first-run job (`genjob.GenerationJobs`, first batch one prompt's answers): seconds
   until the label queue has a first pair, and until 32 answers exist;
3. 32 more answers for 16 more prompts, then 32 pairs judged through the label queue by
   a simulated annotator (the `concise` judge) exactly as a person would see them;
4. a default training run over those 32 pairs (`python -m rpo_app train` with the
   Train tab's defaults, in a child process as the app starts it), each phase timed from
   its run folder (`RunStatus.phases`), beside the Train tab's up-front estimate of each
   (`runestimate.estimate_run`, on this data dir before any run: typical figures for
   loading and saving).

`--quick` trains 4 steps instead of the default run's (40 for a label set this small).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def _first_pair(queue) -> bool:
    item = queue.next_item("bench-probe", "paired")
    if item is None:
        return False
    queue.skip(item.token, "bench-probe")  # only looking: the probe judges nothing
    return True


def _wait(jobs):
    """Until the generation job ends, its line on the terminal every few seconds."""
    while True:
        st = jobs.wait(timeout=5)
        if not st.running:
            return st
        print(st.line(), file=sys.stderr, flush=True)


def run_benchmark(data_dir: Path, quick: bool = False) -> dict:
    """The first minutes in a fresh data dir of its own, removed at the end (its store,
    answers and run folder came to about 50 MB a run, left in the temp dir)."""
    work = Path(tempfile.mkdtemp(prefix="bench-first-run-"))
    try:
        return _run_in(work, data_dir, quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the model is a symlink: its target stays


def _run_in(work: Path, data_dir: Path, quick: bool) -> dict:
    from rpo_app import io, judges
    from rpo_app.generate import GenSettings, ModelHost, backlog
    from rpo_app.genjob import FIRST_RUN_ANSWERS, FIRST_RUN_PROMPTS, GenerationJobs
    from rpo_app.labelqueue import LabelQueue
    from rpo_app.models import link_model_cache
    from rpo_app.runfolder import RunFolder
    from rpo_app.store import Store

    # The converted default model of the data dir (or of the tests' cache) is reused.
    link_model_cache(data_dir if (Path(data_dir) / "models").exists() else REPO / "tests" / ".cache",
                     work)
    store = Store(work)
    io.seed_if_empty(store)
    queue = LabelQueue(store)
    out: dict = {"first_run_prompts": FIRST_RUN_PROMPTS, "answers_per_prompt": FIRST_RUN_ANSWERS}

    t0 = time.perf_counter()
    host = ModelHost(None, work)
    # As the app's host (ui.context): the timing here and the job's decoding below on one
    # thread. Timed on this thread and decoded on the job's, every decode step waited
    # passively and ran 1.7x slower than the estimate (cpushare).
    host.use_own_thread()
    out["load_model_s"] = round(time.perf_counter() - t0, 2)
    timed: dict = {}

    def time_decoding() -> None:  # the app's start-up timing (ui.context)
        host.decode_timing()
        timed["timing_ended"] = time.perf_counter()

    timing = threading.Thread(target=time_decoding, name="model-timing")
    timing.start()
    settings = GenSettings()
    jobs = GenerationJobs(store, lambda h=host: h)
    todo = backlog(store, FIRST_RUN_ANSWERS, FIRST_RUN_PROMPTS)
    click = time.perf_counter()
    jobs.start(todo, FIRST_RUN_ANSWERS, settings, first_batch=FIRST_RUN_ANSWERS)
    while not _first_pair(queue):
        if not jobs.status().running:
            raise RuntimeError(f"generation ended without a pair: {jobs.status().line()}")
        time.sleep(0.2)
    out["click_to_first_pair_s"] = round(time.perf_counter() - click, 1)
    st = _wait(jobs)
    if st.state != "finished":
        raise RuntimeError(st.line())
    out["click_to_all_answers_s"] = round(time.perf_counter() - click, 1)
    out["answers"] = st.new
    timing.join()
    # The timing takes turns with the job's first batch on the model's thread.
    out["click_to_timing_ended_s"] = round(timed["timing_ended"] - click, 1)
    # What the Label tab quotes once the timing is done (a click made after it waits for
    # nothing: its first pair comes in about the first estimate).
    n_answers = FIRST_RUN_PROMPTS * FIRST_RUN_ANSWERS
    out["estimate_first_pair_s"] = round(host.estimate_seconds(FIRST_RUN_ANSWERS, settings.max_new_tokens), 1)
    out["estimate_all_s"] = round(host.estimate_seconds(n_answers, settings.max_new_tokens,
                                                        first_batch=FIRST_RUN_ANSWERS), 1)

    # 16 more prompts, then 32 pairs judged through the queue
    todo = backlog(store, FIRST_RUN_ANSWERS, FIRST_RUN_PROMPTS)
    jobs.start(todo, FIRST_RUN_ANSWERS, settings, first_batch=None)
    _wait(jobs)
    judged = 0
    while judged < 32:
        item = queue.next_item("bench-annotator", "paired")
        if item is None:
            break
        left = judges.concise(item.left["prompt"], item.left["text"])
        right = judges.concise(item.right["prompt"], item.right["text"])
        queue.submit(item.token, "left" if left >= right else "right", "bench-annotator")
        judged += 1
    out["pairs_judged"] = judged
    estimate = _train_tab_estimate(host, store, max_steps=4 if quick else None)
    out["estimate_run_s"] = round(estimate.total, 1)
    out["estimate_phases_s"] = {k: round(v, 1) for k, v in estimate.phases.items()}
    jobs = host = None  # the run's child loads its own model, as the app's would

    run_dir = work / "runs" / "bench-default"
    cmd = [sys.executable, "-m", "rpo_app", "train", "--out", str(run_dir), "--data-dir", str(work)]
    if quick:
        cmd += ["--max-steps", "4"]
    t2 = time.perf_counter()
    # The trainer's own log and step bar go to the terminal: its phases show as it runs.
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL)
    out["run_wall_s"] = round(time.perf_counter() - t2, 1)
    status = RunFolder(run_dir, writable=False).status()
    if proc.returncode or status.state != "finished":
        raise RuntimeError(f"training failed ({status.state}): {status.error or 'see ' + str(run_dir / 'train.log')}")
    phases = status.phase_seconds()
    out["run_phases_s"] = {k: round(v, 1) for k, v in phases.items()}
    out["run_steps"] = status.step
    out["run_in_phases_s"] = round(sum(phases.values()), 1)
    out["run_outside_phases_s"] = round(out["run_wall_s"] - out["run_in_phases_s"], 1)  # imports
    train = phases.get("training", 0.0)
    out["previews_share_of_run"] = round(
        sum(phases.get(k, 0.0) for k in ("the base model's previews", "previews", "the final previews"))
        / out["run_wall_s"], 3)
    out["seconds_per_step"] = round(train / max(status.step, 1), 2)
    out["run_peak_memory_gb"] = round(status.peak_memory_gb or 0.0, 2)
    out["run_gradient_checkpointing"] = bool(status.gradient_checkpointing)
    return out


def _train_tab_estimate(host, store, max_steps: int | None):
    """What the Train tab quotes up front for the run below over the store's judgments
    (runestimate.estimate_run), on a data dir with no finished run yet."""
    from rpo_app import lineage
    from rpo_app.batches import count_examples
    from rpo_app.frozen_prefix import decoder_layers
    from rpo_app.runestimate import estimate_run
    from rpo_app.trainconfig import TrainConfig, check_data, resolve_for_model

    cfg = resolve_for_model(TrainConfig(max_steps=max_steps), decoder_layers(host.model.config))
    judgments, _ = lineage.from_store(cfg, store)
    train_j, eval_j = check_data(cfg, judgments, world_size=1)
    return estimate_run(host, cfg, train_j, eval_j, max(count_examples(train_j, cfg.loss)))


def format_table(result: dict) -> str:
    rows = [("click at 'model ready' → first pair labelable", result["click_to_first_pair_s"],
             f"estimated {result['estimate_first_pair_s']}; the start-up decode timing "
             f"ended {result['click_to_timing_ended_s']} s after the click"),
            (f"click → all {result['answers']} first answers", result["click_to_all_answers_s"],
             f"estimated {result['estimate_all_s']}"),
            (f"default run over {result['pairs_judged']} pairs, wall", result["run_wall_s"],
             f"{result['run_steps']} steps, {result['seconds_per_step']} s/step, peak memory "
             f"{result.get('run_peak_memory_gb', 0):.1f} GB"
             + (", gradient checkpointing switched on" if result.get("run_gradient_checkpointing") else "")
             + f"; the Train tab estimated {result.get('estimate_run_s')}")]
    quoted = result.get("estimate_phases_s", {})
    rows += [(f"  {name}", sec, f"estimated {quoted[name]}" if name in quoted else "")
             for name, sec in result["run_phases_s"].items()]
    rows.append(("  starting the process (imports)", result["run_outside_phases_s"],
                 "estimated with loading the model"))
    lines = ["| step | seconds | note |", "| --- | ---: | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines.append(f"\npreviews are {100 * result['previews_share_of_run']:.1f}% of the run")
    return "\n".join(lines)


def main(data_dir: Path, out: Path, quick: bool) -> dict:
    result = run_benchmark(data_dir, quick)
    (out / "first_run.json").write_text(json.dumps(result, indent=1))
    print(format_table(result))
    return result
