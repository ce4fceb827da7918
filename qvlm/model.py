"""A trunk (any Hugging Face causal LM) with Q/V heads, in one of three modes (:mod:`qvlm.trunk`).

- ``frozen``: only the heads train; the trunk's hidden states at the MDP's state positions are
  computed once per sample and cached, so epochs after the first do not run the trunk.
- ``lora``: low-rank adapters on the trunk's linear layers (peft) train with the heads.
- ``full``: the whole trunk trains with the heads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from qvlm.configs import TrunkConfig
from qvlm.errors import QVLMError
from qvlm.heads import HeadsConfig, QVHeads
from qvlm.loading import hidden_size_of
from qvlm.mdp import TokenBatch, encode_samples
from qvlm.trunk import gather_positions, prepare_trunk, trunk_hidden_states

__all__ = ["QVModel", "load_qv_model"]


class QVModel(nn.Module):
    """Trunk + heads. ``features(batch)`` returns the hidden states of ``s_t`` and ``s_{t+1}``."""

    def __init__(self, trunk: PreTrainedModel, heads: QVHeads, trunk_config: TrunkConfig | None = None):
        super().__init__()
        self.trunk_config = trunk_config or TrunkConfig()
        self.trunk = prepare_trunk(trunk, self.trunk_config)
        self.heads = heads
        if heads.config.q_head == "tied":
            heads.attach_unembedding(self.trunk.get_output_embeddings().weight)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # index -> (token ids, features)

    @classmethod
    def from_trunk(
        cls,
        trunk: PreTrainedModel,
        trunk_config: TrunkConfig | None = None,
        with_q: bool = True,
        num_q_heads: int = 2,
        head_hidden: int = 0,
        base_model: str = "",
        q_head: str = "mlp",
    ) -> "QVModel":
        """Build fresh heads sized from the trunk's config (read once, no guessing)."""
        config = HeadsConfig(
            hidden_size=hidden_size_of(trunk.config),
            vocab_size=trunk.get_output_embeddings().weight.shape[0],
            num_q_heads=num_q_heads,
            head_hidden=head_hidden,
            with_q=with_q,
            base_model=base_model,
            q_head=q_head,
        )
        return cls(trunk, QVHeads(config), trunk_config)

    @property
    def frozen(self) -> bool:
        return self.trunk_config.mode == "frozen"

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The trunk's LM head on hidden states: (..., H) -> (..., vocab)."""
        return self.trunk.get_output_embeddings()(h)

    def features(self, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h_states, h_next)``, each (B, T, H): hidden states at the positions of ``s_t``, ``s_{t+1}``.

        With a frozen trunk they come from the per-sample cache when every sample of the batch is
        cached; otherwise the trunk runs (without gradient when frozen) and fills the cache.
        """
        T = batch.state_positions.shape[1]
        if self.frozen and self._cached(batch):
            feats = _pad_stack([self._cache[int(i)][1] for i in batch.index], T + 1)  # (B, T+1, H)
            return feats[:, :T], feats[:, 1:]
        with torch.set_grad_enabled(not self.frozen and torch.is_grad_enabled()):
            h, _ = trunk_hidden_states(self.trunk, batch.input_ids, batch.attention_mask)  # (B, L, H)
        # the positions of s_1..s_{T+1}: state_positions then one past the last real step
        lengths = batch.response_mask.sum(1).long()  # (B,)
        positions = torch.cat([batch.state_positions, batch.state_positions[:, :1] * 0], dim=1)
        positions[torch.arange(len(lengths)), lengths] = batch.state_positions[:, 0] + lengths
        feats = gather_positions(h, positions)  # (B, T+1, H)
        if self.frozen:
            for b, i in enumerate(batch.index.tolist()):
                ids = batch.input_ids[b][batch.attention_mask[b].bool()].clone()
                self._cache[i] = (ids, feats[b, : lengths[b] + 1].detach().clone())
        return feats[:, :T], feats[:, 1:]

    def _cached(self, batch: TokenBatch) -> bool:
        """Every row cached, for the same tokens (an index reused by other data misses)."""
        for b, i in enumerate(batch.index.tolist()):
            hit = self._cache.get(i)
            if hit is None or not torch.equal(hit[0], batch.input_ids[b][batch.attention_mask[b].bool()]):
                return False
        return True

    def prime_features(
        self,
        tokenizer,
        samples,
        hidden: list[torch.Tensor],
        token_ids: list[list[int]],
        max_length: int,
        chat: bool | None = None,
    ) -> int:
        """Fill the frozen-trunk feature cache with features kept while decoding.

        ``samples[i]`` was decoded as ``token_ids[i]`` (prompt + response ids) with hidden states
        ``hidden[i]`` of ``s_1 .. s_{T+1}`` (``generate(..., return_hidden=True)``). A sample whose
        text re-tokenises to other ids (or is cut by ``max_length``) is skipped: the trunk computes
        it when training needs it. Returns how many samples were primed.
        """
        if not self.frozen:
            raise QVLMError("only a frozen trunk caches features; this model trains its trunk")
        primed = 0
        for i, item in enumerate(encode_samples(samples, tokenizer, max_length, chat)):
            ids = item.prompt_ids + item.response_ids
            if ids == token_ids[i] and hidden[i].shape[0] == len(item.response_ids) + 1:
                self._cache[i] = (torch.tensor(ids), hidden[i].detach())
                primed += 1
        return primed

    def share_feature_cache(self, other: "QVModel") -> None:
        """Use ``other``'s cache of trunk features (same frozen trunk): no sample runs the trunk twice."""
        if other.trunk is not self.trunk:
            raise QVLMError("only models on the same trunk can share trunk features")
        self._cache = other._cache

    def clear_cache(self) -> None:
        self._cache.clear()

    def trainable_trunk_state(self) -> dict[str, torch.Tensor]:
        """The trunk parameters that train (LoRA adapters or all), for checkpoints."""
        return {n: p.detach() for n, p in self.trunk.named_parameters() if p.requires_grad}

    def load_trunk_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.trainable_trunk_state()) - set(state)
        if missing:
            raise QVLMError(f"checkpoint lacks {len(missing)} trunk tensors (e.g. {sorted(missing)[0]})")
        self.trunk.load_state_dict(state, strict=False)


