"""qvlm.distributional by hand: support, two-hot, cross-entropy, Q*_alpha from a categorical, W1.

DESIGN.md ("Distributional values"): support (0, 0.5, 1), p (0.5, 0.3, 0.2): mean 0.35,
Q*_alpha = 0.4306602 (alpha 1), 0.5136111 (0.5), 0.8400731 (0.1); two-hot of 0.7 = 0.6 on 0.5 and 0.4 on 1;
V*_alpha at alpha 0.5 over pi_ref (0.6, 0.4) and Q*_alpha (0.2, 0.9) = 0.5992218.
"""

from __future__ import annotations

import math

import pytest
import torch

from qvlm.distributional import (
    categorical_loss,
    categorical_mean,
    categorical_wasserstein1,
    make_support,
    project_categorical,
    soft_q_from_categorical,
    two_hot,
    wasserstein1,
)
from qvlm.errors import QVLMError
from qvlm.losses import soft_value

Z = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
P = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)


def approx(x, **kw):
    return pytest.approx(x, abs=kw.pop("abs", 1e-7), **kw)


# ---------------------------------------------------------------- support and two-hot


def test_make_support_and_its_errors():
    assert make_support(0, 1, 3).tolist() == [0.0, 0.5, 1.0]
    assert make_support(0, 1, 11, dtype=torch.float64)[3].item() == approx(0.3, abs=1e-15)
    for low, high, bins in [(0, 1, 1), (1, 1, 3), (0, math.inf, 3), (0, 1, 2.5)]:
        with pytest.raises(QVLMError, match="make_support"):
            make_support(low, high, bins)


def test_two_hot_by_hand():
    # DESIGN.md: 0.7 lies between 0.5 and 1: (1 - 0.7) / 0.5 = 0.6 on 0.5, (0.7 - 0.5) / 0.5 = 0.4 on 1
    assert two_hot(torch.tensor(0.7, dtype=torch.float64), Z).tolist() == approx([0.0, 0.6, 0.4], abs=1e-12)
    x = torch.tensor([[0.5, 0.0, 1.0], [-3.0, 7.0, 0.25]])  # (2, 3) -> (2, 3, 3)
    out = two_hot(x, Z)
    assert out.shape == (2, 3, 3)
    assert out[0].tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 1]]  # on an atom: one-hot, the top atom included
    assert out[1, 0].tolist() == [1, 0, 0] and out[1, 1].tolist() == [0, 0, 1]  # clamped into [0, 1]
    assert out[1, 2].tolist() == approx([0.5, 0.5, 0.0])
    # the target's mean is the return inside the range; an uneven support: 2 on (0, 1, 3) -> 0.5 on 1, 0.5 on 3
    uneven = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    assert two_hot(torch.tensor(2.0), uneven).tolist() == approx([0.0, 0.5, 0.5])
    xs = torch.rand(50, dtype=torch.float64) * 3
    assert (two_hot(xs, uneven) @ uneven).tolist() == approx(xs.tolist(), abs=1e-12)
    with pytest.raises(QVLMError, match="increasing"):
        two_hot(torch.tensor(0.5), torch.tensor([0.0, 1.0, 0.5]))


def test_project_categorical_atom_by_atom():
    # atoms 0.25 and 1 with 1/2 each on (0, 0.5, 1): 0.25 -> (0.5, 0.5, 0), 1 -> (0, 0, 1)
    values = torch.tensor([0.25, 1.0], dtype=torch.float64)
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)  # (2, M)
    assert project_categorical(values, probs, Z).flatten().tolist() == approx([0.25, 0.25, 0.5, 0.5, 0.5, 0.0])


# ---------------------------------------------------------------- the loss


