"""The trunk: any Hugging Face causal LM, read as hidden states, and prepared for training.

- ``frozen``: no trunk parameter trains.
- ``lora``: low-rank adapters on the trunk's linear layers (peft) train.
- ``full``: the whole trunk trains.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from qvlm.configs import TRUNK_MODES, TrunkConfig
from qvlm.errors import QVLMError

__all__ = [
    "TRUNK_MODES",
    "TrunkConfig",
    "gather_positions",
    "trunk_forward",
    "trunk_hidden_states",
    "trunk_logits",
    "prepare_trunk",
    "sharded",
]


def gather_positions(h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Pick hidden states at per-row positions: h (B, L, H), positions (B, T) -> (B, T, H)."""
    return h.gather(1, positions[..., None].expand(-1, -1, h.shape[-1]))


def _forward(trunk: PreTrainedModel, input_ids, attention_mask, logits_at=None, **kwargs):
    out = trunk.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    h = out.last_hidden_state  # (B, L, H)
    if logits_at is None:
        return h, None, out
    at = gather_positions(h, logits_at) if isinstance(logits_at, torch.Tensor) else h[:, logits_at]  # (B, L', H)
    return h, trunk.get_output_embeddings()(at), out  # logits (B, L', V)


def _logits(trunk: PreTrainedModel, h: torch.Tensor) -> torch.Tensor:
    return trunk.get_output_embeddings()(h)


def sharded(trunk: PreTrainedModel) -> bool:
    """Whether :func:`qvlm.train.distributed.fully_shard_trunk` sharded ``trunk`` (FSDP2)."""
    return "qvlm_forward" in vars(trunk)


def trunk_forward(
    trunk: PreTrainedModel, input_ids, attention_mask, logits_at: slice | torch.Tensor | None = None, **kwargs
):
    """One pass of the trunk: hidden states, the LM logits at chosen positions, the base model's output.

    Returns the last hidden states (after the final norm) ``(B, L, H)``, the LM logits of positions
    ``logits_at`` (a slice, or per-row positions ``(B, L')``) ``(B, L', V)`` (None when not asked
    for) and the output of
    ``trunk.base_model`` (the decoder without the LM head, so no vocabulary-sized logits are
    computed for positions nobody reads).

    A trunk sharded with FSDP2 runs this as a forward of its root module (registered with
    ``register_fsdp_forward_method``), so its embeddings, final norm and LM head (tied or not) are
    gathered for the whole pass and their gradients reduced once: a loss that reads logits must
    take them from here, not from a second call of the LM head (issue 12).
    """
    if sharded(trunk):
        return trunk.qvlm_forward(input_ids, attention_mask, logits_at, **kwargs)
    return _forward(trunk, input_ids, attention_mask, logits_at, **kwargs)


def trunk_hidden_states(trunk: PreTrainedModel, input_ids, attention_mask, **kwargs):
    """Last hidden states of the trunk (after its final norm): (B, L) -> (B, L, H), and the output.

    The output is ``trunk.base_model``'s (:func:`trunk_forward` without logits)."""
    h, _, out = trunk_forward(trunk, input_ids, attention_mask, **kwargs)
    return h, out


def trunk_logits(trunk: PreTrainedModel, h: torch.Tensor) -> torch.Tensor:
    """The LM head on hidden states ``(..., H) -> (..., V)``, outside a pass of the trunk.

    On a sharded trunk this is a forward of its own (the head is gathered for it): fine without
    gradients (decoding); a loss must take its logits from :func:`trunk_forward` instead."""
    return trunk.qvlm_logits(h) if sharded(trunk) else _logits(trunk, h)


def lora_model(trunk: PreTrainedModel, cfg: TrunkConfig):
    """``trunk`` with LoRA adapters (peft) on every linear layer, as a ``PeftModel`` (what saving an
    adapter and disabling it need); only the adapters train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise QVLMError("--trunk lora needs the package peft: pip install peft (or use --trunk full)") from None
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(trunk, lora)


def prepare_trunk(trunk: PreTrainedModel, cfg: TrunkConfig) -> PreTrainedModel:
    """Freeze the trunk, unfreeze it, or wrap its linear layers in LoRA adapters (peft), per ``cfg.mode``."""
    if cfg.mode == "frozen":
        return trunk.requires_grad_(False)
    if cfg.mode == "full":
        return trunk.requires_grad_(True)
    # keep the Hugging Face model itself (now holding the adapter layers) as the trunk, so every
    # caller uses one interface (base_model, get_output_embeddings) whatever the mode
    return lora_model(trunk, cfg).base_model.model
