"""Loss values against numbers worked out by hand (with math, not the code under test)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rpo_app.loss_registry import LOSSES, WEIGHTINGS, get_loss
from rpo_app.losses import dpo_loss, ipo_loss, kto_loss, preference_metrics, rpo_loss, rpo_weights


def nls(x: float) -> float:
    """-log(sigmoid(x))"""
    return math.log1p(math.exp(-x))


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_dpo_loss_hand_worked():
    # rewards r = policy - ref: chosen [0.5, 0.0], rejected [-0.5, 0.5] -> margins [1.0, -0.5]
    loss = dpo_loss(t([-1.0, -2.0]), t([-3.0, -1.0]), t([-1.5, -2.0]), t([-2.5, -1.5]), beta=0.5)
    expected = (nls(0.5 * 1.0) + nls(0.5 * -0.5)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_rpo_loss_hand_worked_unequal_m_n():
    # M = 2 chosen, N = 3 rejected; 2-d prompt embeddings at known angles.
    chosen_emb = t([[1.0, 0.0], [0.0, 2.0]])  # unnormalised on purpose: cosine must normalise
    rejected_emb = t([[1.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    rc = [0.4, -0.2]  # chosen rewards (policy - ref)
    rr = [0.1, -0.3, 0.2]
    beta, tau = 0.2, 0.5
    cos = [[1.0, 1 / math.sqrt(2), 0.0], [0.0, 1 / math.sqrt(2), -1.0]]
    expected = 0.0
    for i in range(2):
        z = sum(math.exp(c / tau) for c in cos[i])
        for j in range(3):
            w = math.exp(cos[i][j] / tau) / z
            expected += nls(beta * w * (rc[i] - rr[j]))
    expected /= 6
    loss = rpo_loss(t(rc), t(rr), t([0.0, 0.0]), t([0.0, 0.0, 0.0]), chosen_prompt_emb=chosen_emb,
                    rejected_prompt_emb=rejected_emb, beta=beta, temperature=tau)
    assert loss.item() == pytest.approx(expected, abs=1e-9)


def test_rpo_contract_is_positional_and_uses_log_ratios():
    # Same rewards reached through different policy/ref splits give the same loss.
    emb = torch.eye(3, dtype=torch.float64)
    kw = dict(chosen_prompt_emb=emb, rejected_prompt_emb=emb, beta=0.1, temperature=0.5)
    a = rpo_loss(t([1.0, 2, 3]), t([0.0, 0, 0]), t([0.0, 0, 0]), t([0.0, 0, 0]), **kw)
    b = rpo_loss(t([-4.0, -3, -2]), t([-7.0, -1, -2]), t([-5.0, -5, -5]), t([-7.0, -1, -2]), **kw)
    assert a.item() == pytest.approx(b.item(), abs=1e-12)


@pytest.mark.parametrize("n", [2, 4, 7])
def test_rpo_tends_to_dpo_over_n_with_tiny_temperature(n):
    g = torch.Generator().manual_seed(n)
    pc, pr, rc, rr = (torch.randn(n, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    emb = torch.eye(n, dtype=torch.float64)  # distinct prompts: orthogonal embeddings
    rpo = rpo_loss(pc, pr, rc, rr, chosen_prompt_emb=emb, rejected_prompt_emb=emb, beta=0.1,
                   temperature=1e-3)
    dpo = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert rpo.item() == pytest.approx(dpo.item() / n + (n - 1) / n * math.log(2), abs=1e-9)


def test_no_gradient_through_weights():
    emb_c = torch.randn(3, 8, requires_grad=True)
    emb_r = torch.randn(3, 8, requires_grad=True)
    pc = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    pr = torch.tensor([-1.5, -2.5, -2.0], requires_grad=True)
    loss = rpo_loss(pc, pr, torch.zeros(3), torch.zeros(3), chosen_prompt_emb=emb_c, rejected_prompt_emb=emb_r)
    loss.backward()
    assert emb_c.grad is None and emb_r.grad is None
    assert not rpo_weights(emb_c, emb_r).requires_grad
    # Raising a chosen log-prob must lower the loss, raising a rejected one must raise it.
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_identical_prompts_give_uniform_weights():
    emb = torch.ones(4, 5)
    w = rpo_weights(emb, emb, temperature=0.25)
    assert torch.allclose(w, torch.full((4, 4), 0.25))


def test_uniform_weighting_is_all_pairs_dpo():
    """The reference's RPOTrainer without embeddings: every weight 1 inside the sigmoid."""
    rc, rr = [0.3, -0.1], [0.2, -0.4, 0.0]
    beta = 0.5
    expected = sum(nls(beta * (c - r)) for c in rc for r in rr) / 6
    loss = rpo_loss(t(rc), t(rr), t([0, 0]), t([0, 0, 0]), beta=beta, weighting="uniform")
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    # with one pair it is DPO itself
    one = rpo_loss(t([0.7]), t([0.1]), t([0.0]), t([0.0]), beta=beta, weighting="uniform")
    assert one.item() == pytest.approx(dpo_loss(t([0.7]), t([0.1]), t([0.0]), t([0.0]), beta=beta).item())


