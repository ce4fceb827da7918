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

__all__ = ["centre_on_candidates", "guide", "guided_scores", "ValueGuidanceLogitsProcessor"]


def centre_on_candidates(logits: torch.Tensor, idx: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """Advantages of candidate tokens ``idx`` (B, k) minus their mean under the base model's
    probabilities renormalised over the candidates: (B, k) -> (B, k).

    Guidance that touches only candidates treats every other token as having advantage 0, i.e.
    value ``V(s)``. That mean is the heads' own estimate of ``V(s)`` over the candidates, so a Q
    head that runs below or above the V head moves no probability mass to or from the tokens
    outside; guidance only reorders the candidates. Worked example: logits (0, log 3) over two
    candidates give weights (1/4, 3/4); advantages (1, -1) have mean -1/2 and become (1.5, -0.5).
    """
    weights = torch.softmax(logits.gather(-1, idx), dim=-1)  # (B, k)
    return adv - (weights * adv).sum(-1, keepdim=True)


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
    """

    def __init__(self, heads: QVHeads, beta: float, guidance_top_k: int = 0):
        self.heads = heads
        self.beta = beta
        self.guidance_top_k = guidance_top_k
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
        return guided_scores(scores, self.heads, self._hidden, self.beta, self.guidance_top_k)
