"""Judgments -> tokenized preference data and length-grouped batches.

Which judgments each loss trains on (the losses' ``trains_on`` and ``kinds`` in
rpo_app.loss_registry; ties never carry a preference and are skipped):

| judgment (kind / verdict)      | rpo-paired        | dpo, ipo          | rpo-unpaired, kto               |
| ------------------------------ | ----------------- | ----------------- | ------------------------------- |
| paired  a / b                  | pair              | pair              | winner -> chosen, loser -> rejected |
| paired  tie                    | -                 | -                 | -                               |
| paired  both_bad               | -                 | -                 | both -> rejected                |
| cross   a / b                  | pair across two prompts (weighted by prompt similarity) | - | winner -> chosen, loser -> rejected |
| cross   tie                    | -                 | -                 | -                               |
| cross   both_bad               | -                 | -                 | both -> rejected                |
| unpaired up / down             | -                 | -                 | up -> chosen, down -> rejected  |
| ranking of K answers           | its implied pairs (rpo_app.rankings) | its same-prompt pairs | upper tiers -> chosen, lower -> rejected, each answer once |

"pair" losses contrast aligned (chosen, rejected) pairs; "pool" losses draw chosen
and rejected items independently from the two pools. The held-out preference
accuracy is measured on held-out pairs (paired and cross) for every loss, so losses
can be compared on one measure; with no held-out pairs it falls back to the pools.

Text becomes tokens through the model's own chat template: the prompt as a user
message (a conversation: its whole history, ending with a user turn) with the
generation prompt, then the response and the end-of-turn token. Only response tokens
are scored: for a conversation, only its final assistant turn.
"""
from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from rpo_app.chat_template import end_of_turn_id, prompt_ids, response_ids
from rpo_app.conversation import frozen
from rpo_app.loss_registry import LossSpec, get_loss
from rpo_app.rankings import pool_sides

KINDS = ("paired", "cross", "unpaired")
# A judgment as training reads it (Store.training_judgments, the run's judgments.jsonl
# and a --judgments file): texts in *_text fields; prompt_b_text/response_b_text are
# empty for thumbs, and prompt_b_text may be empty for a same-prompt pair.
JUDGMENT_FIELDS = ("kind", "verdict", "prompt_a_text", "response_a_text")
# Consecutive batches drawn from one chunk of this many batches are length-sorted;
# bigger chunks pad less but make batch composition less random.
GROUP_BATCHES = 16


@dataclass(frozen=True)
class Item:
    prompt: str  # the text; for a conversation its transcript (rpo_app.conversation)
    response: str
    # A conversation's messages as (role, content) pairs, ending with the user turn the
    # response answers; None for a single user turn.
    messages: tuple | None = None
    # The answer hit its token limit before it ended (store: responses.cut_off).
    cut_off: bool = False


@dataclass(frozen=True)
class Pair:
    chosen: Item
    rejected: Item
    kind: str
    judgment_id: int | None = None
    strength: str | None = None  # "slightly" / "clearly" when the annotator said


# --- judgments -> pairs and pools ------------------------------------------------------

def filter_judgments(judgments: Iterable[dict], kinds: Sequence[str] | None = None,
                     annotators: Sequence[str] | None = None) -> list[dict]:
    """Keep the judgment kinds and annotators asked for (None: all)."""
    if kinds:
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown judgment kinds {sorted(unknown)}; choose from {', '.join(KINDS)}")
    return [j for j in judgments
            if (not kinds or j["kind"] in kinds) and (not annotators or j.get("annotator") in annotators)]


def _sides(j: dict) -> tuple[Item, Item | None]:
    a = Item(j["prompt_a_text"], j["response_a_text"], frozen(j.get("prompt_a_messages")),
             bool(j.get("cut_off_a")))
    if j["kind"] == "unpaired":
        return a, None
    cut_b = bool(j.get("cut_off_b"))
    # A paired judgment may leave prompt_b empty: both answers share prompt_a.
    if not j.get("prompt_b_text"):
        return a, Item(a.prompt, j["response_b_text"], a.messages, cut_b)
    return a, Item(j["prompt_b_text"], j["response_b_text"], frozen(j.get("prompt_b_messages")), cut_b)


