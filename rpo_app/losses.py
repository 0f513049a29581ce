"""Preference losses as pure functions on tensors.

Every loss takes *summed* response-token log-probs (no length normalisation) under
the policy and under the frozen reference, and returns a scalar to minimise.
``r = policy - ref`` is the implicit reward before the ``beta`` factor.

Relative Preference Optimization (RPO, arXiv 2402.10958) contrasts every chosen
item with every rejected item of the batch, weighting each contrast by how similar
the two prompts are; see ``rpo_loss``. DPO, IPO and KTO are here as baselines.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# The names live in torch-free batches.py so the CLI can list them without importing torch.
from rpo_app.batches import LOSSES, PAIR_LOSSES, POOL_LOSSES, WEIGHTINGS  # noqa: F401 - re-exported

DIAGONAL_WEIGHT = 0.8  # the paper's RPO-Diagonal ablation


def rpo_weights(
    chosen_prompt_emb: torch.Tensor | None,
    rejected_prompt_emb: torch.Tensor | None,
    temperature: float = 0.5,
    weighting: str = "embedding",
    *,
    shape: tuple[int, int] | None = None,
    diagonal_weight: float = DIAGONAL_WEIGHT,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The M x N contrast weights; each row sums to 1; never carries a gradient.

    ``embedding``: softmax over j of cos(e_i, e_j') / temperature.
    ``uniform``: 1/N everywhere (every contrast counts the same).
    ``diagonal``: ``diagonal_weight`` on the aligned pair, the rest spread evenly over
    the row (needs M == N; with N == 1 the single weight is 1).
    ``shape`` gives (M, N) when the embeddings are not needed (uniform, diagonal).
    ``dtype``: at least float32, also when the log-probs come in bf16.
    ``device``: where uniform/diagonal weights go (default: the embeddings' device, else CPU).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    if weighting == "embedding":
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
    if shape is None:
        if chosen_prompt_emb is None or rejected_prompt_emb is None:
            raise ValueError("give shape=(M, N) or the prompt embeddings")
        shape = (chosen_prompt_emb.shape[0], rejected_prompt_emb.shape[0])
    m, n = shape
    if device is None and chosen_prompt_emb is not None:
        device = chosen_prompt_emb.device
    if weighting == "uniform":
        return torch.full((m, n), 1.0 / n, device=device, dtype=dtype)
    if m != n:
        raise ValueError(f"diagonal weighting needs as many chosen as rejected items, got {m} and {n}")
    if n == 1:
        return torch.ones((1, 1), device=device, dtype=dtype)
    off = (1.0 - diagonal_weight) / (n - 1)
    w = torch.full((n, n), off, device=device, dtype=dtype)
    w.fill_diagonal_(diagonal_weight)
    return w


def rpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_prompt_emb: torch.Tensor | None,
    rejected_prompt_emb: torch.Tensor | None,
    beta: float = 0.1,
    temperature: float = 0.5,
    *,
    weighting: str = "embedding",
    diagonal_weight: float = DIAGONAL_WEIGHT,
) -> torch.Tensor:
    """Relative Preference Optimization loss over M chosen and N rejected items.

    Delta[i, j] = r_chosen[i] - r_rejected[j];
    loss = mean_ij -logsigmoid(beta * w[i, j] * Delta[i, j]), with w from ``rpo_weights``.
    Paired RPO passes aligned lists (the diagonal holds the DPO pairs); unpaired RPO
    passes any two pools.
    """
    chosen_r = policy_chosen_logps - ref_chosen_logps
    rejected_r = policy_rejected_logps - ref_rejected_logps
    delta = chosen_r[:, None] - rejected_r[None, :]
    dtype = torch.promote_types(delta.dtype, torch.float32)
    w = rpo_weights(chosen_prompt_emb, rejected_prompt_emb, temperature, weighting,
                    shape=tuple(delta.shape), diagonal_weight=diagonal_weight, dtype=dtype,
                    device=delta.device)
    return -F.logsigmoid(beta * w * delta.to(dtype)).mean()


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """Mean DPO loss over aligned pairs: -logsigmoid(beta * (r_chosen - r_rejected))."""
    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(beta * margin).mean()


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


def preference_loss(
    loss: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_prompt_emb: torch.Tensor | None = None,
    rejected_prompt_emb: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    temperature: float = 0.5,
    weighting: str = "embedding",
) -> torch.Tensor:
    """Dispatch by the loss name the trainer was configured with."""
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if loss in ("rpo-paired", "rpo-unpaired"):
        return rpo_loss(*logps, chosen_prompt_emb, rejected_prompt_emb, beta, temperature,
                        weighting=weighting)
    if loss == "dpo":
        return dpo_loss(*logps, beta=beta)
    if loss == "ipo":
        return ipo_loss(*logps, beta=beta)
    if loss == "kto":
        return kto_loss(*logps, beta=beta)
    raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")


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
            "rewards/chosen": chosen.mean().item() if chosen.numel() else 0.0,
            "rewards/rejected": rejected.mean().item() if rejected.numel() else 0.0,
            "margin": diff.mean().item() if diff.numel() else 0.0,
            "accuracy": (diff > 0).float().mean().item() if diff.numel() else 0.0,
        }
