"""The built-in rewards: ``vader`` (VADER compound sentiment, toward positive), ``vader-negative``
(its negation), ``count:TEXT`` (occurrences of TEXT in the response), ``length`` (characters / 100)."""

from __future__ import annotations

from typing import Sequence

from qvlm.errors import QVLMError
from qvlm.rewards.base import RewardFn

__all__ = ["vader", "count", "length"]


def vader(sign: float) -> RewardFn:
    """VADER's compound score of the response in [-1, 1], times ``sign`` (Hutto and Gilbert 2014)."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise QVLMError("the vader reward needs the package vadersentiment: pip install vadersentiment") from None
    analyzer = SentimentIntensityAnalyzer()

    def reward(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [sign * analyzer.polarity_scores(r)["compound"] for r in responses]

    return reward


def count(text: str) -> RewardFn:
    """The number of occurrences of ``text`` in the response."""
    if not text:
        raise QVLMError("reward count: needs the text to count, e.g. count:good")

    def reward(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [float(r.count(text)) for r in responses]

    return reward


def length(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """The response's length in characters / 100."""
    return [len(r) / 100.0 for r in responses]
