"""Loss values against numbers worked out by hand (with math, not the code under test)."""
from __future__ import annotations

import math

import pytest
import torch

from rpo_app.losses import (dpo_loss, ipo_loss, kto_loss, preference_loss, preference_metrics, rpo_loss,
                            rpo_weights)


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
    loss = rpo_loss(t(rc), t(rr), t([0.0, 0.0]), t([0.0, 0.0, 0.0]), chosen_emb, rejected_emb, beta, tau)
    assert loss.item() == pytest.approx(expected, abs=1e-9)


def test_rpo_contract_is_positional_and_uses_log_ratios():
    # Same rewards reached through different policy/ref splits give the same loss.
    emb = torch.eye(3, dtype=torch.float64)
    a = rpo_loss(t([1.0, 2, 3]), t([0.0, 0, 0]), t([0.0, 0, 0]), t([0.0, 0, 0]), emb, emb, 0.1, 0.5)
    b = rpo_loss(t([-4.0, -3, -2]), t([-7.0, -1, -2]), t([-5.0, -5, -5]), t([-7.0, -1, -2]), emb, emb, 0.1, 0.5)
    assert a.item() == pytest.approx(b.item(), abs=1e-12)


@pytest.mark.parametrize("n", [2, 4, 7])
def test_rpo_tends_to_dpo_over_n_with_tiny_temperature(n):
    g = torch.Generator().manual_seed(n)
    pc, pr, rc, rr = (torch.randn(n, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    emb = torch.eye(n, dtype=torch.float64)  # distinct prompts: orthogonal embeddings
    rpo = rpo_loss(pc, pr, rc, rr, emb, emb, beta=0.1, temperature=1e-3)
    dpo = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert rpo.item() == pytest.approx(dpo.item() / n + (n - 1) / n * math.log(2), abs=1e-9)


def test_no_gradient_through_weights():
    emb_c = torch.randn(3, 8, requires_grad=True)
    emb_r = torch.randn(3, 8, requires_grad=True)
    pc = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    pr = torch.tensor([-1.5, -2.5, -2.0], requires_grad=True)
    loss = rpo_loss(pc, pr, torch.zeros(3), torch.zeros(3), emb_c, emb_r)
    loss.backward()
    assert emb_c.grad is None and emb_r.grad is None
    assert not rpo_weights(emb_c, emb_r).requires_grad
    # Raising a chosen log-prob must lower the loss, raising a rejected one must raise it.
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_identical_prompts_give_uniform_weights():
    emb = torch.ones(4, 5)
    w = rpo_weights(emb, emb, temperature=0.25)
    assert torch.allclose(w, torch.full((4, 4), 0.25))


def test_uniform_weighting_hand_worked():
    rc, rr = [0.3, -0.1], [0.2, -0.4, 0.0]
    beta = 0.5
    expected = sum(nls(beta * (1 / 3) * (c - r)) for c in rc for r in rr) / 6
    loss = rpo_loss(t(rc), t(rr), t([0, 0]), t([0, 0, 0]), None, None, beta, 0.5, weighting="uniform")
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_diagonal_weighting():
    w = rpo_weights(None, None, weighting="diagonal", shape=(3, 3))
    assert torch.allclose(w, torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]]))
    rc, rr = [0.5, -0.5, 1.0], [0.0, 0.5, -1.0]
    expected = sum(nls(0.1 * (0.8 if i == j else 0.1) * (rc[i] - rr[j])) for i in range(3) for j in range(3)) / 9
    loss = rpo_loss(t(rc), t(rr), t([0] * 3), t([0] * 3), None, None, 0.1, 0.5, weighting="diagonal")
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="as many chosen as rejected"):
        rpo_weights(None, None, weighting="diagonal", shape=(2, 3))
    assert rpo_weights(None, None, weighting="diagonal", shape=(1, 1)).item() == 1.0


def test_rows_of_embedding_weights_sum_to_one():
    w = rpo_weights(torch.randn(5, 16), torch.randn(7, 16), temperature=0.5)
    assert w.shape == (5, 7)
    assert torch.allclose(w.sum(1), torch.ones(5))


def test_bad_weighting_and_temperature_refused():
    with pytest.raises(ValueError, match="unknown weighting"):
        rpo_weights(torch.ones(2, 2), torch.ones(2, 2), weighting="cosine")
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


def test_preference_loss_dispatch_and_unknown():
    args = (t([0.5, -1.0]), t([0.0, 0.2]), t([0.0, 0.0]), t([0.0, 0.0]))
    assert preference_loss("dpo", *args, beta=0.3).item() == pytest.approx(dpo_loss(*args, beta=0.3).item())
    emb = torch.eye(2, dtype=torch.float64)
    assert preference_loss("rpo-paired", *args, emb, emb, beta=0.3, temperature=0.7).item() == pytest.approx(
        rpo_loss(*args, emb, emb, 0.3, 0.7).item())
    with pytest.raises(ValueError, match="unknown loss"):
        preference_loss("orpo", *args)


def test_preference_metrics():
    m = preference_metrics(t([1.0, 0.0]), t([0.0, 2.0]), t([0.0, 0.0]), t([0.0, 0.0]), beta=0.5)
    assert m["rewards/chosen"] == pytest.approx(0.25)
    assert m["rewards/rejected"] == pytest.approx(0.5)
    assert m["margin"] == pytest.approx((0.5 + -1.0) / 2)
    assert m["accuracy"] == pytest.approx(0.5)
    # pools: every chosen against every rejected: 3 > 1, 3 < 4, 0 < 1, 0 < 4 -> 1 of 4
    m = preference_metrics(t([3.0, 0.0]), t([1.0, 4.0]), t([0.0, 0.0]), t([0.0, 0.0]), beta=1.0, aligned=False)
    assert m["accuracy"] == pytest.approx(0.25)
    assert m["margin"] == pytest.approx((2 - 1 - 1 - 4) / 4)
