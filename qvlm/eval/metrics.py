"""Evaluation of decoding methods: mean reward with a 95% CI, KL to the base model, distinct-n,
perplexity under the base model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from qvlm.decoding import DecodeConfig, GenerationResult, generate
from qvlm.heads import QVHeads
from qvlm.rewards import RewardFn, score

__all__ = ["mean_ci95", "distinct_n", "perplexity", "MethodMetrics", "summarize", "evaluate_decoding"]

# two-sided 97.5% quantiles of Student's t for small samples (df 1..30); 1.96 beyond
_T975 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval (Student's t, sample std).

    ``mean_ci95([1, 2, 3]) == (2.0, 4.303 * 1 / sqrt(3))``. One value gives a half-width of inf.
    """
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, float("inf")
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    return mean, t * std / math.sqrt(n)


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct n-grams over all n-grams of whitespace words across ``texts`` (Li et al. 2016)."""
    grams = [tuple(w[i : i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def perplexity(base_logprobs: Sequence[Sequence[float]]) -> float:
    """``exp(-mean log pi_base(y_t | s_t))`` over all response tokens."""
    flat = [lp for row in base_logprobs for lp in row]
    return math.exp(-sum(flat) / len(flat)) if flat else float("nan")


@dataclass
class MethodMetrics:
    reward_mean: float
    reward_ci95: float
    kl_to_base: float
    distinct_2: float
    perplexity: float
    cost: float = 1.0
    n: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def summarize(texts, rewards, kl, base_logprobs, cost: float = 1.0) -> MethodMetrics:
    """Metrics of one method's responses: reward mean and 95% CI, mean summed KL, distinct-2,
    perplexity under the base model, and its cost."""
    mean, ci = mean_ci95(rewards)
    return MethodMetrics(
        reward_mean=mean,
        reward_ci95=ci,
        kl_to_base=sum(kl) / len(kl),
        distinct_2=distinct_n(texts, 2),
        perplexity=perplexity(base_logprobs),
        cost=cost,
        n=len(texts),
    )


def evaluate_decoding(
    model,
    tokenizer,
    prompts: list[str],
    reward: RewardFn,
    heads: QVHeads | None = None,
    cfg: DecodeConfig | None = None,
    cost: float = 1.0,
    progress: bool = False,
) -> tuple[MethodMetrics, GenerationResult, list[float]]:
    """Decode ``prompts`` with ``cfg`` (guided when ``cfg.beta != 0``) and measure the result."""
    cfg = cfg or DecodeConfig()
    result = generate(model, tokenizer, prompts, heads=heads, cfg=cfg, track_kl=True, progress=progress)
    rewards = score(reward, prompts, result.texts)
    return summarize(result.texts, rewards, result.kl, result.base_logprobs, cost), result, rewards
