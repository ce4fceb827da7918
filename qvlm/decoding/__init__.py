"""Decoding: plain, value-guided, blockwise and best-of-N, on one KV-cached decoding step.

- :mod:`qvlm.decoding.step`: prefill and one KV-cached step (:class:`DecodeStep`), the only model call.
- :mod:`qvlm.decoding.fast`: the same interface on a static KV cache and a hand-written Llama step
  (:class:`FastDecodeStep`, ``DecodeConfig.fast``), with :class:`FastHeads` for guidance.
- :mod:`qvlm.decoding.sampling`: the batched loop (:func:`sample_rollout` -> :class:`qvlm.rollout.Rollout`,
  :func:`generate` -> :class:`GenerationResult`) and its helpers.
- :mod:`qvlm.decoding.guidance`: ``logits + beta * (Q - V)``, and the ``LogitsProcessor`` for ``model.generate``.
- :mod:`qvlm.decoding.blockwise`: V-guided blockwise decoding (best of K blocks by V).
- :mod:`qvlm.decoding.best_of_n`: best-of-N selection and its KL.
"""

from qvlm.configs import DecodeConfig
from qvlm.decoding.best_of_n import (
    best_of_n_kl_bound,
    best_of_n_kl_estimate,
    best_of_n_kl_exact,
    best_of_n_policy,
    select_best_of_n,
)
from qvlm.decoding.blockwise import blockwise_generate
from qvlm.decoding.fast import FastDecodeStep, FastHeads
from qvlm.decoding.guidance import (
    ValueGuidanceLogitsProcessor,
    candidate_mass,
    centre_on_candidates,
    guide,
    guided_scores,
)
from qvlm.decoding.sampling import (
    GenerationResult,
    batch_inputs,
    cut_at_eos,
    encode_prompts,
    generate,
    left_pad,
    sample_rollout,
    warpers,
)
from qvlm.decoding.step import DecodeStep, StepOutput

__all__ = [
    "DecodeConfig",
    "GenerationResult",
    "generate",
    "sample_rollout",
    "DecodeStep",
    "StepOutput",
    "FastDecodeStep",
    "FastHeads",
    "left_pad",
    "cut_at_eos",
    "warpers",
    "encode_prompts",
    "batch_inputs",
    "guide",
    "guided_scores",
    "centre_on_candidates",
    "candidate_mass",
    "ValueGuidanceLogitsProcessor",
    "blockwise_generate",
    "best_of_n_kl_bound",
    "best_of_n_kl_estimate",
    "best_of_n_kl_exact",
    "best_of_n_policy",
    "select_best_of_n",
]
