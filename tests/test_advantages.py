"""Hand-computed tests for the critic-free advantages of qvlm.online (issue 23): RLOO's leave-one-out
baseline and GRPO's group normalisation, on the same KL-penalised per-token rewards as GAE.

Group layout: the responses to one prompt are contiguous rows, ``group_size`` per prompt (what
``sample_rollout`` writes with ``num_return_sequences``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from qvlm.errors import QVLMError
from qvlm.online import (
    group_advantages,
    grpo_advantages,
    kl_penalised_rewards,
    rloo_advantages,
    sequence_returns,
)


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def terminal(returns: list[float], T: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards with each return on the last of ``T`` real steps, and the all-ones mask."""
    rewards = torch.zeros((len(returns), T), dtype=torch.float64)
    rewards[:, -1] = torch.tensor(returns, dtype=torch.float64)
    return rewards, torch.ones_like(rewards)


# Two prompts x two responses, T = 3, kl_coef 0.5; k1 = log pi_old - log pi_ref per token:
#   row 0: R 1.0, mask 111, k1 (0.1, 0.2, 0.0)  -> r~ (-0.05, -0.1, 1.0)  -> return 0.85
#   row 1: R 0.0, mask 110, k1 (0.2, -0.2, pad) -> r~ (-0.1, 0.1, 0)      -> return 0.0
#   row 2: R 0.5, mask 100, k1 (0.4, pad, pad)  -> r~ (0.5 - 0.2, 0, 0)   -> return 0.3
#   row 3: R 0.5, mask 111, k1 (0, 0, 0)        -> r~ (0, 0, 0.5)         -> return 0.5
MASK = t([1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1])
REWARDS = t(1.0, 0.0, 0.5, 0.5)
K1 = t([0.1, 0.2, 0.0], [0.2, -0.2, 9.0], [0.4, 9.0, 9.0], [0.0, 0.0, 0.0])  # 9.0: padding, ignored


def penalised() -> torch.Tensor:
    ref = torch.full_like(K1, -2.0)
    return kl_penalised_rewards(REWARDS, ref + K1, ref, MASK, kl_coef=0.5)


def test_sequence_returns_sum_the_penalised_rewards():
    assert_close(sequence_returns(penalised(), MASK), t(0.85, 0.0, 0.3, 0.5))


def test_sequence_returns_ignore_padding_even_if_not_finite():
    rewards = t([1.0, float("nan")], [2.0, 3.0])
    assert_close(sequence_returns(rewards, t([1, 0], [1, 1])), t(1.0, 5.0))


def test_rloo_leave_one_out_by_hand():
    # k = 3, returns (1, 0, 0.5): baselines (0 + 0.5) / 2 = 0.25, (1 + 0.5) / 2 = 0.75, (1 + 0) / 2 = 0.5
    rewards, mask = terminal([1.0, 0.0, 0.5])
    adv = rloo_advantages(rewards, mask, group_size=3)
    assert_close(adv, t([0.75, 0.75], [-0.75, -0.75], [0.0, 0.0]))
    # the same as k / (k - 1) (R - mean): 1.5 * (0.5, -0.5, 0)
    assert_close(adv[:, 0], 1.5 * (t(1.0, 0.0, 0.5) - 0.5))


def test_rloo_with_the_kl_penalty_in_the_reward_per_group_on_real_tokens():
    # groups (0.85, 0.0) and (0.3, 0.5): with k = 2 the baseline is the other response's return
    adv = rloo_advantages(penalised(), MASK, group_size=2)
    assert_close(adv, t([0.85, 0.85, 0.85], [-0.85, -0.85, 0.0], [-0.2, 0.0, 0.0], [0.2, 0.2, 0.2]))


def test_grpo_unbiased_std_by_hand():
    # returns (1, 0, 0, 0): mean 0.25, squared deviations 0.5625 + 3 * 0.0625 = 0.75, unbiased
    # variance 0.75 / 3 = 0.25, std 0.5 -> (1.5, -0.5, -0.5, -0.5) without eps (the biased std,
    # sqrt(0.1875) = 0.433, would give 1.732 for the first)
    rewards, mask = terminal([1.0, 0.0, 0.0, 0.0])
    assert_close(grpo_advantages(rewards, mask, 4, eps=0.0)[:, 0], t(1.5, -0.5, -0.5, -0.5))
    # with the default eps 1e-4: 0.75 / 0.5001 = 1.49970006
    assert grpo_advantages(rewards, mask, 4)[0, 0].item() == pytest.approx(0.75 / 0.5001, abs=1e-12)
    # Dr. GRPO: centred, not scaled
    assert_close(grpo_advantages(rewards, mask, 4, scale=False)[:, 0], t(0.75, -0.25, -0.25, -0.25))


def test_grpo_with_the_kl_penalty_in_the_reward():
    # a group of two is +-(d / 2) / (d / sqrt 2) = +-1 / sqrt 2 for any gap d; group 1: d = 0.85
    adv = grpo_advantages(penalised(), MASK, group_size=2, eps=0.0)
    s = 1.0 / math.sqrt(2.0)
    assert_close(adv, t([s, s, s], [-s, -s, 0.0], [-s, 0.0, 0.0], [s, s, s]))
    with_eps = grpo_advantages(penalised(), MASK, group_size=2)  # 0.425 / (0.85 / sqrt 2 + 1e-4)
    assert with_eps[0, 0].item() == pytest.approx(0.425 / (0.85 / math.sqrt(2.0) + 1e-4), abs=1e-12)


def test_equal_returns_give_zero_advantages():
    rewards, mask = terminal([0.3, 0.3, 0.3, 1.0, 1.0, 1.0])
    zero = torch.zeros_like(rewards)
    assert_close(grpo_advantages(rewards, mask, 3), zero)  # std 0: 0 / (0 + eps), no NaN
    assert_close(rloo_advantages(rewards, mask, 3), zero)


def test_groups_are_independent():
    # the second group's returns are shifted by 100: its advantages do not move, nor the first's
    rewards, mask = terminal([1.0, 0.0, 0.5, 101.0, 100.0, 100.5])
    for fn in (rloo_advantages, grpo_advantages):
        adv = fn(rewards, mask, 3)
        assert_close(adv[3:], adv[:3])


@pytest.mark.parametrize("fn", [rloo_advantages, grpo_advantages])
def test_group_of_one_is_a_clear_error(fn):
    rewards, mask = terminal([1.0, 0.0])
    with pytest.raises(QVLMError, match="1 per prompt.*at least 2.*--advantage gae"):
        fn(rewards, mask, 1)


@pytest.mark.parametrize("fn", [rloo_advantages, grpo_advantages])
def test_rows_that_do_not_split_into_groups_are_a_clear_error(fn):
    rewards, mask = terminal([1.0, 0.0, 0.5])
    with pytest.raises(QVLMError, match="3 responses do not split into groups of 2"):
        fn(rewards, mask, 2)


def test_group_advantages_by_name():
    rewards, mask = terminal([1.0, 0.0, 0.5])
    assert_close(group_advantages("rloo", rewards, mask, 3), rloo_advantages(rewards, mask, 3))
    assert_close(group_advantages("grpo", rewards, mask, 3), grpo_advantages(rewards, mask, 3))
    with pytest.raises(QVLMError, match="unknown critic-free advantage 'gae'"):
        group_advantages("gae", rewards, mask, 3)


def test_float32_inputs_stay_float32():
    rewards, mask = terminal([1.0, 0.0])
    adv = rloo_advantages(rewards.float(), mask.float(), 2)
    assert adv.dtype == torch.float32 and adv[0, 0].item() == 1.0