def test_flat_weighting_is_one_over_n_inside():
    rc, rr = [0.3, -0.1], [0.2, -0.4, 0.0]
    expected = sum(nls(0.5 * (1 / 3) * (c - r)) for c in rc for r in rr) / 6
    loss = rpo_loss(t(rc), t(rr), t([0, 0]), t([0, 0, 0]), beta=0.5, weighting="flat")
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    # the limit of embedding weighting as the temperature grows
    emb = torch.randn(2, 4, dtype=torch.float64)
    emb_r = torch.randn(3, 4, dtype=torch.float64)
    hot = rpo_loss(t(rc), t(rr), t([0, 0]), t([0, 0, 0]), beta=0.5, chosen_prompt_emb=emb,
                   rejected_prompt_emb=emb_r, temperature=1e6)
    assert hot.item() == pytest.approx(expected, abs=1e-6)


def test_diagonal_weighting_is_the_reference_formula():
    """RPODiagonalTrainer: 0.8 x own pair + 0.2 x mean of the row's other pairs, outside the sigmoid."""
    rc, rr = [0.5, -0.5, 1.0], [0.0, 0.5, -1.0]
    beta = 0.1
    rows = []
    for i in range(3):
        own = nls(beta * (rc[i] - rr[i]))
        others = [nls(beta * (rc[i] - rr[j])) for j in range(3) if j != i]
        rows.append(0.8 * own + 0.2 * sum(others) / len(others))
    expected = sum(rows) / 3
    loss = rpo_loss(t(rc), t(rr), t([0] * 3), t([0] * 3), beta=beta, weighting="diagonal")
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="as many chosen as rejected"):
        rpo_loss(t(rc[:2]), t(rr), t([0] * 2), t([0] * 3), beta=beta, weighting="diagonal")
    one = rpo_loss(t([0.7]), t([0.1]), t([0.0]), t([0.0]), beta=beta, weighting="diagonal")
    assert one.item() == pytest.approx(nls(beta * 0.6), abs=1e-12)


def test_rows_of_embedding_weights_sum_to_one():
    w = rpo_weights(torch.randn(5, 16), torch.randn(7, 16), temperature=0.5)
    assert w.shape == (5, 7)
    assert torch.allclose(w.sum(1), torch.ones(5))


def test_bad_weighting_and_temperature_refused():
    with pytest.raises(ValueError, match="unknown weighting"):
        rpo_loss(t([0.0]), t([0.0]), t([0.0]), t([0.0]), weighting="cosine")
    with pytest.raises(ValueError, match="temperature"):
        rpo_weights(torch.ones(2, 2), torch.ones(2, 2), temperature=0.0)


def test_ipo_loss_hand_worked():
    # margins h = [1.0, 3.0]; target 1/(2*0.25) = 2 -> squared errors 1 and 1
    loss = ipo_loss(t([1.0, 3.0]), t([0.0, 0.0]), t([0.0, 0.0]), t([0.0, 0.0]), beta=0.25)
    assert loss.item() == pytest.approx(1.0, abs=1e-12)