def judgment_pairs(judgments: Iterable[dict], kinds: Sequence[str] = ("paired", "cross")) -> list[Pair]:
    """(chosen, rejected) pairs from a/b verdicts of the given kinds."""
    pairs = []
    for j in judgments:
        if j["kind"] not in kinds or j["kind"] == "unpaired" or j["verdict"] not in ("a", "b"):
            continue
        a, b = _sides(j)
        chosen, rejected = (a, b) if j["verdict"] == "a" else (b, a)
        pairs.append(Pair(chosen, rejected, j["kind"], j.get("judgment_id"), j.get("strength")))
    return pairs


def judgment_pools(judgments: Iterable[dict]) -> tuple[list[Item], list[Item]]:
    """Chosen and rejected items from every kind of judgment (see the module table)."""
    chosen: list[Item] = []
    rejected: list[Item] = []
    rankings: dict = {}  # ranking id -> ({item: tier}, tiers, none acceptable)
    for j in judgments:
        a, b = _sides(j)
        verdict = j["verdict"]
        if j.get("ranking_id") is not None:  # a ranking counts once per answer, not per pair
            place, _, _ = rankings.setdefault(j["ranking_id"], ({}, j["ranking_tiers"],
                                                                verdict == "both_bad"))
            place.update({a: j["tier_a"], b: j["tier_b"]})
        elif j["kind"] == "unpaired":
            (chosen if verdict == "up" else rejected).append(a)
        elif verdict == "a":
            chosen.append(a)
            rejected.append(b)
        elif verdict == "b":
            chosen.append(b)
            rejected.append(a)
        elif verdict == "both_bad":
            rejected.extend([a, b])
    for place, tiers, none_acceptable in rankings.values():
        liked, disliked = pool_sides(place, tiers, none_acceptable)
        chosen.extend(liked)
        rejected.extend(disliked)
    return chosen, rejected


def _spec(loss: "str | LossSpec") -> "LossSpec":
    return get_loss(loss) if isinstance(loss, str) else loss


def count_examples(judgments: list[dict], loss: "str | LossSpec") -> tuple[int, int]:
    """(chosen, rejected) example counts the loss would train on; pair losses give (n, n)."""
    spec = _spec(loss)
    if spec.pools:
        chosen, rejected = judgment_pools(j for j in judgments if j["kind"] in spec.kinds)
        return len(chosen), len(rejected)
    n = len(judgment_pairs(judgments, spec.kinds))
    return n, n


# --- held-out split --------------------------------------------------------------------

def split_judgments(judgments: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic (train, eval) split in which no prompt is on both sides.

    A cross judgment ties its two prompts together, so prompts are grouped into
    connected components and whole components go to one side. Components are taken
    in a seeded random order until the eval side holds about ``eval_fraction`` of the
    judgments; a component too big to fit is skipped, so one huge component never
    swallows the eval set.
    """
    if eval_fraction <= 0 or not judgments:
        return list(judgments), []
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for j in judgments:
        ra = find(j["prompt_a_text"])
        if j.get("prompt_b_text"):
            rb = find(j["prompt_b_text"])
            parent[rb] = ra
    members: dict[str, list[int]] = {}
    for idx, j in enumerate(judgments):
        members.setdefault(find(j["prompt_a_text"]), []).append(idx)
    components = sorted(members.values())  # sorted: the seed alone fixes the order
    random.Random(seed).shuffle(components)
    target = max(1, int(round(eval_fraction * len(judgments))))
    eval_idx: set[int] = set()
    for comp in components:
        if len(eval_idx) + len(comp) <= target:
            eval_idx.update(comp)
    if not eval_idx and len(components) > 1:
        # Every component overshoots the target: take the smallest rather than hold
        # out nothing, unless even that would be more than twice the share asked for.
        smallest = min(components, key=len)
        if len(smallest) <= 2 * target:
            eval_idx.update(smallest)
    train = [j for i, j in enumerate(judgments) if i not in eval_idx]
    held = [j for i, j in enumerate(judgments) if i in eval_idx]
    return train, held


# --- tokenization ----------------------------------------------------------------------

def truncate(prompt: list[int], response: list[int], max_length: int,
             max_prompt_length: int) -> tuple[list[int], list[int]]:
    """Keep the prompt's end (the question and the assistant header are there) and the
    response's start (its first tokens are what the model will be asked to produce)."""
    if len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:]
    return prompt, response[:max(max_length - len(prompt), 0)]


