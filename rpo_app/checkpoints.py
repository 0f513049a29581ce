"""Checkpoints of a training run and the RNG state that makes a resume continue exactly.

``checkpoints/step-N/`` holds the adapter, the optimizer and scheduler state, one RNG
file per process and trainer_state.json (step, elapsed time, world size, early-stopping
numbers), plus the early-stopping adapter when there is one. It is built as
``step-N.tmp`` and renamed, so a step-N folder is always complete.
"""
from __future__ import annotations

import json
import logging
import os
import shutil

from rpo_app.runfolder import RunFolder

log = logging.getLogger("rpo_app.train")


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) RNG state as plain lists and tensors, so that
    loading needs no unpickling of arbitrary objects (weights_only=True)."""
    import random

    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run: RunFolder, accelerator, model, optimizer, scheduler, *, step: int, grad_accum: int,
         elapsed_s: float, early, keep: int) -> None:
    """Write checkpoints/step-<step> (all processes call this together)."""
    import torch

    final = run.checkpoints / f"step-{step}"
    tmp = run.checkpoints / f"step-{step}.tmp"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    tmp.mkdir(parents=True, exist_ok=True)  # other nodes may not share this disk
    torch.save(rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if main:
        accelerator.unwrap_model(model).save_pretrained(tmp / "adapter")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        state = {"step": step, "micro_batch": step * grad_accum, "elapsed_s": elapsed_s,
                 "world_size": accelerator.num_processes, "best": early.numbers()}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        if early.adapter_state is not None:
            torch.save(early.adapter_state, tmp / "best_adapter_state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in run.checkpoint_dirs()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint saved: %s", final)
    accelerator.wait_for_everyone()


def load_latest(run: RunFolder, accelerator, model, optimizer, scheduler, early) -> dict | None:
    """Restore the newest complete checkpoint into the given objects; returns its
    trainer_state (step, elapsed_s, ...) or None when there is none."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    found = RunFolder(run.root, writable=False).checkpoint_dirs()
    if not found:
        return None
    _, path = found[-1]
    state = json.loads((path / "trainer_state.json").read_text())
    world = accelerator.num_processes
    if state.get("world_size", 1) != world:
        log.warning("resuming a %d-process run on %d processes: the batch size per process and thus the "
                    "global batch differ", state.get("world_size", 1), world)
    net = accelerator.unwrap_model(model)
    set_peft_model_state_dict(net, load_file(str(path / "adapter" / "adapter_model.safetensors")))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=accelerator.device,
                                         weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_file = path / f"rng_state_{accelerator.process_index}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))
    early.load_numbers(state.get("best", {}))
    if (path / "best_adapter_state.pt").exists():
        early.adapter_state = torch.load(path / "best_adapter_state.pt", weights_only=True)
    state["path"] = str(path)
    return state
