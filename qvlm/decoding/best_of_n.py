"""Best-of-N: keep the highest-reward of N base samples (drawn with :func:`qvlm.decoding.generate`)."""

from __future__ import annotations

import torch

from qvlm.errors import QVLMError

__all__ = ["best_of_n_kl_bound", "select_best_of_n"]


def best_of_n_kl_bound(n: int) -> float:
    """KL of best-of-n selection to the base policy, ``log n - (n - 1) / n``.

    The analytic value for a continuous reward without ties (Beirami et al. 2024, "Theoretical
    guarantees on the best-of-n alignment policy"), an upper bound in general. ``n = 4`` -> 0.6363.
    """
    return float(torch.log(torch.tensor(float(n)))) - (n - 1) / n


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
