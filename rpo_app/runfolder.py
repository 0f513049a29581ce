"""The run folder: its layout, the schema of its files, one writer and one reader.

A training run (a child process) writes ``runs/<id>/``; the app, bench-effect and the
tests read it while it is written, and after it was killed at any point:

    config.yaml         the resolved training settings (rpo_app.trainconfig)
    status.json         RunStatus: state, step, errors, notes          (atomic rewrite)
    metrics.jsonl       one MetricRow per optimizer step              (appended)
    samples.jsonl       one SampleRow per preview prompt and step      (appended)
    train.log, stdout.log
    judgments.jsonl     the judgments trained on (a resume sees the same data)
    lineage.json        which judgments trained it and which were held out, what was
                        left out and why, the store's state (rpo_app.lineage)
    label_check.json    every decided pair scored by the final adapter: margin and how
                        sure the model is of the other answer (rpo_app.suspects)
    ref_logps.pt        cached reference log-probs
    base_samples.json   the base model's preview answers: prompts, answers, cut_off (each
                        answer hit its token limit; absent in older runs)
    checkpoints/step-N/ adapter, optimizer, scheduler, RNG state, trainer_state.json
    adapter/            the final adapter (PEFT format)

Whole files are replaced atomically, so a reader never sees half of one. Appended
files can end in a half-written line (the trainer is mid-write, or was killed):
``read_jsonl`` skips it, and so does everyone, because everyone reads through it.
The SQLite ``runs`` row is an index of these files, not a second truth.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from rpo_app.progress import eta_seconds

log = logging.getLogger("rpo_app.train")  # phases show in the trainer's log

LINEAGE_FILE = "lineage.json"  # also copied into the adapter folder it made
STATES = ("queued", "running", "finished", "failed", "stopped")
ACTIVE_STATES = ("queued", "running")
# What a run does, in the order it does it ("evaluating" and "previews" interrupt
# "training"; "embedding the prompts" only for a loss that weighs by prompt similarity).
PHASES = ("loading the model", "embedding the prompts", "scoring the answers with the base model",
          "the base model's previews", "training", "evaluating", "previews", "checking the labels",
          "the final previews", "saving the adapter")


# --- one writer, one reader -------------------------------------------------------------

def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace a file whole: readers see the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every complete line that parses; a missing file is empty.

    A line without its newline is being written or was cut by a kill; a line that
    does not parse was torn the same way. Both are skipped, not raised: the steps
    they belonged to are logged again on resume.
    """
    rows = []
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not line.endswith("\n"):
                    break
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict):
                    rows.append(row)
    except OSError:
        pass
    return rows


def read_json(path: str | os.PathLike) -> dict | None:
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# --- the schema ---------------------------------------------------------------------------