def test_categorical_loss_by_hand():
    # uniform prediction over 3 atoms against the two-hot of 0.7: CE = log 3 = 1.0986123;
    # H(0.6, 0.4) = 0.6730117, so the excess (KL) is 0.4256006
    logits = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[0.0, 0.6, 0.4], [1.0, 0.0, 0.0]], dtype=torch.float64)
    loss, stats = categorical_loss(logits, target, torch.tensor([1.0, 0.0]))  # the second row is padding
    assert loss.item() == approx(1.0986123)
    assert stats["excess"].item() == approx(0.4256006)
    assert set(stats) == {"loss", "excess"} and all(v.dim() == 0 and not v.requires_grad for v in stats.values())
    loss.backward()
    # d CE / d logits = softmax - target on the real row, 0 on the padding row
    assert logits.grad[0].tolist() == approx([1 / 3, 1 / 3 - 0.6, 1 / 3 - 0.4])
    assert logits.grad[1].tolist() == [0.0, 0.0, 0.0]
    # no real entries: the count is clamped to 1, the loss is 0, not NaN
    empty, _ = categorical_loss(torch.zeros(2, 3), target.float(), torch.zeros(2))
    assert empty.item() == 0.0


def test_categorical_loss_minimiser_is_the_mean_target():
    # a tabular categorical fitted by cross-entropy to several targets is minimised at their mean: 0.6 -> (0, 0.8, 0.2)
    # and 0.3 -> (0.4, 0.6, 0), mean (0.2, 0.7, 0.1); there the gradient softmax - mean target vanishes
    targets = two_hot(torch.tensor([0.6, 0.3], dtype=torch.float64), Z)
    assert targets.mean(0).tolist() == approx([0.2, 0.7, 0.1], abs=1e-12)
    for start, zero in ([0.2, 0.7, 0.1], True), ([0.3, 0.6, 0.1], False):
        logits = torch.tensor(start, dtype=torch.float64).log().requires_grad_(True)
        loss, _ = categorical_loss(logits.expand(2, 3), targets, torch.ones(2))
        loss.backward()
        assert (logits.grad.abs().max().item() < 1e-12) is zero


# ---------------------------------------------------------------- Q*_alpha from a categorical


def test_mean_and_soft_q_worked_numbers():
    log_p = P.log()
    assert categorical_mean(log_p, Z).item() == approx(0.35)
    # alpha log(0.5 + 0.3 e^{0.5/alpha} + 0.2 e^{1/alpha})
    for alpha, expected in [(1.0, 0.4306602), (0.5, 0.5136111), (0.1, 0.8400731)]:
        assert soft_q_from_categorical(log_p, Z, alpha).item() == approx(expected)
        assert soft_q_from_categorical(log_p.float(), Z.float(), alpha).item() == approx(expected, abs=1e-6)
        naive = alpha * math.log(sum(p * math.exp(z / alpha) for p, z in zip(P.tolist(), Z.tolist())))
        assert naive == approx(expected)


def test_v_star_from_q_star_and_from_the_mixture():
    # DESIGN.md: pi_ref (0.6, 0.4), Q*_alpha (0.2, 0.9), alpha 0.5 -> V*_alpha = 0.5 log(0.6 e^0.4 + 0.4 e^1.8) = 0.5992218
    q = torch.tensor([0.2, 0.9], dtype=torch.float64)
    log_ref = torch.tensor([0.6, 0.4], dtype=torch.float64).log()
    assert soft_value(q, log_ref, 0.5).item() == approx(0.5992218)
    # the same number from the categoricals: each action's return is a point mass, Q*_alpha of a point mass is
    # its value, and V*_alpha is Q*_alpha of the pi_ref mixture of the actions' distributions
    support = torch.tensor([0.0, 0.2, 0.9, 1.0], dtype=torch.float64)
    per_action = two_hot(q, support)  # (2, 4): one-hot on 0.2 and on 0.9
    assert soft_q_from_categorical(per_action.log(), support, 0.5).tolist() == approx([0.2, 0.9])
    mixture = log_ref.exp() @ per_action
    assert soft_q_from_categorical(mixture.log(), support, 0.5).item() == approx(0.5992218)


