"""Frozen-trunk features: the per-sample cache a frozen trunk reads instead of running again, and
the safetensors file that keeps features from sampling for a later training phase.

A frozen trunk maps the same tokens to the same hidden states, so the features of ``s_1 .. s_{T+1}``
of a sample are computed once (or kept while decoding it) and every later epoch reads them. The
cache is plain Python state, not an ``nn.Module``: it is never part of a model's ``state_dict()``,
``.to()`` does not move it, and two models on one trunk share it by holding the same object.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from qvlm.heads import load_tensors, save_tensors
from qvlm.mdp import Sample, TokenBatch, encode_samples

__all__ = ["FeatureCache", "save_features", "load_features"]


class FeatureCache:
    """``sample index -> (token ids, features)`` with features ``(T + 1, H)`` of ``s_1 .. s_{T+1}``.

    Token ids are kept on the CPU; features stay on the device they were computed on and are moved
    to the batch's device when read. A row is only a hit for the same token ids: an index reused by
    other data misses (and is overwritten when the trunk runs on it).
    """

    def __init__(self) -> None:
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def clear(self) -> None:
        self._rows.clear()

    def put(self, index: int, token_ids: torch.Tensor, features: torch.Tensor) -> None:
        """Keep ``features (T + 1, H)`` of the sample ``index`` whose tokens are ``token_ids (L,)``."""
        self._rows[int(index)] = (token_ids.detach().to("cpu", torch.long), features.detach())

    def get(self, index: int, token_ids: torch.Tensor) -> torch.Tensor | None:
        """The features of ``index`` if they were computed for the same ``token_ids``, else None."""
        hit = self._rows.get(int(index))
        if hit is None or not torch.equal(hit[0], token_ids.to("cpu", torch.long)):
            return None
        return hit[1]

    def lookup(self, batch: TokenBatch) -> torch.Tensor | None:
        """``(B, T + 1, H)`` features of every row of ``batch`` (zero-padded past each row's end) on
        the batch's device, or None when any row is missing or was cached for other tokens."""
        ids, real = batch.input_ids.cpu(), batch.attention_mask.cpu().bool()  # one copy per batch
        rows = []
        for b, i in enumerate(batch.index.tolist()):
            feats = self.get(i, ids[b][real[b]])
            if feats is None:
                return None
            rows.append(feats)
        T = batch.state_positions.shape[1]
        out = torch.zeros((len(rows), T + 1, rows[0].shape[-1]), dtype=rows[0].dtype, device=batch.input_ids.device)
        for b, r in enumerate(rows):
            out[b, : r.shape[0]] = r
        return out

    def store(self, batch: TokenBatch, features: torch.Tensor) -> None:
        """Keep each row's features ``features[b, :T_b + 1]`` (of ``(B, T + 1, H)``) under its index."""
        lengths = batch.response_mask.sum(1).long().tolist()  # (B,)
        ids, real = batch.input_ids.cpu(), batch.attention_mask.cpu().bool()
        for b, i in enumerate(batch.index.tolist()):
            self.put(i, ids[b][real[b]].clone(), features[b, : lengths[b] + 1].detach().clone())

    def prime(
        self,
        tokenizer,
        samples: Sequence[Sample],
        hidden: Sequence[torch.Tensor],
        token_ids: Sequence[Sequence[int]],
        max_length: int,
        chat: bool | None = None,
    ) -> int:
        """Fill the cache with features kept while decoding; returns how many samples were primed.

        ``samples[i]`` was decoded as ``token_ids[i]`` (prompt + response ids) with hidden states
        ``hidden[i]`` of ``s_1 .. s_{T+1}`` (``generate(..., return_hidden=True)``). A sample whose
        text re-tokenises to other ids (or is cut by ``max_length``) is skipped: the trunk computes
        it when training needs it.
        """
        primed = 0
        for i, item in enumerate(encode_samples(samples, tokenizer, max_length, chat)):
            ids = item.prompt_ids + item.response_ids
            if list(token_ids[i]) == ids and hidden[i].shape[0] == len(item.response_ids) + 1:
                self.put(i, torch.tensor(ids), hidden[i])
                primed += 1
        return primed


def save_features(path: str | Path, token_ids: Sequence[Sequence[int]], hidden: Sequence[torch.Tensor]) -> None:
    """Write features kept while sampling (``token_ids[i]``, ``hidden[i] (T_i + 1, H)``) as safetensors.

    Atomic: written to a temporary file in the same folder, then renamed over ``path``.
    """

    tensors = {}
    for i, (ids, h) in enumerate(zip(token_ids, hidden)):
        tensors[f"{i}.ids"] = torch.tensor(list(ids), dtype=torch.long)
        tensors[f"{i}.h"] = h
    save_tensors(path, tensors)


def load_features(path: str | Path) -> tuple[list[list[int]], list[torch.Tensor]]:
    """``(token_ids, hidden)`` as written by :func:`save_features` (tensors on the CPU)."""

    tensors = load_tensors(path)  # a damaged or non-finite cache file: one line naming it
    n = len(tensors) // 2
    return [tensors[f"{i}.ids"].tolist() for i in range(n)], [tensors[f"{i}.h"] for i in range(n)]
