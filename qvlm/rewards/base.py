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
    "named",
    "call_reward",
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
    except OverflowError:  # an int beyond float range
        raise QVLMError(f"{name} returned a number beyond float range for {where}; rewards must be finite") from None
    except Exception:  # noqa: BLE001 (TypeError, ValueError, or whatever a user's object raises)
        raise QVLMError(
            f"{name} returned {type(v).__name__} {_short(v)} for {where}; rewards must be numbers"
        ) from None
    if not math.isfinite(v):
        raise QVLMError(f"{name} returned {v} for {where}; rewards must be finite")
    return v


def _short(v) -> str:
    try:
        text = repr(v)
    except Exception:  # noqa: BLE001 (a user's object)
        text = "?"
    return text if len(text) <= 60 else text[:57] + "..."


def _as_list(values, name: str, n: int, what: str) -> list:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise QVLMError(f"{name} returned {type(values).__name__}; it must return one {what} per response")
    try:
        values = list(values)
    except Exception:  # noqa: BLE001 (a user's object that claims a length but does not iterate)
        raise QVLMError(
            f"{name} returned {type(values).__name__}, not a list; return one {what} per response"
        ) from None
    if len(values) != n:
        raise QVLMError(
            f"{name} returned {len(values)} values for {n} responses; it must return exactly one {what} per response"
        )
    return values


class named:  # noqa: N801 (used as a function: named(reward, "reward my.py:score"))
    """``reward`` under the name ``name`` (e.g. ``"reward my.py:score"``): what it raises, and what is
    wrong with what it returns, are reported under that name (:func:`call_reward`, :func:`score`).
    Every other attribute (a token_level mark, a classifier's settings) is the reward's own."""

    def __init__(self, reward: RewardFn, name: str):
        self.__wrapped__, self.reward_name = reward, name

    def __call__(self, prompts: Sequence[str], items: Sequence) -> Sequence:
        return call_reward(self.__wrapped__, prompts, items, self.reward_name)

    def __getattr__(self, attr: str):
        if attr in ("__wrapped__", "reward_name"):  # not set yet (while unpickling)
            raise AttributeError(attr)
        return getattr(self.__wrapped__, attr)


def call_reward(reward: RewardFn, prompts: Sequence[str], items: Sequence, name: str = "reward") -> Sequence:
    """``reward(prompts, items)``; an exception it raises (a user's Python reward with a bug) becomes
    one :class:`QVLMError` naming the reward, the exception and where it was raised. The original
    stays chained as the cause: ``qvlm --debug`` prints its traceback."""
    try:
        return reward(prompts, items)
    except QVLMError:
        raise
    except (Exception, SystemExit) as err:  # noqa: BLE001 (whatever the user's code raises: reported, on one line)
        text = " ".join(str(err).split())[:300]
        raise QVLMError(
            f"{name} raised {type(err).__name__}{': ' + text if text else ''}{_raised_at(err)}; fix the function "
            "(qvlm --debug shows its traceback)"
        ) from err


def _raised_at(err: BaseException) -> str:
    """`` (at FILE:LINE)``: where in the user's code ``err`` was raised: the innermost frame outside qvlm,
    the standard library and installed packages (else outside qvlm); '' when there is none."""
    import os
    import sysconfig
    import traceback

    qvlm_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    libraries = tuple(os.path.abspath(sysconfig.get_paths()[k]) + os.sep for k in ("stdlib", "purelib", "platlib"))
    frames = [
        f for f in traceback.extract_tb(err.__traceback__) if not os.path.abspath(f.filename).startswith(qvlm_dir)
    ]
    own = [f for f in frames if not os.path.abspath(f.filename).startswith(libraries)]
    frame = (own or frames or [None])[-1]
    return f" (at {frame.filename}:{frame.lineno})" if frame else ""


def _name(reward: RewardFn, name: str | None) -> str:
    return name or getattr(reward, "reward_name", None) or "reward"


def score(reward: RewardFn, prompts: Sequence[str], responses: Sequence[str], name: str | None = None) -> list[float]:
    """Call a sequence reward and check its output: one finite number per response.

    ``name`` (default: the reward's own, see :func:`named`) is what errors call it."""
    name = _name(reward, name)
    if is_token_level(reward):
        raise QVLMError(
            f"{name} gives per-token rewards, and this step scores whole responses; use it with `qvlm sample` "
            "(which writes token_rewards) or `qvlm eval`, or use a sequence reward here"
        )
    values = _as_list(call_reward(reward, prompts, responses, name), name, len(responses), "number")
    return [_finite(v, name, f"response {i} ({responses[i][:40]!r})") for i, v in enumerate(values)]


def score_tokens(
    reward: RewardFn, prompts: Sequence[str], tokens: Sequence[Sequence[str]], name: str | None = None
) -> list[list[float]]:
    """Call a token reward on ``tokens`` (one list of token strings per response) and check its output:
    one list per response with one finite number per token."""
    name = _name(reward, name)
    rows = _as_list(call_reward(reward, prompts, tokens, name), name, len(tokens), "list of per-token numbers")
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
        rows = score_tokens(reward, prompts, response_tokens(tokenizer, ids))
        return [sum(row) for row in rows]

    summed.reward_name = _name(reward, None)
    return summed
