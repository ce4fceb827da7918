"""One decoding step: prefill a batch of prompts, then feed one token per row at a time.

:class:`DecodeStep` is the only place in :mod:`qvlm.decoding` (and the benchmarks) that runs the
model: the trunk (:func:`qvlm.trunk.trunk_hidden_states`) and the LM head. Plain, guided, blockwise,
best-of-N and rollout decoding are all loops over it. It owns what every such loop needs alike:

- position ids for left-padded prompts (a row's first real token is position 0);
- the attention mask, one column longer per step;
- one prefill per prompt shared by its ``n`` responses (``DynamicCache.batch_repeat_interleave``);
- row selection at any step (``DynamicCache.reorder_cache``), for blockwise decoding.

With ``use_cache=False`` it keeps the whole sequence and re-runs the model on all of it at every
step, computing the logits of every position: what a hand loop without a KV cache costs (the
reference row of ``benchmarks/decode_speed.py``). Both modes give the same logits to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from qvlm.trunk import trunk_hidden_states, trunk_logits

__all__ = ["StepOutput", "DecodeStep", "position_ids"]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: each row counts from its first real token. Padding
    gets 0 (it is masked anyway). (B, L) -> (B, L); ``[[0, 1, 1], [1, 1, 1]] -> [[0, 0, 1], [0, 1, 2]]``."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


@dataclass
class StepOutput:
    """What one step gives: the last position's hidden state (B, H), its float32 logits (B, V)
    (None when not asked for) and the KV cache (None without one)."""

    hidden: torch.Tensor
    logits: torch.Tensor | None
    cache: DynamicCache | None


class DecodeStep:
    """Prefill, then one token per row per step, for one batch of left-padded prompts.

    Usage::

        step = DecodeStep(model)
        out = step.prefill(input_ids, attention_mask, repeat=n)  # (B, L) -> rows B * n
        while ...:
            tokens = sample(out.logits)  # (B * n,)
            out = step.step(tokens)
    """

    def __init__(self, model: PreTrainedModel, use_cache: bool = True):
        self.model = model
        self.use_cache = use_cache
        self.cache: DynamicCache | None = None
        self.attention_mask: torch.Tensor | None = None  # (B, L + steps)
        self.input_ids: torch.Tensor | None = None  # (B, L + steps), kept without a cache only

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on last hidden states, in float32: (B, H) -> (B, V)."""
        return trunk_logits(self.model, hidden[:, None])[:, -1].to(torch.float32)

    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, repeat: int = 1, logits: bool = True
    ) -> StepOutput:
        """Run the prompts (B, L) once; with ``repeat = n`` each row then stands for its ``n``
        responses (rows ``b * n .. b * n + n - 1``), which share its prefilled cache."""
        self.cache = DynamicCache() if self.use_cache else None
        self.attention_mask, self.input_ids = attention_mask, None if self.use_cache else input_ids
        if not self.use_cache:
            h_last, full = self._rerun()
            if repeat > 1:
                self.input_ids = self.input_ids.repeat_interleave(repeat, 0)
                self.attention_mask = self.attention_mask.repeat_interleave(repeat, 0)
                h_last, full = h_last.repeat_interleave(repeat, 0), full.repeat_interleave(repeat, 0)
            return StepOutput(h_last, full if logits else None, None)
        h, _ = trunk_hidden_states(
            self.model,
            input_ids,
            attention_mask,
            position_ids=position_ids(attention_mask),
            past_key_values=self.cache,
            use_cache=True,
        )
        h_last = h[:, -1]  # (B, H)
        if repeat > 1:  # one prefill per prompt; its responses share the cache rows
            self.cache.batch_repeat_interleave(repeat)
            self.attention_mask = attention_mask.repeat_interleave(repeat, 0)
            h_last = h_last.repeat_interleave(repeat, 0)
        return StepOutput(h_last, self.logits(h_last) if logits else None, self.cache)

    def step(self, tokens: torch.Tensor, logits: bool = True) -> StepOutput:
        """Append one token per row (B,) and run it: the next state's hidden state and logits."""
        mask = self.attention_mask
        self.attention_mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        if not self.use_cache:
            self.input_ids = torch.cat([self.input_ids, tokens[:, None]], dim=1)
            h_last, full = self._rerun()
            return StepOutput(h_last, full if logits else None, None)
        h, _ = trunk_hidden_states(
            self.model,
            tokens[:, None],
            self.attention_mask,
            position_ids=position_ids(self.attention_mask)[:, -1:],
            past_key_values=self.cache,
            use_cache=True,
        )
        h_last = h[:, -1]  # (B, H)
        return StepOutput(h_last, self.logits(h_last) if logits else None, self.cache)

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and repeat) rows ``rows`` (B',) of the batch: cache, mask and, without a cache, ids."""
        self.attention_mask = self.attention_mask[rows]
        if self.use_cache:
            self.cache.reorder_cache(rows)
        else:
            self.input_ids = self.input_ids[rows]

    def _rerun(self) -> tuple[torch.Tensor, torch.Tensor]:
        # no cache: the whole sequence again, with the logits of every position, as a hand loop does
        h, _ = trunk_hidden_states(
            self.model,
            self.input_ids,
            self.attention_mask,
            position_ids=position_ids(self.attention_mask),
            use_cache=False,
        )
        all_logits = trunk_logits(self.model, h)  # (B, L, V)
        return h[:, -1], all_logits[:, -1].to(torch.float32)
