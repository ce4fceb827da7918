"""The token-level adapter: a multi-turn episode as one growing token sequence (DESIGN.md,
"Distributional values and multi-turn episodes").

An episode is ``o_0, a_1, o_1, a_2, ..., a_n`` (observations from the environment, actions from the
agent). Its token sequence is ``seg_0 + a_1 + seg_1 + a_2 + ... + a_n [+ seg_n]``:

- ``seg_k`` are the environment's tokens for ``o_k``: the chat template applied per turn (the user
  message and the assistant-generation prefix, plus whatever closes the agent's previous turn),
  or, for a tokenizer without a template, a plain form (:func:`observation_ids`). Their
  ``action_mask`` is 0: they are observations, masked out of every loss and of the KL.
- ``a_k`` are the agent's tokens, exactly as sampled (EOS included when written); ``action_mask`` 1.
- ``seg_n``, the observation after the last action, is kept only when the episode was truncated:
  its last token is the state ``s_{T+1}`` whose value a truncated episode bootstraps from. When the
  episode terminated nothing follows the last action (single-turn episodes are then exactly prompt
  then response, as :func:`qvlm.mdp.encode_samples` lays them out).

Rewards: turn k's reward sits on ``a_k``'s last token; ``done`` is 1 on the episode's last action
token when it terminated. Steps are the action tokens only, in order (``t = 1..T``), and ``gamma``
applies per action token: the observation tokens between two turns take no step.

Indices (0-based positions in the sequence; DESIGN.md: ``V(s_t)`` is read at the last token of
``s_t``): for action token t at position ``p_t``, ``V(s_t)`` and ``Q(s_t, .)`` are read at
``p_t - 1`` (:func:`state_positions`), and ``V(s_{t+1})`` at ``p_{t+1} - 1``, the position right
before the next agent token: inside a turn that is ``p_t`` itself, across a turn boundary it is
the last token of the environment's reply (:func:`next_state_positions`). After the last action it
is the sequence's last position (``seg_n``'s last token when truncated). So on the action steps
the multi-turn episode is an ordinary token MDP: ``next_values[t] = values[t + 1]``, and the
functions of :mod:`qvlm.returns` apply unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from qvlm.errors import QVLMError
from qvlm.mdp import TokenBatch, encode_prompt

__all__ = [
    "EpisodeTokens",
    "EpisodeBatch",
    "EpisodeTokenBatch",
    "observation_ids",
    "action_ids",
    "build_tokens",
    "encode_episode",
    "action_positions",
    "state_positions",
    "next_state_positions",
    "action_spans",
    "collate_episodes",
]

# stands in for an agent's turn when the chat template renders the conversation; the text after it
# is the environment's segment (the template's end of the agent's turn, the user turn, the prefix)
_SENTINEL = "QVLMTURN{}END"


def _uses_chat(tokenizer, chat: bool | None) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat


def observation_ids(
    tokenizer,
    observations: Sequence[str],
    chat: bool | None = None,
    previous_action: Sequence[int] = (),
) -> list[int]:
    """Token ids of the segment of the newest observation ``observations[-1]``, after the
    conversation so far (``observations[:-1]`` and as many agent turns).

    ``chat`` (default: when the tokenizer has a template): the first segment is
    :func:`qvlm.mdp.encode_prompt` of ``o_0``; a later one is the text the template puts after an
    agent turn: the conversation is rendered with stand-ins for the agent's turns and the text
    after the last stand-in is tokenised. Only the turns so far are rendered, so a segment never
    depends on later turns: the sequence grows, and the rollout's prefix at each turn is the
    training sequence's prefix. When ``previous_action`` ends with the token the segment starts
    with (the agent wrote the end-of-turn token itself, e.g. ``<|im_end|>``), it is not repeated.

    Without a template: ``o_0`` as ``encode_prompt`` encodes it (BOS then the text), a later
    observation as the tokens of ``"\\n" + o_k + "\\n"``.
    """
    if not observations:
        raise QVLMError("observation_ids needs at least one observation")
    k = len(observations) - 1
    if k == 0:
        return encode_prompt(tokenizer, observations[0], chat)
    if not _uses_chat(tokenizer, chat):
        return tokenizer("\n" + observations[k] + "\n", add_special_tokens=False)["input_ids"]
    messages = [{"role": "user", "content": observations[0]}]
    for i, obs in enumerate(observations[1:], start=1):
        messages += [{"role": "assistant", "content": _SENTINEL.format(i)}, {"role": "user", "content": obs}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    marker = _SENTINEL.format(k)
    if text.count(marker) != 1:
        raise QVLMError(
            "the tokenizer's chat template changed the agent's message (a stand-in for it appears "
            f"{text.count(marker)} times in the rendering), so turns cannot be split; use chat=False"
        )
    ids = list(tokenizer(text.split(marker)[1], add_special_tokens=False)["input_ids"])
    if previous_action and ids and ids[0] == previous_action[-1]:
        ids = ids[1:]  # the agent ended its turn with the template's end-of-turn token itself
    return ids


def action_ids(tokenizer, text: str) -> list[int]:
    """An action written as text (a scripted player's), as the tokens an agent would have sampled:
    the text's tokens, then EOS (the agent ends its turn)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


@dataclass
class EpisodeTokens:
    """One episode as a token sequence of length L (lists, one value per position)."""

    token_ids: list[int]
    action_mask: list[int]  # 1 on the agent's tokens, 0 on the environment's
    token_rewards: list[float]  # turn k's reward on a_k's last token, 0 elsewhere
    done: list[int]  # 1 on the last action token of a terminated episode
    truncated: bool  # the episode was cut (not terminated): bootstrap from V at position L - 1

    @property
    def n_tokens(self) -> int:
        """Tokens of the whole conversation."""
        return len(self.token_ids)

    @property
    def n_steps(self) -> int:
        """MDP steps: the action tokens."""
        return sum(self.action_mask)


def build_tokens(
    segments: Sequence[Sequence[int]],
    actions: Sequence[Sequence[int]],
    rewards: Sequence[float],
    terminated: bool,
) -> EpisodeTokens:
    """Interleave ``segments`` (``seg_0 .. seg_{n-1}``, or ``.. seg_n`` with the final observation)
    and ``actions`` (``a_1 .. a_n``) into an :class:`EpisodeTokens`. Pure: no tokenizer.

    ``len(segments)`` is ``n`` or ``n + 1``; a final segment is dropped when ``terminated``
    (nothing follows a terminal action). Every action needs at least one token (its reward needs
    a place) and ``seg_0`` too (the first action needs a state).

    By hand: segments ``[[5, 6], [7]]``, actions ``[[1], [2, 3]]``, rewards ``(-0.1, 1)``,
    terminated -> ids ``[5, 6, 1, 7, 2, 3]``, mask ``[0, 0, 1, 0, 1, 1]``, rewards
    ``[0, 0, -0.1, 0, 0, 1]``, done ``[0, 0, 0, 0, 0, 1]``.
    """
    n = len(actions)
    if n == 0:
        raise QVLMError("an episode needs at least one action")
    if len(segments) not in (n, n + 1) or len(rewards) != n:
        raise QVLMError(
            f"an episode of {n} actions needs {n} or {n + 1} observation segments and {n} rewards; "
            f"got {len(segments)} segments and {len(rewards)} rewards"
        )
    if not segments[0]:
        raise QVLMError("the first observation has no tokens; the first action needs a state to be taken in")
    ids: list[int] = []
    mask: list[int] = []
    token_rewards: list[float] = []
    for k in range(n):
        if not actions[k]:
            raise QVLMError(f"action {k + 1} has no tokens; every turn's reward needs a token to sit on")
        ids += segments[k]
        mask += [0] * len(segments[k])
        token_rewards += [0.0] * len(segments[k])
        ids += actions[k]
        mask += [1] * len(actions[k])
        token_rewards += [0.0] * (len(actions[k]) - 1) + [float(rewards[k])]
    done = [0] * len(ids)
    if terminated:
        done[-1] = 1
    elif len(segments) == n + 1:
        ids += segments[n]
        mask += [0] * len(segments[n])
        token_rewards += [0.0] * len(segments[n])
        done += [0] * len(segments[n])
    return EpisodeTokens(list(map(int, ids)), mask, token_rewards, done, truncated=not terminated)


def encode_episode(
    tokenizer,
    observations: Sequence[str],
    actions: Sequence[Sequence[int]],
    rewards: Sequence[float],
    terminated: bool,
    chat: bool | None = None,
) -> EpisodeTokens:
    """:func:`build_tokens` with each observation's segment from :func:`observation_ids`
    (``observations``: ``o_0 .. o_{n-1}``, or ``.. o_n`` with the final one)."""
    segments = [
        observation_ids(tokenizer, observations[: k + 1], chat, actions[k - 1] if k else ())
        for k in range(len(observations))
    ]
    return build_tokens(segments, actions, rewards, terminated)


def action_positions(action_mask: Sequence[int]) -> list[int]:
    """Positions of the action tokens, in order (step t = 1..T)."""
    return [i for i, m in enumerate(action_mask) if m]


def state_positions(action_mask: Sequence[int]) -> list[int]:
    """Where ``V(s_t)`` and ``Q(s_t, .)`` are read for each action token: the position before it."""
    positions = action_positions(action_mask)
    if positions and positions[0] == 0:
        raise QVLMError("the first token is an action; an episode starts with the environment's observation")
    return [p - 1 for p in positions]


def next_state_positions(action_mask: Sequence[int]) -> list[int]:
    """Where ``V(s_{t+1})`` is read for each action token: right before the next action token (the
    token itself inside a turn; the last token of the environment's reply across a turn
    boundary), and the sequence's last position after the last action.

    By hand: mask ``[0, 0, 1, 1, 0, 0, 1]`` -> action positions ``[2, 3, 6]``, states
    ``[1, 2, 5]``, next states ``[2, 5, 6]``.
    """
    states = state_positions(action_mask)
    return states[1:] + ([len(action_mask) - 1] if states else [])


def action_spans(action_mask: Sequence[int]) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of action tokens (one per turn when observations separate them)."""
    spans, start = [], None
    for i, m in enumerate(list(action_mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    return spans


@dataclass
class EpisodeTokenBatch(TokenBatch):
    """A :class:`qvlm.mdp.TokenBatch` of multi-turn episodes (what the offline trainers read): the
    same fields, plus ``next_state_positions (B, T)``, where ``V(s_{t+1})`` is read (across a turn
    boundary the last token of the environment's reply, not one past the state)."""

    next_state_positions: torch.Tensor

    @property
    def next_positions(self) -> torch.Tensor:
        return self.next_state_positions


@dataclass
class EpisodeBatch:
    """Episodes right-padded into tensors; the step tensors run over action tokens only.

    ``input_ids, attention_mask, action_mask (B, L)``: the sequences. ``state_positions,
    next_state_positions (B, T)``: where ``V(s_t)`` and ``V(s_{t+1})`` are read (0 on padding).
    ``actions, response_mask, rewards, done (B, T)``: the action tokens, 1 on real steps, ``r_t``,
    1 where ``s_{t+1}`` is terminal. ``truncated (B,)``: bootstrap from ``V`` after the last step.
    The field names follow :class:`qvlm.mdp.TokenBatch`; here ``next_state_positions`` replaces
    ``state_positions + 1``, which does not hold across a turn boundary.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    state_positions: torch.Tensor
    next_state_positions: torch.Tensor
    actions: torch.Tensor
    response_mask: torch.Tensor
    rewards: torch.Tensor
    done: torch.Tensor
    truncated: torch.Tensor

    def to(self, device) -> EpisodeBatch:
        return EpisodeBatch(**{k: v.to(device) for k, v in self.__dict__.items()})

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_ids(self) -> torch.Tensor:
        """The action tokens ``(B, T)``: the name :class:`qvlm.rollout.Rollout` gives the sampled
        tokens, so PPO's optimiser reads either batch (:mod:`qvlm.algos.ppo_env`)."""
        return self.actions

    @property
    def lengths(self) -> torch.Tensor:
        """Action tokens per episode ``(B,)``."""
        return self.response_mask.sum(-1).long()

    def select(self, rows: torch.Tensor) -> EpisodeBatch:
        """The episodes ``rows`` (a minibatch)."""
        return EpisodeBatch(**{k: v[rows.to(v.device)] for k, v in self.__dict__.items()})

    def token_batch(self, index: Sequence[int] | None = None) -> EpisodeTokenBatch:
        """The same episodes as an :class:`EpisodeTokenBatch` (what the offline trainers read);
        ``index`` numbers the episodes for the feature cache."""
        idx = torch.tensor(list(index) if index is not None else range(len(self)), dtype=torch.long)
        return EpisodeTokenBatch(
            self.input_ids,
            self.attention_mask,
            self.state_positions,
            self.actions,
            self.response_mask,
            self.rewards,
            self.done,
            self.truncated,
            idx,
            self.next_state_positions,
        )


def collate_episodes(episodes: Sequence[EpisodeTokens], pad_token_id: int) -> EpisodeBatch:
    """Right-pad episodes into an :class:`EpisodeBatch` (no cut: check lengths against the
    model's context before)."""
    B = len(episodes)
    L = max(len(e.token_ids) for e in episodes)
    T = max(sum(e.action_mask) for e in episodes)
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    action_mask = torch.zeros((B, L), dtype=torch.long)
    states = torch.zeros((B, T), dtype=torch.long)
    next_states = torch.zeros((B, T), dtype=torch.long)
    actions = torch.full((B, T), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((B, T))
    rewards = torch.zeros((B, T))
    done = torch.zeros((B, T))
    truncated = torch.zeros(B, dtype=torch.bool)
    for b, e in enumerate(episodes):
        n = len(e.token_ids)
        positions = action_positions(e.action_mask)
        t = len(positions)
        input_ids[b, :n] = torch.tensor(e.token_ids)
        attention_mask[b, :n] = 1
        action_mask[b, :n] = torch.tensor(e.action_mask)
        states[b, :t] = torch.tensor(state_positions(e.action_mask))
        next_states[b, :t] = torch.tensor(next_state_positions(e.action_mask))
        actions[b, :t] = torch.tensor([e.token_ids[p] for p in positions])
        response_mask[b, :t] = 1
        rewards[b, :t] = torch.tensor([e.token_rewards[p] for p in positions])
        done[b, :t] = torch.tensor([float(e.done[p]) for p in positions])
        truncated[b] = e.truncated
    return EpisodeBatch(
        input_ids, attention_mask, action_mask, states, next_states, actions, response_mask, rewards, done, truncated
    )
