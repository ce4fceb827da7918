"""The exact reward-KL frontier of a token MDP: best-of-N, guidance with the base policy's Q
(controlled decoding), the soft optimum traced over alpha, and guidance with learned heads.

Every point is exact: a policy's expected reward and its KL to ``pi_ref`` over whole responses come
from :func:`qvlm.exact.evaluate_policy` (backward induction), and best-of-N's from its closed form
over the enumerated responses (:func:`qvlm.decoding.best_of_n.best_of_n_policy`).

Why the soft optimum is the frontier: for any policy ``pi`` and any ``alpha > 0``,
``reward(pi) - alpha KL(pi) <= V*_alpha(root)`` (``pi*_alpha`` maximises that objective; Korbak et
al. 2022, "RL with KL penalties is better viewed as Bayesian inference"). So no policy lies above
the curve ``alpha -> (KL(pi*_alpha), reward(pi*_alpha))``: exponential tilting
``pi_ref exp(Q*/alpha)`` is the exact reward-KL Pareto frontier, and :func:`frontier_violation`
measures how far a point is above it (<= 0 for every real policy). Controlled decoding tilts by
``Q^{pi_ref}`` instead of ``Q*`` (Mudgal et al. 2024), and best-of-N tilts by the reward CDF; both
lie below it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from qvlm.decoding.best_of_n import best_of_n_policy
from qvlm.exact.solver import TokenTree, evaluate_policy, guided_policy, solve

__all__ = [
    "FrontierPoint",
    "DEFAULT_NS",
    "DEFAULT_BETAS",
    "DEFAULT_ALPHAS",
    "response_distribution",
    "reach_probs",
    "best_of_n_frontier",
    "guidance_frontier",
    "soft_optimum_frontier",
    "soft_optimum_at_kl",
    "frontier_violation",
    "exact_frontier",
]

DEFAULT_NS = tuple(range(1, 33))  # best-of-N, N = 1..32
DEFAULT_BETAS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)  # guidance strengths
DEFAULT_ALPHAS = tuple(10 ** (k / 8) for k in range(-24, 17))  # 1e-3 .. 100, 8 per decade


@dataclass
class FrontierPoint:
    """One policy on the frontier: its setting (``n``, ``beta`` or ``alpha``), exact expected reward,
    exact KL to pi_ref over whole responses (nats), and ``cost`` in samples per response."""

    setting: str  # "n", "beta" or "alpha"
    value: float
    reward: float
    kl_to_base: float
    cost: float = 1.0
    kl_kind: str = "exact"

    def as_dict(self) -> dict:
        out = asdict(self)
        out[out.pop("setting")] = out.pop("value")
        return out


def reach_probs(tree: TokenTree, policy: torch.Tensor) -> torch.Tensor:
    """Probability that ``policy (N, V)`` reaches each decision state from the root. Shape ``(N,)``."""
    reach = torch.zeros(tree.num_states, dtype=torch.float64)
    reach[0] = 1.0
    for sl in tree.level_slices:
        kid, flow = tree.child[sl], reach[sl, None] * policy[sl]  # (n_d, V)
        live = kid >= 0
        reach.index_add_(0, kid[live], flow[live])
    return reach


def response_distribution(tree: TokenTree) -> tuple[torch.Tensor, torch.Tensor]:
    """Every complete response of the tree under pi_ref: its probability and its discounted return.

    A response is a (state, action) pair whose step ends the episode. Shapes ``(M,)``, ``(M,)``;
    the probabilities sum to 1.
    """
    reach = reach_probs(tree, tree.ref_probs)
    gained = torch.zeros(tree.num_states, dtype=torch.float64)  # discounted reward collected before s
    probs, returns = [], []
    for d, sl in enumerate(tree.level_slices):
        step = gained[sl, None] + tree.gamma**d * tree.rewards[sl]  # (n_d, V)
        kid, done = tree.child[sl], tree.done[sl] > 0
        gained[kid[~done]] = step[~done]
        probs.append((reach[sl, None] * tree.ref_probs[sl])[done])
        returns.append(step[done])
    return torch.cat(probs), torch.cat(returns)


def best_of_n_frontier(tree: TokenTree, ns: Sequence[int] = DEFAULT_NS) -> list[FrontierPoint]:
    """Best-of-N by the response's return, exactly: reward ``sum pi_N R`` and ``KL(pi_N || pi_ref)``."""
    probs, returns = response_distribution(tree)
    points = []
    for n in ns:
        pi = best_of_n_policy(returns, probs, n)
        keep = pi > 0
        kl = float((pi[keep] * (pi[keep].log() - probs[keep].log())).sum())
        points.append(FrontierPoint("n", n, float((pi * returns).sum()), max(kl, 0.0), float(n)))
    return points