def _from_known(cls, values: dict):
    """Build a row from a file's dict, ignoring keys this version does not know."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


@dataclass
class RunStatus:
    """status.json. ``state`` is one of STATES; 'unknown' when the file is missing."""

    state: str = "unknown"
    phase: str | None = None  # what a running run is doing now; "training" during the steps
    step: int = 0
    max_steps: int | None = None
    pid: int | None = None
    started_at: float | None = None
    updated_at: float | None = None
    loss: float | None = None
    eval_accuracy: float | None = None
    elapsed_s: float | None = None
    eta_s: float | None = None
    error: str | None = None
    warning: str | None = None
    early_stop_note: str | None = None  # why early stopping is off, when it is
    early_stopped: bool = False
    best_step: int | None = None
    best_eval_accuracy: float | None = None
    adapter: str | None = None  # the final adapter folder, once finished
    peak_memory_gb: float | None = None  # the training process's largest resident size so far
    gradient_checkpointing: bool | None = None  # whether the steps ran with it (asked or switched on)
    # The phase under way (one of PHASES) counts its own work, so its ETA comes from
    # its own speed: phase_done of phase_total phase_unit since phase_started_at.
    phase_done: float | None = None
    phase_total: float | None = None
    phase_unit: str | None = None
    phase_started_at: float | None = None
    # Finished phases, in order: {"phase", "seconds"}, with "work" and "unit" ("tokens")
    # where the phase counted tokens, so a later estimate reads its speed (phase_rates).
    phases: list = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def phase_eta_s(self, now: float | None = None) -> float | None:
        """Seconds left in the phase under way, from its own speed."""
        if self.phase == "training":  # the trainer times the steps alone (no evals, no previews)
            return self.eta_s if self.step < (self.max_steps or 0) else None
        if self.phase_started_at is None or self.phase_done is None or self.phase_total is None:
            return None
        return eta_seconds((now or time.time()) - self.phase_started_at, self.phase_done,
                           self.phase_total)

    def phase_seconds(self) -> dict[str, float]:
        """Seconds per phase name over the finished phases (training comes in pieces
        between evaluations)."""
        out: dict[str, float] = {}
        for entry in self.phases:
            out[entry["phase"]] = out.get(entry["phase"], 0.0) + float(entry["seconds"])
        return out

    def phase_rates(self) -> dict[str, float]:
        """Seconds per token per phase name, over the finished phases that counted tokens
        (none in a run from before they were recorded)."""
        seconds: dict[str, float] = {}
        work: dict[str, float] = {}
        for entry in self.phases:
            if entry.get("unit") == "tokens" and entry.get("work"):
                seconds[entry["phase"]] = seconds.get(entry["phase"], 0.0) + float(entry["seconds"])
                work[entry["phase"]] = work.get(entry["phase"], 0.0) + float(entry["work"])
        return {name: seconds[name] / work[name] for name in seconds}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict | None) -> "RunStatus":
        return _from_known(cls, values or {})


# On disk the metric names follow TRL's logging ("rewards/chosen", "eval/accuracy");
# in Python they are attribute names. This table is the whole mapping.
_METRIC_KEYS = {"rewards_chosen": "rewards/chosen", "rewards_rejected": "rewards/rejected",
                "eval_accuracy": "eval/accuracy", "eval_margin": "eval/margin", "eval_loss": "eval/loss"}


@dataclass
class MetricRow:
    """One optimizer step in metrics.jsonl; the eval_* fields only at eval steps."""

    step: int
    loss: float | None = None
    rewards_chosen: float | None = None
    rewards_rejected: float | None = None
    margin: float | None = None
    accuracy: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    pairs_per_s: float | None = None
    tokens_per_s: float | None = None
    elapsed_s: float | None = None
    eta_s: float | None = None
    eval_accuracy: float | None = None
    eval_margin: float | None = None
    eval_loss: float | None = None

    def to_record(self) -> dict:
        return {_METRIC_KEYS.get(k, k): v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_record(cls, record: dict) -> "MetricRow":
        back = {v: k for k, v in _METRIC_KEYS.items()}
        return _from_known(cls, {back.get(k, k): v for k, v in record.items()})

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


@dataclass
class SampleRow:
    """One preview in samples.jsonl: the tuned answer at ``step`` beside the base model's,
    each with its mean log-prob per token under the base model (the fluency check)."""

    step: int
    prompt: str
    base: str
    tuned: str
    base_logp: float | None = None
    tuned_logp: float | None = None

    def to_record(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: dict) -> "SampleRow":
        return _from_known(cls, {"base": "", "tuned": "", "prompt": "", **record})


# --- the folder -------------------------------------------------------------------------------

class RunFolder:
    """The files of one run. ``writable=False``: a reader (or a non-main process),
    which never writes."""

    def __init__(self, root: str | os.PathLike, writable: bool = True):
        self.root = Path(root)
        self.writable = writable
        if writable:
            self.root.mkdir(parents=True, exist_ok=True)

    config = property(lambda self: self.root / "config.yaml")
    status_path = property(lambda self: self.root / "status.json")
    metrics_path = property(lambda self: self.root / "metrics.jsonl")
    samples_path = property(lambda self: self.root / "samples.jsonl")
    train_log = property(lambda self: self.root / "train.log")
    stdout_log = property(lambda self: self.root / "stdout.log")
    judgments = property(lambda self: self.root / "judgments.jsonl")
    lineage = property(lambda self: self.root / LINEAGE_FILE)
    label_check_path = property(lambda self: self.root / "label_check.json")
    ref_logps = property(lambda self: self.root / "ref_logps.pt")
    base_samples = property(lambda self: self.root / "base_samples.json")
    checkpoints = property(lambda self: self.root / "checkpoints")
    adapter = property(lambda self: self.root / "adapter")

    # -- status --
    def status(self) -> RunStatus:
        return RunStatus.from_dict(read_json(self.status_path))

    def write_status(self, status: RunStatus) -> None:
        if self.writable:
            atomic_write_text(self.status_path, json.dumps(status.to_dict(), indent=1))

    def update_status(self, **fields) -> RunStatus:
        """Change the named fields (unknown names raise TypeError) and stamp the writer."""
        status = dataclasses.replace(self.status(), **fields)
        status.pid, status.updated_at = os.getpid(), time.time()
        self.write_status(status)
        return status

    def begin_phase(self, phase: str, total: float | None = None, unit: str | None = None,
                    **fields) -> RunStatus:
        """End the phase under way (its seconds go to `phases`) and start `phase`."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; add it to runfolder.PHASES")
        now = time.time()
        status = self.status()
        phases = self._closed(status, now)
        self._last_progress = 0.0
        log.info("phase: %s", phase)
        return self.update_status(phase=phase, phase_started_at=now, phase_done=0 if total else None,
                                  phase_total=total, phase_unit=unit, phases=phases, **fields)

    def phase_progress(self, done: float, total: float | None = None, force: bool = False) -> None:
        """Count work done in the phase under way; written at most twice a second."""
        now = time.time()
        if not force and now - getattr(self, "_last_progress", 0.0) < 0.5:
            return
        self._last_progress = now
        fields = {"phase_done": done}
        if total is not None:
            fields["phase_total"] = total
        self.update_status(**fields)

    def end_phases(self, **fields) -> RunStatus:
        """The run is over: the last phase's seconds go to `phases`."""
        status = self.status()
        return self.update_status(phase=None, phase_done=None, phase_total=None, phase_unit=None,
                                  phase_started_at=None, phases=self._closed(status, time.time()),
                                  **fields)

    @staticmethod
    def _closed(status: RunStatus, now: float) -> list:
        phases = list(status.phases)
        if status.phase and status.phase_started_at:
            entry = {"phase": status.phase, "seconds": round(now - status.phase_started_at, 3)}
            # A phase that counts tokens counts its own from zero up to phase_total as it
            # ends; training counts steps across its pieces, so only tokens are recorded.
            if status.phase_unit == "tokens" and status.phase_total:
                entry.update(work=status.phase_total, unit="tokens")
            phases.append(entry)
        return phases

    # -- rows --
    def append_metric(self, row: MetricRow) -> None:
        if self.writable:
            append_jsonl(self.metrics_path, row.to_record())

    def write_label_checks(self, rows: list[dict]) -> None:
        """rpo_app.suspects.check_rows' output, written once at the end of a run."""
        if self.writable:
            atomic_write_text(self.label_check_path, json.dumps({"rows": rows}, indent=0))

    def label_checks(self) -> list[dict] | None:
        """None when the run made none (it was stopped, or predates the check)."""
        data = read_json(self.label_check_path)
        return data.get("rows") if data else None

    def append_sample(self, row: SampleRow) -> None:
        if self.writable:
            append_jsonl(self.samples_path, row.to_record())

    def metrics(self) -> list[MetricRow]:
        return [MetricRow.from_record(r) for r in read_jsonl(self.metrics_path) if "step" in r]

    def metrics_frame(self):
        """The metrics as a DataFrame with MetricRow's columns (empty ones included)."""
        import pandas as pd

        return pd.DataFrame([dataclasses.asdict(m) for m in self.metrics()], columns=MetricRow.columns())

    def samples(self) -> list[SampleRow]:
        return [SampleRow.from_record(r) for r in read_jsonl(self.samples_path) if "step" in r]

    def final_metrics(self) -> dict:
        """The newest value of each metric (eval ones come from the last eval)."""
        out: dict = {}
        for row in self.metrics():
            out.update({k: v for k, v in dataclasses.asdict(row).items() if v is not None})
        out.pop("step", None)
        return out

    def trim_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint (those steps run again),
        and any torn line a kill left."""
        if not self.writable:
            return
        for path in (self.metrics_path, self.samples_path):
            if path.exists():
                keep = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
                atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep))

    # -- judgments snapshot --
    def write_judgments(self, rows: list[dict]) -> None:
        if self.writable:
            atomic_write_text(self.judgments, "".join(json.dumps(j, ensure_ascii=False) + "\n" for j in rows))

    # -- checkpoints and logs --
    def checkpoint_dirs(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first (a folder is complete once renamed to step-N)."""
        found = []
        for p in self.checkpoints.glob("step-*"):
            tail = p.name[len("step-"):]
            if p.is_dir() and tail.isdigit() and (p / "trainer_state.json").exists():
                found.append((int(tail), p))
        return sorted(found)

    def has_run(self) -> bool:
        return self.metrics_path.exists() or bool(self.checkpoint_dirs())

    def log_tail(self, lines: int = 40) -> str:
        chunks = []
        for path in (self.train_log, self.stdout_log):
            if path.exists():
                with open(path, "rb") as fh:
                    fh.seek(max(0, path.stat().st_size - 64_000))
                    text = fh.read().decode("utf-8", "replace").splitlines()[-lines:]
                chunks.append(f"--- {path.name} ---\n" + "\n".join(text))
        return "\n".join(chunks)

