"""Online RL estimators for a policy that samples its own data (PPO, A2C): pure tensor functions.

- the per-token KL estimators to the reference, k1 (in the reward) and k3 (as a loss term);
- :func:`kl_penalised_rewards`: the sequence reward on the last response token minus the k1 penalty;
- :func:`next_state_values`: ``V(s_{t+1})`` of a right-padded batch, bootstrapping a cut row from
  ``V(s_{T+1})``: the input GAE (:func:`qvlm.returns.gae`) needs besides rewards and ``done``;
- :func:`ppo_advantages`: GAE on the penalised reward with ``V_old``, whitened; value targets;
- :func:`explained_variance` of the critic;
- :class:`AdaptiveKLController` (Ziegler et al. 2019) and :class:`FixedKLController`.

Conventions (shared/DESIGN.md, "Online learning and evaluation"): tensors are ``(B, T)`` over
response steps; ``mask`` is 1 on real steps; ``done[b, t] = 1`` means ``s_{t+1}`` is terminal.
"""

from __future__ import annotations

import torch

from qvlm.errors import QVLMError
from qvlm.masked import masked_var, masked_whiten
from qvlm.returns import gae

__all__ = [
    "k1_kl",
    "k3_kl",
    "kl_penalised_rewards",
    "next_state_values",
    "ppo_advantages",
    "explained_variance",
    "FixedKLController",
    "AdaptiveKLController",
    "kl_controller",
]


def k1_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 estimator of the per-token KL: ``log pi(a_t|s_t) - log pi_ref(a_t|s_t)``.

    Unbiased for ``KL(pi || pi_ref)`` when ``a_t ~ pi``, but may be negative per sample
    (Schulman 2020, "Approximating KL divergence"). DESIGN.md: -1.2, -1.5 -> 0.3.
    Shape: ``(B, T)`` -> ``(B, T)``.
    """
    return logprobs - ref_logprobs


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 estimator: ``exp(d) - d - 1`` with ``d = log pi_ref - log pi``; always >= 0, unbiased
    under ``a_t ~ pi`` (Schulman 2020; the KL loss of GRPO, Shao et al. 2024, eq. 4).

    DESIGN.md: log pi -1.2, log pi_ref -1.5 -> exp(-0.3) + 0.3 - 1 = 0.0408182.
    Shape: ``(B, T)`` -> ``(B, T)``; differentiable in ``logprobs``.
    """
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1.0


def kl_penalised_rewards(
    rewards: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> torch.Tensor:
    """Per-token rewards ``r~_t = r_t - kl_coef * (log pi_old - log pi_ref)`` with the sequence
    reward ``r_t`` on each row's last real response token (0 elsewhere).

    Source: Ziegler et al. 2019, eq. 2 (the KL penalty per token as in Stiennon et al. 2020 and
    TRL's PPO); DESIGN.md "Online learning and evaluation". A row without real steps gets nothing.

    Shape: ``rewards (B,)``, ``logprobs, ref_logprobs, mask (B, T)`` -> ``(B, T)``, 0 on padding.
    """
    mask = mask.to(logprobs.dtype)
    lengths = mask.sum(-1).long()  # (B,)
    last = torch.nn.functional.one_hot((lengths - 1).clamp(min=0), mask.shape[-1]).to(mask.dtype)  # (B, T)
    last = last * (lengths > 0).to(mask.dtype)[:, None]
    penalty = kl_coef * k1_kl(logprobs, ref_logprobs)
    return (last * rewards.to(mask.dtype)[:, None] - penalty) * mask


def next_state_values(values: torch.Tensor, last_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``V(s_{t+1})`` for every step of a right-padded batch.

    ``next[b, t] = values[b, t + 1]`` inside a row; at a row's last real step it is
    ``last_values[b] = V(s_{T_b + 1})``, which bootstraps a response cut by the length limit
    (truncation is not termination: DESIGN.md); a row that ended with EOS has ``done = 1`` there,
    which zeroes it in the TD target. Padding gets 0.

    Shape: ``values, mask (B, T)``, ``last_values (B,)`` -> ``(B, T)``.
    """
    mask = mask.to(values.dtype)
    shifted = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    lengths = mask.sum(-1).long()
    last = torch.nn.functional.one_hot((lengths - 1).clamp(min=0), mask.shape[-1]).to(values.dtype)
    last = last * (lengths > 0).to(values.dtype)[:, None]
    return (shifted * (1.0 - last) + last * last_values.to(values.dtype)[:, None]) * mask


def ppo_advantages(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    last_values: torch.Tensor,
    done: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    whiten: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's advantages and value targets from one rollout.

    GAE (Schulman et al. 2016, eq. 16) on the penalised rewards with ``V_old``; value targets
    ``G = A + V_old`` (the lambda-returns, before whitening); the advantages are then whitened over
    the batch's real tokens (DESIGN.md; Ziegler et al. 2019 whiten them the same way).

    Shape: ``token_rewards, values, done, mask (B, T)``, ``last_values (B,)`` ->
    ``(advantages (B, T), returns (B, T))``, 0 on padding.
    """
    next_values = next_state_values(values, last_values, mask)
    advantages, returns = gae(token_rewards, values, next_values, done, gamma, lam, mask)
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return advantages, returns


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var(G - V) / Var(G)`` over the real tokens: 1 is a perfect critic, 0 one no better than
    a constant, negative one worse (CleanRL's ``explained_var``). NaN when the returns have no
    variance. Shape: ``(B, T)`` -> scalar (detached)."""
    values, returns = values.detach(), returns.detach()
    var_returns = masked_var(returns, mask)
    ratio = masked_var(returns - values, mask) / var_returns
    return torch.where(var_returns > 0, 1.0 - ratio, torch.full_like(ratio, float("nan")))


class FixedKLController:
    """A constant KL coefficient (``state_dict`` for checkpoints, like the adaptive one)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, kl: float, n_samples: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. 2019, section 2.2: move ``beta_kl`` so that the KL tracks a target.

    ``e = clip(KL / target - 1, -0.2, 0.2)``, ``beta_kl <- beta_kl (1 + e n / horizon)`` with ``n``
    the samples in the batch. DESIGN.md: beta 0.1, target 6, horizon 10000, KL 9, n 256 -> e = 0.2,
    beta -> 0.100512.
    """

    def __init__(self, kl_coef: float, target: float, horizon: float):
        if not (target > 0 and horizon > 0):
            raise QVLMError(f"adaptive KL: target {target} and horizon {horizon} must be > 0")
        self.value, self.target, self.horizon = float(kl_coef), float(target), float(horizon)

    def update(self, kl: float, n_samples: int) -> float:
        """One update from the batch's mean KL (nats per response); returns the new coefficient."""
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), float(state["horizon"])


def kl_controller(kl_coef: float, target: float | None, horizon: float) -> FixedKLController | AdaptiveKLController:
    """The adaptive controller when ``target`` is set (> 0), else a fixed coefficient."""
    if target:
        return AdaptiveKLController(kl_coef, target, horizon)
    return FixedKLController(kl_coef)