@dataclass(frozen=True)
class Seq:
    """One tokenized (prompt, response): input_ids[prompt_len:] are the scored tokens."""

    input_ids: tuple[int, ...]
    prompt_len: int
    prompt_idx: int  # index into PreferenceData.prompts

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class PreferenceData:
    """Unique tokenized sequences plus the pairs and pools that point into them.

    A sequence used by several judgments is stored (and scored) once.
    """

    prompts: list[str] = field(default_factory=list)
    seqs: list[Seq] = field(default_factory=list)
    pairs: list[tuple[int, int]] = field(default_factory=list)  # (chosen seq, rejected seq)
    chosen: list[int] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)  # items[k] is the text of seqs[k]
    # Prompt text -> its conversation ((role, content) pairs) for the prompts that are one.
    messages: dict[str, tuple] = field(default_factory=dict)
    # (winner seq, loser seq) for every decided pair in the judgments: what the contrast
    # mask reads (contrast_keep).
    beats: set[tuple[int, int]] = field(default_factory=set)
    # (chosen seq, rejected seq) -> the strongest strength a judgment gave that pair.
    strength: dict[tuple[int, int], str] = field(default_factory=dict)

    def embed_texts(self) -> list[str]:
        """What the embedder reads for each of `prompts` (rpo_app.conversation.embed_text)."""
        from rpo_app.conversation import embed_text

        return [embed_text([{"role": r, "content": c} for r, c in self.messages[p]])
                if p in self.messages else p for p in self.prompts]

    def lengths(self) -> list[int]:
        return [len(s) for s in self.seqs]

    def n_tokens(self, seq_idx: Iterable[int]) -> int:
        return sum(len(self.seqs[i]) for i in seq_idx)


class Encoder:
    """Tokenizes items once each, with per-prompt caching."""

    def __init__(self, tokenizer, max_length: int, max_prompt_length: int):
        if max_prompt_length >= max_length:
            raise ValueError(f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length})")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.eot = end_of_turn_id(tokenizer)
        self._prompt_cache: dict[str, list[int]] = {}

    def encode(self, item: Item, prompt_idx: int) -> Seq:
        if item.prompt not in self._prompt_cache:
            # The whole conversation goes through the template; only the answer is scored.
            self._prompt_cache[item.prompt] = prompt_ids(self.tokenizer, item.messages or item.prompt)
        prompt, response = truncate(self._prompt_cache[item.prompt],
                                    response_ids(self.tokenizer, item.response, self.eot,
                                                 ended=not item.cut_off),
                                    self.max_length, self.max_prompt_length)
        return Seq(tuple(prompt + response), len(prompt), prompt_idx)


