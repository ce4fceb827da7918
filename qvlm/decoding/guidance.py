"""Guidance: the scores ``logits + beta * (Q - V)`` (DESIGN.md), on the whole vocabulary or on the
base model's top-k candidates, and the same inside ``model.generate`` as a ``LogitsProcessor``.

``log pi_ref`` is ``logits`` minus a constant per state, which softmax ignores: with ``beta = 0``
the scores are the raw logits bit for bit.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from transformers import LogitsProcessor, PreTrainedModel

from qvlm.errors import QVLMError
from qvlm.heads import QVHeads

__all__ = [
    "centre_on_candidates",
    "soft_centre",
    "candidate_mass",
    "guide",
    "guided_scores",
    "ValueGuidanceLogitsProcessor",
]


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


def soft_centre(logits: torch.Tensor, idx: torch.Tensor, adv: torch.Tensor, alpha: float) -> torch.Tensor:
    """Advantages of candidate tokens ``idx`` (B, k) minus their soft value at temperature ``alpha``
    under the base model's probabilities renormalised over the candidates:
    ``A_c - alpha log sum_c pi~(c) exp(A_c / alpha)``: (B, k) -> (B, k).

    The baseline distributional heads guide with (issue 22): the guided policy's tilt
    ``pi_ref(c) exp(A_c / alpha)`` then leaves the candidates' total mass exactly as the base model has it
    (``sum_c pi~(c) exp(A'_c / alpha) = 1``) and moves mass only among them, as the soft optimum does when
    the other tokens' soft value equals the candidates'. As alpha grows it tends to the base-weighted mean
    (:func:`centre_on_candidates`). Worked example: logits (0, log 3) give weights (1/4, 3/4); advantages
    (1, -1) at alpha 1 have soft value log(e/4 + 3/(4e)) = -0.0455415 and become (1.0455415, -0.9544585).
    """
    # in float64: alpha logsumexp(...) multiplies the rounding of values near log 1 by alpha
    log_w = torch.log_softmax(logits.gather(-1, idx).double(), dim=-1)  # (B, k)
    a = adv.double()
    if math.isinf(alpha):
        return (a - (log_w.exp() * a).sum(-1, keepdim=True)).to(adv.dtype)
    return (a - alpha * torch.logsumexp(log_w + a / alpha, dim=-1, keepdim=True)).to(adv.dtype)


def candidate_mass(logits: torch.Tensor, probs: torch.Tensor, k: int) -> torch.Tensor:
    """Probability mass that ``probs`` (B, V) puts on the ``k`` tokens with the largest ``logits``
    (B, V): (B,). Logits (3, 2, 1, 0), probs (0.1, 0.2, 0.3, 0.4), k = 2 -> 0.3."""
    return probs.gather(-1, torch.topk(logits, k, dim=-1).indices).sum(-1)


def _guide_candidates(
    logits: torch.Tensor, idx: torch.Tensor, adv: torch.Tensor, beta: float, centre: bool = True, soft: bool = False
) -> torch.Tensor:
    """Add ``beta`` times the (centred) advantages ``adv`` (B, k) of candidates ``idx`` to ``logits``:
    centred on their base-weighted mean, or with ``soft`` on their soft value at ``alpha = 1 / beta``."""
    adv = adv.to(logits.dtype)
    if centre:
        adv = soft_centre(logits, idx, adv, 1.0 / beta) if soft else centre_on_candidates(logits, idx, adv)
    return logits.scatter_add(-1, idx, beta * adv)


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
    matmul per head; the candidates' advantages are centred (:func:`centre_on_candidates`; for
    distributional heads :func:`soft_centre` at ``alpha = 1 / beta``) unless ``centre`` is False (then
    the V head's ``V(s)`` is their baseline: the ablation). Distributional heads give
    ``Q*_alpha - V*_alpha`` at ``alpha = 1 / beta`` (issue 22).
    """
    if beta == 0:
        return logits
    if top_k and top_k < logits.shape[-1]:
        idx = torch.topk(logits, top_k, dim=-1).indices  # (B, k)
        adv = heads.advantages(h, idx, beta=beta)
        return _guide_candidates(logits, idx, adv, beta, centre, soft=heads.soft)
    return guide(logits, heads.advantages(h, beta=beta), beta)


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
