"""Distributional values: a categorical return distribution on a fixed support, and the soft-optimal Q it implies.

In a deterministic token MDP with a terminal reward, the KL-regularised optimum is a functional of the
distribution of the reference policy's return (DESIGN.md, "Distributional values and multi-turn episodes"):
``Q*_alpha(s, a) = alpha log E_{pi_ref}[exp(R / alpha) | s, a]`` (Q#, Zhou et al., NeurIPS 2025). A
learner fits ``Z(s, a)``, the law of ``R``, once, by cross-entropy against two-hot targets on a fixed
support (the categorical parametrisation and its projection: C51, Bellemare et al. 2017, "A
Distributional Perspective on Reinforcement Learning", section 4 and Algorithm 1); every ``alpha``
(every guidance strength ``beta = 1/alpha``) then follows without retraining.

Pure functions of tensors. Shapes: ``K`` support bins, ``...`` any batch shape (``(B, T)`` over response
steps, ``(N, V)`` over a tree's (state, action) pairs). The loss returns ``(loss, stats)`` with detached
0-dim stats and no ``.item()``, as :mod:`qvlm.losses` does.

Worked numbers (DESIGN.md): support ``(0, 0.5, 1)``, probabilities ``(0.5, 0.3, 0.2)``: mean 0.35;
``Q*_alpha`` = 0.4306602 at alpha 1, 0.5136111 at 0.5, 0.8400731 at 0.1. Two-hot of 0.7: 0.6 on 0.5,
0.4 on 1.
"""

from __future__ import annotations

import math

import torch

from qvlm.errors import QVLMError
from qvlm.masked import masked_mean

__all__ = [
    "make_support",
    "two_hot",
    "project_categorical",
    "categorical_loss",
    "categorical_mean",
    "soft_q_from_categorical",
    "wasserstein1",
    "categorical_wasserstein1",
]