def test_kto_loss_hand_worked():
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # explicit reference point 0
    loss = kto_loss(t([1.0]), t([-1.0]), t([0.0]), t([0.0]), beta=1.0, kl=0.0)
    assert loss.item() == pytest.approx(1 - sig(1.0), abs=1e-12)
    # default reference point: batch mean of r = (2 + 0 - 1) / 3 = 1/3, clamped at >= 0
    loss = kto_loss(t([2.0, 0.0]), t([-1.0]), t([0.0, 0.0]), t([0.0]), beta=0.5)
    z = 1 / 3
    expected = ((1 - sig(0.5 * (2 - z))) + (1 - sig(0.5 * (0 - z))) + (1 - sig(0.5 * (z + 1)))) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    # a negative batch mean is clamped to 0
    loss = kto_loss(t([-2.0]), t([-4.0]), t([0.0]), t([0.0]), beta=1.0)
    assert loss.item() == pytest.approx(((1 - sig(-2.0)) + (1 - sig(4.0))) / 2, abs=1e-12)


def test_registry_dispatches_to_each_loss_function():
    args = (t([0.5, -1.0]), t([0.0, 0.2]), t([0.0, 0.0]), t([0.0, 0.0]))
    assert get_loss("dpo").compute(*args, beta=0.3).item() == pytest.approx(dpo_loss(*args, beta=0.3).item())
    emb = torch.eye(2, dtype=torch.float64)

    class Settings:
        temperature, weighting = 0.7, "embedding"

    got = get_loss("rpo-paired").compute(*args, beta=0.3, settings=Settings, chosen_prompt_emb=emb,
                                         rejected_prompt_emb=emb)
    assert got.item() == pytest.approx(rpo_loss(*args, chosen_prompt_emb=emb, rejected_prompt_emb=emb,
                                                beta=0.3, temperature=0.7).item())
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("orpo")


def test_every_registry_entry_is_complete():
    import rpo_app.losses as losses

    for spec in LOSSES.values():
        assert callable(getattr(losses, spec.function)), spec.name
        assert spec.trains_on in ("pairs", "pools") and spec.kinds and spec.default_beta > 0
        assert spec.label and spec.help
    assert set(WEIGHTINGS) == {"embedding", "uniform", "diagonal", "flat"}


def test_preference_metrics():
    m = preference_metrics(t([1.0, 0.0]), t([0.0, 2.0]), t([0.0, 0.0]), t([0.0, 0.0]), beta=0.5)
    assert m["rewards_chosen"] == pytest.approx(0.25)
    assert m["rewards_rejected"] == pytest.approx(0.5)
    assert m["margin"] == pytest.approx((0.5 + -1.0) / 2)
    assert m["accuracy"] == pytest.approx(0.5)
    # pools: every chosen against every rejected: 3 > 1, 3 < 4, 0 < 1, 0 < 4 -> 1 of 4
    m = preference_metrics(t([3.0, 0.0]), t([1.0, 4.0]), t([0.0, 0.0]), t([0.0, 0.0]), beta=1.0, aligned=False)
    assert m["accuracy"] == pytest.approx(0.25)
    assert m["margin"] == pytest.approx((2 - 1 - 1 - 4) / 4)


def test_sft_nll_is_the_mean_per_token_nll_of_the_chosen_answers():
    from rpo_app.losses import sft_nll

    # Two answers: -6 over 3 tokens (2 per token) and -1 over 1 token (1 per token).
    logps = torch.tensor([-6.0, -1.0], requires_grad=True)
    value = sft_nll(logps, torch.tensor([3.0, 1.0]))
    assert value.item() == pytest.approx(1.5)
    value.backward()
    assert logps.grad.tolist() == pytest.approx([-1 / 6, -1 / 2])  # d/dlogp of -(logp/n)/2


