"""Every preference loss the trainer knows, one entry each: the one home of a loss's facts.

An entry says what the loss trains on (aligned pairs or two pools), which judgment
kinds feed it, whether it contrasts the whole batch (and so may weight by prompt
embeddings), its default beta, which pure function in ``rpo_app.losses`` computes it
and which training settings that function takes, and how the Train tab names and
explains it. The trainer, the batch builder, the CLI, the Train tab and bench-effect
all read this table; a new loss is one entry here plus one function in losses.py.

Torch-free on purpose: the CLI lists the names without importing torch.
"""
from __future__ import annotations

from dataclasses import dataclass

# Contrast weights of RPO's M x N matrix D (see losses.rpo_loss). The first three
# mean what the paper's reference code means, so results compare with the paper.
WEIGHTINGS = ("embedding", "uniform", "diagonal", "flat")
WEIGHTING_HELP = {
    "embedding": "softmax over the batch of prompt similarity / tau, inside the sigmoid (RPO)",
    "uniform": "every weight 1 inside the sigmoid: all-pairs DPO (the reference's RPOTrainer "
               "without prompt embeddings)",
    "diagonal": "0.8 x the aligned pair's loss + 0.2 x the mean loss of the other pairs in its row, "
                "the weight outside the sigmoid (the reference's RPODiagonalTrainer); paired only",
    "flat": "1/N inside the sigmoid: embedding weighting at infinite tau, the same scale as "
            "'embedding' without the similarity (ours, not in the paper)",
}


@dataclass(frozen=True)
class LossSpec:
    name: str
    label: str  # the Train tab's picker
    help: str  # one line for --help and the README
    trains_on: str  # "pairs": aligned (chosen[i], rejected[i]); "pools": two independent pools
    kinds: tuple[str, ...]  # judgment kinds that feed it
    default_beta: float
    function: str  # name of the pure function in rpo_app.losses
    contrasts_batch: bool = False  # every chosen item against every rejected item of the batch
    options: tuple[str, ...] = ()  # TrainConfig fields passed to the function by keyword
    # Takes a per-pair margin its aligned pairs must clear (`offset`: the strength margin).
    takes_offset: bool = False
    # TrainConfig.small_set's default: a label set with fewer training examples than this
    # (pairs, or items in the larger pool) trains the small-set schedule (40 steps of 4).
    small_set: int = 64
    # What a benchmark measured against this loss when a set smaller than its small_set
    # trained longer than the small-set schedule (TrainConfig.overtraining_caution says
    # when; the Train tab and the trainer say it).
    overtraining_caution: str = ""

    @property
    def pools(self) -> bool:
        return self.trains_on == "pools"

    def needs_embeddings(self, weighting: str) -> bool:
        return self.contrasts_batch and weighting == "embedding"

    def example_word(self) -> str:
        return "chosen/rejected items" if self.pools else "pairs"

    def compute(self, policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float,
                settings=None, chosen_prompt_emb=None, rejected_prompt_emb=None, keep=None,
                offset=None):
        """The loss on one batch; ``settings`` (a TrainConfig) supplies ``options``."""
        from rpo_app import losses

        kwargs = {name: getattr(settings, name) for name in self.options} if settings else {}
        if self.contrasts_batch:  # `keep`: the contrasts the data does not contradict
            kwargs.update(chosen_prompt_emb=chosen_prompt_emb, rejected_prompt_emb=rejected_prompt_emb,
                          keep=keep)
        if self.takes_offset and offset is not None:
            kwargs["offset"] = offset
        fn = getattr(losses, self.function)
        return fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta, **kwargs)


