"""Multi-turn episodes and their JSONL file: one line per episode (docs/envs.md, "Episode files").

A line::

    {"env": "qvlm/GuessTheNumber-v0", "env_kwargs": {}, "seed": 3, "policy": "scripted",
     "return": 0.7, "terminated": true, "truncated": false,
     "turns": [{"observation": "...", "action": "10", "reward": -0.1, "invalid_action": false}, ...],
     "final_observation": "correct",
     "token_ids": [...], "action_mask": [0, 0, ..., 1, 1, 0, ...]}

``turns[k].observation`` is what the environment said before action k; ``token_ids`` are the exact
tokens of the whole conversation (:mod:`qvlm.envs.tokens`: the agent's tokens as sampled, the
environment's through the chat template), ``action_mask`` 1 on the agent's. Each turn's action is
one run of 1s in the mask, and its reward sits on the run's last token; ``return`` is the
undiscounted sum of the turns' rewards. :func:`read_episodes` checks all of it and names the file
and line of the first problem.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from qvlm.envs.tokens import EpisodeTokens, action_spans
from qvlm.errors import QVLMError
from qvlm.fileio import MAX_LINE_BYTES, atomic_write_text, read_lines

__all__ = ["Turn", "Episode", "write_episodes", "read_episodes", "episode_from_dict", "encode_episodes"]

# an episode line holds every token of a conversation
MAX_EPISODE_LINE_BYTES = 64 * MAX_LINE_BYTES


@dataclass
class Turn:
    """One exchange: the observation the agent saw, its action, the reward the action got."""

    observation: str
    action: str
    reward: float
    invalid_action: bool = False


@dataclass
class Episode:
    """One episode: its turns, how it ended, and (when tokenised) its token sequence."""

    env: str
    seed: int | None
    turns: list[Turn]
    final_observation: str
    terminated: bool
    truncated: bool
    policy: str = ""
    env_kwargs: dict = field(default_factory=dict)
    token_ids: list[int] | None = None
    action_mask: list[int] | None = None
    where: str = field(default="", compare=False, repr=False)  # "file:line" it was read from
    # per turn, log pi(a|s) of each action token under the distribution that sampled it (run_lm with
    # logprobs=True; PPO's log pi_old); not written to the file
    action_logprobs: list[list[float]] | None = field(default=None, compare=False, repr=False)

    @property
    def total_return(self) -> float:
        """The undiscounted return: the sum of the turns' rewards."""
        return sum(t.reward for t in self.turns)

    def tokens(self) -> EpisodeTokens:
        """The token view (:class:`qvlm.envs.tokens.EpisodeTokens`): each turn's reward on the last
        token of its run of action tokens, done on the last action token when terminated."""
        if self.token_ids is None or self.action_mask is None:
            raise QVLMError(f"{self.where or 'episode'}: no token_ids; sample it with a tokenizer (qvlm sample --env)")
        rewards = [0.0] * len(self.token_ids)
        done = [0] * len(self.token_ids)
        spans = action_spans(self.action_mask)
        for (_, end), turn in zip(spans, self.turns):
            rewards[end - 1] = turn.reward
        if self.terminated:
            done[spans[-1][1] - 1] = 1
        return EpisodeTokens(list(self.token_ids), list(self.action_mask), rewards, done, truncated=not self.terminated)

    def to_json(self) -> dict:
        out = {
            "env": self.env,
            "env_kwargs": self.env_kwargs,
            "seed": self.seed,
            "policy": self.policy,
            "return": self.total_return,
            "terminated": self.terminated,
            "truncated": self.truncated,
            "turns": [
                {
                    "observation": t.observation,
                    "action": t.action,
                    "reward": t.reward,
                    "invalid_action": t.invalid_action,
                }
                for t in self.turns
            ],
            "final_observation": self.final_observation,
        }
        if self.token_ids is not None:
            out["token_ids"] = self.token_ids
            out["action_mask"] = self.action_mask
        return out


def write_episodes(path: str | Path, episodes: Iterable[Episode]) -> None:
    """Write episodes as JSONL, atomically."""
    atomic_write_text(path, "".join(json.dumps(e.to_json(), ensure_ascii=False) + "\n" for e in episodes))


def _fail(where: str, what: str) -> QVLMError:
    return QVLMError(f"{where}: {what}")