def guidance_frontier(
    tree: TokenTree, q: torch.Tensor, v: torch.Tensor, betas: Sequence[float] = DEFAULT_BETAS, cost: float = 1.0
) -> list[FrontierPoint]:
    """Guided decoding ``softmax(log pi_ref + beta (Q - V))`` with the given heads, one point per beta."""
    points = []
    for beta in betas:
        ev = evaluate_policy(tree, guided_policy(tree.ref_probs, q, v, beta))
        points.append(FrontierPoint("beta", float(beta), ev.reward, max(ev.kl, 0.0), cost))
    return points


def soft_optimum_frontier(tree: TokenTree, alphas: Sequence[float] = DEFAULT_ALPHAS) -> list[FrontierPoint]:
    """The soft optimum ``pi*_alpha`` (guidance with ``Q*`` at beta = 1/alpha), one point per alpha."""
    points = []
    for alpha in alphas:
        ev = evaluate_policy(tree, solve(tree, alpha).pi)
        points.append(FrontierPoint("alpha", float(alpha), ev.reward, max(ev.kl, 0.0)))
    return points


def soft_optimum_at_kl(tree: TokenTree, kl: float, iters: int = 32) -> FrontierPoint:
    """The soft optimum whose KL equals ``kl`` (bisection on log alpha; KL falls as alpha rises).

    Clamped to the ends: a KL above the one at alpha = 1e-4 returns that point; a KL of 0 (up to 1e-12) returns
    pi_ref itself (alpha = inf)."""
    if kl <= 1e-12:  # rounding: best-of-1's KL comes out as 1e-17
        base = evaluate_policy(tree, tree.ref_probs)
        return FrontierPoint("alpha", math.inf, base.reward, 0.0)
    lo, hi = math.log(1e-4), math.log(1e4)
    point = soft_optimum_frontier(tree, [math.exp(lo)])[0]
    if kl >= point.kl_to_base:
        return point
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        point = soft_optimum_frontier(tree, [math.exp(mid)])[0]
        lo, hi = (mid, hi) if point.kl_to_base > kl else (lo, mid)
    return point


def frontier_violation(point: FrontierPoint, soft_points: Sequence[FrontierPoint]) -> float:
    """``max over alpha of (reward - alpha KL) - V*_alpha(root)`` over the alphas of ``soft_points``
    (from :func:`soft_optimum_frontier`; ``V*_alpha(root) = reward* - alpha KL*``): how far ``point``
    lies above the soft frontier. <= 0, up to rounding, for every policy; a positive value is a bug."""
    return max((point.reward - s.value * point.kl_to_base) - (s.reward - s.value * s.kl_to_base) for s in soft_points)


def exact_frontier(
    tree: TokenTree,
    ns: Sequence[int] = DEFAULT_NS,
    betas: Sequence[float] = DEFAULT_BETAS,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    heads: dict[str, tuple[torch.Tensor, torch.Tensor] | Callable[[float], tuple]] | None = None,
    soft_reward: bool = True,
) -> dict[str, list[dict]]:
    """The whole frontier as ``{METHOD: [point dicts]}``: ``soft_optimum`` (over alpha),
    ``best_of_n`` (N in ``ns``), ``controlled_decoding`` (guidance with ``Q^{pi_ref}, V^{pi_ref}``
    over beta), and one guidance curve per entry of ``heads`` (``{name: (q (N, V), v (N,))}``, or
    ``{name: beta -> (q, v)}`` for heads that differ per beta).

    ``soft_reward``: give every other point ``"soft_optimum_reward"``, the soft optimum's reward at
    the same KL (:func:`soft_optimum_at_kl`): the reward that point leaves on the table."""
    reference = evaluate_policy(tree, tree.ref_probs)
    out = {
        "soft_optimum": soft_optimum_frontier(tree, alphas),
        "best_of_n": best_of_n_frontier(tree, ns),
        "controlled_decoding": guidance_frontier(tree, reference.reward_q, reference.reward_v, betas),
    }
    for name, h in (heads or {}).items():
        if callable(h):  # heads that depend on beta (a distributional learner: Q*_alpha at alpha = 1/beta)
            out[name] = [guidance_frontier(tree, *h(beta), [beta])[0] for beta in betas]
        else:
            out[name] = guidance_frontier(tree, *h, betas)
    table = {name: [p.as_dict() for p in points] for name, points in out.items()}
    if soft_reward:
        for name, points in out.items():
            if name != "soft_optimum":
                for row, point in zip(table[name], points):
                    row["soft_optimum_reward"] = soft_optimum_at_kl(tree, point.kl_to_base).reward
    return table
