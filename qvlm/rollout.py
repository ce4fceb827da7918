"""Rollouts as tensors: what a decoding run sampled, on the model's device, in the layout of DESIGN.md.

A :class:`Rollout` holds a batch of responses (prompt-major: a prompt's responses are adjacent) and
what was recorded while sampling them: the log-probabilities of the sampled tokens under the
sampling distribution (``log pi_old``) and under the base model (``log pi_ref``), ``V(s_t)``, the
trunk's hidden states. Lists and texts are made from it only where a report or a file needs them
(:meth:`Rollout.texts`, :meth:`Rollout.response_lists`, :func:`rollout_to_samples`).

The sampler is :func:`qvlm.decoding.sampling.sample_rollout`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from qvlm.errors import QVLMError
from qvlm.mdp import Sample

__all__ = ["Rollout", "done_mask", "rollout_to_samples"]


def done_mask(response_mask: torch.Tensor, finished: torch.Tensor, fixed_horizon: bool = False) -> torch.Tensor:
    """``done (B, T)``: 1 where ``s_{t+1}`` is terminal (DESIGN.md), from the response mask (B, T)
    and ``finished`` (B,) (EOS written).

    A finished response is done at its last step (the EOS); a response cut by the length limit is
    truncated (all 0), unless ``fixed_horizon``: then the limit ends its episode too, and it is done
    at its last step. Mask ``[[1, 1, 0], [1, 1, 1]]``, finished ``[True, False]`` ->
    ``[[0, 1, 0], [0, 0, 0]]``; with ``fixed_horizon``, ``[[0, 1, 0], [0, 0, 1]]``.
    """
    lengths = response_mask.sum(-1).long()  # (B,)
    last = torch.nn.functional.one_hot((lengths - 1).clamp(min=0), response_mask.shape[-1])  # (B, T)
    ends = (torch.ones_like(finished) if fixed_horizon else finished) & (lengths > 0)  # (B,)
    return (last * ends[:, None]).to(response_mask.dtype)


def _pad_to(x: torch.Tensor, length: int, value, left: bool = False) -> torch.Tensor:
    """Pad dim 1 of ``x`` (B, L, ...) to ``length`` with ``value``, on the right or the left."""
    extra = length - x.shape[1]
    if extra == 0:
        return x
    pad = x.new_full((x.shape[0], extra, *x.shape[2:]), value)
    return torch.cat([pad, x] if left else [x, pad], dim=1)


@dataclass
class Rollout:
    """A batch of sampled responses as tensors (B responses; P prompt, T response positions).

    Response position ``t`` (0-based) is step ``t + 1``: its token ``y_{t+1}`` was sampled in state
    ``s_{t+1}``. Values at padded positions are 0 (ids: ``pad_id``).
    """

    prompt_ids: torch.Tensor  # (B, P) left-padded with pad_id
    prompt_mask: torch.Tensor  # (B, P) 1 on real prompt tokens (long, an attention mask)
    response_ids: torch.Tensor  # (B, T) right-padded with pad_id; EOS included when written
    response_mask: torch.Tensor  # (B, T) float 1 on real response tokens, EOS included
    finished: torch.Tensor  # (B,) bool: EOS written
    logprobs: torch.Tensor | None = None  # (B, T) log of the sampling distribution at the sampled token
    # (B, T) log pi_ref(y_t | s_t): log_softmax of the raw logits of the model that sampled (a LoRA
    # policy's reference needs its adapters disabled: DESIGN.md)
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None  # (B, T) V(s_t) from the heads
    hidden: torch.Tensor | None = None  # (B, T + 1, H) trunk features of s_1 .. s_{T+1} (0 past a row's end)
    kl: torch.Tensor | None = None  # (B,) sum over steps of KL(sampling dist || base)
    topk_mass: torch.Tensor | None = None  # (B,) mean over steps of the sampling mass on the base's top k
    rewards: torch.Tensor | None = None  # (B,) sequence rewards, filled by callers
    token_rewards: torch.Tensor | None = None  # (B, T) per-step rewards, filled by callers
    pad_id: int = 0

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        """Response lengths (B,), EOS included."""
        return self.response_mask.sum(-1).long()

    def done(self, fixed_horizon: bool = False) -> torch.Tensor:
        """``done (B, T)`` (see :func:`done_mask`)."""
        return done_mask(self.response_mask, self.finished, fixed_horizon)

    def to(self, device) -> Rollout:
        """The same rollout with every tensor on ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)

    def response_lists(self) -> list[list[int]]:
        """Per response, its token ids (EOS included when written)."""
        rows, lengths = self.response_ids.tolist(), self.lengths.tolist()
        return [row[:n] for row, n in zip(rows, lengths)]

    def prompt_lists(self) -> list[list[int]]:
        """Per response, its prompt's token ids (no padding)."""
        rows, lengths = self.prompt_ids.tolist(), self.prompt_mask.sum(-1).tolist()
        return [row[len(row) - n :] for row, n in zip(rows, lengths)]

    def texts(self, tokenizer) -> list[str]:
        """Per response, its text (decoded without the EOS and special tokens)."""
        ids, finished = self.response_lists(), self.finished.tolist()
        return [tokenizer.decode(r[:-1] if f else r, skip_special_tokens=True) for r, f in zip(ids, finished)]

    @staticmethod
    def cat(rollouts: list[Rollout]) -> Rollout:
        """Concatenate batches along B, padding prompts on the left and responses on the right."""
        if not rollouts:
            raise QVLMError("Rollout.cat needs at least one rollout")
        if len(rollouts) == 1:
            return rollouts[0]
        first = rollouts[0]
        P = max(r.prompt_ids.shape[1] for r in rollouts)
        T = max(r.response_ids.shape[1] for r in rollouts)
        out = {}
        for f in dataclasses.fields(Rollout):
            if f.name == "pad_id":
                continue
            parts = [getattr(r, f.name) for r in rollouts]
            if all(p is None for p in parts):
                out[f.name] = None
                continue
            if any(p is None for p in parts):
                raise QVLMError(f"Rollout.cat: field {f.name!r} is set in some rollouts and None in others")
            if f.name in ("prompt_ids", "prompt_mask"):
                value = first.pad_id if f.name == "prompt_ids" else 0
                parts = [_pad_to(p, P, value, left=True) for p in parts]
            elif f.name == "hidden":
                parts = [_pad_to(p, T + 1, 0.0) for p in parts]
            elif parts[0].dim() == 2:  # (B, T) response tensors
                parts = [_pad_to(p, T, first.pad_id if f.name == "response_ids" else 0) for p in parts]
            out[f.name] = torch.cat(parts, dim=0)
        return Rollout(**out, pad_id=first.pad_id)


