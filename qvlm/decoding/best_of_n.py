"""Best-of-N: keep the highest-reward of N base samples."""

from __future__ import annotations

import torch

__all__ = ["best_of_n_kl_bound"]


def best_of_n_kl_bound(n: int) -> float:
    """KL of best-of-n selection to the base policy, ``log n - (n - 1) / n``.

    The analytic value for a continuous reward without ties (Beirami et al. 2024, "Theoretical
    guarantees on the best-of-n alignment policy"), an upper bound in general. ``n = 4`` -> 0.6363.
    """
    return float(torch.log(torch.tensor(float(n)))) - (n - 1) / n
