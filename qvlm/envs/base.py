"""The text environment interface: a Gymnasium ``Env`` whose observations and actions are strings.

``reset(seed=None, options=None) -> (observation, info)`` and
``step(action) -> (observation, reward, terminated, truncated, info)``, as in Gymnasium. The
observation is the environment's new message (what it says back this turn), not the whole history:
the conversation grows turn by turn (:mod:`qvlm.envs.tokens` turns it into one token sequence).

Conventions every environment here keeps (docs/envs.md):

- randomness comes only from ``self.np_random`` (seeded by ``reset(seed=...)``), so a seed fixes an
  episode and ``reset()`` without a seed continues the stream;
- an action the environment cannot parse is never an exception: it costs the turn plus
  ``invalid_penalty`` and sets ``info["invalid_action"] = True`` (with ``info["reason"]``);
- a rule of the task that ends the episode (out of guesses, out of moves) is termination, not
  truncation; truncation is for limits outside the task (a wrapper's step limit, a full context);
- ``step`` after the episode ended, or before ``reset``, raises :class:`QVLMError` (a caller's bug,
  not an action).
"""

from __future__ import annotations

import string
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

from qvlm.errors import QVLMError

__all__ = ["PRINTABLE", "TextEnv", "UnicodeText", "text_space", "parse_failure"]

# printable ASCII with whitespace: the characters of every built-in task's observations
PRINTABLE = string.printable
# the longest text an action or observation may have (the spaces' max_length)
MAX_TEXT = 100_000


class UnicodeText(spaces.Text):
    """A :class:`gymnasium.spaces.Text` that contains any string of allowed length, whatever its
    characters (third-party games write card suits and box drawings); ``sample`` draws from
    ``charset`` as ``Text`` does."""

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and self.min_length <= len(x) <= self.max_length

    def __repr__(self) -> str:
        return f"UnicodeText({self.min_length}, {self.max_length})"


def text_space(any_unicode: bool = False) -> spaces.Text:
    """The space of an observation or an action: strings of 0 to ``MAX_TEXT`` characters, printable
    ASCII (``any_unicode``: any characters, :class:`UnicodeText`)."""
    cls = UnicodeText if any_unicode else spaces.Text
    return cls(MAX_TEXT, min_length=0, charset=PRINTABLE)


def parse_failure(reason: str) -> dict:
    """The info flags of an action the environment could not use."""
    return {"invalid_action": True, "reason": reason}


class TextEnv(gymnasium.Env):
    """Base class: text spaces, the seeding call, and the guards around ``step``.

    Subclasses implement ``_reset(options) -> (observation, info)`` and
    ``_step(action) -> (observation, reward, terminated, info)``; the base class passes the seed to
    Gymnasium, refuses a ``step`` outside an episode, and turns a non-string action into a parse
    failure rather than an exception.
    """

    metadata = {"render_modes": []}
    invalid_penalty: float = 0.0
    accepts_any_text: bool = False  # True where every string is a valid action (a single-turn task)

    def __init__(self, any_unicode: bool = False):
        self.observation_space = text_space(any_unicode)
        self.action_space = text_space(any_unicode)
        self._running = False

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        super().reset(seed=seed)
        observation, info = self._reset(dict(options or {}))
        self._running = True
        return observation, info

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        if not self._running:
            raise QVLMError(f"{type(self).__name__}.step() called outside an episode; call reset() first")
        if not isinstance(action, str):
            action = ""  # parsed as nothing: an invalid action, never a crash mid-rollout
        observation, reward, terminated, info = self._step(action)
        if terminated:
            self._running = False
        return observation, float(reward), bool(terminated), False, info

    # subclasses -----------------------------------------------------------------------------------
    def _reset(self, options: dict) -> tuple[str, dict]:
        raise NotImplementedError

    def _step(self, action: str) -> tuple[str, float, bool, dict]:
        raise NotImplementedError

    def random_action(self, rng: np.random.Generator) -> str:
        """A uniformly random valid action (the random policy of the scores' normalisation)."""
        raise QVLMError(f"{type(self).__name__} has no random policy; give its random return some other way")