def build_data(judgments: list[dict], encoder: Encoder, loss: "str | LossSpec", *,
               for_eval: bool = False) -> PreferenceData:
    """Tokenize what ``loss`` trains on; for the eval split also every pair (for accuracy)."""
    data = PreferenceData()
    seq_index: dict[Item, int] = {}
    prompt_index: dict[str, int] = {}

    def add(item: Item) -> int:
        if item not in seq_index:
            if item.prompt not in prompt_index:
                prompt_index[item.prompt] = len(data.prompts)
                data.prompts.append(item.prompt)
                if item.messages:
                    data.messages[item.prompt] = item.messages
            seq_index[item] = len(data.seqs)
            data.seqs.append(encoder.encode(item, prompt_index[item.prompt]))
            data.items.append(item)
        return seq_index[item]

    spec = _spec(loss)
    if not spec.pools or for_eval:
        kinds = ("paired", "cross") if for_eval else spec.kinds
        data.pairs = [(add(p.chosen), add(p.rejected)) for p in judgment_pairs(judgments, kinds)]
    if spec.pools:
        chosen, rejected = judgment_pools(j for j in judgments if j["kind"] in spec.kinds)
        data.chosen = [add(i) for i in chosen]
        data.rejected = [add(i) for i in rejected]
    decided = [p for p in judgment_pairs(judgments) if p.chosen in seq_index and p.rejected in seq_index]
    data.beats = {(seq_index[p.chosen], seq_index[p.rejected]) for p in decided}
    for p in sorted((p for p in decided if p.strength), key=lambda p: STRENGTH_SHARE[p.strength]):
        data.strength[(seq_index[p.chosen], seq_index[p.rejected])] = p.strength
    return data


# The strength margin's share per strength (TrainConfig.strength_margin): a "clearly" pair
# must win by the whole margin, a "slightly" one by half, one without a strength by none.
STRENGTH_SHARE = {"clearly": 1.0, "slightly": 0.5}


def pair_offsets(chosen: Sequence[int], rejected: Sequence[int], data: PreferenceData,
                 margin: float) -> list[float]:
    """The margin each aligned pair of a batch must clear (ODPO's offset)."""
    return [margin * STRENGTH_SHARE.get(data.strength.get((c, r)), 0.0)
            for c, r in zip(chosen, rejected)]


def contrast_keep(chosen: Sequence[int], rejected: Sequence[int], beats: set[tuple[int, int]],
                  aligned: bool):
    """M x N bools: the contrasts of a batch (chosen seq i over rejected seq j) that no
    judgment contradicts. Dropped: j is i's own sequence, or a judgment prefers j to i
    (one ranking's pairs in one batch would otherwise push answers against its order).
    Aligned pairs keep their diagonal: each is the judgment itself."""
    import torch

    keep = torch.tensor([[r != c and (r, c) not in beats for r in rejected] for c in chosen],
                        dtype=torch.bool)
    if aligned:
        keep.fill_diagonal_(True)
    return keep


# --- batches ---------------------------------------------------------------------------

