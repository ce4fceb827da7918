"""Best-of-N: keep the highest-reward of N base samples (drawn with :func:`qvlm.decoding.generate`),
and its KL to the base policy: exact over an enumerable outcome distribution, estimated from base
samples for a language model, or the analytic upper bound (DESIGN.md, "Online learning and evaluation").

Best-of-N over a base distribution with reward CDF ``F`` picks a response of reward level ``r`` with
probability ``F(r)^N - F(r^-)^N`` (ties broken uniformly among equal rewards, so within a level the
base's own proportions are kept); its KL to the base is therefore the KL between the two
distributions over reward levels.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from qvlm.errors import QVLMError

__all__ = [
    "KL_KINDS",
    "best_of_n_kl_bound",
    "best_of_n_policy",
    "best_of_n_kl_exact",
    "best_of_n_kl_estimate",
    "select_best_of_n",
]

KL_KINDS = ("exact", "estimate", "bound")  # how a reported KL was obtained (metrics.json "kl_kind")


def _check_n(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise QVLMError(f"best-of-n: n is {n!r}; use a whole number >= 1")


def best_of_n_kl_bound(n: int) -> float:
    """KL of best-of-n selection to the base policy, ``log n - (n - 1) / n``.

    The analytic value for a continuous reward without ties (Beirami et al. 2024, "Theoretical
    guarantees on the best-of-n alignment policy"), an upper bound in general. ``n = 4`` -> 0.6363.
    """
    return float(torch.log(torch.tensor(float(n)))) - (n - 1) / n


def best_of_n_policy(rewards: torch.Tensor, probs: torch.Tensor, n: int) -> torch.Tensor:
    """Probability that best-of-``n`` returns each outcome: ``pi_n(y) = p(y) / P(R = R(y)) *
    (F(R(y))^n - F(R(y)^-)^n)``, ties split in the base's proportions (Beirami et al. 2024, Lemma 1).

    Shape: ``rewards, probs (M,)`` over enumerable outcomes (probs sum to 1) -> ``(M,)``. Rewards
    (0, 0.5, 1) with probs (0.5, 0.3, 0.2), n = 4 -> (0.0625, 0.3471, 0.5904) (DESIGN.md).
    """
    _check_n(n)
    rewards, probs = torch.as_tensor(rewards, dtype=torch.float64), torch.as_tensor(probs, dtype=torch.float64)
    if rewards.shape != probs.shape or rewards.dim() != 1:
        raise QVLMError(f"best-of-n: rewards {tuple(rewards.shape)} and probs {tuple(probs.shape)} must be equal 1-d")
    _, level = torch.unique(rewards, sorted=True, return_inverse=True)  # (M,) index of each outcome's level
    mass = torch.zeros(int(level.max()) + 1, dtype=torch.float64).index_add_(0, level, probs)  # (L,) P(R = r)
    cdf = mass.cumsum(0).clamp(max=1.0)  # F(r)
    below = cdf - mass  # F(r^-)
    picked = cdf**n - below.clamp(min=0.0) ** n  # (L,) P(best-of-n has reward r)
    share = torch.where(mass[level] > 0, probs / mass[level], torch.zeros_like(probs))
    return picked[level] * share


def best_of_n_kl_exact(rewards: torch.Tensor, probs: torch.Tensor, n: int) -> float:
    """Exact ``KL(pi_n || p)`` over enumerable outcomes (see :func:`best_of_n_policy`), in nats.

    The worked example (rewards (0, 0.5, 1), probs (0.5, 0.3, 0.2), n = 4) gives 0.5597506; the
    bound :func:`best_of_n_kl_bound` says 0.6362944. Outcomes with probability 0 contribute nothing.
    """
    probs = torch.as_tensor(probs, dtype=torch.float64)
    pi = best_of_n_policy(rewards, probs, n)
    keep = pi > 0
    return float((pi[keep] * (pi[keep].log() - probs[keep].log())).sum())


def _continuous_kl(a: float, b: float, n: int) -> float:
    """``integral_a^b f log f du`` with ``f(u) = n u^(n-1)``, the density of best-of-n's CDF rank."""

    def xlogx_n(u: float) -> float:  # u^n log u, 0 at u = 0
        return u**n * math.log(u) if u > 0 else 0.0

    return (b**n - a**n) * math.log(n) + (n - 1) * (xlogx_n(b) - xlogx_n(a) - (b**n - a**n) / n)


def best_of_n_kl_estimate(samples: Sequence[float], n: int, tol: float = 0.0) -> float:
    """KL of best-of-``n`` to the base, estimated from base samples' rewards of one prompt (ties included).

    The base reward CDF is the samples' empirical CDF. A reward seen two or more times is an atom
    (mass = its share of the samples): it adds ``P_n log(P_n / p)`` with ``P_n = F(r)^n - F(r^-)^n``,
    the exact term. A reward seen once stands for a continuous stretch of the distribution: it adds
    the continuous term ``integral f log f`` over its CDF interval with ``f(u) = n u^(n-1)``. So
    without ties the estimate equals the bound ``log n - (n - 1) / n`` (exact for a continuous
    reward), with every sample tied it is 0, and it never exceeds the bound (Jensen: an atom
    contributes at most what the continuous stretch would). Samples (0, 0, 1, 2), n = 2: atom 0 of
    mass 1/2 adds 0.25 log 0.5, singletons add the continuous terms on [1/2, 3/4] and [3/4, 1].
    ``tol``: rewards within ``tol`` of the smallest of their run (sorted) count as tied (use a small
    ``tol`` for values computed in floating point, where equal inputs can differ in the last bits).
    """
    _check_n(n)
    if not samples:
        raise QVLMError("best-of-n KL estimate: no base samples; draw at least one per prompt")
    if n == 1:
        return 0.0
    counts: list[int] = []
    start = -math.inf
    for value in sorted(float(x) for x in samples):
        if value - start > tol or not counts:
            counts.append(0)
            start = value
        counts[-1] += 1
    total, below, kl = float(len(samples)), 0.0, 0.0
    for count in counts:
        mass = count / total
        top = min(below + mass, 1.0)
        if count >= 2:
            picked = top**n - below**n
            kl += picked * math.log(picked / mass) if picked > 0 else 0.0
        else:
            kl += _continuous_kl(below, top, n)
        below = top
    return kl


def select_best_of_n(rewards: list[float], group: int, k: int) -> list[int]:
    """Best-of-``k`` from draws made ``group`` per prompt (prompt-major): for prompt ``i``, the index
    of the highest reward among draws ``i * group .. i * group + k - 1``; ties go to the first.

    ``rewards (0, 3, 3, 1, | 2, 5, 4, 9)``, ``group = 4``, ``k = 3`` -> ``[1, 5]``.
    """
    if group < 1 or not 1 <= k <= group:
        raise QVLMError(f"best-of-n: k is {k} and group is {group}; need 1 <= k <= group")
    if len(rewards) % group:
        raise QVLMError(f"best-of-n: {len(rewards)} rewards is not a whole number of groups of {group}")
    picks = []
    for start in range(0, len(rewards), group):
        draws = rewards[start : start + k]
        picks.append(start + max(range(k), key=lambda j: (draws[j], -j)))
    return picks