def _number(value, where: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise _fail(where, f'field "{name}" must be a finite number, got {str(value)[:40]!r}')
    return float(value)


def _typed(obj: dict, key: str, kind, where: str, what: str, default=None, required: bool = True):
    if key not in obj:
        if required:
            raise _fail(where, f'missing field "{key}" ({what}); see docs/envs.md for the episode format')
        return default
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _fail(where, f'field "{key}" must be {what}, got {type(value).__name__}')
    return value


def _int_list(value, where: str, name: str, allowed=None) -> list[int]:
    ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    if not ok or (allowed is not None and any(v not in allowed for v in value)):
        kind = "0s and 1s" if allowed else "token ids (non-negative integers)"
        raise _fail(where, f'field "{name}" must be a list of {kind}')
    return value


def episode_from_dict(obj, where: str, require_tokens: bool = True) -> Episode:
    """Validate one decoded line; errors name ``where`` (file:line) and the field."""
    if not isinstance(obj, dict):
        raise _fail(where, f"expected a JSON object, got {type(obj).__name__}")
    env = _typed(obj, "env", str, where, "the environment's name")
    seed = obj.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise _fail(where, 'field "seed" must be an integer or null')
    raw_turns = _typed(obj, "turns", list, where, "a list of turns")
    if not raw_turns:
        raise _fail(where, 'field "turns" is empty; an episode has at least one turn')
    turns = []
    for k, t in enumerate(raw_turns):
        at = f"{where}: turn {k + 1}"
        if not isinstance(t, dict):
            raise QVLMError(f"{at}: expected an object with observation, action, reward")
        turns.append(
            Turn(
                _typed(t, "observation", str, at, "a string"),
                _typed(t, "action", str, at, "a string"),
                _number(t.get("reward"), at, "reward"),
                _typed(t, "invalid_action", bool, at, "true or false", False, required=False),
            )
        )
    terminated = _typed(obj, "terminated", bool, where, "true or false")
    truncated = _typed(obj, "truncated", bool, where, "true or false")
    if terminated == truncated:
        raise _fail(where, f'"terminated" and "truncated" are both {str(terminated).lower()}; exactly one is true')
    episode = Episode(
        env=env,
        seed=seed,
        turns=turns,
        final_observation=_typed(obj, "final_observation", str, where, "a string", "", required=False),
        terminated=terminated,
        truncated=truncated,
        policy=_typed(obj, "policy", str, where, "a string", "", required=False),
        env_kwargs=_typed(obj, "env_kwargs", dict, where, "an object", {}, required=False),
        where=where,
    )
    if "return" in obj:
        stated = _number(obj["return"], where, "return")
        if abs(stated - episode.total_return) > 1e-6 * max(1.0, abs(stated)):
            raise _fail(
                where, f'"return" is {stated} but the turns\' rewards sum to {episode.total_return}; fix one of them'
            )
    if "token_ids" in obj or require_tokens:
        ids = _int_list(_typed(obj, "token_ids", list, where, "a list of token ids"), where, "token_ids")
        mask = _int_list(_typed(obj, "action_mask", list, where, "a list of 0s and 1s"), where, "action_mask", (0, 1))
        if len(ids) != len(mask):
            raise _fail(
                where, f"token_ids has {len(ids)} entries but action_mask has {len(mask)}; give one mask per token"
            )
        if mask and mask[0]:
            raise _fail(where, "action_mask starts with 1; an episode starts with the environment's observation")
        runs = len(action_spans(mask))
        if runs != len(turns):
            what = f"action_mask has {runs} runs of action tokens but the episode has {len(turns)} turns"
            raise _fail(where, what + "; each turn's action is one run of 1s")
        episode.token_ids, episode.action_mask = ids, mask
    return episode


def read_episodes(path: str | Path, require_tokens: bool = True) -> list[Episode]:
    """Read and validate an episodes JSONL file (blank lines skipped). ``require_tokens``: every line
    must carry ``token_ids`` and ``action_mask`` (what a trainer needs). Raises :class:`QVLMError`
    naming the file, the line and the field of the first problem."""
    path = Path(path)
    if not path.is_file():
        raise QVLMError(f"{path}: no such file; write episodes with `qvlm sample --env NAME --out FILE`")
    episodes = []
    for lineno, line in read_lines(path, MAX_EPISODE_LINE_BYTES):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except ValueError as err:
            raise _fail(where, f"not valid JSON ({err})") from None
        episodes.append(episode_from_dict(obj, where, require_tokens))
    if not episodes:
        raise QVLMError(f"{path}: no episodes; the file is empty")
    return episodes


def encode_episodes(episodes: Sequence[Episode], max_length: int, vocab_size: int | None = None) -> list[EpisodeTokens]:
    """The token view of each episode (:meth:`Episode.tokens`), for the offline trainers.

    An episode is never cut (a cut inside an observation would leave a state the agent never acts
    in): one longer than ``max_length`` tokens, or with a token id the model's vocabulary of
    ``vocab_size`` lacks (episodes sampled with another tokenizer), is a :class:`QVLMError` naming
    its file and line."""
    items = []
    for i, e in enumerate(episodes):
        where = e.where or f"episode {i + 1}"
        tokens = e.tokens()
        if len(tokens.token_ids) > max_length:
            raise QVLMError(
                f"{where}: the episode has {len(tokens.token_ids)} tokens, over --max-length {max_length}; an "
                f"episode is not cut: pass --max-length {len(tokens.token_ids)} or more, or play shorter episodes"
            )
        if vocab_size is not None and max(tokens.token_ids) >= vocab_size:
            raise QVLMError(
                f"{where}: token id {max(tokens.token_ids)} is outside this model's vocabulary of {vocab_size}; "
                "the episodes were sampled with another tokenizer: pass the --model they were sampled with"
            )
        items.append(tokens)
    return items
