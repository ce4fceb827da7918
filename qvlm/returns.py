"""Returns and advantage estimators: pure tensor functions.

Conventions (shared/DESIGN.md): tensors are ``(B, T)`` over response steps ``t = 1..T``;
``done[b, t] = 1`` means ``s_{t+1}`` is terminal; ``mask[b, t] = 1`` on real response steps and 0
on padding. ``values[b, t] = V(s_t)`` and ``next_values[b, t] = V(s_{t+1})``; the caller builds
``next_values`` (see :func:`shift_values`) so that a response cut by the length limit bootstraps
from ``V(s_{T+1})`` while a terminated one does not (``done`` zeroes it).
"""

from __future__ import annotations

import torch

__all__ = [
    "shift_values",
    "monte_carlo_returns",
    "td_targets",
    "gae",
    "td_lambda_returns",
]


def shift_values(values: torch.Tensor, last_value: torch.Tensor | None = None) -> torch.Tensor:
    """``next_values[:, t] = values[:, t + 1]``, with ``last_value`` (``V(s_{T+1})``) at the end.

    Shape: ``values (B, T)``, ``last_value (B,)`` or None (zeros) -> ``(B, T)``. With right-padded
    batches, pass per-row bootstrap values through ``next_values`` directly instead.
    """
    if last_value is None:
        last_value = torch.zeros_like(values[:, 0])
    return torch.cat([values[:, 1:], last_value[:, None].to(values.dtype)], dim=1)


def _reverse_scan(x: torch.Tensor, carry_weight: torch.Tensor, init: torch.Tensor | None = None) -> torch.Tensor:
    """``out_t = x_t + carry_weight_t * out_{t+1}`` from the right; ``out_{T+1} = init`` (or 0)."""
    out = torch.zeros_like(x)
    running = torch.zeros_like(x[:, 0]) if init is None else init.to(x.dtype)
    for t in reversed(range(x.shape[1])):
        running = x[:, t] + carry_weight[:, t] * running
        out[:, t] = running
    return out


def _continues(done: torch.Tensor, mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """1 where the recursion may carry value from step t+1 back to t: not done and t+1 is real."""
    cont = 1.0 - done.to(like.dtype)
    if mask is not None:
        mask = mask.to(like.dtype)
        next_real = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
        cont = cont * next_real
    return cont


def monte_carlo_returns(
    rewards: torch.Tensor,
    done: torch.Tensor,
    gamma: float,
    mask: torch.Tensor | None = None,
    last_value: torch.Tensor | None = None,
) -> torch.Tensor:
    """Discounted reward-to-go ``G_t = r_t + gamma * (1 - done_t) * G_{t+1}``.

    ``last_value`` (``(B,)``) is ``G_{T+1}`` for rows cut by the length limit (bootstrap); with
    padding, rows end at their last real step and padding returns are 0.
    Source: Sutton & Barto (2018), eq. 3.9. DESIGN.md worked numbers: rewards (0, 0, 1),
    done (0, 0, 1), gamma 0.9 -> (0.81, 0.9, 1.0).

    Shape: ``rewards, done, mask (B, T)`` -> ``(B, T)``.
    """
    if mask is not None:
        rewards = rewards * mask.to(rewards.dtype)
    if last_value is not None:
        # a row cut by the length limit continues past its last real step: fold gamma * V(s_{T+1})
        # into that step's reward (a terminated row has done = 1 there, which zeroes it)
        b = torch.arange(rewards.shape[0])
        last = _last_index(mask, rewards)
        rewards = rewards.clone()
        not_done = 1.0 - done.to(rewards.dtype)[b, last]
        rewards[b, last] += gamma * not_done * last_value.to(rewards.dtype)
    returns = _reverse_scan(rewards, gamma * _continues(done, mask, rewards))
    if mask is not None:
        returns = returns * mask.to(rewards.dtype)
    return returns


def _last_index(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.full((like.shape[0],), like.shape[1] - 1, dtype=torch.long)
    lengths = mask.to(torch.long).sum(1)
    return (lengths - 1).clamp(min=0)


def td_targets(rewards: torch.Tensor, next_values: torch.Tensor, done: torch.Tensor, gamma: float) -> torch.Tensor:
    """One-step TD targets ``y_t = r_t + gamma * (1 - done_t) * V(s_{t+1})``.

    Source: Sutton & Barto (2018), eq. 6.2. DESIGN.md: rewards (0, 0, 1), done (0, 0, 1),
    V(s_2..s_4) = (0.6, 0.8, *) -> (0.54, 0.72, 1.0).

    Shape: all ``(B, T)`` -> ``(B, T)``.
    """
    return rewards + gamma * (1.0 - done.to(rewards.dtype)) * next_values


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    done: torch.Tensor,
    gamma: float,
    lam: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation and lambda-returns.

    ``delta_t = r_t + gamma (1 - done_t) V(s_{t+1}) - V(s_t)``,
    ``A_t = delta_t + gamma * lam * (1 - done_t) * A_{t+1}``, returns ``A_t + V(s_t)``.
    Source: Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE", eq. 16.
    DESIGN.md: V = (0.5, 0.6, 0.8), lam 0.95 -> A = (0.288805, 0.291, 0.2).

    Shape: all ``(B, T)`` -> ``(advantages (B, T), returns (B, T))``; padding entries are 0.
    """
    deltas = td_targets(rewards, next_values, done, gamma) - values
    if mask is not None:
        deltas = deltas * mask.to(deltas.dtype)
    advantages = _reverse_scan(deltas, gamma * lam * _continues(done, mask, deltas))
    returns = advantages + values
    if mask is not None:
        returns = returns * mask.to(returns.dtype)
    return advantages, returns


def td_lambda_returns(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    done: torch.Tensor,
    gamma: float,
    lam: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """TD(lambda) targets: ``G^lam_t = r_t + gamma (1 - done_t) [(1 - lam) V(s_{t+1}) + lam G^lam_{t+1}]``.

    Equal to the GAE lambda-return (Sutton & Barto 2018, eq. 12.18); lam = 0 gives TD targets,
    lam = 1 Monte-Carlo returns (bootstrapped at truncation). Shape: ``(B, T)``.
    """
    return gae(rewards, values, next_values, done, gamma, lam, mask)[1]
