"""Reward functions behind one batch interface: ``reward(prompts, responses) -> list[float]``, or per
token (:func:`token_level`): ``reward(prompts, response_tokens) -> list[list[float]]``.

Names for ``--reward`` and :func:`get_reward` (docs/rewards.md has the details):

- built-in: ``vader``, ``vader-negative``, ``count:TEXT``, ``length`` (:mod:`qvlm.rewards.builtin`);
- Python: ``path/to/file.py:function``, ``package.module:function`` (:mod:`qvlm.rewards.python`);
- classifiers: ``hf:PATH[:LABEL[:logit]]`` (:mod:`qvlm.rewards.hf`);
- against the prompts file's ``reference`` field: ``match`` (per token), ``bleu``, ``chrf``, ``rougeL``
  (:mod:`qvlm.rewards.reference`);
- weighted sums: ``vader+0.2*length`` (:mod:`qvlm.rewards.combine`).

Every reward's output is checked: one finite float per response (or per response token).
"""

from __future__ import annotations

from typing import Mapping

from qvlm.errors import QVLMError
from qvlm.rewards import builtin
from qvlm.rewards.base import (
    RewardFn,
    as_sequence_reward,
    is_token_level,
    named,
    response_tokens,
    score,
    score_tokens,
    token_level,
)
from qvlm.rewards.combine import split_terms, weighted_sum
from qvlm.rewards.python import is_python_spec, load_python_reward
from qvlm.rewards.reference import REFERENCE_REWARDS, read_references, reference_reward

__all__ = [
    "RewardFn",
    "get_reward",
    "score",
    "score_tokens",
    "token_level",
    "is_token_level",
    "response_tokens",
    "as_sequence_reward",
    "needs_reference",
    "check_reward",
    "read_references",
    "REWARD_NAMES",
]

REWARD_NAMES = (
    "vader",
    "vader-negative",
    "count:TEXT",
    "length",
    "match",
    "bleu",
    "chrf",
    "rougeL",
    "hf:PATH[:LABEL]",
    "FILE.py:FUNCTION",
    "MODULE:FUNCTION",
    "W*A+W*B",
)

REWARD_HELP = (
    "reward: vader, vader-negative, count:TEXT, length; match, bleu, chrf, rougeL (against the prompts "
    "file's 'reference' field); hf:PATH[:LABEL] (a local sequence classifier); FILE.py:FUNCTION or "
    "MODULE:FUNCTION (your Python function); weighted sums such as vader+0.2*length (docs/rewards.md)"
)


def needs_reference(spec) -> bool:
    """Whether the reward ``spec`` compares responses with the prompts file's ``reference`` field."""
    return isinstance(spec, str) and any(name in REFERENCE_REWARDS for _, name in split_terms(spec))


def _one(name: str, references, tokenizer, device) -> RewardFn:
    if name in ("vader", "vader-positive"):
        return builtin.vader(1.0)
    if name == "vader-negative":
        return builtin.vader(-1.0)
    if name.startswith("count:"):
        return builtin.count(name[len("count:") :])
    if name == "length":
        return builtin.length
    if name in REFERENCE_REWARDS:
        return reference_reward(name, references, tokenizer)
    if name.startswith("hf:"):
        from qvlm.rewards.hf import HFClassifierReward

        return HFClassifierReward(name, device=device)
    if is_python_spec(name):
        return load_python_reward(name)
    raise QVLMError(
        f"unknown reward {name!r}; use one of {', '.join(REWARD_NAMES)} (e.g. vader+0.2*length, my_rewards.py:score)"
    )


def check_reward(spec: str) -> None:
    """Raise :class:`QVLMError` now for a reward ``spec`` that :func:`get_reward` would refuse later:
    an unknown name, a Python file or module without the function (or of the wrong arity), a classifier
    directory without config or weights. Cheap: loads no model, so commands call it before theirs."""
    for _, name in split_terms(spec):
        if name in ("vader", "vader-positive", "vader-negative", "length") or name in REFERENCE_REWARDS:
            continue
        if name.startswith("count:"):
            builtin.count(name[len("count:") :])
        elif name.startswith("hf:"):
            from qvlm.rewards.hf import check_classifier_dir

            check_classifier_dir(name)
        elif is_python_spec(name):
            load_python_reward(name)
        else:
            _one(name, None, None, "cpu")  # raises: unknown


def get_reward(
    name,
    *,
    references: Mapping[str, str] | None = None,
    tokenizer=None,
    device: str = "cpu",
) -> RewardFn:
    """A reward by name (see the module docstring); a callable is returned unchanged.

    ``references`` (``{prompt: reference}``, see :func:`read_references`) serves ``match``, ``bleu``,
    ``chrf`` and ``rougeL``; ``tokenizer`` (the policy's) serves ``match``; ``device`` is where
    ``hf:`` classifiers run.
    """
    if callable(name):
        return name
    terms = split_terms(name)
    # each reward carries its name: an error about it (raised, or in what it returns) names it
    rewards = [(w, named(_one(n, references, tokenizer, device), f"reward {n}")) for w, n in terms]
    if len(terms) == 1 and terms[0][0] == 1.0:
        return rewards[0][1]
    return named(weighted_sum(rewards, [n for _, n in terms]), f"reward {name}")
