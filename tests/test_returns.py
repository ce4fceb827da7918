"""Hand-computed tests for qvlm.returns (torchtune style: every number can be checked by hand).

Shared example (DESIGN.md, "Worked numbers"): T = 3, rewards (0, 0, 1), done (0, 0, 1), gamma 0.9,
V(s_1..s_3) = (0.5, 0.6, 0.8).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from qvlm.masked import masked_mean, masked_var, masked_whiten
from qvlm.returns import (
    gae,
    monte_carlo_returns,
    shift_values,
    td_lambda_returns,
    td_targets,
)

GAMMA = 0.9
LAM = 0.95


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


@pytest.fixture
def worked():
    """DESIGN.md worked example as (B=1, T=3) tensors; next_values[-1] is never used (done)."""
    return dict(
        rewards=t([0.0, 0.0, 1.0]),
        done=t([0.0, 0.0, 1.0]),
        values=t([0.5, 0.6, 0.8]),
        next_values=t([0.6, 0.8, 123.0]),  # V(s_4) = 123 must be ignored: s_4 is terminal
    )


# ---------------------------------------------------------------- masked_mean / var / whiten


def test_masked_mean_scalar_and_per_row():
    x = t([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    mask = t([1, 1, 0], [1, 0, 0])
    # over all real entries: (1 + 2 + 4) / 3 = 7/3
    assert masked_mean(x, mask).item() == pytest.approx(7.0 / 3.0)
    # per row: (1 + 2) / 2 = 1.5 ; 4 / 1 = 4
    assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 4.0], dtype=torch.float64))


def test_masked_mean_all_padding_is_zero_not_nan():
    x = t([1.0, 2.0], [3.0, 4.0])
    mask = t([0, 0], [1, 1])
    # row 0: sum 0 / clamp(0, min=1) = 0 ; row 1: (3 + 4) / 2 = 3.5
    out = masked_mean(x, mask, dim=1)
    assert_close(out, torch.tensor([0.0, 3.5], dtype=torch.float64))
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_masked_var_ignores_padding_and_applies_bessel():
    x = t([1.0, 2.0, 3.0, 100.0])
    mask = t([1, 1, 1, 0])
    # mean 2, squared deviations (1, 0, 1), sum 2: biased 2/3, unbiased 2/(3-1) = 1
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(2.0 / 3.0)
    assert masked_var(x, mask).item() == pytest.approx(1.0)


def test_masked_whiten_zero_mean_unit_variance_padding_zero():
    x = t([1.0, 2.0, 3.0, 100.0])
    mask = t([1, 1, 1, 0])
    # mean 2, unbiased var 1 -> (x - 2) / 1 = (-1, 0, 1); padding -> 0
    assert_close(masked_whiten(x, mask), t([-1.0, 0.0, 1.0, 0.0]))
    # shift_mean=False adds the mean back: (1, 2, 3), padding still 0
    assert_close(masked_whiten(x, mask, shift_mean=False), t([1.0, 2.0, 3.0, 0.0]))


def test_masked_whiten_scales_by_std():
    x = t([0.0, 4.0])
    mask = t([1, 1])
    # mean 2, unbiased var ((-2)^2 + 2^2) / 1 = 8, std 2*sqrt(2): (-2, 2) / 2.828427 = -/+0.7071068
    s = 1.0 / math.sqrt(2.0)
    assert_close(masked_whiten(x, mask), t([-s, s]))


# ---------------------------------------------------------------- shift_values


def test_shift_values_with_and_without_last_value():
    values = t([0.5, 0.6, 0.8], [1.0, 2.0, 3.0])
    # next_values[:, t] = values[:, t+1]; the last column is V(s_{T+1}) = last_value (or 0)
    assert_close(shift_values(values), t([0.6, 0.8, 0.0], [2.0, 3.0, 0.0]))
    last = torch.tensor([0.3, 4.0], dtype=torch.float64)
    assert_close(shift_values(values, last), t([0.6, 0.8, 0.3], [2.0, 3.0, 4.0]))


# ---------------------------------------------------------------- Monte-Carlo returns


def test_mc_returns_worked_numbers(worked):
    # G_3 = 1 ; G_2 = 0 + 0.9 * 1 = 0.9 ; G_1 = 0 + 0.9 * 0.9 = 0.81
    out = monte_carlo_returns(worked["rewards"], worked["done"], GAMMA)
    assert_close(out, t([0.81, 0.9, 1.0]))


def test_mc_returns_done_ignores_last_value(worked):
    # done_3 = 1: (1 - done) zeroes gamma * V(s_4), so last_value = 5 changes nothing
    out = monte_carlo_returns(
        worked["rewards"], worked["done"], GAMMA, last_value=torch.tensor([5.0], dtype=torch.float64)
    )
    assert_close(out, t([0.81, 0.9, 1.0]))


def test_mc_returns_truncation_bootstraps_from_last_value(worked):
    # done_3 = 0 (cut by the length limit), V(s_4) = 2:
    # G_3 = 1 + 0.9 * 2 = 2.8 ; G_2 = 0.9 * 2.8 = 2.52 ; G_1 = 0.9 * 2.52 = 2.268
    out = monte_carlo_returns(
        worked["rewards"], t([0.0, 0.0, 0.0]), GAMMA, last_value=torch.tensor([2.0], dtype=torch.float64)
    )
    assert_close(out, t([2.268, 2.52, 2.8]))


def test_mc_returns_done_mid_row_stops_bootstrapping():
    # rewards (1, 2, 3), done (1, 0, 1), gamma 0.5:
    # G_3 = 3 ; G_2 = 2 + 0.5 * 3 = 3.5 ; G_1 = 1 (done_1 = 1: nothing flows back from step 2)
    out = monte_carlo_returns(t([1.0, 2.0, 3.0]), t([1.0, 0.0, 1.0]), 0.5)
    assert_close(out, t([1.0, 3.5, 3.0]))


def test_mc_returns_padding_does_not_change_real_steps():
    # row 0 = worked example + 2 padding steps holding garbage rewards (5, 7) and done 0
    # row 1 = a truncated row of length 2: rewards (0, 1), last_value 2:
    #   G_2 = 1 + 0.9 * 2 = 2.8 ; G_1 = 0.9 * 2.8 = 2.52 ; padding (reward 9) -> 0
    rewards = t([0.0, 0.0, 1.0, 5.0, 7.0], [0.0, 1.0, 9.0, 9.0, 9.0])
    done = t([0.0, 0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0])
    mask = t([1, 1, 1, 0, 0], [1, 1, 0, 0, 0])
    last_value = torch.tensor([4.0, 2.0], dtype=torch.float64)  # row 0 is done: its 4 is ignored
    out = monte_carlo_returns(rewards, done, GAMMA, mask=mask, last_value=last_value)
    assert_close(out, t([0.81, 0.9, 1.0, 0.0, 0.0], [2.52, 2.8, 0.0, 0.0, 0.0]))


def test_mc_returns_padded_row_equals_unpadded_row():
    # a truncated row without bootstrap value: padding rewards must not leak into G_2
    rewards = torch.tensor([[0.3, 1.0]], dtype=torch.float64)
    done = torch.zeros(1, 2, dtype=torch.float64)
    unpadded = monte_carlo_returns(rewards, done, GAMMA)  # (0.3 + 0.9 * 1, 1) = (1.2, 1.0)
    assert_close(unpadded, t([1.2, 1.0]))
    padded = monte_carlo_returns(
        torch.tensor([[0.3, 1.0, 50.0]], dtype=torch.float64),
        torch.zeros(1, 3, dtype=torch.float64),
        GAMMA,
        mask=t([1, 1, 0]),
    )
    assert_close(padded[:, :2], unpadded)
    assert padded[0, 2].item() == 0.0


# ---------------------------------------------------------------- TD targets


def test_td_targets_worked_numbers(worked):
    # y_1 = 0 + 0.9 * 0.6 = 0.54 ; y_2 = 0 + 0.9 * 0.8 = 0.72 ; y_3 = 1 + 0.9 * 0 * 123 = 1.0
    out = td_targets(worked["rewards"], worked["next_values"], worked["done"], GAMMA)
    assert_close(out, t([0.54, 0.72, 1.0]))


def test_td_targets_truncated_row_bootstraps_from_next_values(worked):
    # done_3 = 0, V(s_4) = 2: y_3 = 1 + 0.9 * 2 = 2.8
    out = td_targets(worked["rewards"], t([0.6, 0.8, 2.0]), t([0.0, 0.0, 0.0]), GAMMA)
    assert_close(out, t([0.54, 0.72, 2.8]))


def test_td_targets_from_shift_values(worked):
    # shift_values builds next_values = (0.6, 0.8, last_value); done zeroes the last one
    next_values = shift_values(worked["values"], torch.tensor([9.0], dtype=torch.float64))
    out = td_targets(worked["rewards"], next_values, worked["done"], GAMMA)
    assert_close(out, t([0.54, 0.72, 1.0]))


# ---------------------------------------------------------------- GAE and lambda-returns


def test_gae_worked_numbers(worked):
    # delta = y - V = (0.54 - 0.5, 0.72 - 0.6, 1.0 - 0.8) = (0.04, 0.12, 0.2); gamma * lam = 0.855
    # A_3 = 0.2 ; A_2 = 0.12 + 0.855 * 0.2 = 0.291 ; A_1 = 0.04 + 0.855 * 0.291 = 0.288805
    # returns = A + V = (0.788805, 0.891, 1.0)
    adv, ret = gae(**worked, gamma=GAMMA, lam=LAM)
    assert_close(adv, t([0.288805, 0.291, 0.2]))
    assert_close(ret, t([0.788805, 0.891, 1.0]))


def test_gae_lam_zero_is_td_error(worked):
    # lam = 0: A_t = delta_t = (0.04, 0.12, 0.2)
    adv, _ = gae(**worked, gamma=GAMMA, lam=0.0)
    assert_close(adv, t([0.04, 0.12, 0.2]))


def test_gae_truncated_row_bootstraps(worked):
    # done_3 = 0, V(s_4) = 2: delta_3 = 1 + 0.9 * 2 - 0.8 = 2.0, delta_1,2 = (0.04, 0.12)
    # A_3 = 2.0 ; A_2 = 0.12 + 0.855 * 2 = 1.83 ; A_1 = 0.04 + 0.855 * 1.83 = 1.60465
    adv, ret = gae(worked["rewards"], worked["values"], t([0.6, 0.8, 2.0]), t([0.0, 0.0, 0.0]), GAMMA, LAM)
    assert_close(adv, t([1.60465, 1.83, 2.0]))
    assert_close(ret, t([2.10465, 2.43, 2.8]))


def test_gae_done_mid_row_stops_advantage_flow():
    # rewards (1, 3), values (0, 0), next_values (5, 0), done (1, 1), gamma 1, lam 1:
    # delta_1 = 1 + 1 * (1 - 1) * 5 - 0 = 1 ; delta_2 = 3 ; A_2 = 3 ; A_1 = 1 + 0 * A_2 = 1
    # (ignoring done would give delta_1 = 6 and A_1 = 9)
    adv, _ = gae(t([1.0, 3.0]), t([0.0, 0.0]), t([5.0, 0.0]), t([1.0, 1.0]), 1.0, 1.0)
    assert_close(adv, t([1.0, 3.0]))


def test_gae_padding_does_not_change_real_steps(worked):
    # row 0 = worked example + 1 padding step full of garbage (reward 5, V 7, next V 9, done 0)
    # row 1 = truncated row of length 2: rewards (0, 1), V (0.5, 0.6), V(s_3) = 2 at its last real
    #   step; delta = (0 + 0.9*0.6 - 0.5, 1 + 0.9*2 - 0.6) = (0.04, 2.2)
    #   A_2 = 2.2 ; A_1 = 0.04 + 0.855 * 2.2 = 1.921 ; returns (2.421, 2.8)
    rewards = t([0.0, 0.0, 1.0, 5.0], [0.0, 1.0, 5.0, 5.0])
    values = t([0.5, 0.6, 0.8, 7.0], [0.5, 0.6, 7.0, 7.0])
    next_values = t([0.6, 0.8, 123.0, 9.0], [0.6, 2.0, 9.0, 9.0])
    done = t([0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0])
    mask = t([1, 1, 1, 0], [1, 1, 0, 0])
    adv, ret = gae(rewards, values, next_values, done, GAMMA, LAM, mask=mask)
    assert_close(adv, t([0.288805, 0.291, 0.2, 0.0], [1.921, 2.2, 0.0, 0.0]))
    assert_close(ret, t([0.788805, 0.891, 1.0, 0.0], [2.421, 2.8, 0.0, 0.0]))
    # the padded row equals the unpadded one on its real steps
    adv_unpadded, _ = gae(**worked, gamma=GAMMA, lam=LAM)
    assert_close(adv[:1, :3], adv_unpadded)


def test_td_lambda_returns_worked_numbers(worked):
    # G^lam_3 = 1 ; G^lam_2 = 0 + 0.9 * (0.05 * 0.8 + 0.95 * 1) = 0.891
    # G^lam_1 = 0 + 0.9 * (0.05 * 0.6 + 0.95 * 0.891) = 0.9 * 0.87645 = 0.788805
    out = td_lambda_returns(**worked, gamma=GAMMA, lam=LAM)
    assert_close(out, t([0.788805, 0.891, 1.0]))


def test_td_lambda_returns_lam0_equals_td_targets(worked):
    out = td_lambda_returns(**worked, gamma=GAMMA, lam=0.0)
    expected = td_targets(worked["rewards"], worked["next_values"], worked["done"], GAMMA)
    assert_close(out, expected)
    assert_close(out, t([0.54, 0.72, 1.0]))


def test_td_lambda_returns_lam1_equals_mc_returns(worked):
    out = td_lambda_returns(**worked, gamma=GAMMA, lam=1.0)
    assert_close(out, monte_carlo_returns(worked["rewards"], worked["done"], GAMMA))
    assert_close(out, t([0.81, 0.9, 1.0]))


def test_td_lambda_returns_lam1_equals_bootstrapped_mc_on_truncation(worked):
    # truncated, V(s_4) = 2: both give (2.268, 2.52, 2.8) (see the MC truncation test)
    not_done = t([0.0, 0.0, 0.0])
    last_value = torch.tensor([2.0], dtype=torch.float64)
    next_values = shift_values(worked["values"], last_value)  # (0.6, 0.8, 2.0)
    out = td_lambda_returns(worked["rewards"], worked["values"], next_values, not_done, GAMMA, 1.0)
    mc = monte_carlo_returns(worked["rewards"], not_done, GAMMA, last_value=last_value)
    assert_close(out, mc)
    assert_close(out, t([2.268, 2.52, 2.8]))
