"""Samples -> token batches of the token-level MDP (shared/DESIGN.md, "Conventions").

A sample is ``{"prompt": str, "response": str, "reward": float}`` with optional
``"token_rewards"`` (one float per response token, EOS excluded), ``"finished"`` (bool,
default true: the model ended the response itself, so EOS is appended; false: the response was
cut by the length limit, which is truncation, not termination) and ``"terminal"`` (bool, default
false; only with ``"finished": false``): the episode ended at the cut although no EOS was written.
That is a fixed-horizon task, whose reward scores exactly these tokens (``qvlm demo``, or
``qvlm sample --fixed-horizon``): the last response token is terminal and nothing bootstraps past it.
``"response_ids"`` (ints, EOS excluded) are the exact tokens sampled; when given, they are the
actions instead of a re-tokenisation of the text (sampled text often re-tokenises differently).
Reading and writing samples files: :mod:`qvlm.jsonl`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from qvlm.errors import QVLMError

__all__ = [
    "Sample",
    "TokenBatch",
    "encode_prompt",
    "encode_samples",
    "collate",
    "value_positions",
]


@dataclass
class Sample:
    """One scored response. ``token_rewards`` has one float per response token (EOS excluded)."""

    prompt: str
    response: str
    reward: float = 0.0
    token_rewards: list[float] | None = None
    finished: bool = True
    meta: dict = field(default_factory=dict)
    terminal: bool = False  # finished=False but the episode ended there anyway (a fixed horizon)
    response_ids: list[int] | None = None  # the exact tokens sampled (EOS excluded), if known
    where: str = field(default="", compare=False, repr=False)  # "file:line" it was read from, for errors

    def label(self, index: int) -> str:
        """Where errors about this sample point: its ``file:line``, else ``sample N`` (1-based)."""
        return self.where or f"sample {index + 1}"

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if v is not None and k not in ("meta", "where")}
        if not self.terminal:
            out.pop("terminal")
        out = {k: out[k] for k in sorted(out, key=lambda k: k == "response_ids")}  # the long field last
        out.update(self.meta)
        return out


# a token covers at most this many characters in the check below (English BPE: about 4)
CHARS_PER_TOKEN_BOUND = 8


def check_fits(tokenizer: PreTrainedTokenizerBase, text: str, budget: int, what: str, advice: str = "") -> None:
    """Refuse a text that cannot fit in ``budget`` tokens without tokenising all of it.

    A text longer than ``CHARS_PER_TOKEN_BOUND * budget`` characters is judged by its prefix of that
    many characters: when the prefix alone has more than ``budget`` tokens, raise :class:`QVLMError`.
    The cost is bounded by the context, not by the text (a 50 MB line costs a context's worth). A
    text that passes is tokenised in full by its caller, which checks it exactly.
    """
    cap = CHARS_PER_TOKEN_BOUND * max(budget, 1)
    if len(text) <= cap:
        return
    n = len(tokenizer(text[:cap], add_special_tokens=False)["input_ids"])
    if n > budget:
        raise QVLMError(
            f"{what} is too long: its first {cap:,} of {len(text):,} characters alone are {n} tokens, over the "
            f"{budget} that fit in the model's context; shorten it" + (f" or {advice}" if advice else "")
        )


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, chat: bool | None = None) -> list[int]:
    """Token ids of a prompt: through the chat template when the tokenizer has one (``chat=None``).

    Every stage (sampling, training, decoding) encodes prompts with this function, so the states
    the heads see in training are the states they score in decoding.
    """
    if not prompt.strip():
        raise QVLMError("empty prompt; every prompt needs some text")
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    if chat:
        out = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        ids = out["input_ids"] if not isinstance(out, list) else out
        return list(ids)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    return ids


@dataclass
class TokenBatch:
    """A right-padded batch of prompt + response sequences and their per-step MDP tensors.

    ``input_ids, attention_mask (B, L)``: prompt then response, then padding.
    ``state_positions (B, T)``: position of the last token of ``s_t`` (DESIGN.md: ``m + t - 2``
    for 1-based t), whose hidden state gives ``Q(s_t, .)``, ``V(s_t)`` and the LM logits for
    ``y_t``; :attr:`next_positions` (``state_positions + 1``) gives ``V(s_{t+1})``.
    ``actions, response_mask, rewards, done (B, T)``: ``y_t``, 1 on real steps, ``r_t``,
    1 where ``s_{t+1}`` is terminal. ``truncated (B,)``: cut by the length limit (bootstrap).
    Multi-turn episodes are a :class:`qvlm.envs.tokens.EpisodeTokenBatch`, whose ``next_positions``
    cross turn boundaries. Either way ``next_positions[:, t] = state_positions[:, t + 1]`` on real
    steps: the states ``s_1 .. s_{T+1}`` of a row are one sequence of positions (:func:`value_positions`).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    state_positions: torch.Tensor
    actions: torch.Tensor
    response_mask: torch.Tensor
    rewards: torch.Tensor
    done: torch.Tensor
    truncated: torch.Tensor
    index: torch.Tensor  # (B,) sample indices, for feature caches

    def to(self, device) -> "TokenBatch":
        return type(self)(**{k: v.to(device) for k, v in self.__dict__.items()})

    @property
    def next_positions(self) -> torch.Tensor:
        """``(B, T)`` positions of ``s_{t+1}``: one past each state (single-turn data)."""
        return self.state_positions + 1


def value_positions(state_positions: torch.Tensor, next_positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The positions of ``s_1 .. s_{T+1}`` of each row: ``(B, T + 1)``.

    ``state_positions`` then, after each row's last real step ``T_b``, the position of
    ``s_{T_b + 1}`` (``next_positions[b, T_b - 1]``); 0 past it. Reading features here gives
    ``V(s_t)`` as ``[:, :T]`` and ``V(s_{t+1})`` as ``[:, 1:]``, because
    ``next_positions[:, t] = state_positions[:, t + 1]`` on real steps (inside a turn the next
    token's state; across a turn boundary the last token of the environment's reply).

    By hand: states ``[[11, 12, 20, 21]]``, next ``[[12, 20, 21, 22]]``, mask ``[[1, 1, 1, 1]]``
    -> ``[[11, 12, 20, 21, 22]]``; single-turn states ``[[4, 5, 0]]``, next ``[[5, 6, 1]]``, mask
    ``[[1, 1, 0]]`` -> ``[[4, 5, 6, 0]]``.
    Shape: ``state_positions, next_positions, mask (B, T)`` -> ``(B, T + 1)`` (long).
    """
    B = state_positions.shape[0]
    lengths = mask.sum(1).long()  # (B,)
    rows = torch.arange(B, device=state_positions.device)
    positions = torch.cat([state_positions, torch.zeros_like(state_positions[:, :1])], dim=1)  # (B, T + 1)
    positions[rows, lengths] = next_positions[rows, (lengths - 1).clamp(min=0)] * (lengths > 0)
    return positions


@dataclass
class EncodedSample:
    prompt_ids: list[int]
    response_ids: list[int]
    rewards: list[float]
    terminated: bool
    truncated: bool

    @property
    def n_tokens(self) -> int:
        """Prompt and response tokens."""
        return len(self.prompt_ids) + len(self.response_ids)

    @property
    def n_steps(self) -> int:
        """MDP steps: the response tokens."""
        return len(self.response_ids)


def encode_samples(
    samples: Sequence[Sample],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    chat: bool | None = None,
) -> list[EncodedSample]:
    """Tokenise samples; place rewards on steps; cut at ``max_length`` total tokens.

    The scalar reward goes on the last response step that is kept; ``token_rewards`` add per step.
    A finished sample gets EOS appended and is done; a ``terminal`` one is done at its last token
    (a fixed horizon: no EOS). A response cut here is marked truncated (not done), so its last
    state bootstraps. A prompt that leaves no room for a response raises :class:`QVLMError`.
    """
    encoded = []
    eos = tokenizer.eos_token_id
    for i, s in enumerate(samples):
        check_fits(tokenizer, s.prompt, max_length - 1, f"{s.label(i)}: the prompt", "raise max_length")
        prompt_ids = encode_prompt(tokenizer, s.prompt, chat)
        if s.response_ids is not None:
            response_ids = list(s.response_ids)
            if tokenizer.decode(response_ids, skip_special_tokens=True) != s.response:
                raise QVLMError(
                    f"{s.label(i)}: response_ids do not decode to the response text under this tokenizer; "
                    "they were sampled with another model's tokenizer, or drop the field to re-tokenise"
                )
        else:
            response_ids = tokenizer(s.response, add_special_tokens=False)["input_ids"]
        n_text = len(response_ids)
        if s.token_rewards is not None and len(s.token_rewards) != n_text:
            raise QVLMError(
                f"{s.label(i)}: token_rewards has {len(s.token_rewards)} values but the response has "
                f"{n_text} tokens under this tokenizer; give one value per response token"
            )
        step_rewards = list(s.token_rewards) if s.token_rewards is not None else [0.0] * n_text
        terminated = s.finished and eos is not None
        if terminated:
            response_ids = response_ids + [eos]
            step_rewards.append(0.0)
        elif s.terminal:
            terminated = True  # the horizon ended the episode: done at the last token, no EOS
        if not response_ids:
            raise QVLMError(f"{s.label(i)}: empty response with finished=false; drop it or mark it finished")
        room = max_length - len(prompt_ids)
        if room < 1:
            raise QVLMError(
                f"{s.label(i)}: the prompt has {len(prompt_ids)} tokens, which leaves no room for a "
                f"response within max_length={max_length}; shorten the prompt or raise max_length"
            )
        truncated = not terminated
        if len(response_ids) > room:
            response_ids, step_rewards = response_ids[:room], step_rewards[:room]
            terminated, truncated = False, True
        step_rewards[-1] += s.reward
        encoded.append(EncodedSample(prompt_ids, response_ids, step_rewards, terminated, truncated))
    return encoded


def collate(items: Sequence[EncodedSample], pad_token_id: int, index: Sequence[int] | None = None) -> TokenBatch:
    """Right-pad encoded samples into a :class:`TokenBatch`."""
    B = len(items)
    L = max(len(e.prompt_ids) + len(e.response_ids) for e in items)
    T = max(len(e.response_ids) for e in items)
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    state_positions = torch.zeros((B, T), dtype=torch.long)
    actions = torch.full((B, T), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((B, T))
    rewards = torch.zeros((B, T))
    done = torch.zeros((B, T))
    truncated = torch.zeros(B, dtype=torch.bool)
    for b, e in enumerate(items):
        m, n = len(e.prompt_ids), len(e.response_ids)
        input_ids[b, : m + n] = torch.tensor(e.prompt_ids + e.response_ids)
        attention_mask[b, : m + n] = 1
        state_positions[b, :n] = torch.arange(m - 1, m - 1 + n)  # (n,)
        actions[b, :n] = torch.tensor(e.response_ids)
        response_mask[b, :n] = 1
        rewards[b, :n] = torch.tensor(e.rewards)
        done[b, n - 1] = float(e.terminated)
        truncated[b] = e.truncated
    idx = torch.tensor(list(index) if index is not None else range(B), dtype=torch.long)
    return TokenBatch(input_ids, attention_mask, state_positions, actions, response_mask, rewards, done, truncated, idx)