def length_grouped(lengths: Sequence[int], batch_size: int, rng: random.Random,
                   drop_last: bool = True) -> list[list[int]]:
    """Shuffled batches of indices whose members have similar lengths.

    Shuffle, cut into chunks of GROUP_BATCHES batches, sort each chunk by length so
    neighbours pad little, cut into batches, then shuffle the batch order so long
    and short batches alternate randomly over the epoch.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if drop_last:
        order = order[: len(order) // batch_size * batch_size]
    chunk = batch_size * GROUP_BATCHES
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: -lengths[i])
        batches.extend(part[k:k + batch_size] for k in range(0, len(part), batch_size))
    rng.shuffle(batches)
    return batches


class BatchPlan:
    """The whole run's data order as a pure function of (seed, micro-batch number).

    Micro-batch k lives in epoch k // batches_per_epoch; each epoch's order is
    rebuilt from (seed, epoch), so resuming only needs k. ``batch(k)`` returns
    (chosen seq indices, rejected seq indices) for the GLOBAL batch of
    ``batch_size`` examples; each process takes its slice.

    Pair losses: one example is an aligned pair, length-grouped by its longer side.
    Pool losses: a batch holds ``batch_size`` chosen and ``batch_size`` rejected items;
    the epoch runs over the larger pool while the smaller one is cycled.
    """

    def __init__(self, data: PreferenceData, batch_size: int, seed: int, pool: bool):
        self.data, self.batch_size, self.seed, self.pool = data, batch_size, seed, pool
        lengths = data.lengths()
        if pool:
            self._chosen_len = [lengths[i] for i in data.chosen]
            self._rejected_len = [lengths[i] for i in data.rejected]
            longest = max(len(data.chosen), len(data.rejected))
            self.batches_per_epoch = longest // batch_size if min(len(data.chosen), len(data.rejected)) else 0
        else:
            self._pair_len = [max(lengths[c], lengths[r]) for c, r in data.pairs]
            self.batches_per_epoch = len(data.pairs) // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError("fewer training examples than one batch")
        self._cache: tuple[int, list] | None = None

    def _epoch(self, epoch: int) -> list[tuple[list[int], list[int]]]:
        if self._cache and self._cache[0] == epoch:
            return self._cache[1]
        rng = random.Random(f"{self.seed}:{epoch}")
        if self.pool:
            n = self.batches_per_epoch * self.batch_size
            chosen = self._stream(self.data.chosen, self._chosen_len, n, rng)
            rejected = self._stream(self.data.rejected, self._rejected_len, n, rng)
            bs = self.batch_size
            out = [(chosen[k:k + bs], rejected[k:k + bs]) for k in range(0, n, bs)]
        else:
            out = [([self.data.pairs[p][0] for p in b], [self.data.pairs[p][1] for p in b])
                   for b in length_grouped(self._pair_len, self.batch_size, rng)]
        self._cache = (epoch, out)
        return out

    def _stream(self, pool: list[int], lengths: list[int], n: int, rng: random.Random) -> list[int]:
        """n pool entries in length-grouped order, cycling through the pool as needed."""
        out: list[int] = []
        while len(out) < n:
            for b in length_grouped(lengths, self.batch_size, rng, drop_last=False):
                out.extend(pool[i] for i in b)
        return out[:n]

    def batch(self, k: int) -> tuple[list[int], list[int]]:
        epoch, pos = divmod(k, self.batches_per_epoch)
        return self._epoch(epoch)[pos]


def eval_batches(data: PreferenceData, batch_size: int, pool: bool) -> list[tuple[list[int], list[int]]]:
    """Fixed, unshuffled batches for the held-out loss (nothing is dropped)."""
    if pool:
        if not data.chosen or not data.rejected:
            return []
        c = [data.chosen[k:k + batch_size] for k in range(0, len(data.chosen), batch_size)]
        r = [data.rejected[k:k + batch_size] for k in range(0, len(data.rejected), batch_size)]
        return [(c[i % len(c)], r[i % len(r)]) for i in range(max(len(c), len(r)))]
    pairs = data.pairs
    return [([c for c, _ in pairs[k:k + batch_size]], [r for _, r in pairs[k:k + batch_size]])
            for k in range(0, len(pairs), batch_size)]


def collate(seqs: Sequence[Seq], pad_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Right-padded tensors for one forward pass.

    ``score_mask[b, t]`` is True where the logits at position t predict a response
    token (t + 1 is in the response): exactly the positions whose log-probs we sum.
    """
    import torch

    longest = max(len(s) for s in seqs)
    if pad_to_multiple_of:
        longest = math.ceil(longest / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), longest), dtype=torch.long)
    score = torch.zeros((len(seqs), longest), dtype=torch.bool)
    for b, s in enumerate(seqs):
        n = len(s)
        input_ids[b, :n] = torch.tensor(s.input_ids)
        attention[b, :n] = 1
        score[b, s.prompt_len - 1:n - 1] = True
    return {"input_ids": input_ids, "attention_mask": attention, "score_mask": score}
