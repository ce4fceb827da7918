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

__all__ = ["TRUNK_MODES", "TrunkConfig", "gather_positions", "trunk_hidden_states", "prepare_trunk"]


def gather_positions(h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Pick hidden states at per-row positions: h (B, L, H), positions (B, T) -> (B, T, H)."""
    return h.gather(1, positions[..., None].expand(-1, -1, h.shape[-1]))


def trunk_hidden_states(trunk: PreTrainedModel, input_ids, attention_mask, **kwargs):
    """Last hidden states of the trunk (after its final norm): (B, L) -> (B, L, H), and the output.

    Runs ``trunk.base_model`` (the decoder without the LM head) so no vocabulary-sized logits are
    computed for positions nobody reads.
    """
    out = trunk.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return out.last_hidden_state, out


def prepare_trunk(trunk: PreTrainedModel, cfg: TrunkConfig) -> PreTrainedModel:
    """Freeze the trunk, unfreeze it, or wrap its linear layers in LoRA adapters (peft), per ``cfg.mode``."""
    if cfg.mode == "frozen":
        return trunk.requires_grad_(False)
    if cfg.mode == "full":
        return trunk.requires_grad_(True)
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise QVLMError("trunk mode 'lora' needs the package peft: pip install peft") from None
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    # keep the Hugging Face model itself (now holding the adapter layers) as the trunk, so every
    # caller uses one interface (base_model, get_output_embeddings) whatever the mode
    return get_peft_model(trunk, lora).base_model.model
