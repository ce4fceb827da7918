"""Reward-model over-optimisation made measurable (Gao, Schulman and Hilton 2022, "Scaling Laws for
Reward Model Overoptimization"): preference pairs labelled by a gold reward, and the gold and proxy
reward of best-of-N selection by the proxy, estimated without bias from one pool of draws per prompt.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

from qvlm.errors import QVLMError

__all__ = ["gold_pairs", "best_of_n_weights", "best_of_n_expectation", "peak"]


def gold_pairs(
    groups: Sequence[Sequence[tuple[str, float]]], prompts: Sequence[str], noise: float, rng: random.Random
) -> list[dict]:
    """Preference pairs from each prompt's scored responses: every two responses whose gold rewards
    differ, the higher one ``chosen``; with probability ``noise`` a pair's label is flipped (label noise).

    ``groups[i]`` holds ``(response, gold)`` for ``prompts[i]``. Returns ``{"prompt", "chosen",
    "rejected", "gold_margin"}`` dicts (``gold_margin`` = gold(chosen) - gold(rejected), negative when
    flipped), in a seeded random order.
    """
    if not 0 <= noise < 0.5:
        raise QVLMError(f"label noise is {noise}; it must be in [0, 0.5) (0.5 would make the labels random)")
    pairs = []
    for prompt, group in zip(prompts, groups):
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                (a, ga), (b, gb) = group[i], group[j]
                if ga == gb or a == b:
                    continue
                hi, lo = ((a, ga), (b, gb)) if ga > gb else ((b, gb), (a, ga))
                if rng.random() < noise:
                    hi, lo = lo, hi
                pairs.append({"prompt": prompt, "chosen": hi[0], "rejected": lo[0], "gold_margin": hi[1] - lo[1]})
    rng.shuffle(pairs)
    return pairs


def best_of_n_weights(pool: int, n: int) -> list[float]:
    """Probability that the draw of rank ``i`` (1-based, ascending by the selecting score) is the
    best of a uniformly random ``n``-subset of ``pool`` draws: ``C(i - 1, n - 1) / C(pool, n)``.

    ``pool = 3, n = 2`` -> ``(0, 1/3, 2/3)``; ``n = 1`` -> uniform; ``n = pool`` -> all on the top draw.
    """
    if not 1 <= n <= pool:
        raise QVLMError(f"best-of-{n} from a pool of {pool} draws: need 1 <= n <= pool")
    total = math.comb(pool, n)
    return [math.comb(i - 1, n - 1) / total for i in range(1, pool + 1)]


def best_of_n_expectation(select_by: Sequence[float], values: Sequence[float], n: int) -> float:
    """Expected ``values`` of the draw that best-of-``n`` by ``select_by`` keeps, over every
    ``n``-subset of the pool: the unbiased estimator Gao et al. (2022) use, after Nakano et al. (2021).

    Ties in ``select_by`` are broken by position (a stable sort). Shape: two sequences of one pool.
    """
    if len(select_by) != len(values):
        raise QVLMError(f"best-of-n: {len(select_by)} scores but {len(values)} values; give one of each per draw")
    order = sorted(range(len(values)), key=lambda i: select_by[i])
    return sum(w * values[i] for w, i in zip(best_of_n_weights(len(values), n), order))


def peak(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, int]:
    """``(x, y, index)`` of the largest ``y`` (the first on ties)."""
    k = max(range(len(ys)), key=lambda i: (ys[i], -i))
    return xs[k], ys[k], k
