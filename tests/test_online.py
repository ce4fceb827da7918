"""Hand-computed tests for qvlm.online: KL estimators, the KL-penalised reward, GAE inputs of a
rollout with a cut and an EOS response, explained variance, the KL controllers.

Numbers from shared/DESIGN.md ("Worked numbers", both sections) where they exist; the others are
worked out in the comments.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from qvlm.errors import QVLMError
from qvlm.online import (
    AdaptiveKLController,
    FixedKLController,
    explained_variance,
    k1_kl,
    k3_kl,
    kl_controller,
    kl_penalised_rewards,
    next_state_values,
    ppo_advantages,
)
from qvlm.rollout import done_mask


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_k1_and_k3_design_numbers():
    logp, ref = t([-1.2]), t([-1.5])
    assert_close(k1_kl(logp, ref), t([0.3]))
    assert_close(k3_kl(logp, ref), t([math.exp(-0.3) + 0.3 - 1.0]))
    assert k3_kl(logp, ref).item() == pytest.approx(0.0408182, abs=1e-7)
    # k3 is >= 0 both ways and 0 only where the log-probs agree; k1 changes sign
    assert k3_kl(ref, logp).item() > 0 and k1_kl(ref, logp).item() < 0
    assert k3_kl(t([-0.7]), t([-0.7])).item() == 0.0


def test_k3_gradient_pulls_toward_reference():
    logp = torch.tensor([-1.2], requires_grad=True)
    k3_kl(logp, torch.tensor([-1.5])).sum().backward()
    # d/dlogp [exp(ref - logp) - (ref - logp) - 1] = -exp(ref - logp) + 1 = 1 - exp(-0.3) > 0
    assert logp.grad.item() == pytest.approx(1 - math.exp(-0.3), rel=1e-6)


def test_k1_penalty_placement():
    # two responses of a T = 3 batch: row 0 has 2 real steps, row 1 all 3
    # row 0: reward 2.0 on step 2; penalties 0.1 * (0.3, 0.0) -> (-0.03, 2.0, 0 padding)
    # row 1: reward -1.0 on step 3; penalties 0.1 * (0, -0.5, 0.2) -> (0, 0.05, -1.02)
    logp = t([-1.2, -1.0, -9.0], [-0.5, -2.0, -0.3])
    ref = t([-1.5, -1.0, -1.0], [-0.5, -1.5, -0.5])
    mask = t([1, 1, 0], [1, 1, 1])
    out = kl_penalised_rewards(torch.tensor([2.0, -1.0], dtype=torch.float64), logp, ref, mask, 0.1)
    assert_close(out, t([-0.03, 2.0, 0.0], [0.0, 0.05, -1.02]))
    # coefficient 0: the sequence reward alone, on the last real token
    assert_close(
        kl_penalised_rewards(torch.tensor([2.0, -1.0], dtype=torch.float64), logp, ref, mask, 0.0),
        t([0.0, 2.0, 0.0], [0.0, 0.0, -1.0]),
    )


def test_gae_inputs_from_a_rollout_with_a_cut_and_an_eos_response():
    # row 0: DESIGN's example, EOS at step 3 (finished); row 1: cut by the length limit after 2
    # steps (truncated: bootstraps from V(s_3) = 0.8); row 2: EOS at step 1, then padding
    mask = t([1, 1, 1], [1, 1, 0], [1, 0, 0])
    finished = torch.tensor([True, False, True])
    done = done_mask(mask, finished)
    assert_close(done, t([0, 0, 1], [0, 0, 0], [1, 0, 0]))
    values = t([0.5, 0.6, 0.8], [0.5, 0.6, 0.0], [0.3, 0.0, 0.0])
    last_values = torch.tensor([0.7, 0.8, 0.9], dtype=torch.float64)
    # V(s_{t+1}): inside a row the next value; at the row's last step V(s_{T+1}) (used only where not done)
    assert_close(next_state_values(values, last_values, mask), t([0.6, 0.8, 0.7], [0.6, 0.8, 0.0], [0.9, 0, 0]))
    rewards = kl_penalised_rewards(
        torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64), values * 0, values * 0, mask, 0.1
    )
    adv, ret = ppo_advantages(rewards, values, last_values, done, mask, gamma=0.9, lam=0.95, whiten=False)
    # row 0 (DESIGN.md): A = (0.288805, 0.291, 0.2); row 1: delta = (0.9*0.6 - 0.5, 1 + 0.9*0.8 - 0.6)
    # = (0.04, 1.12), A_2 = 1.12, A_1 = 0.04 + 0.9*0.95*1.12 = 0.9976; row 2: A_1 = 0.5 - 0.3 = 0.2
    assert_close(adv, t([0.288805, 0.291, 0.2], [0.9976, 1.12, 0.0], [0.2, 0.0, 0.0]))
    assert_close(ret, t([0.788805, 0.891, 1.0], [1.4976, 1.72, 0.0], [0.5, 0.0, 0.0]))
    # whitened over the 6 real tokens: mean 0, unbiased variance 1, padding 0
    white, _ = ppo_advantages(rewards, values, last_values, done, mask, gamma=0.9, lam=0.95)
    real = mask.bool()
    assert white[real].mean().item() == pytest.approx(0.0, abs=1e-9)
    assert white[real].var().item() == pytest.approx(1.0, abs=1e-6)
    assert (white[~real] == 0).all()


def test_explained_variance():
    # G - V = (0, 0, 1): variance 1/3; G = (1, 2, 4): variance 7/3 -> 1 - 1/7
    values, returns = t([1.0, 2.0, 3.0, 99.0]), t([1.0, 2.0, 4.0, -5.0])
    mask = t([1, 1, 1, 0])
    assert explained_variance(values, returns, mask).item() == pytest.approx(6 / 7)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert math.isnan(explained_variance(values, t([1.0, 1.0, 1.0, 0.0]), mask).item())


def test_adaptive_controller_design_numbers_and_state():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # e = clip(9 / 6 - 1, -0.2, 0.2) = 0.2; beta = 0.1 * (1 + 0.2 * 256 / 10000) = 0.100512
    assert ctl.update(kl=9.0, n_samples=256) == pytest.approx(0.100512)
    # below target: e = clip(3/6 - 1) = -0.2 -> shrinks by the same factor's mirror
    assert ctl.update(kl=3.0, n_samples=256) == pytest.approx(0.100512 * (1 - 0.2 * 256 / 10000))
    again = AdaptiveKLController(1.0, 1.0, 1.0)
    again.load_state_dict(ctl.state_dict())
    assert again.state_dict() == ctl.state_dict()
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 8) == 0.05
    assert isinstance(kl_controller(0.1, None, 10000), FixedKLController)
    assert isinstance(kl_controller(0.1, 6.0, 10000), AdaptiveKLController)
    with pytest.raises(QVLMError):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
