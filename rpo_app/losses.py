"""Preference losses as pure functions on tensors.

Every loss takes *summed* response-token log-probs (no length normalisation) under
the policy and under the frozen reference, and returns a scalar to minimise.
``r = policy - ref`` is the implicit reward before the ``beta`` factor.

Relative Preference Optimization (RPO, arXiv 2402.10958) contrasts every chosen
item with every rejected item of the batch, weighting each contrast by how similar
the two prompts are; see ``rpo_loss``. DPO, IPO and KTO are here as baselines.
Which loss trains on what, and its defaults, is in ``rpo_app.loss_registry``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rpo_app.loss_registry import WEIGHTINGS

DIAGONAL_WEIGHT = 0.8  # the reference code's RPODiagonalTrainer


def rpo_weights(
    chosen_prompt_emb: torch.Tensor,
    rejected_prompt_emb: torch.Tensor,
    temperature: float = 0.5,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The M x N embedding weights: softmax over j of cos(e_i, e_j') / temperature.

    Each row sums to 1; never carries a gradient. ``dtype``: at least float32, also
    when the log-probs come in bf16.
    """
    if chosen_prompt_emb is None or rejected_prompt_emb is None:
        raise ValueError("embedding weighting needs chosen and rejected prompt embeddings")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # Weights are a fixed property of the prompts: the policy must not learn by
    # moving them, and the embedder is not being trained.
    with torch.no_grad():
        a = F.normalize(chosen_prompt_emb.detach().to(dtype), dim=-1)
        b = F.normalize(rejected_prompt_emb.detach().to(dtype), dim=-1)
        return torch.softmax(a @ b.T / temperature, dim=1)


def rpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 1.0,
    chosen_prompt_emb: torch.Tensor | None = None,
    rejected_prompt_emb: torch.Tensor | None = None,
    temperature: float = 0.5,
    weighting: str = "embedding",
    diagonal_weight: float = DIAGONAL_WEIGHT,
    keep: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Relative Preference Optimization loss over M chosen and N rejected items.

    D[i, j] = r_chosen[i] - r_rejected[j], with r = policy - ref log-probs.

    ``embedding`` (RPO): mean_ij -logsigmoid(beta * w[i, j] * D[i, j]), w from ``rpo_weights``.
    ``uniform`` (the reference's RPOTrainer without embeddings): every w = 1, i.e.
    mean_ij -logsigmoid(beta * D[i, j]): all-pairs DPO.
    ``diagonal`` (the reference's RPODiagonalTrainer; needs M == N): per row
    0.8 * -logsigmoid(beta * D[i, i]) + 0.2 * mean_{j != i} -logsigmoid(beta * D[i, j]),
    averaged over rows; the weight is outside the sigmoid. With one pair: DPO.
    ``flat`` (ours): every w = 1/N inside the sigmoid, the limit of ``embedding`` as
    the temperature grows, so it isolates what prompt similarity adds at the same scale.

    Paired RPO passes aligned lists (the diagonal holds the DPO pairs); unpaired RPO
    passes any two pools.

    ``keep`` (M x N bools) drops contrasts the data itself contradicts: a rejected item
    that is the chosen one, or that a judgment prefers to it (in a ranking A > B > C > D,
    the pairs C > D and A > B put C and B in one batch, and D[C, B] would push C above
    B). The mean runs over the kept cells; the weights are computed over the whole batch
    as before. Paired RPO always keeps the diagonal.

    ``offset`` (M values, aligned pairs only) is the margin each pair's own contrast must
    clear, ODPO's offset: its diagonal term becomes -logsigmoid(z_ii - offset_i), where
    z is the term's argument under the weighting.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    chosen_r = policy_chosen_logps - ref_chosen_logps
    rejected_r = policy_rejected_logps - ref_rejected_logps
    delta = chosen_r[:, None] - rejected_r[None, :]
    dtype = torch.promote_types(delta.dtype, torch.float32)
    delta = delta.to(dtype)
    m, n = delta.shape
    if keep is not None and keep.shape != delta.shape:
        raise ValueError(f"keep has shape {tuple(keep.shape)}, the contrasts {tuple(delta.shape)}")

    if offset is not None and (m != n or offset.shape != (m,)):
        raise ValueError(f"an offset needs aligned pairs and one value per pair, got {tuple(offset.shape)} "
                         f"for {m} x {n} contrasts")
    shift = 0.0 if offset is None else torch.diag_embed(offset.to(dtype))

    def mean(cells):
        return cells.mean() if keep is None else cells[keep].mean() if keep.any() else cells.sum() * 0

    if weighting == "embedding":
        w = rpo_weights(chosen_prompt_emb, rejected_prompt_emb, temperature, dtype=dtype)
        return mean(-F.logsigmoid(beta * w * delta - shift))
    if weighting == "uniform":
        return mean(-F.logsigmoid(beta * delta - shift))
    if weighting == "flat":
        return mean(-F.logsigmoid(beta * delta / n - shift))
    if m != n:
        raise ValueError(f"diagonal weighting needs as many chosen as rejected items, got {m} and {n}")
    cell = -F.logsigmoid(beta * delta - shift)
    on = cell.diagonal()
    if n == 1:
        return on.mean()
    off_keep = torch.ones_like(cell, dtype=torch.bool) if keep is None else keep.clone()
    off_keep.fill_diagonal_(False)
    counts = off_keep.sum(dim=1)
    # A row whose other cells are all dropped is its own pair alone, as with one pair.
    off = torch.where(counts > 0, (cell * off_keep).sum(dim=1) / counts.clamp(min=1), on)
    return (diagonal_weight * on + (1.0 - diagonal_weight) * off).mean()


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean DPO loss over aligned pairs: -logsigmoid(beta * (r_chosen - r_rejected)); with
    ``offset`` (one value per pair), ODPO: -logsigmoid(beta * (...) - offset)."""
    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    z = beta * margin
    if offset is not None:
        z = z - offset.to(z.dtype)
    return -F.logsigmoid(z).mean()


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """IPO (Azar et al. 2023): mean (h - 1/(2 beta))^2, h the log-ratio margin.

    A squared loss towards a fixed margin instead of DPO's ever-growing one, so the
    policy cannot push the rejected answer's probability to zero.
    """
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return ((h - 1.0 / (2.0 * beta)) ** 2).mean()


def kto_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    *,
    kl: torch.Tensor | float | None = None,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024) over pools of desirable and undesirable items.

    desirable: w_d * (1 - sigmoid(beta * (r - z))); undesirable: w_u * (1 - sigmoid(beta * (z - r))).
    The reference point z estimates KL(policy || ref). The paper estimates it from
    mismatched prompt/answer pairs, which costs an extra forward pass; when ``kl`` is
    not given we use the batch mean of r over all items instead, clamped at 0 and
    without gradient (as the paper does with its estimate).
    """
    chosen_r = policy_chosen_logps - ref_chosen_logps
    rejected_r = policy_rejected_logps - ref_rejected_logps
    if kl is None:
        kl = torch.cat([chosen_r, rejected_r]).detach().mean().clamp(min=0)
    elif not torch.is_tensor(kl):
        kl = torch.tensor(float(kl), device=chosen_r.device)
    kl = kl.detach()
    losses = torch.cat([
        desirable_weight * (1 - torch.sigmoid(beta * (chosen_r - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - rejected_r))),
    ])
    return losses.mean()


def sft_nll(policy_chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Mean per-token negative log-likelihood of the chosen answers: the supervised term
    TRL adds with loss_type=["sigmoid", "sft"]. Per token, so a long answer does not
    outweigh a short one."""
    return -(policy_chosen_logps / chosen_tokens.clamp(min=1)).mean()


def preference_metrics(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    aligned: bool = True,
) -> dict[str, float]:
    """Implicit-reward metrics (beta * r) for logging.

    ``aligned``: chosen[i] and rejected[i] form a pair, so margin and accuracy are over
    the pairs; otherwise over every (chosen, rejected) combination (accuracy is then
    the pools' ROC AUC, ties counted as misses).
    """
    with torch.no_grad():
        chosen = beta * (policy_chosen_logps - ref_chosen_logps).detach().float()
        rejected = beta * (policy_rejected_logps - ref_rejected_logps).detach().float()
        if aligned:
            diff = chosen - rejected
        else:
            diff = (chosen[:, None] - rejected[None, :]).flatten()
        return {
            "rewards_chosen": chosen.mean().item() if chosen.numel() else 0.0,
            "rewards_rejected": rejected.mean().item() if rejected.numel() else 0.0,
            "margin": diff.mean().item() if diff.numel() else 0.0,
            "accuracy": (diff > 0).float().mean().item() if diff.numel() else 0.0,
        }