def rollout_to_samples(rollout, tokenizer, prompts: list[str], rewards: list[float], fixed_horizon: bool = False):
    """Scored :class:`qvlm.mdp.Sample` records, one per response, for ``samples.jsonl`` and training.

    ``rollout`` is a :class:`Rollout` or a :class:`qvlm.decoding.GenerationResult`; ``prompts`` the
    prompt texts, one per prompt (repeated here for its responses, prompt-major) or one per
    response; ``rewards`` one per response. A finished response stores its tokens without the EOS
    (which :func:`qvlm.mdp.encode_samples` appends back); with ``fixed_horizon`` a response cut by
    the length limit is ``terminal`` (the limit ends its episode) instead of truncated.
    """
    if isinstance(rollout, Rollout):
        texts, finished, ids = rollout.texts(tokenizer), rollout.finished.tolist(), rollout.response_lists()
    else:
        texts, finished, ids = rollout.texts, rollout.finished, rollout.response_ids
    B = len(ids)
    if not prompts or B % len(prompts):
        raise QVLMError(
            f"rollout_to_samples: {B} responses but {len(prompts)} prompts; give one prompt per prompt "
            "decoded (its responses adjacent) or one per response"
        )
    if len(rewards) != B:
        raise QVLMError(f"rollout_to_samples: {len(rewards)} rewards for {B} responses; give one per response")
    n = B // len(prompts)
    repeated = [p for p in prompts for _ in range(n)]
    return [
        Sample(p, text, r, finished=f, terminal=fixed_horizon and not f, response_ids=i[:-1] if f else i)
        for p, text, r, f, i in zip(repeated, texts, rewards, finished, ids)
    ]