def _pad_stack(rows: list[torch.Tensor], length: int) -> torch.Tensor:
    out = rows[0].new_zeros((len(rows), length, rows[0].shape[-1]))
    for b, r in enumerate(rows):
        out[b, : r.shape[0]] = r
    return out


def load_qv_model(trunk: PreTrainedModel, heads_dir: str | Path) -> QVModel:
    """Attach heads saved in ``heads_dir`` to ``trunk``; restore a trained trunk (LoRA or full)
    from ``trunk.safetensors`` when the run trained one. Checks that the shapes match."""
    import json

    from safetensors.torch import load_file

    from qvlm.heads import load_heads

    heads_dir = Path(heads_dir)
    heads = load_heads(heads_dir)
    hidden = hidden_size_of(trunk.config)
    vocab = trunk.get_output_embeddings().weight.shape[0]
    if (heads.config.hidden_size, heads.config.vocab_size) != (hidden, vocab):
        raise QVLMError(
            f"{heads_dir}: heads were trained on a model with hidden size {heads.config.hidden_size} and "
            f"vocabulary {heads.config.vocab_size} ({heads.config.base_model or 'unknown'}); this model has "
            f"{hidden} and {vocab}; pass the --model the heads were trained on"
        )
    info_file = heads_dir / "training.json"
    trunk_cfg = TrunkConfig()
    if info_file.is_file():
        trunk_cfg = TrunkConfig(**json.loads(info_file.read_text()).get("trunk", {}))
    model = QVModel(trunk, heads, trunk_cfg)
    if (heads_dir / "trunk.safetensors").is_file():
        model.load_trunk_state(load_file(str(heads_dir / "trunk.safetensors")))
    return model.eval().requires_grad_(False)
