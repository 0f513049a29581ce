"""Candidate generation and streaming chat on one base model with LoRA adapters.

One `ModelHost` holds one base model, its tokenizer and any number of LoRA adapters
loaded by name. It answers many prompts x samples per forward pass (left padding,
prompts sorted by length), and runs side-by-side chat where every row of one batch
may use a different adapter (peft's mixed-batch `adapter_names`, "__base__" for the
plain base model).

The prompt pass is shared: the chat template's common prefix is run once per batch
and each distinct prompt once, however many samples it gets (see _shared_prefill).
On a CPU the prompt pass of a padded batch otherwise costs about as much as the
answers themselves.

Sampling is seeded per row: each answer draws its random numbers from its own
generator, seeded from (seed, prompt text, sample index), so the draws do not depend on
the batch size, the batch order or the other prompts of a run. The same seed and
settings with the same batch size reproduce the same texts on one machine. Across
batch sizes, prefill paths or machines the floating-point sums of the forward pass may
round differently (a CPU picks its kernels by shape and instruction set), so a few
answers can differ there; a repeated answer is caught by its text (the store keeps
one copy per prompt).
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import queue
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple, Sequence

from rpo_app import chat_template
from rpo_app.cpushare import Unshared

if TYPE_CHECKING:
    from rpo_app.cpushare import AppShare

log = logging.getLogger(__name__)

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch (peft/tuners/lora/layer.py)
Progress = Callable[[int, int], None]


class GenerationError(RuntimeError):
    """Generation could not run; the message says why."""


@dataclass
class GenSettings:
    # The sampling defaults (temperature, top_p, min_p, repetition_penalty) were chosen
    # with the sampling benchmark (`python -m rpo_app bench --only sampling`,
    # rpo_app/bench/sampling.py: its docstring states the rule, its table the numbers).
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 192
    seed: int = 0
    system_prompt: str | None = None
    # Keep tokens whose probability (after temperature) is at least min_p x the most
    # likely token's; 0 = off. Composes with top_p as in transformers: both filters apply.
    min_p: float = 0.05
    # transformers' repetition penalty over the answer's own tokens (the prompt is not
    # counted, see _logits_processors); 1 = off. Applies to greedy decoding too.
    repetition_penalty: float = 1.05

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if not 0 < self.repetition_penalty < float("inf"):
            raise ValueError(f"repetition_penalty must be a positive number (1 = off), "
                             f"got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        return asdict(self)


def row_seed(seed: int, text: str, index: int) -> int:
    """A 63-bit seed for one answer: stable across runs, batchings and machines."""
    digest = hashlib.sha256(f"{seed}\x00{index}\x00{text}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _seed_text(prompt) -> str:
    """The text a prompt's row seeds come from: itself, or a conversation's transcript."""
    if isinstance(prompt, str):
        return prompt
    from rpo_app.conversation import check, transcript

    return transcript(check(prompt))


# -- pieces handed to transformers' generate ---------------------------------------------
def _row_sampler(seeds: Sequence[int], temperature: float, top_p: float, min_p: float = 0.0):
    """A logits processor that samples each row with its own torch.Generator.

    It returns scores that are -inf everywhere except the drawn token, so greedy
    decoding (do_sample=False) picks exactly that token. One uniform number per row
    per step, turned into a token by inverse CDF (over the nucleus when top_p < 1).

    As in transformers' warpers, temperature comes first, then the filters on the
    tempered probabilities: top_p keeps the smallest set of top tokens whose mass
    reaches top_p, min_p keeps the tokens with at least min_p x the row's largest
    probability; a token must pass both (transformers applies min-p after top-p, and
    renormalising between them does not move min-p's cut, which is relative).
    """
    import torch
    from transformers import LogitsProcessor

    class RowSampler(LogitsProcessor):
        def __init__(self):
            self.generators = []
            for s in seeds:
                g = torch.Generator(device="cpu")
                g.manual_seed(int(s))
                self.generators.append(g)

        def __call__(self, input_ids, scores):
            probs = torch.softmax(scores.float() / temperature, dim=-1)
            u = torch.stack([torch.rand((), generator=g, dtype=torch.float64)
                             for g in self.generators]).to(probs.device, probs.dtype)
            if top_p >= 1.0 and min_p <= 0.0:
                token = _inverse_cdf(probs, u)
            else:
                token = _nucleus(probs, u, top_p, min_p)
            out = torch.full_like(scores, float("-inf"))
            out.scatter_(-1, token.unsqueeze(-1), 0.0)
            return out

    def _inverse_cdf(probs, u):
        cdf = probs.cumsum(-1)
        pos = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
        return pos.clamp_(max=probs.shape[-1] - 1)

    def _nucleus(probs, u, p, min_p):
        """Sample from the smallest set of top tokens whose mass reaches p (p >= 1:
        no such cut), less the tokens under min_p x the row's largest probability.

        A full sort of a 50k vocabulary per row costs more than the forward pass of a
        small model on a CPU, so look at the top 64 first and widen only the rows
        whose kept set is larger (exact either way): a row is done at k once its
        nucleus fits in the top k or its k-th token already falls under the min-p
        floor (every later one does too)."""
        vocab = probs.shape[-1]
        token = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
        rows = torch.arange(probs.shape[0], device=probs.device)
        floor = probs.amax(-1) * min_p  # 0 when min_p is off: nothing falls under it
        for k in (64, 1024, vocab):
            if not rows.numel():
                break
            k = min(k, vocab)
            if k == vocab:
                top, idx = torch.sort(probs[rows], dim=-1, descending=True)
            else:
                top, idx = torch.topk(probs[rows], k, dim=-1)  # sorted, largest first
            before = top.cumsum(-1) - top
            low = top < floor[rows].unsqueeze(-1)  # the row's top token never is
            fits = low[:, -1] | (k == vocab)
            if p < 1.0:
                fits |= before[:, -1] + top[:, -1] >= p
            if fits.any():
                drop = low[fits] | (before[fits] >= p) if p < 1.0 else low[fits]
                kept = top[fits].masked_fill(drop, 0.0)
                pos = _inverse_cdf(kept, u[rows[fits]])
                token[rows[fits]] = idx[fits].gather(-1, pos.unsqueeze(-1)).squeeze(-1)
            rows = rows[~fits]
        return token

    return RowSampler()


def _logits_processors(settings: GenSettings, seeds: Sequence[int], prompt_width: int) -> list:
    """The logits processors of one generate call, in order: the repetition penalty,
    then our per-row sampler (none at all for plain greedy decoding).

    The penalty is transformers' RepetitionPenaltyLogitsProcessor counting only the
    answer's own tokens (`prompt_ignore_length`: every row's prompt, left-padded, ends
    at column prompt_width, in the shared-prefill layout too). Counting the prompt, as
    transformers does by default, would penalise the chat template's tokens in every
    prompt: the end-of-turn token (so answers would run on), "\n", the system turn, and
    a prompt's own words an answer should reuse ("rewrite this sentence"). The left
    padding is then out of the count as well; it would not have mattered anyway, the
    penalty counts a token once however often it occurs and the pad token (the
    end-of-turn token for SmolLM2) is in every prompt already.
    """
    from transformers import RepetitionPenaltyLogitsProcessor

    out = []
    if settings.repetition_penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(float(settings.repetition_penalty),
                                                    prompt_ignore_length=int(prompt_width)))
    if not settings.greedy:
        out.append(_row_sampler(seeds, settings.temperature, settings.top_p, settings.min_p))
    return out


def _chosen_logps():
    """A logits processor that passes the scores on untouched and keeps their log-softmax,
    so the row streamer can take each row's log-prob of the token then chosen (`take`).

    Put first, it sees the model's own logits, before the repetition penalty and the
    sampler's temperature: the log-probs are the model's, as the scorer's are. The
    answers' log-probs under the model that wrote them come out of the decoding steps,
    one log-softmax a step, instead of a second pass over every answer later."""
    from transformers import LogitsProcessor

    class ChosenLogps(LogitsProcessor):
        last = None

        def __call__(self, input_ids, scores):
            # A tensor of our own: a later processor may change `scores` in place.
            self.last = scores.float().log_softmax(-1)
            return scores

        def take(self, tokens) -> list[float]:
            return self.last.gather(-1, tokens.reshape(-1, 1).to(self.last.device)).squeeze(-1).tolist()

    return ChosenLogps()


def _stop_flag(event: threading.Event):
    import torch
    from transformers import StoppingCriteria

    class StopOnEvent(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool,
                              device=input_ids.device)

    return StopOnEvent()


def _batch_streamer_class():
    from transformers.generation.streamers import BaseStreamer

    class BatchTextStreamer(BaseStreamer):
        """Streams a batch: keeps each row's tokens, stops each row at its own
        end-of-turn, and calls `on_update(texts)` after every step.

        transformers' TextIteratorStreamer only takes batch size 1.
        """

        def __init__(self, tokenizer, batch_size: int, stop_ids: set[int],
                     on_update: Callable[[list[str]], None]):
            self.tokenizer = tokenizer
            self.stop_ids = stop_ids
            self.on_update = on_update
            self.tokens: list[list[int]] = [[] for _ in range(batch_size)]
            self.done = [False] * batch_size
            self._prompt_seen = False

        def put(self, value):
            if not self._prompt_seen:  # the first call carries the prompt ids
                self._prompt_seen = True
                return
            rows = value.reshape(len(self.tokens), -1).tolist()
            changed = False
            for i, new in enumerate(rows):
                for tok in new:
                    if self.done[i]:
                        break
                    if tok in self.stop_ids:
                        self.done[i] = True
                    else:
                        self.tokens[i].append(tok)
                        changed = True
            if changed:
                self.on_update(self.texts(partial=True))

        def end(self):
            self.on_update(self.texts(partial=False))

        def cut_off(self) -> list[bool]:
            """Per row, once generation has run its course: it hit the token limit
            before its end-of-turn token."""
            return [not done for done in self.done]

        def texts(self, partial: bool) -> list[str]:
            out = []
            for toks in self.tokens:
                text = self.tokenizer.decode(toks, skip_special_tokens=True)
                if partial:
                    text = text.rstrip("\ufffd")  # half of a multi-byte character
                out.append(text.strip())
            return out

    return BatchTextStreamer


def _row_streamer_class():
    from transformers.generation.streamers import BaseStreamer

    class RowStreamer(BaseStreamer):
        """Reports every decoding step and every row the moment it ends (at its
        end-of-turn token or its token limit), so answers can be stored as they finish
        while the batch keeps its speed. Each row is reported exactly once, with the
        same tokens `ModelHost._run` returns for it, the stop token that ended it (None:
        the limit, or stopped from outside) and, given `logps` (_chosen_logps, in the
        same generate call), the summed log-prob of its tokens and that stop token."""

        def __init__(self, n_rows: int, stop_ids: set[int], max_new: int,
                     on_row: Callable[[int, list[int], int | None, float | None], None] | None,
                     on_step: Callable[[int], None] | None, logps=None):
            self.stop_ids, self.max_new = stop_ids, max_new
            self.on_row, self.on_step = on_row, on_step
            self.tokens: list[list[int]] = [[] for _ in range(n_rows)]
            self.done = [False] * n_rows
            self.logps = logps
            self.sums = [0.0] * n_rows
            self.step = 0
            self._prompt_seen = False

        def _finish(self, i: int, stop: int | None = None) -> None:
            self.done[i] = True
            if self.on_row is not None:
                self.on_row(i, self.tokens[i], stop, self.sums[i] if self.logps is not None else None)

        def put(self, value):
            if not self._prompt_seen:  # the first call carries the prompt ids
                self._prompt_seen = True
                return
            self.step += 1
            new = value.reshape(len(self.tokens), -1)[:, -1]
            taken = self.logps.take(new) if self.logps is not None else None
            for i, tok in enumerate(new.tolist()):
                if self.done[i]:
                    continue
                if taken is not None:
                    self.sums[i] += taken[i]
                if tok in self.stop_ids:
                    self._finish(i, tok)
                    continue
                self.tokens[i].append(tok)
                if len(self.tokens[i]) >= self.max_new:
                    self._finish(i)
            if self.on_step is not None:
                self.on_step(self.step)

        def end(self):
            for i, finished in enumerate(self.done):
                if not finished:  # stopped from outside: report what it has
                    self._finish(i)

    return RowStreamer


def batch_sizes(n_jobs: int, batch_size: int, first: int | None = None) -> list[int]:
    """How `generate_batches` cuts n_jobs rows: full batches, except that a small
    `first` batch (say, one prompt's answers) can go ahead so something is ready within
    seconds; the next batch is 4x that, then full batches."""
    sizes, left, size = [], n_jobs, batch_size
    if first is not None and first < batch_size:
        size = max(1, first)
    while left > 0:
        take = min(size, left)
        sizes.append(take)
        left -= take
        size = min(batch_size, size * 4)
    return sizes


# The batch sizes a decoding step is timed at: those of a first run (batch_sizes with a
# first batch of 2: 2, then 4x that, then full batches of 32); 2 is also the previews'.
TIMED_ROWS = (2, 8, 32)
# A forward pass for the Train tab's estimate is timed this many times and the fastest
# kept: one pass of a fresh copy wandered 0.71-0.88 ms a token on a quiet 2-core Xeon.
TIMED_PASSES = 3


class Generated(NamedTuple):
    """One answer of `ModelHost.generate_batches`."""
    prompt: int  # index into the prompts asked
    sample: int
    text: str
    tokens: int  # generated tokens, the end-of-turn token included when one was produced
    cut_off: bool  # it hit max_new_tokens before its end-of-turn token
    # The prompt's token ids, the answer's and the stop token that ended it (if one did),
    # and the summed log-prob of the answer's tokens and that stop token under the base
    # model, taken as it was written (None: written by an adapter).
    sequence: tuple[int, ...]
    logp: float | None
    # Its input to decoder layer `keep_states_at` as written (generate_batches), one row a
    # token of `sequence`, the last zeros (written_states); None when not asked for.
    states: Any = None


class Answer(NamedTuple):
    text: str
    # It hit max_new_tokens before its end-of-turn token: scored without an ending.
    cut_off: bool


@dataclass(frozen=True)
class DecodeSpeed:
    """Seconds per decoding step, measured at a few batch sizes: ((rows, seconds), ...).

    Between two measured sizes the time is interpolated; above the largest the last
    segment's slope goes on; below the smallest it is the smallest's time. No straight
    line through one point covers every size: on a CPU one row decodes through a
    matrix-vector kernel, and two rows already cost about 1.5x one (measured on an
    AVX2 EPYC: 83 ms a step for one row of the bundled model, 128 for two, 149 for 8),
    so a line fitted on 1 and 8 rows put the first pair 25-45% early."""
    points: tuple[tuple[int, float], ...]

    def __post_init__(self):
        rows = [r for r, _ in self.points]
        if len(rows) < 2 or rows != sorted(set(rows)) or rows[0] < 1 or any(s <= 0 for _, s in self.points):
            raise ValueError("decode timings need at least two increasing row counts with positive "
                             f"times, got {self.points}")

    def step_seconds(self, rows: int) -> float:
        pts = self.points
        if rows <= pts[0][0]:
            return pts[0][1]
        for (r0, s0), (r1, s1) in zip(pts, pts[1:]):
            if rows <= r1:
                return s0 + (s1 - s0) * (rows - r0) / (r1 - r0)
        # Beyond the largest: its slope, never downhill (timing noise can make it so).
        (r0, s0), (r1, s1) = pts[-2:]
        return s1 + max(0.0, (s1 - s0) / (r1 - r0)) * (rows - r1)


def _placed(out: list, rows: list[int], values: list) -> list:
    for i, v in zip(rows, values):
        out[i] = v
    return out


@contextmanager
def _eval_mode(model):
    """Dropout off while generating; a model that was training (a trainer's previews)
    goes back to training mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


class _ModelThread:
    """One daemon thread that runs the calls handed to it (ModelHost.use_own_thread): urgent
    ones (a chat turn) first, the others in the order they came. A long call can let the
    urgent ones in between its steps (run_urgent)."""

    URGENT, BACKGROUND = 0, 1

    def __init__(self):
        self._calls: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()  # ties in priority go first come, first served
        self._thread = threading.Thread(target=self._serve, name="model", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            self._do(self._calls.get())

    @staticmethod
    def _do(item) -> None:
        _, _, fn, done = item
        if done.set_running_or_notify_cancel():
            try:
                done.set_result(fn())
            except BaseException as err:  # re-raised in the caller's thread
                done.set_exception(err)

    def call(self, fn, urgent: bool = False):
        if threading.current_thread() is self._thread:
            return fn()
        from concurrent.futures import Future

        done: Future = Future()
        self._calls.put((self.URGENT if urgent else self.BACKGROUND, next(self._order), fn, done))
        return done.result()

    def urgent_waiting(self) -> bool:
        with self._calls.mutex:
            return bool(self._calls.queue) and self._calls.queue[0][0] == self.URGENT

    def run_urgent(self) -> None:
        """On this thread, inside a long call: run the urgent calls waiting, to the end."""
        if threading.current_thread() is not self._thread:
            return
        while self.urgent_waiting():
            self._do(self._calls.get_nowait())  # only this thread takes: the head is urgent


# -- the host ----------------------------------------------------------------------------
class ModelHost:
    """One base model + tokenizer, with LoRA adapters loaded by name.

    Thread-safe: every use of the model holds `self.lock` (and runs on the host's own
    thread once `use_own_thread` gave it one).
    """

    def __init__(self, model: str | None = None, data_dir: str | Path = "data",
                 device: str | None = None, trust_remote_code: bool = False,
                 precision: str = "auto"):
        """`precision` (models.pick_precision): the weights' dtype. auto: bf16 on a GPU with
        bf16 and on a CPU with bf16 instructions, where decoding reads half the bytes per
        token (2 answers of 192 tokens: 24 s in fp32, 13 s in bf16 on 2 cores)."""
        import torch

        from rpo_app.models import DEFAULT_MODEL_NAME, is_default, load_model, pick_device, pick_precision

        device = pick_device(device)
        dtype = torch.bfloat16 if pick_precision(device, precision) == "bf16" else torch.float32
        net, tok = load_model(model, data_dir, device=device, dtype=dtype,
                              trust_remote_code=trust_remote_code)
        self._setup(net, tok, DEFAULT_MODEL_NAME if is_default(model) else str(model))

    @classmethod
    def from_loaded(cls, model, tokenizer, name: str) -> "ModelHost":
        """A host over a model already in memory, such as the trainer's PeftModel.

        A PeftModel generates as it stands: with its active adapter, or as the base model
        inside `model.disable_adapter()` (until this host loads adapters of its own,
        adapter=None means "as it stands"). The model is put in eval mode here, so a
        trainer calls `model.train()` again before its next step; each generation runs
        in eval mode and then gives back the mode it found, whatever the caller did.
        """
        host = cls.__new__(cls)
        host._setup(model, tokenizer, name)
        return host

    def _setup(self, model, tokenizer, name: str) -> None:
        from rpo_app.models import contiguous_head_input

        contiguous_head_input(model)
        self.base = model
        self.model = model  # becomes a PeftModel once an adapter is loaded
        self.tokenizer = tokenizer
        self.model_name = name
        # Re-entrant: a chat turn let in between a batch's decoding steps runs inside it.
        self.lock = threading.RLock()
        self.device = next(model.parameters()).device
        model.eval()
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_id = tokenizer.pad_token_id
        self.stop_ids = chat_template.stop_token_ids(tokenizer, model)
        self._adapter_paths: dict[str, str] = {}
        self.share_prefill = True  # see _shared_prefill; off = plain left padding
        # How this model shares the cores with training runs (the app's is a
        # cpushare.AppShare: a run gives back cores while this model computes).
        self.share: AppShare | Unshared = Unshared()
        self._own_thread: _ModelThread | None = None
        # Hidden states below the adapters, kept for the scoring job (active.kept_states_for,
        # by (model, layer, precision)): None keeps none; the app's host keeps them, from
        # its answers as written and from job to job.
        self.kept_states: dict | None = None
        self._recording = None  # the batch's written_states.WrittenStates while it is written
        # One decode timing at a time: the app times the model in the background at
        # start-up, and a first-run click during it timed it a second time before its
        # first batch (the first pair 45-54 s after the click against 31-32 s with one
        # timing, alternating, on a 2-core AVX2 EPYC).
        self._timing_lock = threading.Lock()
        self._decode_timing: DecodeSpeed | None = None

    def use_own_thread(self) -> None:
        """From now on every computation of this host runs on one long-lived thread of its
        own (the app's host, whose chat turns, jobs and timings come from many threads).
        A thread that has computed keeps OpenMP workers while it lives, and with more of
        them than cores libgomp stops spin-waiting (cpushare): on 2 cores, 2 rows on an
        adapter decoded at 112-124 ms a step beside a living thread that had scored, against
        60 ms alone or on the host's own thread."""
        if self._own_thread is None:
            self._own_thread = _ModelThread()

    def _computing(self, fn: Callable[[], Any], share_cores: bool = True,
                   urgent: bool = False) -> Any:
        """fn() holding the model (self.lock) and, with share_cores, the app's cores
        (self.share), on the host's own thread when it has one; `urgent` goes ahead of
        the calls waiting there and into a candidate batch between its steps."""
        def locked():
            with self.lock, self.share.busy() if share_cores else nullcontext():
                return fn()

        return locked() if self._own_thread is None else self._own_thread.call(locked, urgent)

    def _let_urgent_in(self) -> None:
        """Between two decoding steps of a candidate batch: the cores' share as it is now,
        and the chat turns waiting, so a chat answers at once rather than after the batch
        (12 s for 32 answers of 192 tokens on a 2-core Xeon with AMX; longer on slower
        CPUs). They set the adapters up for themselves; the batch's setup is put back
        after them."""
        self.share.rebalance()  # a run started since the batch began takes its share now
        if self._own_thread is None or not self._own_thread.urgent_waiting():
            return
        state = self._adapter_state()
        with self._recording.paused() if self._recording is not None else nullcontext():
            self._own_thread.run_urgent()
        self._set_adapter_state(state)

    def _adapter_state(self):
        """(active adapter, adapter layers off) of a model with adapters; None without."""
        if not self._adapter_paths:
            return None
        return self.model.active_adapter, self._adapters_off()

    def _set_adapter_state(self, state) -> None:
        if state is None or not self._adapter_paths:
            return
        active, off = state
        if active in self._adapter_paths:
            self.model.set_adapter(active)
        self._switch_adapters(off)

    def _switch_adapters(self, off: bool) -> None:
        if off != self._adapters_off():
            if off:
                self.model.base_model.disable_adapter_layers()
            else:
                self.model.base_model.enable_adapter_layers()

    def _adapters_off(self) -> bool:
        from peft.tuners.tuners_utils import BaseTunerLayer

        layer = next((m for m in self.model.modules() if isinstance(m, BaseTunerLayer)), None)
        return bool(layer is not None and layer.disable_adapters)

    # -- adapters ------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return list(self._adapter_paths)

    def adapter_path(self, name: str) -> str | None:
        return self._adapter_paths.get(name)

    def seconds_per_token(self, precision: str = "fp32") -> float:
        """Seconds of one forward pass per token on this machine as a training run will
        compute it in the given arithmetic (models.pick_precision: a run's bf16 autocast is
        2-3x faster on a CPU with bf16 instructions): timed once, then kept (the Train
        tab's time estimate), unless a run shared the cores (_timed). See
        trainer_forward_model for what is timed."""
        import contextlib

        import torch

        timed = self.__dict__.setdefault("_seconds_per_token", {})
        if precision not in timed:
            ids = torch.randint(0, self.tokenizer.vocab_size, (4, 128), device=self.device)
            autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if precision == "bf16"
                        else contextlib.nullcontext())

            def timed_pass() -> float:
                model = self.trainer_forward_model(precision)
                times = []
                with torch.inference_mode(), autocast:
                    model(input_ids=ids)  # warm-up: the first pass allocates
                    for _ in range(TIMED_PASSES):
                        t0 = time.perf_counter()
                        model(input_ids=ids)
                        times.append(time.perf_counter() - t0)
                return min(times) / ids.numel()

            value, alone = self._timed(lambda: self._computing(timed_pass))
            if not alone:
                return value
            timed[precision] = value
        return timed[precision]

    def _timed(self, measure: Callable[[], Any]) -> tuple[Any, bool]:
        """measure() (which computes as everything does, holding the cores' share), and
        whether it had the machine to itself: a timing taken beside a training run measures
        the share, not this machine, and is not kept (it is taken again later)."""
        alone = not self.share.run_active()
        value = measure()
        return value, alone and not self.share.run_active()

    def trainer_forward_model(self, precision: str):
        """The base model as a run's child computes it: its weights in models.pick_dtype's
        dtype, its attention models.training_attention's. A host that holds bf16 weights,
        or another attention, gives a copy in the run's form, where the memory the run's own
        copy will need is free anyway (a bf16 host's own pass ran 0.43-0.52 ms a token, the
        run's form 0.71-0.88: 2 threads, a 2-core Xeon with AMX); else the host's model (the
        first run's phase rates then correct the estimate, runestimate.estimate_phases)."""
        import copy

        from rpo_app.heap import free_memory_gb
        from rpo_app.models import pick_dtype, training_attention

        model = self.base
        dtype = pick_dtype(str(self.device))
        attention = training_attention(str(self.device), precision)
        now = getattr(model.config, "_attn_implementation", None)
        if next(model.parameters()).dtype == dtype and attention in (None, now):
            return model
        size_gb = sum(p.numel() for p in model.parameters()) * dtype.itemsize / 1e9
        if size_gb > 0.5 * free_memory_gb(self.device):
            return model
        twin = copy.deepcopy(model).to(dtype)
        if attention and attention != now:
            twin.set_attn_implementation(attention)
        return twin.eval()

    def decode_timing(self, measure: bool = True) -> "DecodeSpeed | None":
        """This machine's seconds per decoding step at each of TIMED_ROWS batch sizes:
        short generations with the default sampling, timed once, then kept unless a run
        shared the cores (see DecodeSpeed, _timed). With measure=False: None until it has
        been timed. A caller that comes while another thread is timing waits for that
        timing."""
        if self._decode_timing is not None or not measure:
            return self._decode_timing
        with self._timing_lock:
            if self._decode_timing is None:
                speed, alone = self._timed(self._time_decoding)
                if not alone:
                    return speed
                self._decode_timing = speed
            return self._decode_timing

    def _time_decoding(self) -> "DecodeSpeed":
        """The measurement behind decode_timing."""
        steps = 12
        settings = GenSettings(max_new_tokens=steps + 2)
        # A step costs more as the context grows (each step copies and attends to the
        # whole cache: at 32 rows of the bundled model, 233 ms a step at 143 tokens
        # against 196 at 38), so the timed steps sit halfway through a default answer.
        sentence = "Write a long story about a lighthouse. "
        text, row = sentence, self.encode_prompt(sentence)
        context = len(row) + GenSettings().max_new_tokens // 2
        limit = getattr(self.base.config, "max_position_embeddings", None)
        if limit:  # a small model's window: stay well inside it
            context = min(context, limit // 2)
        while len(row) < context:
            text += sentence
            row = self.encode_prompt(text)
        # the first call pays one-off setup costs
        self._computing(lambda: self._run([row] * 2, [0, 1], GenSettings(max_new_tokens=2),
                                          [None] * 2))
        points = []
        for rows in TIMED_ROWS:
            at: list[float] = []
            # No stop token: the timing must cover every step. From the second step
            # on: the first one also runs the prompt.
            streamer = _row_streamer_class()(rows, set(), steps + 2, None,
                                             lambda _step: at.append(time.perf_counter()))
            self._computing(lambda rows=rows, streamer=streamer: self._run(
                [row] * rows, list(range(rows)), settings, [None] * rows, streamer=streamer,
                stop_ids=set()))
            points.append((rows, (at[-1] - at[1]) / (len(at) - 2)))
        return DecodeSpeed(tuple(points))

    def estimate_batches(self, n_answers: int, max_new_tokens: int, batch_size: int = 32,
                         first_batch: int | None = None) -> list[tuple[int, float]]:
        """(answers, seconds) of each batch that generate_batches would cut for n_answers
        at most max_new_tokens long. An upper bound when answers end early; small
        models' candidates mostly run to the limit, so it is close."""
        speed = self.decode_timing()
        return [(size, max_new_tokens * speed.step_seconds(size))
                for size in batch_sizes(n_answers, batch_size, first_batch)]

    def estimate_seconds(self, n_answers: int, max_new_tokens: int, batch_size: int = 32,
                         first_batch: int | None = None) -> float:
        """The whole of estimate_batches."""
        return sum(sec for _, sec in self.estimate_batches(n_answers, max_new_tokens, batch_size,
                                                           first_batch))

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load a PEFT LoRA adapter folder under `name` (replacing one of that name)."""
        from peft import PeftModel

        from rpo_app.adapters import check_adapter_dir
        from rpo_app.config import check_name
        from rpo_app.lora_fused import fuse_lora_layers

        name = check_name(name, "adapter name")
        if name == BASE:
            raise ValueError(f"{BASE!r} is reserved for the base model")
        folder = check_adapter_dir(path)

        def load() -> None:
            if name in self._adapter_paths:
                self._delete_adapter(name)
            # The adapter in the weights' own dtype: peft would keep a bf16 model's LoRA
            # weights in fp32 and cast every LoRA input up and back, 10% of a bf16 scoring
            # pass on the bundled model for the same log-probs (autocast runs those matmuls
            # in bf16 either way); generation runs them in bf16 like the rest of the model.
            # This host only infers; the trainer keeps its LoRA weights in fp32.
            same_dtype = {"autocast_adapter_dtype": False}
            try:
                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(str(folder), adapter_name=name,
                                            torch_device=str(self.device), **same_dtype)
                else:
                    self.model = PeftModel.from_pretrained(
                        self.base, str(folder), adapter_name=name, torch_device=str(self.device),
                        **same_dtype)
            except Exception as err:  # peft raises many kinds; name the adapter and the cause
                if isinstance(self.model, PeftModel) and name in self.model.peft_config:
                    try:  # drop the half-loaded adapter; the others stay usable
                        self.model.delete_adapter(name)
                    except Exception:  # noqa: BLE001 - best effort, the error below matters
                        log.warning("could not clean up half-loaded adapter %s", name)
                raise GenerationError(
                    f"could not load adapter {name!r} from {folder}: "
                    f"{err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                ) from err
            self.model.eval()
            fuse_lora_layers(self.model)  # this host never trains: the adapter's add in the GEMM
            self._adapter_paths[name] = str(folder)

        self._computing(load, share_cores=False)

    def unload_adapter(self, name: str) -> None:
        def unload() -> None:
            if name not in self._adapter_paths:
                raise KeyError(f"no adapter named {name!r} is loaded")
            self._delete_adapter(name)

        self._computing(unload, share_cores=False)

    def _delete_adapter(self, name: str) -> None:
        del self._adapter_paths[name]
        if self._adapter_paths:
            self.model.delete_adapter(name)
        else:  # the last one: take the LoRA layers out, back to the plain model
            self.model = self.model.unload()
            self.base = self.model
            self.model.eval()

    @contextmanager
    def _adapter_mode(self, adapters: Sequence[str | None]):
        """Set up the model for these per-row adapters; yields extra generate kwargs."""
        wanted = set(adapters)
        for a in wanted - {None}:
            if a not in self._adapter_paths:
                raise GenerationError(
                    f"adapter {a!r} is not loaded (loaded: {', '.join(self._adapter_paths) or 'none'})")
        if not self._adapter_paths:
            yield {}
        elif wanted == {None}:
            # The adapter layers off, as peft's disable_adapter() does for LoRA, but without
            # its model-wide flag: that flag also turns off the per-row adapters of a chat
            # turn let in meanwhile (_let_urgent_in), giving its base rows the adapter.
            was_off = self._adapters_off()
            self._switch_adapters(off=True)
            try:
                yield {}
            finally:
                self._switch_adapters(off=was_off)
        else:
            self._switch_adapters(off=False)  # a chat turn let into a base-model batch
            if len(wanted) == 1:
                self.model.set_adapter(next(iter(wanted)))
                yield {}
            else:
                yield {"adapter_names": [BASE if a is None else a for a in adapters]}

    # -- scoring ------------------------------------------------------------------------
    def adapter_first_layer(self, name: str) -> int | None:
        """The lowest decoder layer the loaded adapter `name` adapts, where the layers
        below it are the base model's; None when it adapts every layer or the model's
        decoder cannot be run from a layer up (frozen_prefix.FrozenPrefixScorer.supports)."""
        from rpo_app.frozen_prefix import FrozenPrefixScorer, decoder_layers

        if name not in self._adapter_paths:
            raise GenerationError(f"adapter {name!r} is not loaded")
        layers = getattr(self.model.peft_config[name], "layers_to_transform", None)
        if isinstance(layers, int):
            layers = [layers]
        n = decoder_layers(self.base.config)
        if not layers or min(layers) <= 0 or not FrozenPrefixScorer.supports(self.model, n):
            return None
        return min(layers)

    def sequence_logps(self, seqs, adapter: str | None = None, precision: str = "auto",
                       states=None) -> list[float]:
        """Summed log-probs of the answer tokens of tokenized (prompt, answer) sequences
        (rpo_app.batches.Seq), under one loaded adapter or the base model (None): the
        trainer's scorer (rpo_app.scoring), each distinct prompt run once where the
        model allows it (as the shared prefill does for generation).

        `states` (a frozen_prefix.FrozenPrefixScorer whose layer is at or below the
        adapter's lowest, in this precision): sequences it kept run from that layer up;
        the others run through every layer as above and are kept, unless `states.room`
        says the memory is spent. Its first top-only use is checked against a whole
        pass."""
        import contextlib

        import torch

        from rpo_app.models import pick_precision
        from rpo_app.scoring import PromptScorer, keeps_logits_by_mask

        bf16 = pick_precision(str(self.device), precision) == "bf16"
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16
                    else contextlib.nullcontext())

        def score() -> list[float]:
            with _eval_mode(self.model), self._adapter_mode([adapter]), torch.inference_mode(), autocast:
                by_mask = keeps_logits_by_mask(self.model)
                if states is None or states.usable is False:
                    return full_pass(seqs, by_mask).tolist()
                out: list[float | None] = [None] * len(seqs)
                kept = [i for i, s in enumerate(seqs) if states.has([s])]
                rest = sorted(set(range(len(seqs))) - set(kept))
                if kept and states.usable is None:  # kept as written, never checked
                    probe = [seqs[i] for i in kept[:2]]
                    if not check(probe, full_pass(probe, by_mask), by_mask):
                        return full_pass(seqs, by_mask).tolist()
                if kept:
                    values = states(self.model, [seqs[i] for i in kept], self.pad_id, self.device,
                                    by_mask, fp32=not bf16).tolist()
                    out = _placed(out, kept, values)
                if rest and states.room([seqs[i] for i in rest]):
                    part = [seqs[i] for i in rest]
                    values = full_pass(part, by_mask, keep=states)
                    if states.usable is None:
                        check(part[:2], values[:2], by_mask)
                    out = _placed(out, rest, values.tolist())
                elif rest:
                    out = _placed(out, rest, full_pass([seqs[i] for i in rest], by_mask).tolist())
                return out

        def check(part, want, by_mask) -> bool:
            states.usable = states.matches(self.model, part, self.pad_id, self.device, by_mask, want,
                                           fp32=not bf16)
            if not states.usable:
                log.warning("scoring from kept hidden states does not reproduce "
                            "this model's log-probs; scoring whole passes")
            return states.usable

        def full_pass(part, by_mask, keep=None):
            # Every layer; `keep` keeps the states on the way. The log-softmax in bf16 too when the model runs in bf16: ranking answers
            # needs no more (scoring.py, _log_softmax).
            scorer = PromptScorer(share=self.share_prefill, fp32=not bf16, keep=keep)
            out = scorer(self.model, part, self.pad_id, self.device, by_mask)
            self.share_prefill = scorer.share  # a model that failed it shares no prefill either
            return out

        return self._computing(score)

    # -- prompts -> token ids ------------------------------------------------------------
    def encode_chat(self, messages: list[dict], system_prompt: str | None = None) -> list[int]:
        return chat_template.chat_ids(self.tokenizer, messages, system_prompt)

    def encode_prompt(self, prompt, system_prompt: str | None = None) -> list[int]:
        """A text (one user turn) or a conversation (messages ending with a user turn)."""
        return chat_template.prompt_ids(self.tokenizer, prompt, system_prompt)

    def _pad_left(self, rows: list[list[int]]):
        import torch

        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _forward_kwargs(self) -> dict:
        import inspect

        # A PeftModel's forward takes **kwargs and hands them to the model it wraps.
        net = self.base.get_base_model() if hasattr(self.base, "get_base_model") else self.base
        params = inspect.signature(net.forward).parameters
        return {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def _shared_prefill(self, rows: list[list[int]], recorder=None):
        """Prefill the KV cache without repeating work, for rows on one adapter.

        The rows of a batch share a prefix (the chat template's system turn and user
        header) and each prompt appears n times (n samples). The prefix is run once,
        each distinct prompt once, and the cache is then copied out to every row.
        Row layout: [shared prefix | padding | rest of the prompt]; the attention
        mask hides the padding and position ids count only real tokens, so each row
        sees exactly its own prompt. Returns (input_ids, attention_mask, cache) for
        `generate`, which then runs only the last prompt token of every row.
        """
        import torch

        from rpo_app.scoring import shared_prefix_layout

        p, ids, mask = shared_prefix_layout(rows, self.pad_id)
        width, batch = ids.shape[1] - p, len(rows)
        ids, mask = ids.to(self.device), mask.to(self.device)
        distinct: dict[tuple, int] = {}
        slot = [distinct.setdefault(tuple(r), len(distinct)) for r in rows]
        firsts = torch.tensor([slot.index(j) for j in range(len(distinct))], device=self.device)
        extra = self._forward_kwargs()
        cache = None
        if p:
            cache = self.model(input_ids=ids[:1, :p], attention_mask=mask[:1, :p],
                               use_cache=True, **extra).past_key_values
        if width > 1:
            if cache is not None:
                cache.batch_repeat_interleave(len(distinct))
            sub_mask = mask[firsts, :p + width - 1]
            positions = (sub_mask.cumsum(-1) - 1).clamp(min=0)[:, p:]
            cache = self.model(input_ids=ids[firsts, p:p + width - 1], attention_mask=sub_mask,
                               position_ids=positions, past_key_values=cache, use_cache=True,
                               **extra).past_key_values
            cache.batch_select_indices(torch.tensor(slot, device=self.device))
        elif cache is not None:
            cache.batch_repeat_interleave(batch)
        if recorder is not None and cache is not None:
            recorder.decoding(mask, slot, p)
        return ids, mask, cache

    def _generation_config(self, settings: GenSettings, stop_ids: set[int]):
        import copy

        from transformers import GenerationConfig

        base = getattr(self.base, "generation_config", None)
        gc = copy.deepcopy(base) if base is not None else GenerationConfig()
        # Sampling is done by our own per-row sampler, so transformers decodes greedily.
        gc.do_sample = False
        gc.temperature = None
        gc.top_p = None
        gc.top_k = None
        gc.min_p = None
        gc.num_beams = 1
        gc.num_return_sequences = 1
        gc.max_new_tokens = settings.max_new_tokens
        gc.max_length = None
        gc.eos_token_id = sorted(stop_ids)
        gc.pad_token_id = self.pad_id
        return gc

    @contextmanager
    def _recorded(self, recorder):
        """`recorder` records while the block runs, paused for a chat turn let in between
        two decoding steps (_let_urgent_in)."""
        if recorder is None:
            yield
            return
        outer, self._recording = self._recording, recorder
        try:
            with recorder.recording():
                yield
        finally:
            self._recording = outer

    def _run(self, rows: list[list[int]], seeds: list[int], settings: GenSettings,
             adapters: Sequence[str | None], streamer=None, stopping=None,
             stop_ids: set[int] | None = None, logps=None, recorder=None):
        """One generate call over left-padded rows; returns the new token ids per row,
        cut at each row's own end-of-turn (the stop token is kept out). `stop_ids`
        replaces the end-of-turn rule for this call only (decode_timing: none); `logps`
        (_chosen_logps) goes ahead of the other logits processors; `recorder`
        (written_states.WrittenStates) records a layer's input all along."""
        stops = self.stop_ids if stop_ids is None else stop_ids
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        kwargs = {}
        if stopping is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([stopping])
        with _eval_mode(self.model), self._adapter_mode(adapters) as extra, torch.inference_mode(), \
                self._recorded(recorder):
            ids = mask = cache = None
            if not extra and len(rows) > 1 and self.share_prefill:
                try:
                    ids, mask, cache = self._shared_prefill(rows, recorder)
                except Exception as err:  # noqa: BLE001 - an odd architecture: plain path
                    log.warning("shared prefill failed (%s); using plain padding", err)
                    self.share_prefill = False
                    ids = mask = cache = None  # the recorder starts over at generate's calls
            if ids is None:
                ids, mask = self._pad_left(rows)
            if recorder is not None and cache is None:
                recorder.decoding(mask)
            if cache is not None:
                kwargs["past_key_values"] = cache
            processors = _logits_processors(settings, seeds, prompt_width=ids.shape[1])
            if logps is not None:
                processors.insert(0, logps)
            if processors:
                kwargs["logits_processor"] = LogitsProcessorList(processors)
            out = self.model.generate(input_ids=ids, attention_mask=mask,
                                      generation_config=self._generation_config(settings, stops),
                                      streamer=streamer, **extra, **kwargs)
        new = out[:, ids.shape[1]:].tolist()
        result = []
        for toks in new:
            cut = []
            for t in toks:
                if t in stops:
                    break
                cut.append(t)
            result.append(cut)
        return result

    # -- batched candidate generation ----------------------------------------------------
    def generate_batches(self, prompts: list[str], n: int = 1,
                         settings: GenSettings | None = None, adapter: str | None = None,
                         batch_size: int = 16, start_index: int = 0,
                         first_batch: int | None = None,
                         on_answer: Callable[[Generated], None] | None = None,
                         on_step: Callable[[int, int], None] | None = None,
                         keep_states_at: int | None = None,
                         ) -> Iterator[list[Generated]]:
        """Yield the answers (Generated) of each forward batch.

        Sample indices run from start_index to start_index + n - 1 (they seed the
        sampler, so topping up a prompt draws fresh answers). `first_batch` sends a small
        batch ahead (see batch_sizes). `on_answer` gets each answer the moment its row
        ends, before its batch does; `on_step(steps done, steps at most)` counts decoding
        steps over all batches (a batch whose rows all end early skips the rest of its
        steps, so the count is an upper bound that only moves forward). Answers of the
        base model carry their log-prob as written (Generated.logp) and, given
        `keep_states_at`, their input to that decoder layer as written (Generated.states).
        """
        from rpo_app.written_states import WrittenStates

        settings = settings or GenSettings()
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        encoded = [self.encode_prompt(p, settings.system_prompt) for p in prompts]
        jobs = [(pi, start_index + k) for pi in range(len(prompts)) for k in range(n)]
        # Longest first: padding stays small, and running out of memory shows at once.
        jobs.sort(key=lambda j: (-len(encoded[j[0]]), j[0], j[1]))
        sizes = batch_sizes(len(jobs), batch_size, first_batch)
        max_steps = settings.max_new_tokens * len(sizes)
        start = 0
        for b, size in enumerate(sizes):
            chunk = jobs[start:start + size]
            start += size
            rows = [encoded[pi] for pi, _ in chunk]
            seeds = [row_seed(settings.seed, _seed_text(prompts[pi]), k) for pi, k in chunk]
            finished: dict[int, Generated] = {}
            recorder = WrittenStates(self.model, keep_states_at) \
                if keep_states_at is not None and adapter is None else None

            def row_done(i: int, toks: list[int], stop: int | None = None, logp: float | None = None,
                         chunk=chunk, finished=finished, recorder=recorder) -> None:
                pi, k = chunk[i]
                cut_off = len(toks) >= settings.max_new_tokens
                ended = [] if stop is None else [stop]
                sequence = tuple(encoded[pi] + toks + ended)
                states = None
                if recorder is not None and (stop is not None or cut_off):  # not stopped from outside
                    # the stop token, or the last token at the limit, was never fed back
                    states = recorder.row(i, len(toks) - (stop is None), len(sequence))
                finished[i] = Generated(pi, k, self.tokenizer.decode(toks, skip_special_tokens=True).strip(),
                                        len(toks) + (0 if cut_off else 1), cut_off, sequence, logp, states)
                if on_answer is not None:
                    on_answer(finished[i])

            def step_done(step: int, base=b * settings.max_new_tokens) -> None:
                if on_step is not None:
                    on_step(base + step, max_steps)
                self._let_urgent_in()  # on the model thread, between two decoding steps

            logps = _chosen_logps() if adapter is None else None
            streamer = _row_streamer_class()(len(chunk), self.stop_ids, settings.max_new_tokens,
                                             row_done, step_done, logps)
            new = self._computing(lambda: self._run(rows, seeds, settings, [adapter] * len(chunk),
                                                    streamer=streamer, logps=logps, recorder=recorder))
            for i, toks in enumerate(new):
                if i not in finished:  # the streamer saw every row; this is a safety net
                    row_done(i, toks)
            if on_step is not None:
                on_step((b + 1) * settings.max_new_tokens, max_steps)
            yield [finished[i] for i in range(len(chunk))]

    def generate(self, prompts: list[str], n: int = 1, settings: GenSettings | None = None,
                 adapter: str | None = None, batch_size: int = 16,
                 progress: Progress | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> list[list[str]]:
        """n answers' texts for every prompt, in prompt order: result[i][k] is sample k of
        prompt i. Arguments as in `answers`."""
        return [[a.text for a in row] for row in
                self.answers(prompts, n, settings, adapter, batch_size, progress, on_step)]

    def answers(self, prompts: list[str], n: int = 1, settings: GenSettings | None = None,
                adapter: str | None = None, batch_size: int = 16,
                progress: Progress | None = None,
                on_step: Callable[[int, int], None] | None = None) -> list[list[Answer]]:
        """n answers for every prompt, in prompt order: result[i][k] is sample k of prompt i.
        `progress(answers done, total)` per batch; `on_step` as in generate_batches."""
        out: list[list[Answer | None]] = [[None] * n for _ in prompts]
        total, done = len(prompts) * n, 0
        if progress:
            progress(0, total)
        for batch in self.generate_batches(prompts, n, settings, adapter, batch_size,
                                           on_step=on_step):
            for a in batch:
                out[a.prompt][a.sample] = Answer(a.text, a.cut_off)
            done += len(batch)
            if progress:
                progress(done, total)
        return out  # type: ignore[return-value]

    # -- streaming chat, one row per conversation ----------------------------------------
    def chat_stream(self, conversations: list[list[dict]], adapters: list[str | None],
                    settings: GenSettings | None = None,
                    on_end: Callable[[list[bool]], None] | None = None) -> Iterator[list[str]]:
        """Yield the partial answer of every row as tokens arrive (the last yield is the
        final text). Row i uses adapters[i] (None = the base model); all rows run in
        one batched forward pass. `on_end(cut_off)`, before the last yield, when the
        answers ran their course (not when the reader stopped early): per row, whether it
        hit max_new_tokens before it ended."""
        settings = settings or GenSettings()
        if len(conversations) != len(adapters):
            raise ValueError("one adapter (or None) per conversation")
        if not conversations:
            return
        rows = [self.encode_chat(c, settings.system_prompt) for c in conversations]
        seeds = [row_seed(settings.seed, repr(c), i) for i, c in enumerate(conversations)]
        updates: queue.Queue = queue.Queue()
        stop = threading.Event()
        done = object()
        streamer = _batch_streamer_class()(self.tokenizer, len(rows), self.stop_ids, updates.put)

        def work():
            try:
                self._computing(lambda: self._run(rows, seeds, settings, adapters, streamer=streamer,
                                                  stopping=_stop_flag(stop)), urgent=True)
                if on_end is not None and not stop.is_set():
                    on_end(streamer.cut_off())
            except BaseException as err:  # handed to the consumer thread
                updates.put(err)
            finally:
                updates.put(done)

        thread = threading.Thread(target=work, name="chat-stream", daemon=True)
        thread.start()
        try:
            while True:
                items = [updates.get()]
                # Coalesce: when the reader is slower than the model, show the newest.
                while True:
                    try:
                        items.append(updates.get_nowait())
                    except queue.Empty:
                        break
                texts = [i for i in items if isinstance(i, list)]
                if texts:
                    yield texts[-1]
                errors = [i for i in items if isinstance(i, BaseException)]
                if errors:
                    raise GenerationError(f"chat generation failed: {errors[0]}") from errors[0]
                if any(i is done for i in items):
                    break
        finally:
            stop.set()  # the reader went away (or finished): let generate end early
            thread.join(timeout=60)


# -- writing candidates to the store -----------------------------------------------------
def generate_candidates(store, host: ModelHost, prompt_ids: list[int], n: int,
                        settings: GenSettings | None = None, adapter: str | None = None,
                        progress: Progress | None = None, batch_size: int = 32,
                        start_index: int = 0, first_batch: int | None = None,
                        between_batches: Callable[[], None] | None = None) -> dict:
    """Generate n answers per prompt and store each one the moment its row ends (a
    batch of 32 does not hold its short answers back until its longest is done).
    `first_batch` sends a small batch ahead (one prompt's answers: a pair to judge
    within seconds). `between_batches` runs on the caller's thread after each batch,
    before the next one starts."""
    from rpo_app.active import keep_as_written, scoring_encoder, written_states_layer

    settings = settings or GenSettings()
    rows = store.prompts(prompt_ids)
    if len(rows) != len(set(prompt_ids)):
        found = {r["id"] for r in rows}
        missing = sorted(set(prompt_ids) - found)
        raise ValueError(f"unknown prompt ids: {missing[:10]}")
    # A conversation is answered as one: its whole history, then the next assistant turn.
    texts = [r["messages"] or r["text"] for r in rows]
    ids = [r["id"] for r in rows]
    # base_logps: answers whose base-model log-prob was kept as written (active.keep_as_written)
    stats = {"prompts": len(ids), "generated": 0, "new": 0, "duplicates": 0, "tokens": 0,
             "base_logps": 0}
    total = len(ids) * n
    encoder = scoring_encoder(host.tokenizer) if adapter is None else None
    keep_at = written_states_layer(host) if adapter is None else None
    t0 = time.perf_counter()
    if progress:
        progress(0, total)

    def store_answer(answer: Generated) -> None:
        rid, created = store.add_response(ids[answer.prompt], answer.text, source="model",
                                          model=host.model_name, adapter=adapter,
                                          gen_settings=settings.to_dict(), cut_off=answer.cut_off)
        if created and answer.logp is not None:
            stats["base_logps"] += keep_as_written(store, host, encoder, rid, rows[answer.prompt], answer,
                                                   keep_at)
        stats["generated"] += 1
        stats["new" if created else "duplicates"] += 1
        stats["tokens"] += answer.tokens
        if progress:
            progress(stats["generated"], total)

    for _batch in host.generate_batches(texts, n, settings, adapter, batch_size, start_index,
                                        first_batch=first_batch, on_answer=store_answer,
                                        keep_states_at=keep_at):
        # each answer was stored as it ended
        if between_batches is not None:
            between_batches()
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    stats["tokens_per_second"] = round(stats["tokens"] / stats["seconds"], 1) if stats["seconds"] else 0.0
    return stats


def _prompt_ids_from_file(store, path: Path) -> list[int]:
    """Store the prompts of an import file (any shape, or TXT one per line) and return
    their ids in file order. Only prompts: answering a preference file must not turn
    its pairs into judgments or its answers into candidates."""
    from rpo_app.io import read_import_file

    items = read_import_file(path).prompts()
    return store.add_prompts(items, f"file:{path.name}")[0]  # all of them or none


def backlog(store, n: int, limit: int | None = None, adapter: str | None = None,
            prompt_ids: list[int] | None = None) -> list[tuple[int, int]]:
    """(prompt id, answers it has) for each prompt with fewer than n answers: the work
    `top_up` takes. Among `prompt_ids` in their order, else the whole store, fewest
    first; at most `limit`. With `adapter`, only that adapter's answers count: the
    iterative loop asks the tuned model for fresh candidates on prompts the base model
    already answered."""
    if prompt_ids is None:
        return [(r["id"], r["n"]) for r in store.prompts_with_fewer_responses(n, limit, adapter)]
    have = store.response_counts(prompt_ids, adapter=adapter)
    todo = [(pid, have.get(pid, 0)) for pid in prompt_ids if have.get(pid, 0) < n]
    return todo[:limit] if limit else todo


def top_up(store, host: ModelHost, todo: list[tuple[int, int]], n: int,
           settings: GenSettings | None = None, adapter: str | None = None,
           batch_size: int = 32, progress: Callable[[int, int], None] | None = None,
           first_batch: int | None = None,
           between_batches: Callable[[], None] | None = None) -> dict:
    """Bring each (prompt_id, answers it has) up to n answers.

    Prompts with the same count go together so sample indices continue from what
    exists: a top-up never redraws an earlier sample (which would be a duplicate).
    `first_batch` applies to the first group only (the rest follows at full speed);
    `between_batches` as in generate_candidates.
    """
    groups: dict[int, list[int]] = {}
    for pid, have in todo:
        groups.setdefault(have, []).append(pid)
    total = sum((n - have) * len(pids) for have, pids in groups.items())
    totals = {"prompts": len(todo), "generated": 0, "new": 0, "duplicates": 0, "tokens": 0,
              "seconds": 0.0}
    for g, (have, pids) in enumerate(sorted(groups.items())):
        def tick(done, _total, base=totals["generated"]):
            if progress is not None:
                progress(base + done, total)

        stats = generate_candidates(store, host, pids, n - have, settings, adapter=adapter,
                                    progress=tick, batch_size=batch_size, start_index=have,
                                    first_batch=first_batch if g == 0 else None,
                                    between_batches=between_batches)
        for key in ("generated", "new", "duplicates", "tokens", "seconds"):
            totals[key] += stats[key]
    return totals


# -- CLI -----------------------------------------------------------------------------------
def cli_generate(args) -> int:
    import sys

    from tqdm import tqdm

    from rpo_app.adapters import AdapterError, resolve_adapter
    from rpo_app.config import DataLayout, resolve_data_dir
    from rpo_app.models import ModelLoadError
    from rpo_app.store import Store

    layout = DataLayout(resolve_data_dir(args.data_dir))
    store = Store(layout.root)
    try:
        settings = GenSettings(temperature=args.temperature, top_p=args.top_p,
                               max_new_tokens=args.max_new_tokens, seed=args.seed,
                               min_p=args.min_p, repetition_penalty=args.repetition_penalty)
        if args.n < 1 or args.batch_size < 1:
            raise ValueError("--n and --batch-size must be at least 1")
        adapter_name = adapter_path = None
        if args.adapter:
            adapter_name, adapter_path = resolve_adapter(store, layout, args.adapter)

        ids = _prompt_ids_from_file(store, Path(args.prompts)) if args.prompts else None
        todo = backlog(store, args.n, args.limit, adapter_name, prompt_ids=ids)
        if not todo:
            print("nothing to do: every selected prompt already has "
                  f"{args.n} answer(s){' from ' + adapter_name if adapter_name else ''}")
            return 0

        host = ModelHost(args.model, layout.root, device=args.device)
        if adapter_name:
            host.load_adapter(adapter_name, adapter_path)
    except (ValueError, AdapterError, ModelLoadError, GenerationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    total = sum(args.n - have for _, have in todo)
    with tqdm(total=total, unit="answer", desc="generating", file=sys.stderr) as bar:
        def progress(done, _total):
            bar.n = done
            bar.refresh()

        totals = top_up(store, host, todo, args.n, settings, adapter=adapter_name,
                        batch_size=args.batch_size, progress=progress)
    rate = totals["tokens"] / totals["seconds"] if totals["seconds"] else 0.0
    print(f"generated {totals['generated']} answers for {totals['prompts']} prompts "
          f"({totals['new']} new, {totals['duplicates']} duplicates); "
          f"{totals['tokens']} tokens in {totals['seconds']:.1f} s ({rate:.1f} tokens/s)")
    return 0
