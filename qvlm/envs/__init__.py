"""Multi-turn text tasks as Gymnasium environments, and what turns their episodes into token data.

- :mod:`qvlm.envs.base`: the interface (:class:`TextEnv`: text observations and actions, seeding,
  unparseable actions as a documented penalty, never an exception).
- Tasks: :mod:`qvlm.envs.guess` (guess-the-number), :mod:`qvlm.envs.maze` (a text maze), both with
  exact optimal and random-policy returns and scripted players; :mod:`qvlm.envs.single_turn` (a
  prompt set and any qvlm reward, one step); :mod:`qvlm.envs.textarena` (TextArena's offline
  single-player games, optional).
- :mod:`qvlm.envs.registry`: the names (``gymnasium.make("qvlm/GuessTheNumber-v0")``) and :func:`make`.
- :mod:`qvlm.envs.tokens`: the token-level adapter (one growing sequence, action mask, rewards on
  each turn's last action token, the next action state across a turn boundary).
- :mod:`qvlm.envs.episodes` and :mod:`qvlm.envs.rollout`: episodes with any policy, as multi-turn JSONL.
- :mod:`qvlm.envs.scores`: LMRL-Gym's normalised score with 95% CIs.

Importing this package registers the environments with Gymnasium. docs/envs.md has the details.
"""

from qvlm.envs.base import TextEnv, UnicodeText, text_space
from qvlm.envs.guess import GuessTheNumberEnv, guess_optimal_return, guess_random_return
from qvlm.envs.maze import MazeEnv, maze_optimal_return, maze_random_return
from qvlm.envs.policies import POLICY_KINDS, RandomPolicy, scripted_policy
from qvlm.envs.registry import ENV_NAMES, TEXTARENA_NAMES, env_names, make, optimal_and_random, register_envs
from qvlm.envs.single_turn import PromptEnv
from qvlm.envs.textarena import TextArenaEnv, textarena_available

register_envs()

__all__ = [
    "TextEnv",
    "UnicodeText",
    "text_space",
    "GuessTheNumberEnv",
    "guess_optimal_return",
    "guess_random_return",
    "MazeEnv",
    "maze_optimal_return",
    "maze_random_return",
    "PromptEnv",
    "TextArenaEnv",
    "textarena_available",
    "POLICY_KINDS",
    "RandomPolicy",
    "scripted_policy",
    "ENV_NAMES",
    "TEXTARENA_NAMES",
    "env_names",
    "make",
    "optimal_and_random",
    "register_envs",
]
