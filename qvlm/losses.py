"""Losses for Q/V learning and policy optimisation: pure functions of tensors.

Every function returns ``(loss, stats)`` where ``loss`` is a scalar tensor and ``stats`` a dict of
detached 0-dim tensors for logging: nothing here calls ``.item()``, so a loss never waits for the
device; trainers turn the stats into floats once per step
(:func:`qvlm.train.metrics.stats_to_floats`). Reductions over tokens are masked means (DESIGN.md,
"Padding").
Shapes: ``(B, T)`` over response steps, ``(B, T, V)`` for vocabulary-sized heads and logits.
"""

from __future__ import annotations

from typing import Sequence

import torch

from qvlm.masked import masked_mean

__all__ = [
    "Stats",
    "expectile_loss",
    "ilql_q_loss",
    "cql_loss",
    "awac_loss",
    "soft_value",
    "ppo_policy_loss",
    "clipped_value_loss",
    "value_regression_loss",
    "bradley_terry_loss",
    "classification_loss",
]

Stats = dict[str, torch.Tensor]  # name -> detached 0-dim tensor


def expectile_loss(
    target_q: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, tau: float
) -> tuple[torch.Tensor, Stats]:
    """Expectile regression of ``V(s_t)`` toward the target Q: ``mean(|tau - 1(u < 0)| u^2)``.

    ``u = Q_hat(s_t, a_t) - V(s_t)`` with ``Q_hat`` the min over twin target heads, detached here.
    With tau > 0.5, V approaches an upper expectile of Q over the data's actions, an in-support
    approximation of max_a Q (Kostrikov et al. 2022, IQL, eq. 5; Snell et al. 2023, ILQL, eq. 3).
    DESIGN.md: tau 0.7, Q_hat (0.6, 0.5, 1.0), V (0.5, 0.6, 0.8) -> terms (0.007, 0.003, 0.028),
    mean 0.0126667.

    Shape: ``target_q, values, mask (B, T)`` -> scalar.
    """
    u = target_q.detach() - values
    weight = torch.abs(tau - (u < 0).to(u.dtype))
    loss = masked_mean(weight * u**2, mask)
    return loss, {"loss": loss.detach(), "v_mean": masked_mean(values.detach(), mask)}


def ilql_q_loss(
    q_values: Sequence[torch.Tensor], td_target: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, Stats]:
    """Squared TD error of each Q head on the taken actions, averaged over heads.

    ``mean_i mean_t (Q_i(s_t, a_t) - [r_t + gamma (1 - done_t) V(s_{t+1})])^2``, V detached
    (ILQL, Snell et al. 2023, eq. 2; the target uses V, not max Q, which keeps it in-support).

    Shape: each ``q_values[i] (B, T)`` (Q of the taken action), ``td_target (B, T)`` -> scalar.
    """
    target = td_target.detach()
    per_head = [masked_mean((q - target) ** 2, mask) for q in q_values]
    loss = torch.stack(per_head).mean()
    return loss, {"loss": loss.detach(), "q_mean": masked_mean(q_values[0].detach(), mask)}


def cql_loss(q_logits: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, Stats]:
    """Conservative Q term: cross-entropy of ``Q(s_t, .)`` used as logits against ``a_t``.

    ``logsumexp_a Q(s_t, a) - Q(s_t, a_t)`` pushes Q down on actions the data did not take
    (Kumar et al. 2020, CQL(H), eq. 4; ILQL eq. 4).

    Shape: ``q_logits (B, T, V)``, ``actions (B, T)`` (long), ``mask (B, T)`` -> scalar.
    """
    ce = torch.logsumexp(q_logits, dim=-1) - q_logits.gather(-1, actions[..., None]).squeeze(-1)
    loss = masked_mean(ce, mask)
    return loss, {"loss": loss.detach()}


def awac_loss(
    logits: torch.Tensor,
    actions: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 1.0,
    max_weight: float = 100.0,
) -> tuple[torch.Tensor, Stats]:
    """Advantage-weighted cross-entropy of the LM logits on the taken actions.

    ``mean(exp(beta * A) * -log pi(a_t | s_t))`` with ``A = Q_hat - V`` detached and the weight
    clipped at ``max_weight`` for stability (Nair et al. 2020, AWAC, eq. 10).

    Shape: ``logits (B, T, V)``, ``actions, advantages, mask (B, T)`` -> scalar.
    """
    weight = torch.exp(beta * advantages.detach()).clamp(max=max_weight)
    nll = -torch.log_softmax(logits, dim=-1).gather(-1, actions[..., None]).squeeze(-1)
    loss = masked_mean(weight * nll, mask)
    return loss, {"loss": loss.detach(), "weight_mean": masked_mean(weight, mask)}


