"""Episodes with any policy: a scripted player, or a language model decoding one turn at a time.

- :func:`run_scripted`: a scripted policy (:mod:`qvlm.envs.policies`), one episode per seed; with a
  tokenizer, each action is tokenised as an agent would have written it (its tokens, then EOS).
- :func:`run_lm`: the model (the base model, or value-guided with ``heads`` and ``cfg.beta``) plays
  every episode at once: each turn decodes one response per unfinished episode from its whole
  conversation so far (:func:`qvlm.decoding.sample_rollout`), and keeps the exact token ids it
  sampled. Each response has its own random stream keyed by (episode seed, turn, ``sample_seed``),
  so an episode's tokens do not depend on which other episodes share its batch.

Both return :class:`qvlm.envs.episodes.Episode` objects (write them with
:func:`qvlm.envs.episodes.write_episodes`). An episode ends when the environment terminates or
truncates it, after ``max_turns`` turns (truncated), or, for a model, when its conversation leaves
no room for another response in the context (truncated, ``"context"`` in the log line): never by
an exception mid-rollout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import gymnasium
import numpy as np

from qvlm.envs.episodes import Episode, Turn
from qvlm.envs.policies import DEFAULT_EPSILON, TextPolicy, scripted_policy
from qvlm.envs.registry import make, resolve_name
from qvlm.envs.tokens import action_ids, build_tokens, observation_ids
from qvlm.errors import QVLMError

__all__ = ["run_episode", "run_scripted", "run_lm", "MAX_TURNS"]

# a guard for environments without a turn limit of their own
MAX_TURNS = 1000


def _policy_rng(seed: int | None) -> np.random.Generator:
    # a stream apart from the environment's (np_random is seeded with the same seed)
    return np.random.default_rng(None if seed is None else [seed, 1])


def _tokenise(episode: Episode, observations: list[str], actions: list[list[int]], tokenizer, chat) -> None:
    kept = observations if episode.truncated else observations[: len(actions)]
    segments = [observation_ids(tokenizer, kept[: k + 1], chat, actions[k - 1] if k else ()) for k in range(len(kept))]
    tokens = build_tokens(segments, actions, [t.reward for t in episode.turns], episode.terminated)
    episode.token_ids, episode.action_mask = tokens.token_ids, tokens.action_mask


def run_episode(
    env: gymnasium.Env,
    policy: TextPolicy,
    seed: int | None,
    tokenizer=None,
    chat: bool | None = None,
    max_turns: int = MAX_TURNS,
    name: str = "",
    policy_name: str = "",
) -> Episode:
    """One episode of ``policy`` in ``env`` from ``reset(seed=seed)``; tokenised when a tokenizer is given."""
    observation, info = env.reset(seed=seed)
    policy.reset(observation, info, _policy_rng(seed))
    observations, turns = [observation], []
    terminated = truncated = False
    while not (terminated or truncated):
        action = policy.act(observation, info)
        observation, reward, terminated, truncated, info = env.step(action)
        turns.append(Turn(observations[-1], action, float(reward), bool(info.get("invalid_action", False))))
        observations.append(observation)
        if len(turns) >= max_turns and not terminated:
            truncated = True
    spec = getattr(env, "spec", None)
    episode = Episode(
        env=name or (spec.id if spec else type(env.unwrapped).__name__),
        seed=seed,
        turns=turns,
        final_observation=observation,
        terminated=bool(terminated),
        truncated=not terminated,
        policy=policy_name,
        env_kwargs=dict(spec.kwargs) if spec else {},
    )
    if tokenizer is not None:
        _tokenise(episode, observations, [action_ids(tokenizer, t.action) for t in turns], tokenizer, chat)
    return episode


def run_scripted(
    env_name: str,
    seeds: Sequence[int],
    kind: str = "scripted",
    epsilon: float = DEFAULT_EPSILON,
    tokenizer=None,
    chat: bool | None = None,
    env_kwargs: dict | None = None,
    max_turns: int = MAX_TURNS,
) -> list[Episode]:
    """One episode per seed of the scripted policy ``kind`` (``scripted``, ``noisy``, ``random``)."""
    env = make(env_name, **(env_kwargs or {}))
    policy = scripted_policy(env, kind, epsilon)
    label = f"noisy(epsilon={epsilon})" if kind == "noisy" else kind
    episodes = [run_episode(env, policy, s, tokenizer, chat, max_turns, resolve_name(env_name), label) for s in seeds]
    for e in episodes:
        e.env_kwargs = dict(env_kwargs or {})
    return episodes


@dataclass
class _Game:
    """One episode in progress under :func:`run_lm`."""

    env: gymnasium.Env
    seed: int
    observations: list[str]
    segments: list[list[int]]
    sample_seed: int = 0
    actions: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    terminated: bool = False
    truncated: bool = False

    @property
    def over(self) -> bool:
        return self.terminated or self.truncated

    def context(self) -> list[int]:
        ids: list[int] = []
        for k, seg in enumerate(self.segments):
            ids += seg
            if k < len(self.actions):
                ids += self.actions[k]
        return ids


def _best_by_q(rollout, heads, n: int):
    """Of each episode's ``n`` adjacent candidate replies, the one whose last token has the highest
    ``Q(s_t, a_t)`` (min over twin heads) under ``heads``; ties go to the first."""
    import torch

    from qvlm.rollout import Rollout

    B = len(rollout)
    rows = torch.arange(B, device=rollout.response_ids.device)
    last = (rollout.lengths - 1).clamp(min=0)  # (B,)
    h = rollout.hidden[rows, last]  # (B, H): the state the last token was written in
    with torch.no_grad():
        q = torch.stack(heads.q_taken(h, rollout.response_ids[rows, last][:, None])).amin(0)[:, 0]  # (B,)
    best = q.float().view(B // n, n).argmax(-1) + torch.arange(0, B, n, device=q.device)  # (B / n,)
    kept = {f.name: getattr(rollout, f.name) for f in dataclasses.fields(Rollout) if f.name != "pad_id"}
    kept = {k: (v[best] if isinstance(v, torch.Tensor) else v) for k, v in kept.items()}
    return Rollout(**kept, pad_id=rollout.pad_id)


def run_lm(
    model,
    tokenizer,
    env_name: str,
    seeds: Sequence[int],
    cfg=None,
    heads=None,
    env_kwargs: dict | None = None,
    sample_seed: int = 0,
    max_turns: int = MAX_TURNS,
    progress: bool = False,
    policy_name: str = "base",
    logprobs: bool = False,
    sample_seeds: Sequence[int] | None = None,
    candidates: int = 1,
) -> list[Episode]:
    """One episode per seed, the model writing every action (``cfg``: a
    :class:`qvlm.configs.DecodeConfig`; ``heads`` and ``cfg.beta`` guide it). Returns tokenised
    episodes whose action tokens are the tokens sampled.

    ``logprobs``: keep, per turn, the log-probability of each action token under the distribution it
    was drawn from (``Episode.action_logprobs``; PPO's ``log pi_old``, recorded by the decoding step
    as DESIGN.md asks). ``sample_seeds``: one sampling seed per episode instead of ``sample_seed``
    for all (two episodes of one environment seed then sample apart).

    ``candidates`` > 1: value-guided decoding at the turn level. Each turn decodes that many replies
    per episode and keeps the one whose last token has the highest ``Q(s_t, a_t)`` under ``heads``
    (the min over twin Q heads, read from the hidden states the decoding computed): the reply whose
    turn the heads expect to pay most (blockwise controlled decoding, Mudgal et al. 2024, with a
    block of one turn). ``cfg.beta`` may guide each candidate's tokens as well."""
    from qvlm.configs import DecodeConfig
    from qvlm.decoding import GenerationResult, sample_rollout
    from qvlm.decoding.sampling import sampling_seeds
    from qvlm.loading import context_length
    from qvlm.progress import progress as progress_bar

    if candidates > 1 and (heads is None or not heads.has_q):
        raise QVLMError(f"candidates={candidates} picks each turn's reply by Q: pass heads with Q heads")
    if candidates > 1 and logprobs:
        raise QVLMError(
            "candidates > 1 keeps one of several replies, which no sampling distribution wrote: logprobs=False"
        )
    cfg = dataclasses.replace(cfg or DecodeConfig(), num_return_sequences=max(1, candidates))
    chat = cfg.chat
    limit = context_length(model.config)
    if sample_seeds is not None and len(sample_seeds) != len(seeds):
        raise QVLMError(f"run_lm: {len(sample_seeds)} sample_seeds for {len(seeds)} episodes; give one per episode")
    games = []
    for i, seed in enumerate(seeds):
        env = make(env_name, **(env_kwargs or {}))
        observation, _ = env.reset(seed=seed)
        first = observation_ids(tokenizer, [observation], chat)
        own = sample_seed if sample_seeds is None else int(sample_seeds[i])
        games.append(_Game(env, seed, [observation], [first], own))
    for turn in progress_bar(iter(range(max_turns)), desc="turns", enabled=progress, unit="turn"):
        for g in games:
            if not g.over and limit and len(g.context()) + cfg.max_new_tokens > limit:
                g.truncated = True  # no room for another response: the conversation is cut, not ended
        active = [g for g in games if not g.over]
        if not active:
            break
        n = cfg.num_return_sequences
        row_seeds = [
            s for g in active for s in sampling_seeds(g.seed, turn, range(g.sample_seed * n, (g.sample_seed + 1) * n))
        ]
        rollout = sample_rollout(
            model,
            tokenizer,
            [g.context() for g in active],
            heads,
            cfg,
            logprobs=logprobs,
            ref_logprobs=False,
            return_hidden=n > 1,
            row_seeds=row_seeds if cfg.do_sample else None,
        )
        if n > 1:
            rollout = _best_by_q(rollout, heads, n)
        result = GenerationResult.from_rollout(rollout, tokenizer)
        if logprobs:
            for g, ids, row in zip(active, result.response_ids, rollout.logprobs.tolist()):
                g.logprobs.append(row[: len(ids)])
        for g, ids, text in zip(active, result.response_ids, result.texts):
            observation, reward, terminated, truncated, info = g.env.step(text)
            g.turns.append(Turn(g.observations[-1], text, float(reward), bool(info.get("invalid_action", False))))
            g.actions.append(list(ids))
            g.observations.append(observation)
            g.terminated = bool(terminated)
            g.truncated = not terminated and (bool(truncated) or turn + 1 >= max_turns)
            if not terminated:  # the next state (for a truncated episode: the state it bootstraps from)
                g.segments.append(observation_ids(tokenizer, g.observations, chat, ids))
    episodes = []
    for g in games:
        if not g.turns:
            raise QVLMError(
                f"episode of seed {g.seed}: the first observation leaves no room for a response in the "
                "model's context; lower max_new_tokens"
            )
        tokens = build_tokens(g.segments, g.actions, [t.reward for t in g.turns], g.terminated)
        episodes.append(
            Episode(
                env=resolve_name(env_name),
                seed=g.seed,
                turns=g.turns,
                final_observation=g.observations[-1],
                terminated=g.terminated,
                truncated=not g.terminated,
                policy=policy_name,
                env_kwargs=dict(env_kwargs or {}),
                token_ids=tokens.token_ids,
                action_mask=tokens.action_mask,
                action_logprobs=g.logprobs if logprobs else None,
            )
        )
    return episodes
