"""Guidance: the scores ``logits + beta * (Q - V)`` (DESIGN.md), on the whole vocabulary or on the
base model's top-k candidates, and the same inside ``model.generate`` as a ``LogitsProcessor``.

``log pi_ref`` is ``logits`` minus a constant per state, which softmax ignores: with ``beta = 0``
the scores are the raw logits bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import LogitsProcessor, PreTrainedModel

from qvlm.errors import QVLMError
from qvlm.heads import QVHeads

__all__ = ["centre_on_candidates", "candidate_mass", "guide", "guided_scores", "ValueGuidanceLogitsProcessor"]


def centre_on_candidates(logits: torch.Tensor, idx: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """Advantages of candidate tokens ``idx`` (B, k) minus their mean under the base model's
    probabilities renormalised over the candidates: (B, k) -> (B, k).

    Guidance that touches only candidates treats every other token as having advantage 0, i.e.
    value ``V(s)``. Centring sets the candidates' base-weighted mean advantage to zero (that mean
    is the heads' own estimate of ``V(s)`` over the candidates), so an offset between the Q and
    V heads (Q running below or above V everywhere) does not shift probability mass wholesale
    between the candidates and the other tokens. It does not keep the candidates' total mass
    fixed: the softmax of the guided scores still moves mass between the candidates and the rest.
    Their unnormalised weight becomes ``sum_c pi_ref(c) exp(beta A_c)``, which by Jensen's
    inequality (zero mean under the renormalised base weights) is at least ``sum_c pi_ref(c)``, so
    centred guidance can only draw mass onto the candidates (measured at beta 16: the
    top-20 mass rose from 0.79 to 0.90).
    Worked example: logits (0, log 3) over two candidates give weights (1/4, 3/4); advantages
    (1, -1) have mean -1/2 and become (1.5, -0.5).
    """
    weights = torch.softmax(logits.gather(-1, idx), dim=-1)  # (B, k)
    return adv - (weights * adv).sum(-1, keepdim=True)


def candidate_mass(logits: torch.Tensor, probs: torch.Tensor, k: int) -> torch.Tensor:
    """Probability mass that ``probs`` (B, V) puts on the ``k`` tokens with the largest ``logits``
    (B, V): (B,). Logits (3, 2, 1, 0), probs (0.1, 0.2, 0.3, 0.4), k = 2 -> 0.3."""
    return probs.gather(-1, torch.topk(logits, k, dim=-1).indices).sum(-1)


def _guide_candidates(
    logits: torch.Tensor, idx: torch.Tensor, adv: torch.Tensor, beta: float, centre: bool = True
) -> torch.Tensor:
    """Add ``beta`` times the (centred) advantages ``adv`` (B, k) of candidates ``idx`` to ``logits``."""
    adv = adv.to(logits.dtype)
    return logits.scatter_add(-1, idx, beta * (centre_on_candidates(logits, idx, adv) if centre else adv))


def guide(logits: torch.Tensor, advantages: torch.Tensor, beta: float, top_k: int = 0) -> torch.Tensor:
    """Guided scores ``logits + beta * (Q - V)``; with ``top_k``, only on the base model's ``top_k``
    likeliest tokens (FUDGE's candidate set: heads trained on the data's actions say little about
    tokens the base model would almost never write), with the candidates' advantages centred
    (:func:`centre_on_candidates`). Shape: (B, V) -> (B, V).
    """
    adv = advantages[..., : logits.shape[-1]].to(logits.dtype)
    if top_k and top_k < logits.shape[-1]:
        idx = torch.topk(logits, top_k, dim=-1).indices  # (B, k)
        return _guide_candidates(logits, idx, adv.gather(-1, idx), beta)
    return logits + beta * adv


def guided_scores(
    logits: torch.Tensor, heads: QVHeads, h: torch.Tensor, beta: float, top_k: int = 0, centre: bool = True
) -> torch.Tensor:
    """``logits + beta * (Q - V)`` from the heads on hidden states ``h`` (B, H): (B, V) -> (B, V).

    With ``top_k``, Q is computed for the base model's ``top_k`` likeliest tokens only (the others
    keep their logits), so guidance costs ``top_k`` dot products instead of a vocabulary-sized
    matmul per head; the candidates' advantages are centred (:func:`centre_on_candidates`) unless
    ``centre`` is False (then the V head's ``V(s)`` is their baseline: the ablation).
    """
    if beta == 0:
        return logits
    if top_k and top_k < logits.shape[-1]:
        idx = torch.topk(logits, top_k, dim=-1).indices  # (B, k)
        return _guide_candidates(logits, idx, heads.advantages(h, idx), beta, centre)
    return guide(logits, heads.advantages(h), beta)


class ValueGuidanceLogitsProcessor(LogitsProcessor):
    """Adds ``beta * (Q(s, .) - V(s))`` to the scores inside ``model.generate``.

    Use it through :meth:`attach`, which hooks the decoder so that each step's last hidden state
    is captured during the forward pass ``generate`` already makes::

        proc = ValueGuidanceLogitsProcessor(heads, beta=2.0)
        with proc.attach(model):
            out = model.generate(ids, logits_processor=LogitsProcessorList([proc]), do_sample=True)

    With ``guidance_top_k``, only the base model's ``guidance_top_k`` likeliest tokens are guided,
    their advantages centred on their base-weighted mean (:func:`centre_on_candidates`: no wholesale
    shift from a Q-vs-V offset, though the softmax still moves mass between them and the rest)
    unless ``centre_candidates`` is False (the ablation: ``V(s)`` is their baseline), as
    ``DecodeConfig.centre_candidates`` does for :func:`qvlm.decoding.generate`.
    """

    def __init__(self, heads: QVHeads, beta: float, guidance_top_k: int = 0, centre_candidates: bool = True):
        self.heads = heads
        self.beta = beta
        self.guidance_top_k = guidance_top_k
        self.centre_candidates = centre_candidates
        self._hidden: torch.Tensor | None = None

    @contextmanager
    def attach(self, model: PreTrainedModel):
        def hook(_module, _args, output):
            h = output[0] if isinstance(output, tuple) else output.last_hidden_state
            self._hidden = h[:, -1].detach()  # (B, H)

        handle = model.base_model.register_forward_hook(hook)
        try:
            yield self
        finally:
            handle.remove()
            self._hidden = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.beta == 0:
            return scores
        if self._hidden is None:
            raise QVLMError("ValueGuidanceLogitsProcessor used outside `with proc.attach(model):`")
        return guided_scores(scores, self.heads, self._hidden, self.beta, self.guidance_top_k, self.centre_candidates)
