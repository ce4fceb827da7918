"""Decoding: plain, value-guided, blockwise and best-of-N, on one KV-cached decoding step.

- :mod:`qvlm.decoding.sampling`: the batched KV-cached loop (:func:`generate`) and its helpers.
- :mod:`qvlm.decoding.guidance`: ``logits + beta * (Q - V)``, and the ``LogitsProcessor`` for ``model.generate``.
- :mod:`qvlm.decoding.blockwise`: V-guided blockwise decoding (best of K blocks by V).
- :mod:`qvlm.decoding.best_of_n`: best-of-N selection and its KL.
"""

from qvlm.configs import DecodeConfig
from qvlm.decoding.best_of_n import best_of_n_kl_bound
from qvlm.decoding.blockwise import blockwise_generate
from qvlm.decoding.guidance import ValueGuidanceLogitsProcessor, centre_on_candidates, guide, guided_scores
from qvlm.decoding.sampling import (
    GenerationResult,
    batch_inputs,
    cut_at_eos,
    encode_prompts,
    generate,
    left_pad,
    warpers,
)

__all__ = [
    "DecodeConfig",
    "GenerationResult",
    "generate",
    "left_pad",
    "cut_at_eos",
    "warpers",
    "encode_prompts",
    "batch_inputs",
    "guide",
    "guided_scores",
    "centre_on_candidates",
    "ValueGuidanceLogitsProcessor",
    "blockwise_generate",
    "best_of_n_kl_bound",
]
