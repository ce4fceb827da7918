"""Scores as LMRL-Gym reports them: ``normalised = 100 (return - random) / (optimal - random)``.

0 is the random policy's expected return, 100 the optimal policy's. The built-in tasks know both
exactly (:func:`qvlm.envs.guess.guess_optimal_return`, :func:`qvlm.envs.maze.maze_random_return`,
...); elsewhere the random policy's return can be estimated from episodes
(:func:`estimate_random_return`), and :func:`score_summary` says which it used. The 95% CI is
Student's t over episodes (:func:`qvlm.eval.metrics.mean_ci95`); normalising is affine, so the
normalised CI is the return's CI times ``100 / (optimal - random)``.
"""

from __future__ import annotations

import math
from typing import Sequence

from qvlm.errors import QVLMError

__all__ = ["normalised_score", "return_ci95", "score_summary", "estimate_random_return"]


def normalised_score(value: float, random_return: float, optimal_return: float) -> float:
    """``100 (value - random) / (optimal - random)``. By hand: return 0.3, random -0.2, optimal 0.8
    -> 50."""
    span = optimal_return - random_return
    if not math.isfinite(span) or span <= 0:
        raise QVLMError(
            f"cannot normalise: the optimal return ({optimal_return}) must exceed the random policy's ({random_return})"
        )
    return 100.0 * (value - random_return) / span


def return_ci95(returns: Sequence[float]) -> tuple[float, float]:
    """Mean return over episodes and the half-width of its 95% CI (Student's t, n - 1 df)."""
    from qvlm.eval.metrics import mean_ci95

    if not returns:
        raise QVLMError("no episodes to score")
    return mean_ci95([float(r) for r in returns])


def score_summary(
    returns: Sequence[float],
    random_return: float | None = None,
    optimal_return: float | None = None,
    random_source: str = "exact",
) -> dict:
    """Mean return with its 95% CI, and, when both references are known, the normalised score
    with its CI. ``random_source``: ``"exact"`` or ``"estimate (N episodes)"``, reported as is."""
    mean, half = return_ci95(returns)
    out = {"episodes": len(returns), "mean_return": mean, "ci95": half}
    if random_return is not None and optimal_return is not None:
        scale = 100.0 / (optimal_return - random_return) if optimal_return > random_return else math.nan
        out.update(
            normalised=normalised_score(mean, random_return, optimal_return),
            normalised_ci95=half * scale,
            random_return=random_return,
            optimal_return=optimal_return,
            random_source=random_source,
        )
    return out


def estimate_random_return(env_name: str, episodes: int = 1000, seed: int = 0, env_kwargs=None) -> tuple[float, float]:
    """The random policy's mean return over ``episodes`` episodes (seeds ``seed ..``) and its 95%
    CI half-width: for tasks without an exact value."""
    from qvlm.envs.rollout import run_scripted

    runs = run_scripted(env_name, range(seed, seed + episodes), kind="random", env_kwargs=env_kwargs)
    return return_ci95([e.total_return for e in runs])
