"""Training runs as child processes: stop keeps a loadable checkpoint; a killed run is
reported as failed (not "running" forever) and resumes to the end."""
from __future__ import annotations

import os
import signal
import time

import pytest

from apptools import seed_store
from rpo_app.config import DataLayout
from rpo_app.runs import RunManager
from rpo_app.store import Store
from rpo_app.trainconfig import TrainConfig

pytestmark = pytest.mark.slow


@pytest.fixture
def manager(data_dir):
    seeded = seed_store(data_dir, n_prompts=8, answers_per_prompt=2)
    store = Store(data_dir)
    for pid in seeded["prompts"]:
        a, b = seeded["responses"][pid]
        store.add_judgment("paired", a, b, "a", "tester")
    yield RunManager(store, DataLayout(data_dir)), store
    store.close()


def _config(tiny_model_dir, steps: int) -> TrainConfig:
    return TrainConfig(loss="rpo-paired", model=str(tiny_model_dir), max_steps=steps,
                       batch_size=2, max_length=64, max_prompt_length=32, save_every=1,
                       eval_every=0, sample_every=0, sample_max_new_tokens=8,
                       preview_prompts=["Say hi."], eval_fraction=0.0, early_stop_patience=0)


def _wait_step(manager, run_id, step, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = manager.status(run_id)
        assert st.state in ("queued", "running"), st
        if st.step >= step and st.state == "running":
            return st
        time.sleep(0.3)
    raise TimeoutError(f"run never reached step {step}: {manager.log_tail(run_id)}")


def test_stop_keeps_a_loadable_checkpoint(manager, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    runs, store = manager
    run_id = runs.start(_config(tiny_model_dir, steps=2000))
    _wait_step(runs, run_id, 2)
    assert runs.stop(run_id)
    st = runs.wait(run_id, timeout=120)
    assert st.state == "stopped", runs.log_tail(run_id)
    assert store.run(run_id)["state"] == "stopped"
    ckpts = sorted((runs.layout.run_dir(run_id) / "checkpoints").iterdir())
    assert ckpts and all(not p.name.endswith(".tmp") for p in ckpts)
    last = max(ckpts, key=lambda p: int(p.name.split("-")[1]))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, last / "adapter")
    assert any("lora" in name for name, _ in model.named_parameters())


def test_killed_run_is_failed_then_resumes(manager, tiny_model_dir, data_dir):
    runs, store = manager
    # Long enough that it cannot end between the poll that sees step 2 and the kill: with
    # 6 steps, a loaded CI machine once saw the run finished before it could kill it.
    steps = 40
    run_id = runs.start(_config(tiny_model_dir, steps=steps))
    st = _wait_step(runs, run_id, 2)
    os.kill(st.pid or store.run(run_id)["pid"], signal.SIGKILL)
    # wait() returns once the watcher has recorded the end in the store too; status.json
    # alone turns "failed" a moment before the store's row does.
    st = runs.wait(run_id, timeout=30)
    assert st.state == "failed" and "died" in st.error
    assert store.run(run_id)["state"] == "failed"
    run_dir = runs.layout.run_dir(run_id)
    runs.resume(run_id)
    st = runs.wait(run_id, timeout=600)
    assert st.state == "finished" and st.step == steps, runs.log_tail(run_id)
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    # A finished run's adapter is registered for chat and generation.
    assert store.adapter_for_run(run_id) is not None


def test_finished_run_registers_its_adapter_with_nobody_watching(manager, tiny_model_dir):
    """Registration happens when the run ends, not when something polls its status,
    and the link is the run id: a renamed adapter stays the run's."""
    from rpo_app import adapters

    runs, store = manager
    run_id = runs.start(_config(tiny_model_dir, steps=2))
    deadline = time.time() + 300
    while store.adapter_for_run(run_id) is None:  # only the store: no status() call
        assert time.time() < deadline, runs.log_tail(run_id)
        time.sleep(0.5)
    assert store.run(run_id)["state"] == "finished"
    assert store.run(run_id)["final_metrics"]["loss"] > 0
    adapters.rename(store, runs.layout, store.adapter_for_run(run_id)["name"], "my-tuned")
    assert store.adapter_for_run(run_id)["name"] == "my-tuned"
    assert [r["adapter"] for r in runs.runs() if r["id"] == run_id] == ["my-tuned"]
    # A second look (an app restart) does not register it again under the run's name.
    RunManager(store, runs.layout).reattach()
    assert store.adapter(run_id) is None and [a["name"] for a in store.adapters()] == ["my-tuned"]
    runs.delete(run_id)
    assert store.adapters() == [] and not runs.layout.adapter_dir("my-tuned").exists()
