"""Guess-the-number: a secret drawn uniformly from 1..n, replies "higher", "lower" or "correct".

Rewards: every turn costs ``turn_cost``; the correct guess adds ``bonus`` and ends the episode;
after ``max_turns`` turns without it the episode ends (a rule of the game: terminated). An action
without a number in 1..n is invalid: it costs ``turn_cost + invalid_penalty`` and uses the turn.

The optimum is exact (:func:`guess_optimal_return`): after any history of in-range guesses the
secret is uniform on an interval of candidates, so the value depends only on the interval's size
``m`` and the turns left ``k``, and a dynamic programme over ``(m, k)`` in exact fractions gives
it (binary search, with the split that pays best when the turns run short). The random policy's
return (a uniform guess in 1..n every turn) is exact too (:func:`guess_random_return`).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from functools import lru_cache

import numpy as np

from qvlm.envs.base import TextEnv, parse_failure
from qvlm.errors import QVLMError

__all__ = [
    "GuessTheNumberEnv",
    "GuessPolicy",
    "guess_optimal_return",
    "guess_random_return",
    "guess_values",
]

_NUMBER = re.compile(r"-?\d+")


def _exact(x: float) -> Fraction:
    return Fraction(str(x))  # 0.1 -> 1/10, not the binary float's 3602879701896397/36028797018963968


def _check(n: int, max_turns: int, turn_cost: float, bonus: float, invalid_penalty: float = 0.0) -> None:
    if n < 1 or max_turns < 1:
        raise QVLMError(f"guess-the-number needs n >= 1 and max_turns >= 1, got n={n}, max_turns={max_turns}")
    for name, v in (("turn_cost", turn_cost), ("bonus", bonus), ("invalid_penalty", invalid_penalty)):
        if not math.isfinite(v):
            raise QVLMError(f"guess-the-number: {name} is {v}; give a finite number")


@lru_cache(maxsize=16)
def guess_values(n: int, max_turns: int, turn_cost: float, bonus: float) -> tuple[list, list]:
    """The exact optimal values and guesses of guess-the-number.

    ``values[k][m]`` (a Fraction) is the optimal expected return with ``m`` candidates left (the
    secret uniform on them) and ``k`` turns left; ``best[k][m]`` is the optimal guess as a 1-based
    position among the candidates (0: no guess beats wasting the turn). Recursion, with c the turn
    cost and b the bonus: ``V(m, 0) = 0``, ``V(0, k) = 0`` and, for a guess at position g,
    ``V(m, k) = -c + max(b/m + (g-1)/m V(g-1, k-1) + (m-g)/m V(m-g, k-1), V(m, k-1))``; the last
    term is a guess outside the candidates (it teaches nothing). Ties go to the guess nearest the
    middle. By hand: ``V(1, k) = b - c``; ``V(3, 2) = b - 5c/3``.
    """
    _check(n, max_turns, turn_cost, bonus)
    c, b = _exact(turn_cost), _exact(bonus)
    values = [[Fraction(0)] * (n + 1)]
    best = [[0] * (n + 1)]
    for k in range(1, max_turns + 1):
        prev, row, choice = values[k - 1], [Fraction(0)], [0]
        for m in range(1, n + 1):
            top, arg = prev[m], 0  # wasting the turn
            for g in sorted(range(1, m + 1), key=lambda g: (abs(2 * g - (m + 1)), g)):  # middle first
                v = (b + (g - 1) * prev[g - 1] + (m - g) * prev[m - g]) / m
                if v > top:
                    top, arg = v, g
            row.append(top - c)
            choice.append(arg)
        values.append(row)
        best.append(choice)
    return values, best


def guess_optimal_return(n: int = 20, max_turns: int = 6, turn_cost: float = 0.1, bonus: float = 1.0) -> float:
    """The optimal expected return over the uniform secret in 1..n (exact: :func:`guess_values`).

    n = 3, 2 turns, cost 0.1, bonus 1: guess 2 (1/3 correct), else one guess left that is right:
    ``1/3 (1 - 0.1) + 2/3 (1 - 0.2) = 0.8333...``.
    """
    return float(guess_values(n, max_turns, turn_cost, bonus)[0][max_turns][n])


def guess_random_return(n: int = 20, max_turns: int = 6, turn_cost: float = 0.1, bonus: float = 1.0) -> float:
    """The expected return of the random policy (a uniform guess in 1..n each turn, repeats allowed),
    exact: with p = 1/n, ``sum_{t=1..K} (1-p)^(t-1) p (b - t c) - (1-p)^K K c``."""
    _check(n, max_turns, turn_cost, bonus)
    p, c, b = Fraction(1, n), _exact(turn_cost), _exact(bonus)
    total = sum((1 - p) ** (t - 1) * p * (b - t * c) for t in range(1, max_turns + 1))
    return float(total - (1 - p) ** max_turns * max_turns * c)


class GuessTheNumberEnv(TextEnv):
    """Guess a whole number in 1..n (``qvlm/GuessTheNumber-v0``); see the module docstring.

    ``reset(options={"secret": s})`` fixes the secret (tests, exhaustive evaluation).
    """

    def __init__(
        self,
        n: int = 20,
        max_turns: int = 6,
        turn_cost: float = 0.1,
        bonus: float = 1.0,
        invalid_penalty: float = 0.1,
    ):
        super().__init__()
        _check(n, max_turns, turn_cost, bonus, invalid_penalty)
        self.n, self.max_turns = int(n), int(max_turns)
        self.turn_cost, self.bonus, self.invalid_penalty = float(turn_cost), float(bonus), float(invalid_penalty)
        self.secret = 0
        self.turn = 0

    def optimal_return(self) -> float:
        return guess_optimal_return(self.n, self.max_turns, self.turn_cost, self.bonus)

    def random_return(self) -> float:
        return guess_random_return(self.n, self.max_turns, self.turn_cost, self.bonus)

    def random_action(self, rng: np.random.Generator) -> str:
        return str(int(rng.integers(1, self.n + 1)))

    def _reset(self, options: dict) -> tuple[str, dict]:
        secret = options.get("secret")
        if secret is None:
            secret = int(self.np_random.integers(1, self.n + 1))
        elif not (isinstance(secret, int) and 1 <= secret <= self.n):
            raise QVLMError(f"options['secret'] is {secret!r}; give a whole number from 1 to {self.n}")
        self.secret, self.turn = secret, 0
        prompt = (
            f"I am thinking of a whole number from 1 to {self.n}. Guess it in at most {self.max_turns} tries: "
            "reply with one number. I answer higher, lower or correct."
        )
        return prompt, {"turn": 0, "guesses_left": self.max_turns}

    def _parse(self, action: str) -> tuple[int | None, str]:
        match = _NUMBER.search(action)
        if match is None:
            return None, "no number in the reply"
        try:
            guess = int(match.group())
        except ValueError:  # more digits than int() takes
            return None, "the number is too long"
        if not 1 <= guess <= self.n:
            return None, f"{guess} is outside 1..{self.n}"
        return guess, ""

    def _step(self, action: str) -> tuple[str, float, bool, dict]:
        self.turn += 1
        guess, why = self._parse(action)
        info = {"turn": self.turn, "guesses_left": self.max_turns - self.turn, "invalid_action": guess is None}
        reward = -self.turn_cost
        if guess is None:
            info.update(parse_failure(why))
            reward -= self.invalid_penalty
            reply = f"invalid: reply with one number from 1 to {self.n}"
        elif guess == self.secret:
            info["outcome"] = "correct"
            return "correct", reward + self.bonus, True, {**info, "reply": "correct"}
        else:
            reply = "higher" if guess < self.secret else "lower"
            info["reply"] = reply
        if self.turn >= self.max_turns:
            info["outcome"] = "out_of_guesses"
            return f"{reply}. No guesses left; the number was {self.secret}.", reward, True, info
        return reply, reward, False, info


class GuessPolicy:
    """The scripted player: the exact optimal guess (:func:`guess_values`) from the candidates the
    replies leave; with probability ``epsilon`` a uniform guess in 1..n instead (the noisy policy of
    LMRL-Gym's mixed-quality data). It reads only the replies to its own guesses."""

    def __init__(self, n: int, max_turns: int, turn_cost: float, bonus: float, epsilon: float = 0.0):
        if not 0.0 <= epsilon <= 1.0:
            raise QVLMError(f"epsilon is {epsilon}; give a probability in [0, 1]")
        self.n, self.max_turns, self.epsilon = n, max_turns, epsilon
        self.best = guess_values(n, max_turns, turn_cost, bonus)[1]

    @classmethod
    def for_env(cls, env: GuessTheNumberEnv, epsilon: float = 0.0) -> GuessPolicy:
        return cls(env.n, env.max_turns, env.turn_cost, env.bonus, epsilon)

    def reset(self, observation: str, info: dict, rng: np.random.Generator) -> None:
        self.rng, self.lo, self.hi, self.turns, self.last = rng, 1, self.n, 0, None

    def act(self, observation: str, info: dict) -> str:
        if self.last is not None:
            reply = observation.strip().lower()
            if reply.startswith("higher"):
                self.lo = max(self.lo, self.last + 1)
            elif reply.startswith("lower"):
                self.hi = min(self.hi, self.last - 1)
        explore = self.rng.random() < self.epsilon  # drawn every turn: the stream does not depend on the replies
        m, left = self.hi - self.lo + 1, max(self.max_turns - self.turns, 1)
        if explore:
            guess = int(self.rng.integers(1, self.n + 1))
        elif m >= 1 and self.best[min(left, self.max_turns)][m]:
            guess = self.lo - 1 + self.best[min(left, self.max_turns)][m]
        else:  # no candidate left (the replies contradicted each other): any guess
            guess = min(max(self.lo, 1), self.n)
        self.turns += 1
        self.last = guess
        return str(guess)
