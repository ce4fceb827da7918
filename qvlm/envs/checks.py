"""A Gymnasium API conformance check for text environments, written out by hand.

``gymnasium.utils.env_checker.check_env`` runs on these environments too (their spaces are
``gymnasium.spaces.Text``), and the tests run it; this check adds what it does not cover for text:
whole episodes replayed from one seed, unparseable actions that must not raise, and the end of an
episode. Run both on an environment you write (docs/envs.md, "Make one").
"""

from __future__ import annotations

import inspect

import gymnasium
import numpy as np
from gymnasium import spaces

from qvlm.envs.base import PRINTABLE
from qvlm.errors import QVLMError

__all__ = ["check_text_env"]

UNPARSEABLE = ("", "???", "\x00\x01 not an action at all " * 20)


def _episode(env: gymnasium.Env, seed: int, actions: list[str], max_steps: int) -> list[tuple]:
    observation, info = env.reset(seed=seed)
    assert isinstance(observation, str), f"reset returned a {type(observation).__name__} observation, not a str"
    assert isinstance(info, dict), f"reset returned a {type(info).__name__} info, not a dict"
    assert observation in env.observation_space, "reset's observation is not in the observation space"
    trace = [(observation,)]
    for step in range(max_steps):
        action = actions[step % len(actions)]
        out = env.step(action)
        assert isinstance(out, tuple) and len(out) == 5, "step must return (obs, reward, terminated, truncated, info)"
        observation, reward, terminated, truncated, info = out
        assert isinstance(observation, str) and observation in env.observation_space, "step's observation is not text"
        assert isinstance(reward, float) and np.isfinite(reward), f"step's reward {reward!r} is not a finite float"
        assert isinstance(terminated, bool) and isinstance(truncated, bool), "terminated and truncated must be bools"
        assert isinstance(info.get("invalid_action"), bool), 'step\'s info must carry "invalid_action" (a bool)'
        trace.append((observation, reward, terminated, truncated, info.get("invalid_action")))
        if terminated or truncated:
            return trace
    raise AssertionError(f"the episode did not end within {max_steps} steps")


def check_text_env(env: gymnasium.Env, seed: int = 0, max_steps: int = 200) -> None:
    """Raise ``AssertionError`` where ``env`` breaks the text-environment contract (docs/envs.md):

    - ``reset(*, seed=None, options=None)`` returns ``(str, dict)`` with the observation in the space;
    - ``step`` returns ``(str, float, bool, bool, dict)``, ``info["invalid_action"]`` a bool;
    - one seed and one action sequence replay the same episode (observations, rewards, flags);
    - unparseable actions are a penalty, not an exception (flagged, unless the task's
      ``accepts_any_text``), and every episode ends;
    - a random valid policy (``env.random_action``, where the task has one) also replays exactly.
    """
    params = inspect.signature(env.unwrapped.reset).parameters
    assert "seed" in params and "options" in params, "reset must take the keywords seed and options"
    short = spaces.Text(200, min_length=0, charset=PRINTABLE, seed=seed)  # the action space's text, shorter
    junk = list(UNPARSEABLE) + [short.sample() for _ in range(3)]
    first, again = _episode(env, seed, junk, max_steps), _episode(env, seed, junk, max_steps)
    assert first == again, "the same seed and actions gave different episodes"
    base = env.unwrapped
    if not getattr(base, "accepts_any_text", False):
        assert any(step[4] for step in first[1:]), "no unparseable action was flagged invalid_action"
    try:
        rng = np.random.default_rng(seed)
        valid = [base.random_action(rng) for _ in range(max_steps)]
    except QVLMError:  # no random policy for this task
        return
    first, again = _episode(env, seed, valid, max_steps), _episode(env, seed, valid, max_steps)
    assert first == again, "the same seed and valid actions gave different episodes"