def soft_value(q_values: torch.Tensor, ref_logprobs: torch.Tensor, alpha: float) -> torch.Tensor:
    """KL-regularised state value ``V(s) = alpha * log sum_a pi_ref(a|s) exp(Q(s, a) / alpha)``.

    The soft Bellman optimum (DESIGN.md; Ziebart 2010; Haarnoja et al. 2017, eq. 3 with a prior).
    DESIGN.md: pi_ref (0.5, 0.5), Q (1, 0), alpha 1 -> log(0.5 e + 0.5) = 0.6201145.

    Shape: ``q_values, ref_logprobs (..., V)`` -> ``(...)``.
    """
    return alpha * torch.logsumexp(ref_logprobs + q_values / alpha, dim=-1)


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, Stats]:
    """PPO clipped surrogate: ``mean(max(-A rho, -A clip(rho, 1 - eps, 1 + eps)))``.

    ``rho = exp(log pi - log pi_old)`` (Schulman et al. 2017, eq. 7).

    Shape: all ``(B, T)`` -> scalar. ``stats['clipfrac']`` is the fraction of clipped steps.
    """
    ratio = torch.exp(logprobs - old_logprobs.detach())
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).to(ratio.dtype), mask)
    approx_kl = masked_mean(0.5 * (logprobs.detach() - old_logprobs.detach()) ** 2, mask)
    return loss, {
        "loss": loss.detach(),
        "clipfrac": clipfrac.detach(),
        "approx_kl": approx_kl.detach(),
        "ratio_mean": masked_mean(ratio.detach(), mask),
    }


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, Stats]:
    """PPO value loss ``0.5 mean(max((V - G)^2, (V_old + clip(V - V_old, -eps, eps) - G)^2))``.

    Source: the OpenAI baselines PPO2 value clipping (Engstrom et al. 2020 discuss its effect).

    Shape: all ``(B, T)`` -> scalar.
    """
    clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    loss = 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)
    vclipfrac = masked_mean(((clipped - returns) ** 2 > (values - returns) ** 2).to(values.dtype), mask)
    return loss, {"loss": loss.detach(), "clipfrac": vclipfrac.detach()}


def value_regression_loss(
    values: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, Stats]:
    """Mean squared error of ``V(s_t)`` against targets (Monte-Carlo returns or TD targets).

    The prefix-scorer objective of controlled decoding (Mudgal et al. 2024, CD-FUDGE / CD-Q).
    Shape: all ``(B, T)`` -> scalar.
    """
    loss = masked_mean((values - targets.detach()) ** 2, mask)
    return loss, {"loss": loss.detach(), "v_mean": masked_mean(values.detach(), mask)}


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> tuple[torch.Tensor, Stats]:
    """Bradley-Terry preference loss ``mean(-log sigmoid(r_chosen - r_rejected))``.

    Source: Bradley and Terry (1952); the reward-model objective of Ouyang et al. (2022), eq. 1, with
    one comparison per pair. Stats: the loss, the pair accuracy (``r_chosen > r_rejected``) and the
    mean margin. Shape: ``(B,)`` and ``(B,)`` -> scalar.
    """
    margin = chosen_rewards - rejected_rewards
    loss = -torch.nn.functional.logsigmoid(margin).mean()
    accuracy = (margin.detach() > 0).to(margin.dtype).mean()
    return loss, {"loss": loss.detach(), "accuracy": accuracy, "margin": margin.detach().mean()}


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, Stats]:
    """Cross-entropy of a classifier's logits against integer labels, and its accuracy.

    Shape: logits ``(B, K)``, labels ``(B,)`` (ints in ``[0, K)``) -> scalar.
    """
    loss = torch.nn.functional.cross_entropy(logits, labels)
    accuracy = (logits.detach().argmax(-1) == labels).to(logits.dtype).mean()
    return loss, {"loss": loss.detach(), "accuracy": accuracy}


# ---------------------------------------------------------------- soft Q-learning (issue 10)

__all__ += ["soft_bellman_targets", "soft_q_loss"]


def soft_bellman_targets(
    rewards: torch.Tensor,
    next_target_q: torch.Tensor,
    next_ref_logprobs: torch.Tensor,
    done: torch.Tensor,
    gamma: float,
    alpha: float,
) -> torch.Tensor:
    """Soft Bellman targets ``y_t = r_t + gamma (1 - done_t) alpha log sum_a pi_ref(a|s_{t+1})
    exp(Qbar(s_{t+1}, a) / alpha)``, over the full vocabulary, from target heads ``Qbar``.

    Soft Q-learning with a reference prior (Haarnoja et al. 2017, eq. 3-4; the KL-regularised form of
    DESIGN.md: the next state's value is :func:`soft_value` of the target Q). As alpha -> 0 the value
    becomes the max over actions (Q-learning); as alpha -> inf the mean under pi_ref (SARSA on pi_ref).
    Where the episode ended (done) nothing is bootstrapped; where it was cut (truncated) it is.
    One step, ``pi_ref(.|s') = (0.5, 0.5)``, ``Qbar(s', .) = (1, 0)``, alpha 1, r 0, gamma 0.9:
    ``0.9 log(0.5 e + 0.5) = 0.5581031``.

    Shape: ``rewards, done (B, T)``, ``next_target_q, next_ref_logprobs (B, T, V)`` -> ``(B, T)``.
    """
    next_v = soft_value(next_target_q.detach().to(torch.float32), next_ref_logprobs.to(torch.float32), alpha)
    return rewards + gamma * (1.0 - done) * next_v


def soft_q_loss(
    q_taken: torch.Tensor,
    next_target_q: torch.Tensor,
    next_ref_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    done: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    alpha: float,
) -> tuple[torch.Tensor, Stats]:
    """Soft Q-learning loss: ``mean_t (Q(s_t, a_t) - y_t)^2`` toward :func:`soft_bellman_targets`.

    The targets come from the target heads and are detached (Mnih et al. 2015's target network;
    Haarnoja et al. 2017, eq. 11 with a reference prior). Masked mean over real steps.
    Shape: ``q_taken, rewards, done, mask (B, T)``, ``next_target_q, next_ref_logprobs (B, T, V)``
    -> scalar; ``stats`` hold the loss, mean Q of the taken actions and mean target.
    """
    target = soft_bellman_targets(rewards, next_target_q, next_ref_logprobs, done, gamma, alpha).detach()
    loss = masked_mean((q_taken.to(target.dtype) - target) ** 2, mask)
    return loss, {
        "loss": loss.detach(),
        "q_mean": masked_mean(q_taken.detach().to(target.dtype), mask),
        "target_mean": masked_mean(target, mask),
    }
