"""Reward functions behind one batch interface: ``reward(prompts, responses) -> list[float]``.

Names for the CLI: ``vader`` (VADER compound sentiment, toward positive), ``vader-negative``
(its negation), ``count:TEXT`` (occurrences of TEXT in the response), ``length`` (characters / 100).
Every reward's output is checked: one finite float per response.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from qvlm.errors import QVLMError

__all__ = ["RewardFn", "get_reward", "score", "REWARD_NAMES"]

RewardFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]
REWARD_NAMES = ("vader", "vader-negative", "count:TEXT", "length")


def _vader(sign: float) -> RewardFn:
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise QVLMError("the vader reward needs the package vadersentiment: pip install vadersentiment") from None
    analyzer = SentimentIntensityAnalyzer()

    def reward(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [sign * analyzer.polarity_scores(r)["compound"] for r in responses]

    return reward


def _count(text: str) -> RewardFn:
    if not text:
        raise QVLMError("reward count: needs the text to count, e.g. count:good")

    def reward(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [float(r.count(text)) for r in responses]

    return reward


def _length(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    return [len(r) / 100.0 for r in responses]


def get_reward(name: str) -> RewardFn:
    """A reward by name (see :data:`REWARD_NAMES`); a callable is returned unchanged."""
    if callable(name):
        return name
    if name in ("vader", "vader-positive"):
        return _vader(1.0)
    if name == "vader-negative":
        return _vader(-1.0)
    if name.startswith("count:"):
        return _count(name[len("count:") :])
    if name == "length":
        return _length
    raise QVLMError(f"unknown reward {name!r}; use one of {', '.join(REWARD_NAMES)}")


def score(reward: RewardFn, prompts: Sequence[str], responses: Sequence[str], name: str = "reward") -> list[float]:
    """Call ``reward`` and check its output: one finite number per response."""
    values = reward(prompts, responses)
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise QVLMError(f"{name} returned {type(values).__name__}; it must return one number per response") from None
    if len(values) != len(responses):
        raise QVLMError(
            f"{name} returned {len(values)} values for {len(responses)} responses; "
            "it must return exactly one number per response"
        )
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise QVLMError(f"{name} returned {v} for response {i} ({responses[i][:40]!r}); rewards must be finite")
    return values
