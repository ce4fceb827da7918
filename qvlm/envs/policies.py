"""Scripted text policies: the optimal player, its noisy version, and the random one.

A policy is an object with ``reset(observation, info, rng)`` at the start of an episode and
``act(observation, info) -> action text`` each turn; its randomness comes from ``rng`` alone (the
rollout seeds it from the episode's seed), so an episode is a function of its seed. Scripted
players read only what the environment says (the observation), never its hidden state.

LMRL-Gym's offline protocol trains on a mixed-quality policy's data: the base model plus a scripted
player with noise (``noisy``: the optimal action, or with probability ``epsilon`` a uniformly
random valid one).
"""

from __future__ import annotations

from typing import Protocol

import gymnasium
import numpy as np

from qvlm.errors import QVLMError

__all__ = ["TextPolicy", "RandomPolicy", "POLICY_KINDS", "scripted_policy", "DEFAULT_EPSILON"]

POLICY_KINDS = ("scripted", "noisy", "random")
DEFAULT_EPSILON = 0.3


class TextPolicy(Protocol):
    """What a scripted player provides: ``reset`` at the start of an episode, ``act`` each turn."""

    def reset(self, observation: str, info: dict, rng: np.random.Generator) -> None: ...

    def act(self, observation: str, info: dict) -> str: ...


class RandomPolicy:
    """A uniformly random valid action every turn (``env.random_action``): the random policy whose
    return the normalised score subtracts."""

    def __init__(self, env):
        self.env = env

    def reset(self, observation: str, info: dict, rng: np.random.Generator) -> None:
        self.rng = rng

    def act(self, observation: str, info: dict) -> str:
        return self.env.random_action(self.rng)


def scripted_policy(env: gymnasium.Env, kind: str = "scripted", epsilon: float = DEFAULT_EPSILON) -> TextPolicy:
    """The scripted policy ``kind`` (``scripted``: optimal; ``noisy``: epsilon-random; ``random``)
    for ``env`` (wrapped or not); :class:`QVLMError` where the task has none."""
    from qvlm.envs.guess import GuessPolicy, GuessTheNumberEnv
    from qvlm.envs.maze import MazeEnv, MazePolicy
    from qvlm.envs.textarena import TextArenaEnv, TextArenaGuessPolicy

    if kind not in POLICY_KINDS:
        raise QVLMError(f"unknown policy {kind!r}; use one of {', '.join(POLICY_KINDS)}")
    base = env.unwrapped
    if kind == "random":
        base.random_action(np.random.default_rng(0))  # QVLMError now where the task has no random policy
        return RandomPolicy(base)
    eps = epsilon if kind == "noisy" else 0.0
    if isinstance(base, GuessTheNumberEnv):
        return GuessPolicy.for_env(base, eps)
    if isinstance(base, MazeEnv):
        return MazePolicy.for_env(base, eps)
    if isinstance(base, TextArenaEnv) and base.game.startswith("GuessTheNumber"):
        return TextArenaGuessPolicy.for_env(base, eps)
    raise QVLMError(
        f"{type(base).__name__} has no scripted policy; use the base model (--policy base) "
        "or write a policy with reset() and act() (docs/envs.md)"
    )
