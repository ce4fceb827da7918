"""V per turn of a multi-turn episode under trained heads (``qvlm inspect --episodes``, the env benchmark's
report): what the heads expected before each of the agent's turns, against what followed.

For turn k with action tokens at steps ``i0 .. i1 - 1`` (steps are the action tokens, in order):

- ``value``: ``V(s_{i0})``, read at the last token before the turn's first action token (the end of
  the environment's message): the return the heads expect from here;
- ``value_after``: ``V(s_{i1})``, the next turn's ``value`` (the state after the environment's reply);
  after the last turn ``V`` at the sequence's last position when the episode was truncated, ``None``
  when it terminated (nothing follows);
- ``return_to_go``: the discounted return from step ``i0``, ``gamma`` per action token
  (:func:`qvlm.returns.monte_carlo_returns`), the Monte-Carlo target of ``value``;
- ``advantage``: the sum of ``Q(s_t, a_t) - V(s_t)`` over the turn's tokens (the min over twin Q heads),
  ``None`` without Q heads.
"""

from __future__ import annotations

import torch

from qvlm.envs.episodes import Episode
from qvlm.envs.tokens import action_spans, collate_episodes
from qvlm.returns import monte_carlo_returns

__all__ = ["episode_turn_values"]


@torch.no_grad()
def episode_turn_values(model, tokenizer, episode: Episode, gamma: float = 1.0) -> list[dict]:
    """One row per turn of ``episode`` under ``model`` (a :class:`qvlm.model.QVModel`): the turn's
    observation, action and reward with ``value``, ``value_after``, ``return_to_go`` and ``advantage``
    (module docstring)."""
    tokens = episode.tokens()
    batch = collate_episodes([tokens], tokenizer.pad_token_id).token_batch()
    h, h_next = model.features(batch)  # (1, T, H) each
    values = model.heads.values(h)[0].float()  # (T,)
    last = float(model.heads.values(h_next[:, -1])[0])  # V(s_{T+1})
    advantages = None
    if model.heads.has_q:
        q = torch.stack(model.heads.q_taken(h, batch.actions.to(h.device))).amin(0)[0].float()  # (T,)
        advantages = q - values
    returns = monte_carlo_returns(
        batch.rewards, batch.done, gamma, batch.response_mask, torch.tensor([last if tokens.truncated else 0.0])
    )[0]
    rows, step = [], 0
    spans = action_spans(tokens.action_mask)
    for k, ((start, end), turn) in enumerate(zip(spans, episode.turns)):
        i0, i1 = step, step + (end - start)
        if i1 < len(values):
            after = float(values[i1])
        else:
            after = last if tokens.truncated else None
        rows.append(
            {
                "turn": k + 1,
                "observation": turn.observation,
                "action": turn.action,
                "reward": turn.reward,
                "value": float(values[i0]),
                "value_after": after,
                "return_to_go": float(returns[i0]),
                "advantage": None if advantages is None else float(advantages[i0:i1].sum()),
            }
        )
        step = i1
    return rows
