"""Hand-computed tests for qvlm.losses (torchtune style: every number can be checked by hand).

V(s_1..s_3) = (0.5, 0.6, 0.8) and the TD targets (0.54, 0.72, 1.0) are DESIGN.md's worked example.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from qvlm.losses import (
    awac_loss,
    clipped_value_loss,
    cql_loss,
    expectile_loss,
    ilql_q_loss,
    ppo_policy_loss,
    soft_value,
    value_regression_loss,
)

LN2 = math.log(2.0)
E = math.e


def t(*rows, grad: bool = False) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64, requires_grad=grad)


ONES3 = torch.ones(1, 3, dtype=torch.float64)


# ---------------------------------------------------------------- expectile


def test_expectile_worked_numbers():
    # u = Q_hat - V = (0.1, -0.1, 0.2); weights |0.7 - 1(u < 0)| = (0.7, 0.3, 0.7)
    # terms (0.7 * 0.01, 0.3 * 0.01, 0.7 * 0.04) = (0.007, 0.003, 0.028), mean 0.038 / 3 = 0.0126667
    loss, stats = expectile_loss(t([0.6, 0.5, 1.0]), t([0.5, 0.6, 0.8]), ONES3, tau=0.7)
    assert loss.item() == pytest.approx(0.038 / 3)
    assert float(stats["loss"]) == pytest.approx(0.0126667, abs=1e-7)
    assert float(stats["v_mean"]) == pytest.approx(1.9 / 3)  # (0.5 + 0.6 + 0.8) / 3


def test_expectile_tau_half_is_half_mse():
    # tau 0.5: weight 0.5 on both sides -> 0.5 * mean(u^2) = 0.5 * (0.01 + 0.01 + 0.04) / 3 = 0.01
    loss, _ = expectile_loss(t([0.6, 0.5, 1.0]), t([0.5, 0.6, 0.8]), ONES3, tau=0.5)
    assert loss.item() == pytest.approx(0.01)


def test_expectile_gradient_flows_to_values_not_target():
    target_q = t([0.6, 0.5, 1.0], grad=True)
    values = t([0.5, 0.6, 0.8], grad=True)
    loss, _ = expectile_loss(target_q, values, ONES3, tau=0.7)
    loss.backward()
    # dL/dV_t = -2 w_t u_t / 3 = (-2*0.7*0.1, -2*0.3*(-0.1), -2*0.7*0.2) / 3
    assert_close(values.grad, t([-0.14 / 3, 0.06 / 3, -0.28 / 3]))
    assert target_q.grad is None  # Q_hat is detached


def test_expectile_padding_does_not_change_loss():
    # a 4th padding step with a huge error must not count; the denominator stays 3
    loss, _ = expectile_loss(t([0.6, 0.5, 1.0, 100.0]), t([0.5, 0.6, 0.8, -100.0]), t([1, 1, 1, 0]), tau=0.7)
    assert loss.item() == pytest.approx(0.0126667, abs=1e-7)


def test_expectile_all_padding_is_zero():
    loss, _ = expectile_loss(t([1.0, 2.0]), t([0.0, 0.0]), t([0, 0]), tau=0.7)
    assert loss.item() == 0.0 and not torch.isnan(loss)


# ---------------------------------------------------------------- ILQL Q loss


def test_ilql_q_loss_mean_over_heads():
    # target (1, 1, 1); head 1 (1, 2, 3): errors (0, 1, 2), mean sq (0 + 1 + 4) / 3 = 5/3
    # head 2 (1, 1, 1): 0 ; loss = mean over heads = (5/3 + 0) / 2 = 5/6
    q1, q2 = t([1.0, 2.0, 3.0], grad=True), t([1.0, 1.0, 1.0], grad=True)
    loss, stats = ilql_q_loss([q1, q2], t([1.0, 1.0, 1.0]), ONES3)
    assert loss.item() == pytest.approx(5.0 / 6.0)
    assert float(stats["q_mean"]) == pytest.approx(2.0)  # head 0: (1 + 2 + 3) / 3
    loss.backward()
    # dL/dq1 = 2 (q1 - y) / 3 / 2 heads = (0, 1/3, 2/3)
    assert_close(q1.grad, t([0.0, 1.0 / 3.0, 2.0 / 3.0]))


def test_ilql_q_loss_target_from_worked_td_targets_is_detached():
    # y = r + 0.9 (1 - done) V(s') = (0.54, 0.72, 1.0) from V(s_2), V(s_3) = (0.6, 0.8)
    next_v = t([0.6, 0.8, 0.0], grad=True)
    target = t([0.0, 0.0, 1.0]) + 0.9 * t([1.0, 1.0, 0.0]) * next_v
    q = t([0.64, 0.72, 0.8], grad=True)
    # errors (0.1, 0, -0.2) -> (0.01 + 0 + 0.04) / 3 = 0.0166667
    loss, _ = ilql_q_loss([q], target, ONES3)
    assert loss.item() == pytest.approx(0.05 / 3)
    loss.backward()
    assert next_v.grad is None  # V in the TD target is detached
    assert q.grad is not None


def test_ilql_q_loss_padding_ignored():
    loss, _ = ilql_q_loss([t([1.0, 2.0, 50.0])], t([1.0, 1.0, 0.0]), t([1, 1, 0]))
    # real errors (0, 1): (0 + 1) / 2 = 0.5; the padded 50^2 is ignored
    assert loss.item() == pytest.approx(0.5)


# ---------------------------------------------------------------- CQL


def test_cql_loss_cross_entropy_of_q_logits():
    # step 1: Q = (0, 0), a = 0: logsumexp = ln 2, minus Q(a) = 0 -> ln 2 = 0.693147
    # step 2: Q = (ln 3, 0), a = 0: ln(3 + 1) - ln 3 = ln(4/3) = 0.287682
    # step 3: padding. mean = (ln 2 + ln 4/3) / 2 = ln(8/3) / 2 = 0.490415
    q_logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [9.0, -9.0]]], dtype=torch.float64, requires_grad=True)
    actions = torch.tensor([[0, 0, 1]])
    loss, stats = cql_loss(q_logits, actions, t([1, 1, 0]))
    assert loss.item() == pytest.approx(math.log(8.0 / 3.0) / 2)
    assert float(stats["loss"]) == pytest.approx(0.490415, abs=1e-6)
    loss.backward()
    # dL/dQ = (softmax - onehot(a)) / 2: step 1 (0.5 - 1, 0.5) / 2 = (-0.25, 0.25); padding 0
    assert_close(q_logits.grad[0, 0], torch.tensor([-0.25, 0.25], dtype=torch.float64))
    assert_close(q_logits.grad[0, 2], torch.zeros(2, dtype=torch.float64))


# ---------------------------------------------------------------- AWAC


def test_awac_loss_weighted_nll_with_clipping():
    # logits (0, 0) -> -log pi(a) = ln 2 on every step
    # step 1: A = ln 2, weight exp(ln 2) = 2 ; step 2: A = 10, exp(10) clipped to max_weight 5
    # loss = (2 ln 2 + 5 ln 2) / 2 = 3.5 ln 2 = 2.426015 ; weight_mean (2 + 5) / 2 = 3.5
    logits = torch.zeros(1, 2, 2, dtype=torch.float64, requires_grad=True)
    advantages = t([LN2, 10.0], grad=True)
    loss, stats = awac_loss(logits, torch.tensor([[0, 1]]), advantages, t([1, 1]), max_weight=5.0)
    assert loss.item() == pytest.approx(3.5 * LN2)
    assert float(stats["weight_mean"]) == pytest.approx(3.5)
    loss.backward()
    assert advantages.grad is None  # the weight is detached
    assert logits.grad is not None


def test_awac_loss_beta_scales_advantage():
    # beta 2, A = ln 2: weight exp(2 ln 2) = 4 ; logits (ln 3, 0), a = 0: -log(3/4) = ln(4/3)
    # loss = 4 ln(4/3) = 1.150728
    logits = torch.tensor([[[math.log(3.0), 0.0]]], dtype=torch.float64)
    loss, _ = awac_loss(logits, torch.tensor([[0]]), t([LN2]), t([1]), beta=2.0)
    assert loss.item() == pytest.approx(4 * math.log(4.0 / 3.0))


def test_awac_loss_gradient_to_logits_and_padding():
    logits = torch.zeros(1, 2, 2, dtype=torch.float64, requires_grad=True)
    # step 1 real, weight exp(0) = 1 ; step 2 padding (A = 100 must not count)
    loss, _ = awac_loss(logits, torch.tensor([[0, 0]]), t([0.0, 100.0]), t([1, 0]))
    assert loss.item() == pytest.approx(LN2)
    loss.backward()
    # d(-log softmax_0)/dlogits = softmax - onehot = (-0.5, 0.5) ; padding step 0
    assert_close(logits.grad[0], torch.tensor([[-0.5, 0.5], [0.0, 0.0]], dtype=torch.float64))


# ---------------------------------------------------------------- soft value


def test_soft_value_worked_numbers_and_optimal_policy():
    # V* = 1 * log(0.5 e^1 + 0.5 e^0) = log(0.5 e + 0.5) = 0.6201145
    ref_logprobs = torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64))
    q = torch.tensor([1.0, 0.0], dtype=torch.float64)
    v = soft_value(q, ref_logprobs, alpha=1.0)
    assert v.item() == pytest.approx(0.6201145, abs=1e-7)
    # pi* = pi_ref exp((Q - V*) / alpha) = (e, 1) / (e + 1) = (sigmoid(1), sigmoid(-1))
    pi_star = torch.exp(ref_logprobs + (q - v) / 1.0)
    assert_close(pi_star, torch.tensor([0.7310586, 0.2689414], dtype=torch.float64))


def test_soft_value_temperature():
    ref_logprobs = torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64))
    q = torch.tensor([1.0, 0.0], dtype=torch.float64)
    # alpha 2: 2 log(0.5 e^0.5 + 0.5) = 2 log(1.3243606) = 0.5618596
    assert soft_value(q, ref_logprobs, 2.0).item() == pytest.approx(0.5618596, abs=1e-7)
    # alpha 0.01 -> max Q: 0.01 log(0.5 e^100 + 0.5) = 1 + 0.01 ln 0.5 = 0.9930685
    assert soft_value(q, ref_logprobs, 0.01).item() == pytest.approx(0.9930685, abs=1e-7)


def test_soft_value_batched_shape_and_zero_prob_action():
    # (2, 2, 3) -> (2, 2); pi_ref = (1, 0, 0) makes V = Q(a_0) whatever the other Q are
    ref = torch.log(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)).expand(2, 2, 3)
    q = torch.tensor([[[0.3, 50.0, 50.0]]], dtype=torch.float64).expand(2, 2, 3)
    v = soft_value(q, ref, 1.0)
    assert v.shape == (2, 2)
    assert_close(v, torch.full((2, 2), 0.3, dtype=torch.float64))


# ---------------------------------------------------------------- PPO policy loss


def test_ppo_policy_loss_upper_clip():
    # log pi - log pi_old = 1 -> ratio e = 2.718 ; eps 0.2
    # A = +1: max(-e, -1.2) = -1.2 (clipped) ; A = -1: max(e, 1.2) = e (unclipped)
    # A = +2: max(-2e, -2.4) = -2.4 (clipped)
    # loss = (-1.2 + e - 2.4) / 3 = -0.2938636 ; clipfrac 2/3
    logprobs = t([1.0, 1.0, 1.0], grad=True)
    loss, stats = ppo_policy_loss(logprobs, t([0.0, 0.0, 0.0]), t([1.0, -1.0, 2.0]), ONES3)
    assert loss.item() == pytest.approx((E - 3.6) / 3)
    assert float(stats["clipfrac"]) == pytest.approx(2.0 / 3.0)
    assert float(stats["ratio_mean"]) == pytest.approx(E)
    assert float(stats["approx_kl"]) == pytest.approx(0.5)  # 0.5 * 1^2
    loss.backward()
    # clipped steps: no gradient ; unclipped: d(-A e^x)/dx / 3 = -(-1) e / 3 = e / 3
    assert_close(logprobs.grad, t([0.0, E / 3, 0.0]))


def test_ppo_policy_loss_lower_clip():
    # log ratio -1 -> ratio 1/e = 0.3679
    # A = +1: max(-0.3679, -0.8) = -0.3679 (unclipped) ; A = -1: max(0.3679, 0.8) = 0.8 (clipped)
    # A = -2: max(0.7358, 1.6) = 1.6 (clipped)
    # loss = (-1/e + 0.8 + 1.6) / 3 = 0.6773735 ; clipfrac 2/3
    logprobs = t([-1.0, -1.0, -1.0], grad=True)
    loss, stats = ppo_policy_loss(logprobs, t([0.0, 0.0, 0.0]), t([1.0, -1.0, -2.0]), ONES3)
    assert loss.item() == pytest.approx((2.4 - 1 / E) / 3)
    assert float(stats["clipfrac"]) == pytest.approx(2.0 / 3.0)
    loss.backward()
    # unclipped step: d(-1 * e^x)/dx / 3 = -e^-1 / 3 ; clipped steps: 0
    assert_close(logprobs.grad, t([-1 / (3 * E), 0.0, 0.0]))


def test_ppo_policy_loss_ratio_one_and_padding():
    # ratio 1 everywhere: loss = -mean(A) over real steps = -(2 + 4) / 2 = -3 ; nothing clipped
    # the padded step (A = 1000, log ratio 5) must not count
    loss, stats = ppo_policy_loss(t([0.0, 0.0, 5.0]), t([0.0, 0.0, 0.0]), t([2.0, 4.0, 1000.0]), t([1, 1, 0]))
    assert loss.item() == pytest.approx(-3.0)
    assert float(stats["clipfrac"]) == 0.0
    assert float(stats["approx_kl"]) == 0.0


def test_ppo_policy_loss_old_logprobs_detached():
    old = t([0.1, 0.2], grad=True)
    loss, _ = ppo_policy_loss(t([0.0, 0.0], grad=True), old, t([1.0, 1.0]), t([1, 1]))
    loss.backward()
    assert old.grad is None


# ---------------------------------------------------------------- value losses


def test_clipped_value_loss_both_branches():
    # eps 0.2, V = 1, V_old = 0.5: clipped V = 0.5 + clip(0.5, -0.2, 0.2) = 0.7
    # step 1, G = 0.5: max((1 - 0.5)^2, (0.7 - 0.5)^2) = max(0.25, 0.04) = 0.25 (unclipped)
    # step 2, G = 1.5: max((1 - 1.5)^2, (0.7 - 1.5)^2) = max(0.25, 0.64) = 0.64 (clipped)
    # step 3, G = 1.1: max((1 - 1.1)^2, (0.7 - 1.1)^2) = max(0.01, 0.16) = 0.16 (clipped)
    # loss = 0.5 * (0.25 + 0.64 + 0.16) / 3 = 0.175 ; clipfrac 2/3
    values = t([1.0, 1.0, 1.0], grad=True)
    loss, stats = clipped_value_loss(values, t([0.5, 0.5, 0.5]), t([0.5, 1.5, 1.1]), ONES3)
    assert loss.item() == pytest.approx(0.175)
    assert float(stats["clipfrac"]) == pytest.approx(2.0 / 3.0)
    loss.backward()
    # step 1: 0.5 * 2 (1 - 0.5) / 3 = 1/6 ; steps 2, 3 follow the saturated clip: 0
    assert_close(values.grad, t([1.0 / 6.0, 0.0, 0.0]))


def test_clipped_value_loss_within_clip_is_half_mse_and_padding():
    # |V - V_old| = 0.1 < 0.2: both branches equal -> 0.5 * mean((V - G)^2) = 0.5 * (0.09 + 0.01) / 2
    loss, stats = clipped_value_loss(t([0.6, 0.4, 9.0]), t([0.5, 0.5, 0.0]), t([0.3, 0.5, -9.0]), t([1, 1, 0]))
    assert loss.item() == pytest.approx(0.025)
    assert float(stats["clipfrac"]) == 0.0


def test_value_regression_loss_against_worked_mc_returns():
    # V (0.5, 0.6, 0.8) vs MC returns (0.81, 0.9, 1.0): errors (0.31, 0.3, 0.2)
    # (0.0961 + 0.09 + 0.04) / 3 = 0.2261 / 3 = 0.0753667
    values = t([0.5, 0.6, 0.8], grad=True)
    targets = t([0.81, 0.9, 1.0], grad=True)
    loss, stats = value_regression_loss(values, targets, ONES3)
    assert loss.item() == pytest.approx(0.2261 / 3)
    assert float(stats["v_mean"]) == pytest.approx(1.9 / 3)
    loss.backward()
    # dL/dV = 2 (V - G) / 3 = (-0.62, -0.6, -0.4) / 3 ; targets detached
    assert_close(values.grad, t([-0.62 / 3, -0.2, -0.4 / 3]))
    assert targets.grad is None


def test_value_regression_loss_padded_row_equals_unpadded():
    # batch: row 0 real (0.5, 0.6) vs (1, 1) -> errors (0.5, 0.4), sq (0.25, 0.16) ; row 0 padding
    # step carries garbage ; row 1 is all padding: loss = (0.25 + 0.16) / 2 = 0.205, not NaN
    loss, _ = value_regression_loss(
        t([0.5, 0.6, 7.0], [3.0, 3.0, 3.0]), t([1.0, 1.0, -7.0], [0.0, 0.0, 0.0]), t([1, 1, 0], [0, 0, 0])
    )
    unpadded, _ = value_regression_loss(t([0.5, 0.6]), t([1.0, 1.0]), t([1, 1]))
    assert loss.item() == pytest.approx(0.205)
    assert loss.item() == pytest.approx(unpadded.item())


# ---------------------------------------------------------------- stats: detached tensors, no sync


def _every_loss(grad: bool):
    x = t([0.5, 0.6, 0.8], grad=grad)
    y = t([0.6, 0.5, 1.0], grad=grad)
    logits = torch.zeros(1, 3, 2, dtype=torch.float64, requires_grad=grad)
    actions = torch.tensor([[0, 1, 0]])
    return {
        "expectile": expectile_loss(y, x, ONES3, tau=0.7),
        "ilql_q": ilql_q_loss([x, y], y, ONES3),
        "cql": cql_loss(logits, actions, ONES3),
        "awac": awac_loss(logits, actions, y, ONES3),
        "ppo_policy": ppo_policy_loss(x, y, y, ONES3),
        "clipped_value": clipped_value_loss(x, y, y, ONES3),
        "value_regression": value_regression_loss(x, y, ONES3),
    }


def test_every_loss_returns_detached_zero_dim_tensor_stats(monkeypatch):
    # .item() is a device sync per call: the losses must not call it (the trainer converts once per step)
    def no_item(self):
        raise AssertionError("a loss called .item()")

    monkeypatch.setattr(torch.Tensor, "item", no_item)
    for name, (loss, stats) in _every_loss(grad=True).items():
        assert loss.requires_grad, name
        for key, value in stats.items():
            assert isinstance(value, torch.Tensor) and value.dim() == 0, (name, key)
            assert not value.requires_grad, (name, key)
    # the "loss" stat is the loss's value: value_regression (0.01 + 0.01 + 0.04) / 3 = 0.02
    loss, stats = _every_loss(grad=True)["value_regression"]
    monkeypatch.undo()
    assert float(stats["loss"]) == pytest.approx(0.02) == loss.item()
