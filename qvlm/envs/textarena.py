"""TextArena's single-player games behind the same interface (optional: ``pip install qvlm[textarena]``).

Only games checked to run with no network are registered (:data:`OFFLINE_GAMES`, as
``qvlm/TextArena-<game>-v0``): each was made, reset and stepped in a process without a network
(``unshare -n``) and a fresh ``HOME``, with textarena 0.7.4 (docs/envs.md has the list and the
method). Left out, because they fetch something at run time: Wordle, Hangman, WordLadder and
WordSearch (``nltk.download("words")``: the NLTK word list is not in any installed package),
GuessWho and TwentyQuestions (an OpenRouter model as the other player: an API key and the
network); Klondike and UltimateTexasHoldem do not import on Python 3.11 (syntax errors in 0.7.4).
Countdown, Cryptarithm and Slitherlink run offline but raise inside the game on an invalid move
(0.7.4 passes ``set_invalid_move`` its arguments in the wrong order), so they are not registered;
``TextArenaEnv("Countdown-v0")`` still works, and ends such an episode as described below.

The wrapper uses the game's raw observations: each ``step`` returns only the messages the game
added since the last one (the player's own action, which the game echoes, is left out), so the
conversation grows by what the game said. The reward is the game's own, given when it ends
(TextArena scores a single-player game at the end). An invalid move is the game's to judge: a
first one gets the game's warning and a second try, a second ends the game with the game's own
penalty; ``info["invalid_action"]`` is set either way. An exception inside the game ends the
episode with ``reward = -1`` and ``info["error"]`` instead of ending the rollout.

TextArena seeds Python's global ``random`` on reset; the wrapper keeps the game's random state to
itself (swapped in around each call), so a seed fixes an episode and nothing else is disturbed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import random

from qvlm.envs.base import TextEnv
from qvlm.errors import QVLMError

__all__ = ["TEXTARENA_VERSION", "OFFLINE_GAMES", "TextArenaEnv", "textarena_available", "gym_id"]

TEXTARENA_VERSION = "0.7.4"

# single-player games that make, reset and step offline, with a reset under a second (measured over seeds 0-9)
OFFLINE_GAMES = (
    "GuessTheNumber-v0",
    "GuessTheNumber-v0-hardcore",
    "Mastermind-v0",
    "TowerOfHanoi-v0",
    "FrozenLake-v0",
    "LightsOut-v0",
    "Minesweeper-v0-small",
    "FifteenPuzzle-v0",
    "Crosswords-v0",
    "Secretary-v0",
    "ThreeCardMonte-v0",
    "Bandit-v0",
    "Blackjack-v0",
    "PegJump-v0",
    "Sudoku-v0-easy",
    "2048-v0",
    "LogicPuzzle-v0",
    "Set-v0",
    "Sokoban-v0",
)

# a game that runs past this many steps is truncated (TimeLimit): games without a turn limit of
# their own cannot loop for ever
MAX_STEPS = 100
FAILED_GAME_REWARD = -1.0


def textarena_available() -> bool:
    """Whether the optional textarena package is installed."""
    return importlib.util.find_spec("textarena") is not None


def gym_id(game: str) -> str:
    """``GuessTheNumber-v0-hardcore`` -> ``qvlm/TextArena-GuessTheNumber-hardcore-v0`` (Gymnasium
    ids end in their version)."""
    name, _, rest = game.partition("-v0")
    return f"qvlm/TextArena-{name}{rest}-v0"


class TextArenaEnv(TextEnv):
    """One TextArena single-player game (``game``: its TextArena id, e.g. ``"GuessTheNumber-v0"``)."""

    def __init__(self, game: str = "GuessTheNumber-v0"):
        super().__init__(any_unicode=True)  # card suits, box drawings
        if not textarena_available():
            raise QVLMError(
                f"TextArena game {game!r} needs the textarena package; install it with "
                f"pip install 'qvlm[textarena]' (textarena=={TEXTARENA_VERSION})"
            )
        import textarena as ta

        if game not in ta.envs.registration.ENV_REGISTRY:
            raise QVLMError(
                f"textarena has no game {game!r}; qvlm wraps these offline ones: {', '.join(OFFLINE_GAMES)}"
            )
        self.game = game
        self._ta = ta
        self._env = ta.make(game + "-raw")  # raw: each observation is the new messages only
        self._rng_state = random.Random(0).getstate()
        self.invalid_penalty = 0.0  # the game's own penalty applies (see the module docstring)

    @contextlib.contextmanager
    def _game_random(self):
        """Run with the game's own state of Python's ``random``, and keep everyone else's; the
        game's prints (some print while generating a puzzle) are swallowed."""
        outside = random.getstate()
        random.setstate(self._rng_state)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                yield
        finally:
            self._rng_state = random.getstate()
            random.setstate(outside)

    def _observation(self) -> str:
        _, messages = self._env.get_observation()
        player_action = self._ta.ObservationType.PLAYER_ACTION
        return "\n".join(text for _, text, kind in messages if kind != player_action)

    def _reset(self, options: dict) -> tuple[str, dict]:
        seed = int(self.np_random.integers(2**31))
        with self._game_random():
            self._env.reset(num_players=1, seed=seed)
            observation = self._observation()
        return observation, {"game": self.game, "game_seed": seed}

    def _step(self, action: str) -> tuple[str, float, bool, dict]:
        try:
            with self._game_random():
                done, step_info = self._env.step(action)
                observation = self._observation()
                # the state resets its error count on every valid move: > 0 means this one was invalid
                invalid = getattr(self._env.state, "error_count", 0) > 0
                info = {"invalid_action": invalid}
                if done:
                    rewards, game_info = self._env.close()
                    player = game_info.get(0, {}) if isinstance(game_info, dict) else {}
                    info.update(invalid_action=invalid or bool(player.get("invalid_move")), reason=player.get("reason"))
                    return observation, float((rewards or {}).get(0, 0.0)), True, info
                return observation, 0.0, False, info
        except Exception as err:  # a bug in the game must not end the rollout: end the episode instead
            return "", FAILED_GAME_REWARD, True, {"invalid_action": False, "error": f"{type(err).__name__}: {err}"}


class TextArenaGuessPolicy:
    """Bisection for TextArena's GuessTheNumber (guesses as ``[n]``; the game replies "The target
    number is higher." or "... lower."); with probability ``epsilon`` a uniform guess instead."""

    def __init__(self, low: int, high: int, epsilon: float = 0.0):
        if not 0.0 <= epsilon <= 1.0:
            raise QVLMError(f"epsilon is {epsilon}; give a probability in [0, 1]")
        self.low, self.high, self.epsilon = low, high, epsilon

    @classmethod
    def for_env(cls, env: TextArenaEnv, epsilon: float = 0.0) -> TextArenaGuessPolicy:
        return cls(env._env.min_number, env._env.max_number, epsilon)

    def reset(self, observation: str, info: dict, rng) -> None:
        self.rng, self.lo, self.hi, self.last = rng, self.low, self.high, None

    def act(self, observation: str, info: dict) -> str:
        if self.last is not None:
            if "higher" in observation:
                self.lo = max(self.lo, self.last + 1)
            elif "lower" in observation:
                self.hi = min(self.hi, self.last - 1)
        if self.rng.random() < self.epsilon:
            guess = int(self.rng.integers(self.low, self.high + 1))
        else:
            guess = (self.lo + self.hi) // 2 if self.lo <= self.hi else self.lo
        self.last = guess
        return f"[{guess}]"