def make_support(low: float, high: float, bins: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``bins`` equally spaced atoms ``z_1 = low < ... < z_K = high``. Shape ``(K,)``.

    Choose ``[low, high]`` to cover the range of returns: :func:`two_hot` clamps a return outside it
    onto the nearest end, which biases every value read from the distribution.
    """
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        raise QVLMError(f"support [{low}, {high}] (make_support): need finite low < high covering the returns")
    if int(bins) != bins or bins < 2:
        raise QVLMError(f"bins={bins} (make_support): a categorical support needs an integer number of bins >= 2")
    return torch.linspace(float(low), float(high), int(bins), dtype=dtype)


def _check_support(support: torch.Tensor, where: str) -> None:
    if support.dim() != 1 or support.numel() < 2 or not bool((support[1:] > support[:-1]).all()):
        raise QVLMError(
            f"support of shape {tuple(support.shape)} ({where}): give a 1-D, strictly increasing tensor of "
            ">= 2 atoms (make_support)"
        )


def two_hot(x: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Two-hot target of scalar returns on the support (C51's projection of a point mass).

    ``x`` is clamped into ``[z_1, z_K]``; a value between ``z_j`` and ``z_{j+1}`` puts
    ``(z_{j+1} - x) / (z_{j+1} - z_j)`` on ``z_j`` and ``(x - z_j) / (z_{j+1} - z_j)`` on ``z_{j+1}``, so
    the target's mean is ``x`` (inside the range). A value on an atom is one-hot. The support need not be
    evenly spaced. DESIGN.md: 0.7 on ``(0, 0.5, 1)`` -> ``(0, 0.6, 0.4)``.

    Shape: ``x (...)``, ``support (K,)`` -> ``(..., K)`` in ``support``'s dtype.
    """
    _check_support(support, "two_hot")
    x = x.to(support.dtype).clamp(support[0], support[-1])
    K = support.numel()
    lo = (torch.searchsorted(support, x.contiguous(), right=True) - 1).clamp(0, K - 2)  # (...) index of z_j
    z_lo, z_hi = support[lo], support[lo + 1]
    w_hi = (x - z_lo) / (z_hi - z_lo)
    out = torch.zeros(*x.shape, K, dtype=support.dtype, device=support.device)
    out.scatter_(-1, lo[..., None], (1.0 - w_hi)[..., None])
    out.scatter_add_(-1, (lo + 1)[..., None], w_hi[..., None])
    return out


def project_categorical(values: torch.Tensor, probs: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """A discrete distribution (atoms ``values`` with ``probs``) projected onto the support, atom by atom
    with :func:`two_hot` (C51, Algorithm 1). Keeps the mean inside the range; widens the spread.

    Shape: ``values (M,)``, ``probs (..., M)``, ``support (K,)`` -> ``(..., K)``.
    """
    return probs.to(support.dtype) @ two_hot(values, support)  # (..., M) @ (M, K)


def categorical_loss(
    logits: torch.Tensor, target_probs: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy of a categorical head against target distributions (two-hot labels, C51's loss).

    ``loss = masked_mean(-sum_b target_b log softmax(logits)_b)`` over the real entries, the count
    clamped to >= 1 (DESIGN.md, "Padding"). Stats: ``loss`` and ``excess`` = the mean of
    ``CE - H(target)`` = KL(target || prediction) (0 at a perfect fit, whatever the targets' entropy).

    Shape: ``logits, target_probs (..., K)``, ``mask (...)`` -> scalar.
    """
    log_probs = torch.log_softmax(logits, dim=-1)
    target = target_probs.detach().to(log_probs.dtype)
    ce = -(target * log_probs).sum(-1)  # (...)
    entropy = -torch.where(target > 0, target * torch.log(target), torch.zeros_like(target)).sum(-1)
    loss = masked_mean(ce, mask)
    return loss, {"loss": loss.detach(), "excess": masked_mean((ce - entropy).detach(), mask)}


def categorical_mean(log_probs: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """``E[R] = sum_b p_b z_b``. Shape: ``log_probs (..., K)``, ``support (K,)`` -> ``(...)``."""
    return (log_probs.exp() * support.to(log_probs.dtype)).sum(-1)


def soft_q_from_categorical(log_probs: torch.Tensor, support: torch.Tensor, alpha: float) -> torch.Tensor:
    """``Q*_alpha = alpha log sum_b p_b exp(z_b / alpha) = alpha logsumexp_b(log p_b + z_b / alpha)``.

    The soft-optimal value of a distribution of the reference policy's return (Q#, Zhou et al. 2025;
    DESIGN.md). Computed as ``m + alpha logsumexp_b(log p_b + (z_b - m) / alpha)`` with ``m`` the largest
    atom of positive probability, so every exponent is <= 0 and the result is exact in float32 down to
    tiny alpha, with finite gradients (``d Q / d log p_b`` is alpha times the tilted distribution
    ``p_b e^{z_b / alpha} / sum_c p_c e^{z_c / alpha}``). Limits:
    ``alpha = 0``: ``m`` itself (the largest supported return with ``p_b > 0``; softmax probabilities are
    never exactly 0, so for a head this is the top atom); ``alpha = inf``: the mean. ``Q*_alpha`` rises
    monotonically from the mean to ``m`` as alpha falls.

    DESIGN.md: support (0, 0.5, 1), p (0.5, 0.3, 0.2): 0.4306602 at alpha 1, 0.5136111 at 0.5,
    0.8400731 at 0.1.

    Shape: ``log_probs (..., K)`` (``-inf`` for ``p_b = 0``), ``support (K,)`` -> ``(...)``.
    """
    alpha = float(alpha)
    if math.isnan(alpha) or alpha < 0:
        raise QVLMError(f"alpha={alpha} (soft_q_from_categorical): the KL temperature must be >= 0 (or inf)")
    z = support.to(log_probs.dtype)
    if math.isinf(alpha):
        return categorical_mean(log_probs, z)
    live = log_probs > -math.inf
    top = torch.where(live, z, torch.full_like(log_probs, -math.inf)).amax(-1)  # (...) largest supported atom
    if alpha == 0.0:
        return top
    shifted = torch.where(live, log_probs + (z - top[..., None]) / alpha, torch.full_like(log_probs, -math.inf))
    return top + alpha * torch.logsumexp(shifted, dim=-1)


def wasserstein1(
    values_a: torch.Tensor, probs_a: torch.Tensor, values_b: torch.Tensor, probs_b: torch.Tensor
) -> torch.Tensor:
    """1-Wasserstein distance ``W1 = integral |F_a(x) - F_b(x)| dx`` between two discrete distributions.

    Why W1 (for scoring a learned return distribution against the exact one): it is in the units of the
    return (W1 = 0.01: mass moved 0.01 on average), it sees how far mass is misplaced (total variation
    or KL on a grid treat a neighbouring bin like a distant one), it compares distributions on different
    atoms without re-binning (a categorical against the exact atoms of pi_ref's returns), and it bounds
    the error of the mean: ``|E_a R - E_b R| <= W1``. It does not bound ``Q*_alpha``'s error at small
    alpha, which weighs the upper tail by ``exp(R / alpha)``: report both. (C51 analyses the Cramer
    distance, the L2 of ``F_a - F_b``; W1 is its L1 counterpart.)

    Shape: ``values_a (K,)``, ``probs_a (..., K)``, ``values_b (M,)``, ``probs_b (..., M)`` (batch
    shapes broadcastable) -> ``(...)``. Atoms need not be sorted or distinct.
    """
    dtype = torch.promote_types(probs_a.dtype, probs_b.dtype)
    values = torch.cat([values_a, values_b]).to(dtype)  # (K + M,)
    order = torch.argsort(values)
    batch = torch.broadcast_shapes(probs_a.shape[:-1], probs_b.shape[:-1])
    pa = torch.cat([probs_a.to(dtype).expand(*batch, -1), torch.zeros(*batch, len(values_b), dtype=dtype)], -1)
    pb = torch.cat([torch.zeros(*batch, len(values_a), dtype=dtype), probs_b.to(dtype).expand(*batch, -1)], -1)
    gap = (pa - pb)[..., order].cumsum(-1)[..., :-1]  # F_a - F_b on each interval between sorted atoms
    return (gap.abs() * torch.diff(values[order])).sum(-1)


def categorical_wasserstein1(probs_a: torch.Tensor, probs_b: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """W1 between two categoricals on one support: ``sum_j |F_a(z_j) - F_b(z_j)| (z_{j+1} - z_j)``.

    Shape: ``probs_a, probs_b (..., K)``, ``support (K,)`` -> ``(...)``.
    """
    dtype = torch.promote_types(probs_a.dtype, probs_b.dtype)
    gap = (probs_a.to(dtype) - probs_b.to(dtype)).cumsum(-1)[..., :-1]
    return (gap.abs() * torch.diff(support.to(dtype))).sum(-1)