def test_soft_q_limits_in_alpha():
    log_p = P.log()
    # alpha -> 0: the largest supported return, approached as 1 + alpha log 0.2 (the top atom's log-probability)
    assert soft_q_from_categorical(log_p, Z, 0.0).item() == 1.0
    assert soft_q_from_categorical(log_p, Z, 1e-4).item() == approx(1 + 1e-4 * math.log(0.2), abs=1e-12)
    # an atom of probability 0 is not supported: the limit is the largest atom with p > 0
    no_top = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64).log()
    assert soft_q_from_categorical(no_top, Z, 0.0).item() == 0.5
    assert soft_q_from_categorical(no_top, Z, 1e-3).item() == approx(0.5 + 1e-3 * math.log(0.5), abs=1e-12)
    # alpha -> infinity: the mean, approached as mean + variance / (2 alpha); variance 0.275 - 0.35^2 = 0.1525
    assert soft_q_from_categorical(log_p, Z, math.inf).item() == approx(0.35, abs=1e-15)
    assert soft_q_from_categorical(log_p, Z, 1e4).item() == approx(0.35 + 0.1525 / 2e4, abs=1e-8)
    # monotone in between
    alphas = [1e-3, 0.01, 0.05, 0.1, 0.5, 1, 10, 100]
    values = [soft_q_from_categorical(log_p, Z, a).item() for a in alphas]
    assert all(a > b for a, b in zip(values, values[1:]))
    with pytest.raises(QVLMError, match="alpha"):
        soft_q_from_categorical(log_p, Z, -0.1)


def test_soft_q_is_stable_in_float32_at_tiny_alpha_with_finite_gradients():
    logits = torch.tensor([[0.3, -1.0, 0.5], [2.0, 0.0, -30.0]], dtype=torch.float32)
    for alpha in (1e-2, 1e-3, 1e-5, 1e-8):
        x = logits.clone().requires_grad_(True)
        q = soft_q_from_categorical(torch.log_softmax(x, -1), Z.float(), alpha)
        exact = soft_q_from_categorical(torch.log_softmax(logits.double(), -1), Z, alpha)
        assert torch.isfinite(q).all() and q.tolist() == approx(exact.tolist(), abs=1e-6)
        q.sum().backward()
        assert torch.isfinite(x.grad).all()
    # d Q / d log p_b = alpha times the tilted distribution p_b e^{z_b/alpha} / sum: at tiny alpha all on the top atom
    log_p = P.log().requires_grad_(True)
    soft_q_from_categorical(log_p, Z, 1e-6).backward()
    assert (log_p.grad / 1e-6).tolist() == approx([0.0, 0.0, 1.0], abs=1e-9)
    # bins of probability 0 (log p = -inf) get gradient 0, not NaN
    log_p = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64).log().requires_grad_(True)
    soft_q_from_categorical(log_p, Z, 0.1).backward()
    tilt = torch.tensor([0.5, 0.5 * math.exp(5.0)]) / (0.5 + 0.5 * math.exp(5.0))
    assert (log_p.grad / 0.1).tolist() == approx([tilt[0].item(), tilt[1].item(), 0.0])


# ---------------------------------------------------------------- W1


def test_wasserstein1_by_hand():
    # (0.5, 0.3, 0.2) on (0, 0.5, 1) against a point mass at 0.35: E|R - 0.35| = 0.175 + 0.045 + 0.13 = 0.35
    point = torch.tensor([0.35], dtype=torch.float64)
    assert wasserstein1(Z, P, point, torch.ones(1, dtype=torch.float64)).item() == approx(0.35)
    # two categoricals on one support: F = (0.5, 0.8) and (0.2, 0.5) on the two gaps of 0.5 -> 0.3 + ... = 0.3
    Q = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    assert categorical_wasserstein1(P, Q, Z).item() == approx(0.3)
    assert wasserstein1(Z, P, Z, Q).item() == approx(0.3)
    assert wasserstein1(Z, P, Z, P).item() == 0.0
    # batched, atoms unsorted and repeated; a categorical against the exact atoms it was projected from
    values = torch.tensor([1.0, 0.25, 0.25], dtype=torch.float64)
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.0, 0.5, 0.5]], dtype=torch.float64)  # (2, 3)
    projected = project_categorical(values, probs, Z)  # (2, 3): 0.25 -> half on 0, half on 0.5
    # moving 1/2 of the mass at 0.25 to 0 and 1/2 to 0.5 moves it by 0.25 on average
    assert wasserstein1(Z, projected, values, probs).tolist() == approx([0.5 * 0.25, 1.0 * 0.25])
    # it bounds the error of the mean
    assert abs(categorical_mean(P.log(), Z) - categorical_mean(Q.log(), Z)).item() <= 0.3 + 1e-12