# RPO's default beta: each contrast is scaled by beta * w_ij and a row of w sums to 1
# over the batch (on the seed prompts at tau 0.5 and batch 8: 0.48 on the diagonal,
# 0.07 elsewhere), so at DPO's 0.1 its terms barely saturate and the model drifts until
# its answers garble. The effect benchmark (docs/benchmarks.md) measured 1.0 near the base model's
# fluency and winning as often as DPO at 0.1. Unpaired RPO on thumbs has no same-prompt
# cell to carry the weight (at batch 4 about 0.25 on each), yet at 1.0 its loss saturates
# halfway through a small-set run and it stops learning; bench-curve measured 0.25 ahead
# of 1.0 (docs/benchmarks.md, "Thumbs only, again").
_RPO = dict(function="rpo_loss", contrasts_batch=True, default_beta=1.0,
            options=("temperature", "weighting"))

# The pooled losses' small-set bounds, in items of the larger pool (bench-curve, concise,
# thumbs only, the schedule forced each way; docs/benchmarks.md "The small-set bound, measured").
# KTO: 40 steps of 4 won more than 60 steps of 8 at pools of 58-67 and 81-83, less at
# 105-109, so 96. rpo-unpaired: 60 steps of 8 collapsed it at 58-67 (6 of 6), garbled it at
# 81-83 (3 of 3, read) and drifted it at 105-109 (-1.18 log-prob per token against -0.69,
# one seed of 3 partly garbled); 40 steps of 4 kept it fluent at every size, so 128.
# Pairs keep 64: 102-109 training pairs lost 0.15 (dpo) and 0.23 (rpo-paired) of mean
# win rate on 40 steps of 4, and stayed fluent on 60 steps of 8.
_KTO_SMALL_SET = 96
_RPO_UNPAIRED_SMALL_SET = 128

_SPECS = (
    LossSpec("rpo-paired", "RPO, paired (same + related prompts)",
             "Relative Preference Optimization on A/B pairs, also across related prompts",
             trains_on="pairs", kinds=("paired", "cross"), takes_offset=True, **_RPO),
    LossSpec("rpo-unpaired", "RPO, unpaired (thumbs and every judgment)",
             "Relative Preference Optimization on pools of liked and disliked answers",
             trains_on="pools", kinds=("paired", "cross", "unpaired"), **{**_RPO, "default_beta": 0.25},
             small_set=_RPO_UNPAIRED_SMALL_SET,
             overtraining_caution=(
                 f"on fewer than {_RPO_UNPAIRED_SMALL_SET} liked or disliked items, rpo-unpaired "
                 "collapsed or garbled on 10 of 12 thumbs-only runs that trained 60 steps of 8 (all "
                 "9 at 128 and 176 thumbs) and on 3 of 37 at 40 steps of 4, the default for a set "
                 "this size (runs of emoji at 64 thumbs): leave Steps blank, or set Steps to 40 and "
                 "Batch size to 4, or use KTO")),
    LossSpec("dpo", "DPO (same-prompt pairs)", "Direct Preference Optimization (baseline)",
             trains_on="pairs", kinds=("paired",), default_beta=0.1, function="dpo_loss",
             takes_offset=True),
    LossSpec("ipo", "IPO (baseline)", "Identity Preference Optimization (baseline)",
             trains_on="pairs", kinds=("paired",), default_beta=0.1, function="ipo_loss"),
    LossSpec("kto", "KTO (baseline, thumbs)", "Kahneman-Tversky Optimization on liked/disliked pools",
             trains_on="pools", kinds=("paired", "cross", "unpaired"), default_beta=0.1,
             function="kto_loss", small_set=_KTO_SMALL_SET),
)

LOSSES: dict[str, LossSpec] = {s.name: s for s in _SPECS}
LOSS_NAMES = tuple(LOSSES)


def default_small_sets() -> str:
    """Each loss's small-set bound, for help texts: "rpo-paired 64, rpo-unpaired 128, ..."."""
    return ", ".join(f"{s.name} {s.small_set}" for s in _SPECS)


def default_betas() -> str:
    """Each loss's default beta, for help texts: "rpo-paired 1, rpo-unpaired 0.25, ..."."""
    return ", ".join(f"{s.name} {s.default_beta:g}" for s in _SPECS)


def get_loss(name: str) -> LossSpec:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}") from None
