"""The reward interface and its checks.

A sequence reward is ``reward(prompts, responses) -> floats``: one finite number per response. A
token reward (marked with :func:`token_level`) is called ``reward(prompts, response_tokens)`` with
each response as its list of tokens (each token decoded alone, EOS excluded) and returns one list
per response, one finite number per token: the per-step rewards ``r_t`` of shared/DESIGN.md.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from qvlm.errors import QVLMError

__all__ = [
    "RewardFn",
    "token_level",
    "is_token_level",
    "score",
    "score_tokens",
    "response_tokens",
    "as_sequence_reward",
]

RewardFn = Callable[[Sequence[str], Sequence], Sequence]


def token_level(fn):
    """Mark ``fn`` as a token reward: called with token lists, returns one list of floats per response."""
    fn.token_level = True
    return fn


def is_token_level(reward) -> bool:
    """Whether ``reward`` gives per-token rewards (see :func:`token_level`)."""
    return bool(getattr(reward, "token_level", False))


def _finite(v, name: str, where: str) -> float:
    if isinstance(v, (list, tuple)):
        raise QVLMError(
            f"{name} returned a list for {where}; a sequence reward returns one number per response "
            "(mark a per-token reward with @qvlm.rewards.token_level)"
        )
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise QVLMError(f"{name} returned {type(v).__name__} {v!r} for {where}; rewards must be numbers") from None
    if not math.isfinite(v):
        raise QVLMError(f"{name} returned {v} for {where}; rewards must be finite")
    return v


def _as_list(values, name: str, n: int, what: str) -> list:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise QVLMError(f"{name} returned {type(values).__name__}; it must return one {what} per response")
    values = list(values)
    if len(values) != n:
        raise QVLMError(
            f"{name} returned {len(values)} values for {n} responses; it must return exactly one {what} per response"
        )
    return values


def score(reward: RewardFn, prompts: Sequence[str], responses: Sequence[str], name: str = "reward") -> list[float]:
    """Call a sequence reward and check its output: one finite number per response."""
    if is_token_level(reward):
        raise QVLMError(
            f"{name} gives per-token rewards, and this step scores whole responses; use it with `qvlm sample` "
            "(which writes token_rewards) or `qvlm eval`, or use a sequence reward here"
        )
    values = _as_list(reward(prompts, responses), name, len(responses), "number")
    return [_finite(v, name, f"response {i} ({responses[i][:40]!r})") for i, v in enumerate(values)]


def score_tokens(
    reward: RewardFn, prompts: Sequence[str], tokens: Sequence[Sequence[str]], name: str = "reward"
) -> list[list[float]]:
    """Call a token reward on ``tokens`` (one list of token strings per response) and check its output:
    one list per response with one finite number per token."""
    rows = _as_list(reward(prompts, tokens), name, len(tokens), "list of per-token numbers")
    out = []
    for i, (row, toks) in enumerate(zip(rows, tokens)):
        if isinstance(row, (str, bytes)) or not hasattr(row, "__len__"):
            raise QVLMError(f"{name} returned {type(row).__name__} for response {i}; a token reward returns a list")
        if len(row) != len(toks):
            raise QVLMError(
                f"{name} returned {len(row)} values for response {i}, which has {len(toks)} tokens; "
                "a token reward returns one number per response token"
            )
        out.append([_finite(v, name, f"token {t} of response {i}") for t, v in enumerate(row)])
    return out


def response_tokens(tokenizer, ids: Sequence[Sequence[int]]) -> list[list[str]]:
    """Each response's tokens as strings, each token decoded alone (what a token reward is called with)."""
    return [[tokenizer.decode([int(i)]) for i in row] for row in ids]


def as_sequence_reward(reward: RewardFn, tokenizer) -> RewardFn:
    """``reward`` itself when it scores sequences; for a token reward, its undiscounted return (the sum
    of the per-token rewards) over the response text tokenized again with ``tokenizer``.

    Re-tokenising sampled text can split it differently from the sampled tokens; `qvlm sample` scores
    the sampled tokens themselves.
    """
    if not is_token_level(reward):
        return reward

    def summed(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in responses]
        rows = score_tokens(reward, prompts, response_tokens(tokenizer, ids), getattr(reward, "__name__", "reward"))
        return [sum(row) for row in rows]

    return summed
