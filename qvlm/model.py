"""A trunk (any Hugging Face causal LM) with Q/V heads, in one of three modes (:mod:`qvlm.trunk`).

- ``frozen``: only the heads train; the trunk's hidden states at the MDP's state positions are
  computed once per sample and cached (:class:`qvlm.features.FeatureCache`), so epochs after the
  first do not run the trunk.
- ``lora``: low-rank adapters on the trunk's linear layers (peft) train with the heads.
- ``full``: the whole trunk trains with the heads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from qvlm.configs import TrunkConfig
from qvlm.errors import QVLMError
from qvlm.features import FeatureCache
from qvlm.fileio import read_text
from qvlm.heads import HeadsConfig, QVHeads, build_heads, load_heads, load_tensors
from qvlm.loading import hidden_size_of
from qvlm.mdp import TokenBatch, value_positions
from qvlm.train.distributed import fully_shard_trunk, load_full_state_dict, trainable_state
from qvlm.trunk import gather_positions, prepare_trunk, sharded, trunk_forward, trunk_logits

__all__ = ["QVModel", "load_qv_model"]


class QVModel(nn.Module):
    """Trunk + heads. ``features(batch)`` returns the hidden states of ``s_t`` and ``s_{t+1}``.

    A frozen trunk reads and fills ``feature_cache`` (its own unless one is passed; models on one
    trunk share features by being given the same :class:`FeatureCache`). The cache is a plain
    attribute: not in ``state_dict()``, not moved by ``.to()``.
    """

    def __init__(
        self,
        trunk: PreTrainedModel,
        heads: QVHeads,
        trunk_config: TrunkConfig | None = None,
        feature_cache: FeatureCache | None = None,
    ):
        super().__init__()
        self.trunk_config = trunk_config or TrunkConfig()
        self.trunk = prepare_trunk(trunk, self.trunk_config)
        weight = self.trunk.get_output_embeddings().weight
        self.heads = heads.to(device=weight.device, dtype=weight.dtype)  # one device, one dtype
        self._attach_unembedding()
        if feature_cache is not None and not self.frozen:
            raise QVLMError(
                f"a feature cache was given to a model whose trunk trains ({self.trunk_config.mode}); "
                "only a frozen trunk caches features: drop feature_cache or use TrunkConfig('frozen')"
            )
        self.feature_cache = (feature_cache if feature_cache is not None else FeatureCache()) if self.frozen else None

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
        feature_cache: FeatureCache | None = None,
        bins: int = 0,
        support: tuple[float, float] = (-1.0, 1.0),
        dist_rank: int = 64,
        dist_head: str = "bilinear",
    ) -> "QVModel":
        """Build fresh heads sized from the trunk's config (read once, no guessing); ``bins`` > 0 builds
        distributional heads (:class:`qvlm.heads.DistHeads`) on ``support``."""
        config = HeadsConfig(
            hidden_size=hidden_size_of(trunk.config),
            vocab_size=trunk.get_output_embeddings().weight.shape[0],
            num_q_heads=num_q_heads,
            head_hidden=head_hidden,
            with_q=with_q,
            base_model=base_model,
            q_head=q_head,
            bins=bins,
            support_low=support[0],
            support_high=support[1],
            dist_rank=dist_rank,
            dist_head=dist_head,
        )
        return cls(trunk, build_heads(config), trunk_config, feature_cache)

    def _attach_unembedding(self) -> None:
        """Tied Q heads and distributional heads read the trunk's output embedding: its current tensor,
        never a copy."""
        if self.heads.config.q_head == "tied" or self.heads.config.bins:
            self.heads.attach_unembedding(self.trunk.get_output_embeddings().weight)

    def _apply(self, fn, recurse: bool = True):
        # .to(), .cuda(), .half(), ... move the trunk and the heads as one; the tied heads' view of
        # the output embedding is dropped first (not cast as a second copy) and re-read after
        self.heads.attach_unembedding(None)
        super()._apply(fn, recurse)
        self._attach_unembedding()
        return self

    @property
    def device(self) -> torch.device:
        return self.trunk.get_output_embeddings().weight.device

    @property
    def frozen(self) -> bool:
        return self.trunk_config.mode == "frozen"

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The trunk's LM head on hidden states: (..., H) -> (..., vocab). Not on a sharded trunk
        (``--fsdp``) with gradients: take the logits from :meth:`features_and_logits` there."""
        return trunk_logits(self.trunk, h)

    def shard(self) -> None:
        """Shard the trunk's weights over the processes with FSDP2 (``--fsdp``; a full trunk only, which
        :class:`~qvlm.configs.TrunkConfig` checks).
        The heads stay whole on every process (their gradients are summed by
        :func:`qvlm.train.distributed.all_reduce_grads`)."""

        if self.heads.config.q_head == "tied":
            raise QVLMError("--fsdp does not support --q-head tied (it reads the sharded LM head); use --q-head mlp")
        fully_shard_trunk(self.trunk)

    def features(self, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h_states, h_next)``, each (B, T, H): hidden states at the positions of ``s_t``, ``s_{t+1}``.

        With a frozen trunk they come from the per-sample cache when every sample of the batch is
        cached; otherwise the trunk runs (without gradient when frozen) and fills the cache.
        """
        batch = batch.to(self.device)
        T = batch.state_positions.shape[1]
        cached = self.feature_cache.lookup(batch) if self.feature_cache is not None else None  # (B, T+1, H)
        if cached is not None:  # features kept in another dtype (the model was cast since) follow the trunk
            cached = cached.to(self.trunk.get_output_embeddings().weight.dtype)
            return cached[:, :T], cached[:, 1:]
        feats, _ = self._trunk_features(batch, logits=False)  # (B, T+1, H)
        if self.feature_cache is not None:
            self.feature_cache.store(batch, feats)
        return feats[:, :T], feats[:, 1:]

    def features_and_logits(self, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`features` and the LM logits at the states ``s_t`` ``(B, T, V)``, from one pass of
        a trunk that trains (no cache): what a sharded trunk needs (:func:`qvlm.trunk.trunk_forward`)."""
        batch = batch.to(self.device)
        T = batch.state_positions.shape[1]
        feats, logits = self._trunk_features(batch, logits=True)
        return feats[:, :T], feats[:, 1:], logits

    def _trunk_features(self, batch: TokenBatch, logits: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        # the positions of s_1..s_{T+1}: state_positions then the next state after the last real step
        # (single-turn: one past it; a multi-turn episode: the sequence's last position)
        T = batch.state_positions.shape[1]
        positions = value_positions(batch.state_positions, batch.next_positions, batch.response_mask)  # (B, T+1)
        with torch.set_grad_enabled(not self.frozen and torch.is_grad_enabled()):
            h, lm_logits, _ = trunk_forward(
                self.trunk, batch.input_ids, batch.attention_mask, logits_at=positions[:, :T] if logits else None
            )  # (B, L, H), (B, T, V)
        return gather_positions(h, positions), lm_logits  # (B, T+1, H)

    def prime_features(
        self,
        tokenizer,
        samples,
        hidden: list[torch.Tensor],
        token_ids: list[list[int]],
        max_length: int,
        chat: bool | None = None,
    ) -> int:
        """Fill the frozen-trunk feature cache with features kept while decoding (a thin wrapper of
        :meth:`FeatureCache.prime`); returns how many samples were primed."""
        if self.feature_cache is None:
            raise QVLMError("only a frozen trunk caches features; this model trains its trunk")
        return self.feature_cache.prime(tokenizer, samples, hidden, token_ids, max_length, chat)

    def clear_cache(self) -> None:
        if self.feature_cache is not None:
            self.feature_cache.clear()

    def trainable_trunk_state(self) -> dict[str, torch.Tensor]:
        """The trunk parameters that train (LoRA adapters or all), for checkpoints. A sharded trunk's
        are gathered collectively: every process calls it, rank 0 gets the full tensors, the others
        an empty dict."""

        return trainable_state(self.trunk)

    def load_trunk_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = {n for n, p in self.trunk.named_parameters() if p.requires_grad} - set(state)
        if missing:
            raise QVLMError(f"checkpoint lacks {len(missing)} trunk tensors (e.g. {sorted(missing)[0]})")
        try:
            if sharded(self.trunk):
                load_full_state_dict(self.trunk, state)  # each process keeps its shard
                return
            self.trunk.load_state_dict(state, strict=False)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[-1].strip()[:200]
            raise QVLMError(
                f"saved trunk tensors do not fit this model ({first}); use the --model and --trunk they were trained with"
            ) from None


def load_qv_model(trunk: PreTrainedModel, heads_dir: str | Path) -> QVModel:
    """Attach heads saved in ``heads_dir`` to ``trunk``; restore a trained trunk (LoRA or full)
    from ``trunk.safetensors`` when the run trained one. Checks that the shapes match."""

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
        try:
            trunk_cfg = TrunkConfig(**json.loads(read_text(info_file)).get("trunk", {}))
        except (TypeError, ValueError, AttributeError) as err:
            if isinstance(err, QVLMError) and str(err).startswith(str(info_file)):
                raise
            raise QVLMError(f"{info_file}: not a valid training record ({err}); restore it or train again") from None
    model = QVModel(trunk, heads, trunk_cfg)
    if (heads_dir / "trunk.safetensors").is_file():
        model.load_trunk_state(load_tensors(heads_dir / "trunk.safetensors"))
    return model.eval().requires_grad_(False)