def test_rpo_keep_drops_the_contrasts_it_is_told_to():
    pc = torch.tensor([1.0, 0.2, -0.5])
    pr = torch.tensor([0.3, -1.0, 0.4])
    zeros = torch.zeros(3)
    keep = torch.tensor([[True, False, True], [True, True, False], [False, True, True]])
    delta = pc[:, None] - pr[None, :]
    for weighting, scale in (("uniform", 1.0), ("flat", 1 / 3)):
        got = rpo_loss(pc, pr, zeros, zeros, beta=0.5, weighting=weighting, keep=keep)
        want = -F.logsigmoid(0.5 * scale * delta)[keep].mean()
        assert torch.allclose(got, want)
    # diagonal: each row's own pair, plus the mean of its kept other cells
    got = rpo_loss(pc, pr, zeros, zeros, beta=0.5, weighting="diagonal", keep=keep)
    cell = -F.logsigmoid(0.5 * delta)
    rows = [0.8 * cell[i, i] + 0.2 * torch.stack([cell[i, j] for j in range(3)
                                                  if j != i and keep[i, j]]).mean()
            for i in range(3)]
    assert torch.allclose(got, torch.stack(rows).mean())
    with pytest.raises(ValueError, match="shape"):
        rpo_loss(pc, pr, zeros, zeros, keep=keep[:2])


def test_contrast_keep_drops_a_ranking_s_reversed_cells():
    from rpo_app.batches import contrast_keep

    # A ranking A > B > C > D as seqs 0..3: its pairs C > D and A > B in one batch.
    beats = {(a, b) for a in range(4) for b in range(a + 1, 4)}
    keep = contrast_keep([2, 0], [3, 1], beats, aligned=True)
    # C over B contradicts the ranking; A over D agrees with it.
    assert keep.tolist() == [[True, False], [True, True]]
    # A rejected sequence that is the chosen one is no contrast at all.
    assert contrast_keep([0, 1], [1, 0], set(), aligned=False).tolist() == [[True, False], [False, True]]


def test_strength_offset_is_odpo_on_each_aligned_pair():
    pc, pr = torch.tensor([-10.0, -12.0]), torch.tensor([-11.0, -11.0])
    rc, rr = torch.tensor([-10.5, -12.0]), torch.tensor([-11.0, -10.0])
    offset = torch.tensor([1.0, 0.0])
    margin = (pc - rc) - (pr - rr)
    assert torch.allclose(dpo_loss(pc, pr, rc, rr, beta=0.5, offset=offset),
                          -F.logsigmoid(0.5 * margin - offset).mean())
    assert torch.allclose(dpo_loss(pc, pr, rc, rr, beta=0.5, offset=torch.zeros(2)),
                          dpo_loss(pc, pr, rc, rr, beta=0.5))
    # RPO: only the pair's own contrast (the diagonal) must clear the offset.
    delta = (pc - rc)[:, None] - (pr - rr)[None, :]
    want = -F.logsigmoid(0.5 * delta - torch.diag(offset)).mean()
    assert torch.allclose(rpo_loss(pc, pr, rc, rr, beta=0.5, weighting="uniform", offset=offset), want)
    with pytest.raises(ValueError, match="aligned pairs"):
        rpo_loss(pc, pr[:1], rc, rr[:1], weighting="uniform", offset=offset)


def test_pair_offsets_follow_the_strength_and_the_setting_is_checked():
    from rpo_app.batches import PreferenceData, pair_offsets
    from rpo_app.trainconfig import ConfigError, TrainConfig

    data = PreferenceData(strength={(0, 1): "clearly", (2, 3): "slightly"})
    assert pair_offsets([0, 2, 4], [1, 3, 5], data, 2.0) == [2.0, 1.0, 0.0]
    assert get_loss("dpo").takes_offset and get_loss("rpo-paired").takes_offset
    assert not get_loss("kto").takes_offset
    TrainConfig(loss="dpo", strength_margin=1.0).validate()
    with pytest.raises(ConfigError, match="strength_margin works with rpo-paired, dpo"):
        TrainConfig(loss="ipo", strength_margin=1.0).validate()
    with pytest.raises(ConfigError, match=">= 0"):
        TrainConfig(strength_margin=-1).validate()
