"""Evaluation of decoding methods: mean reward with a 95% CI (Student's t), KL to the base model,
distinct-n, perplexity under the base model, and the sampling distribution's mass on the base
model's top-k tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from qvlm.decoding import DecodeConfig, GenerationResult, generate
from qvlm.heads import QVHeads
from qvlm.rewards import RewardFn, score

__all__ = [
    "betainc",
    "student_t_quantile",
    "mean_ci95",
    "grouped_mean_ci95",
    "distinct_n",
    "perplexity",
    "json_safe",
    "MethodMetrics",
    "summarize",
    "evaluate_decoding",
]


def _beta_continued_fraction(a: float, b: float, x: float, max_terms: int = 10_000) -> float:
    """The continued fraction of the incomplete beta function, by the modified Lentz method
    (Numerical Recipes, 3rd ed., section 6.4, ``betacf``); converges fast for x < (a + 1) / (a + b + 2)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_terms + 1):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # even step d_2m
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),  # odd step d_2m+1
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function ``I_x(a, b) = B(x; a, b) / B(a, b)`` for a, b > 0, x in [0, 1].

    Checks by hand: ``I_x(1, 1) = x``, ``I_x(a, 1) = x^a``, ``I_{1/2}(a, a) = 1/2``.
    """
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"betainc needs a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b  # symmetry I_x(a,b) = 1 - I_1-x(b,a)


def student_t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (df > 0, any real), for 0 < p < 1.

    The two-sided tail is ``P(|T| > t) = I_{df / (df + t^2)}(df / 2, 1 / 2)`` (Abramowitz and Stegun
    26.7.1 through 26.5.27), decreasing in t; bisection finds the t where it equals ``2 (1 - p)``.
    By hand: df 1 is Cauchy, ``tan(pi (p - 1/2))`` (12.7062 at p = 0.975); df 2 has
    ``(2p - 1) / sqrt(2 p (1 - p))`` (4.3027); df -> inf gives the normal 1.95996.
    """
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"student_t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    target = 2.0 * (1.0 - p)

    def tail(t: float) -> float:
        return betainc(df / 2.0, 0.5, df / (df + t * t))

    lo, hi = 0.0, 1.0
    while tail(hi) > target:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-12 * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if tail(mid) > target else (lo, mid)
    return 0.5 * (lo + hi)


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval (Student's t with n - 1 df, sample std).

    ``mean_ci95([1, 2, 3]) == (2.0, 4.302653 * 1 / sqrt(3))``. One value gives a half-width of inf
    (:func:`json_safe` writes it as null), none gives (nan, nan).
    """
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, float("inf")
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, student_t_quantile(0.975, n - 1) * std / math.sqrt(n)


def grouped_mean_ci95(values: Sequence[float], group_size: int) -> tuple[float, float]:
    """Mean and 95% CI half-width when ``values`` come in consecutive groups of ``group_size`` draws
    for the same prompt: the draws of one prompt are not independent, so the CI is taken over the
    prompts' means (Student's t with ``prompts - 1`` df). The mean is the plain mean either way.

    ``grouped_mean_ci95([1, 3, 2, 4, 3, 5], 2) == mean_ci95([2, 3, 4])``; ``group_size = 1`` is
    :func:`mean_ci95`.
    """
    if group_size < 1 or len(values) % group_size:
        raise ValueError(f"{len(values)} values do not split into groups of {group_size}")
    means = [sum(values[i : i + group_size]) / group_size for i in range(0, len(values), group_size)]
    return mean_ci95(means)


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (inf, nan) replaced by None, through dicts, lists and tuples.

    ``json.dumps`` writes inf as ``Infinity``, which is not JSON; null is, and the report shows it as a dash.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


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
    """One method's row of metrics.json (write ``as_dict()`` through :func:`json_safe`)."""

    reward_mean: float
    reward_ci95: float  # half-width of the 95% CI; inf for one response
    kl_to_base: float  # mean over responses of the KL to the base model, summed over the response
    distinct_2: float
    perplexity: float  # under the base model
    cost: float = 1.0
    n: int = 0
    topk_mass: float = math.nan  # mean mass on the base model's guidance_top_k tokens; nan: not tracked
    kl_kind: str = "exact"  # exact (per-token KL summed), estimate (best-of-N from the base reward CDF) or bound

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def summarize(
    texts: Sequence[str],
    rewards: Sequence[float],
    kl: Sequence[float],
    base_logprobs: Sequence[Sequence[float]],
    cost: float = 1.0,
    topk_mass: Sequence[float] | None = None,
    kl_kind: str = "exact",
    group_size: int = 1,
) -> MethodMetrics:
    """Metrics of one method's responses: reward mean and 95% CI, mean summed KL (``kl_kind`` says
    whether it is exact, an estimate or a bound), distinct-2, perplexity under the base model, the mean top-k
    mass (``topk_mass``: one value per response; None or empty: not tracked, nan), and the cost.
    ``group_size`` > 1: the responses come ``group_size`` per prompt, consecutively, and the CI is
    over the prompts' mean rewards (:func:`grouped_mean_ci95`)."""
    if kl_kind not in ("exact", "estimate", "bound"):
        raise ValueError(f"kl_kind is {kl_kind!r}; use exact, estimate or bound")
    mean, ci = grouped_mean_ci95(rewards, group_size)
    return MethodMetrics(
        reward_mean=mean,
        reward_ci95=ci,
        kl_to_base=sum(kl) / len(kl) if kl else float("nan"),
        distinct_2=distinct_n(texts, 2),
        perplexity=perplexity(base_logprobs),
        cost=cost,
        n=len(texts),
        topk_mass=sum(topk_mass) / len(topk_mass) if topk_mass else float("nan"),
        kl_kind=kl_kind,
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
    """Decode ``prompts`` with ``cfg`` (guided when ``cfg.beta != 0``; ``cfg.num_return_sequences``
    responses per prompt, the CI then over the prompts' means) and measure the result."""
    cfg = cfg or DecodeConfig()
    result = generate(model, tokenizer, prompts, heads=heads, cfg=cfg, track_kl=True, progress=progress)
    k = cfg.num_return_sequences
    rewards = score(reward, [p for p in prompts for _ in range(k)], result.texts)
    topk_mass = getattr(result, "topk_mass", [])
    metrics = summarize(result.texts, rewards, result.kl, result.base_logprobs, cost, topk_mass, group_size=k)
    return metrics, result, rewards
