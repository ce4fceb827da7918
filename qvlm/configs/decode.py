"""Decoding settings: sampling, guidance by Q - V, and the fast path."""

from __future__ import annotations

import math
from dataclasses import dataclass

from qvlm.configs.base import Config, option

__all__ = ["DecodeConfig"]


@dataclass
class DecodeConfig(Config):
    """Decoding settings. ``beta = 0`` is plain sampling from the base model."""

    max_new_tokens: int = option(48, "response length limit (a cut response is truncated, not done)", ge=1)
    do_sample: bool = option(True, "sample (False: greedy, the argmax of the guided scores)")
    temperature: float = option(
        1.0, "softmax temperature applied after guidance (> 0)", gt=0, note="use do_sample=False for greedy"
    )
    top_k: int = option(0, "keep the k best tokens (0: off)", ge=0, note="0 turns it off")
    top_p: float = option(1.0, "nucleus sampling mass (1: off)", gt=0, le=1)
    beta: float = option(
        0.0,
        "guidance strength on Q - V (0: the base model; 1/alpha recovers the soft optimum)",
        check=math.isfinite,
        rule="a finite number (0: no guidance)",
    )
    guidance_top_k: int = option(
        0, "guide only the base model's k likeliest tokens, as FUDGE rescores its top k (0: all)", ge=0
    )
    centre_candidates: bool = option(
        True, "top-k guidance: centre the candidates' advantages on their base-weighted mean"
    )
    seed: int | None = option(None, "seeds torch's global RNG before decoding (as HF generate uses it)", type=int)
    num_return_sequences: int = option(
        1, "responses per prompt (each prompt is prefilled once and its KV cache shared)", ge=1
    )
    batch_size: int = option(16, "responses decoded together", ge=1)
    chat: bool | None = option(None, "wrap prompts in the chat template (None: when the tokenizer has one)", type=bool)
    # issue 12: a static KV cache and a hand-written Llama step (qvlm.decoding.fast); off until it
    # is the default everywhere, since its logits equal the standard step's to rounding, not bit for bit
    fast: bool = option(False, "fast decoding path: static KV cache, fused Llama step (Llama-style models only)")
    # measured on this CPU (SmolLM2-135M, batch 8, one thread): 55 s to compile, then 303 ms a step
    # against 70 ms eager (inductor's matmuls at 8 rows, attention over the whole capacity)
    fast_compile: bool = option(
        False, "with fast: torch.compile the one-token step (slower on CPU; compiles per shape)"
    )
