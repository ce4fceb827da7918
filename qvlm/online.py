"""Online RL estimators for a policy that samples its own data (PPO, A2C): pure tensor functions.

- the per-token KL estimators to the reference, k1 (in the reward) and k3 (as a loss term);
- :func:`kl_penalised_rewards`: the sequence reward on the last response token minus the k1 penalty;
- :func:`next_state_values`: ``V(s_{t+1})`` of a right-padded batch, bootstrapping a cut row from
  ``V(s_{T+1})``: the input GAE (:func:`qvlm.returns.gae`) needs besides rewards and ``done``;
- :func:`ppo_advantages`: GAE on the penalised reward with ``V_old``, whitened; value targets;
- critic-free advantages over the responses to one prompt, on the same penalised rewards:
  :func:`sequence_returns`, :func:`rloo_advantages` (leave-one-out baseline),
  :func:`grpo_advantages` (group-normalised), :func:`group_advantages` (either, by name);
- :func:`explained_variance` of the critic;
- :class:`AdaptiveKLController` (Ziegler et al. 2019) and :class:`FixedKLController`.

Conventions (shared/DESIGN.md, "Online learning and evaluation"): tensors are ``(B, T)`` over
response steps; ``mask`` is 1 on real steps; ``done[b, t] = 1`` means ``s_{t+1}`` is terminal.
Groups: the ``group_size`` responses to one prompt are contiguous rows ``g * group_size ..
(g + 1) * group_size - 1``, the layout :func:`qvlm.decoding.sampling.sample_rollout` writes
(``num_return_sequences`` rows per prompt, prompt-major).
"""

from __future__ import annotations

import torch

from qvlm.configs.ppo import ADVANTAGES
from qvlm.errors import QVLMError
from qvlm.masked import masked_var, masked_whiten
from qvlm.returns import gae

__all__ = [
    "k1_kl",
    "k3_kl",
    "kl_penalised_rewards",
    "next_state_values",
    "ppo_advantages",
    "ADVANTAGES",
    "sequence_returns",
    "rloo_advantages",
    "grpo_advantages",
    "group_advantages",
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


# ---- critic-free advantages: a baseline from the other responses to the same prompt ----------------
#
# All of them take the same per-token rewards as GAE (:func:`kl_penalised_rewards`: the sequence reward on
# the last real token minus the k1 penalty, or no penalty when the KL is a k3 loss term), so the KL options
# are the same for gae, rloo and grpo. A response's return is the undiscounted sum of its penalised
# rewards (gamma = 1, as RLOO and GRPO define the sequence reward); TRL's RLOO puts its k1 KL penalty into
# the sequence reward the same way (reward - beta * sum_t k1_t).

# ADVANTAGES = ("gae", "rloo", "grpo"): the names PPOConfig.advantage takes, declared with the config


def sequence_returns(token_rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each response's return: the sum of its per-token rewards over its real steps (gamma = 1).

    With :func:`kl_penalised_rewards` this is ``R - kl_coef * sum_t (log pi_old - log pi_ref)``.
    Shape: ``token_rewards, mask (B, T)`` -> ``(B,)``.
    """
    return torch.where(mask.bool(), token_rewards, torch.zeros((), dtype=token_rewards.dtype)).sum(-1)


def _groups(returns: torch.Tensor, group_size: int, estimator: str) -> torch.Tensor:
    """``returns (B,)`` -> ``(B / group_size, group_size)``, checked."""
    B = returns.shape[0]
    if group_size < 2:
        raise QVLMError(
            f"{estimator} advantages compare the responses to one prompt, but there is {group_size} per prompt; "
            "sample at least 2 (num_return_sequences / --samples-per-prompt >= 2) or use --advantage gae"
        )
    if B % group_size:
        raise QVLMError(
            f"{estimator} advantages: {B} responses do not split into groups of {group_size} "
            "(responses to one prompt must be contiguous, num_return_sequences per prompt)"
        )
    return returns.view(B // group_size, group_size)


def _broadcast(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A sequence-level advantage ``(B,)`` on every real step of its response: ``(B, T)``, 0 on padding."""
    return advantages[:, None].to(mask.dtype) * mask


def rloo_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out (RLOO) advantages: ``A_i = R_i - mean_{j != i} R_j`` over the
    ``k = group_size`` responses to one prompt, on every real token of response ``i``.

    Source: Kool et al. 2019 ("Buy 4 REINFORCE samples, get a baseline for free!") and Ahmadian
    et al. 2024 ("Back to basics: revisiting REINFORCE style optimization for learning from human
    feedback in LLMs", the RLOO estimator):
    the baseline of sample ``i`` is the mean return of the other ``k - 1`` samples, so it does not
    depend on ``y_i`` and the gradient estimate stays unbiased. Equivalently
    ``A_i = k / (k - 1) * (R_i - mean_j R_j)``. Returns ``R_i`` from :func:`sequence_returns`.

    A group of one has no "other" response: :class:`QVLMError` (no silent zero advantages). Equal
    returns in a group give advantages 0.

    Shape: ``token_rewards, mask (B, T)`` with ``B = n_prompts * group_size`` -> ``(B, T)``, 0 on padding.
    """
    grouped = _groups(sequence_returns(token_rewards, mask), group_size, "RLOO")  # (G, k)
    baseline = (grouped.sum(-1, keepdim=True) - grouped) / (group_size - 1)  # (G, k): mean of the others
    return _broadcast((grouped - baseline).reshape(-1), mask)


def grpo_advantages(
    token_rewards: torch.Tensor, mask: torch.Tensor, group_size: int, eps: float = 1e-4, scale: bool = True
) -> torch.Tensor:
    """GRPO's group-normalised advantages: ``A_i = (R_i - mean(R)) / (std(R) + eps)`` over the
    ``group_size`` responses to one prompt, on every real token of response ``i`` (outcome
    supervision).

    Source: Shao et al. 2024 (DeepSeekMath), section 4.1.2: ``A_i = (r_i - mean(r)) / std(r)``. The
    paper does not say which std; this is the unbiased (Bessel-corrected, ``n - 1``) one with
    ``eps = 1e-4`` added, as TRL's ``GRPOTrainer`` computes it (``rewards.view(-1, G).std(dim=1)``,
    torch's default), the peer of issue 23. ``scale=False`` drops the division (Dr. GRPO, Liu et al.
    2025, "Understanding R1-Zero-like training": the std term up-weights prompts whose responses
    score alike).

    Equal returns in a group (std 0) give advantages exactly 0. A group of one has an undefined
    unbiased std and nothing to compare with: :class:`QVLMError`.

    Shape: ``token_rewards, mask (B, T)`` with ``B = n_prompts * group_size`` -> ``(B, T)``, 0 on padding.
    """
    grouped = _groups(sequence_returns(token_rewards, mask), group_size, "GRPO")  # (G, k)
    centred = grouped - grouped.mean(-1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(-1, keepdim=True) + eps)  # unbiased std, as TRL
    return _broadcast(centred.reshape(-1), mask)


def group_advantages(estimator: str, token_rewards: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """:func:`rloo_advantages` or :func:`grpo_advantages` by name (``"rloo"``, ``"grpo"``), at their
    defaults. Shape: ``(B, T)`` -> ``(B, T)``."""
    if estimator == "rloo":
        return rloo_advantages(token_rewards, mask, group_size)
    if estimator == "grpo":
        return grpo_advantages(token_rewards, mask, group_size)
    raise QVLMError(f"unknown critic-free advantage {estimator!r}; use rloo or grpo (or gae, with a critic)")


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
