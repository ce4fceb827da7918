"""V-guided blockwise decoding (controlled decoding, Mudgal et al. 2024, "CD-Q blockwise"):
sample K candidate blocks of a few tokens from the base model, keep the one whose end state has
the highest ``V``, repeat.

All K candidates of all prompts decode together in one batch that shares one KV cache: each
prompt is prefilled once, and at each block boundary the cache rows of the winners are selected
and repeated K times (:meth:`qvlm.decoding.step.DecodeStep.select`), so no prefix is ever recomputed. The forward pass that scores a
candidate's end state is the one that computes the next step's logits anyway: V costs one small
head per token.
"""

from __future__ import annotations

import torch

from qvlm.configs import DecodeConfig
from qvlm.decoding.best_of_n import best_of_n_kl_estimate
from qvlm.decoding.fast import FastDecodeStep
from qvlm.decoding.sampling import GenerationResult, batch_inputs, cut_at_eos, encode_prompts, warpers
from qvlm.decoding.step import DecodeStep
from qvlm.errors import QVLMError
from qvlm.heads import QVHeads
from qvlm.progress import progress as progress_bar

__all__ = ["blockwise_generate"]


@torch.no_grad()
def blockwise_generate(
    model,
    tokenizer,
    prompts: list[str],
    heads: QVHeads,
    candidates: int = 4,
    block_size: int = 4,
    cfg: DecodeConfig | None = None,
    progress: bool = False,
) -> GenerationResult:
    """Decode each prompt block by block, keeping the best of ``candidates`` blocks by ``V``.

    ``result.kl`` holds, per response, the sum over its blocks of the best-of-K KL estimated from
    that block's K candidate values (:func:`qvlm.decoding.best_of_n.best_of_n_kl_estimate`: the
    bound ``log K - (K-1)/K`` when the K values differ, less where they tie, 0 once the response has
    ended and its K copies are equal); its kind is ``"estimate"``. ``result.base_logprobs`` holds
    the base log-probabilities.
    """
    cfg = cfg or DecodeConfig()
    if candidates < 1 or block_size < 1:
        raise QVLMError("candidates and block_size must be >= 1")
    encoded = encode_prompts(tokenizer, prompts, cfg, model)
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    result = GenerationResult(encoded, [], [], [])

    per_batch = max(1, cfg.batch_size // candidates)
    for start in progress_bar(range(0, len(encoded), per_batch), desc="blockwise", enabled=progress, unit="batch"):
        _blockwise_batch(
            model, tokenizer, encoded[start : start + per_batch], heads, candidates, block_size, cfg, result
        )
    return result


def _blockwise_batch(model, tokenizer, prompt_ids, heads, K, block_size, cfg, result) -> None:
    pad_id, eos, ids, mask = batch_inputs(model, tokenizer, prompt_ids)  # (B, L): each prompt is prefilled once
    device, B = ids.device, ids.shape[0]
    warp = warpers(cfg)
    if cfg.fast:
        decoder = FastDecodeStep(model, max_new_tokens=cfg.max_new_tokens, compile=cfg.fast_compile)
    else:
        decoder = DecodeStep(model)
    unfinished = torch.ones(B * K, dtype=torch.bool, device=device)
    live = unfinished  # candidates whose last fed token is a real, non-EOS token
    generated = ids.repeat_interleave(K, 0)  # (B*K, L)
    base_lp = torch.zeros((B * K, 0), device=device)
    score_h = None  # (B*K, H): hidden state of each candidate's last non-EOS token
    winners = None  # (B,): set once the winners are known
    block_kl = [0.0] * B  # per prompt: the summed best-of-K KL estimates of its blocks
    next_tokens = None  # (B*K,): the tokens written last
    for step in range(cfg.max_new_tokens):
        # the prompt's K candidates share its prefilled cache rows
        out = (
            decoder.prefill(ids, mask, repeat=K, logits=False) if step == 0 else decoder.step(next_tokens, logits=False)
        )
        h_last = out.hidden  # (B*K, H)
        score_h = h_last if score_h is None else torch.where(live[:, None], h_last, score_h)
        if step > 0 and step % block_size == 0:
            # keep the best candidate of each prompt by V of its end state; repeat it K times
            v = heads.values(score_h).view(B, K)  # (B, K)
            _add_block_kl(block_kl, v, K)
            keep = (torch.arange(B, device=device) * K + v.argmax(1)).repeat_interleave(K)  # (B*K,)
            decoder.select(keep)
            generated, unfinished = generated[keep], unfinished[keep]
            base_lp, h_last, score_h = base_lp[keep], h_last[keep], score_h[keep]
            if not unfinished.any():
                winners = torch.arange(B, device=device) * K  # all K rows of a prompt are its winner now
                break
        logits = decoder.logits(h_last)  # (B*K, V)
        scores = warp(generated, logits)
        next_tokens = torch.multinomial(torch.softmax(scores, -1), 1).squeeze(1) if cfg.do_sample else scores.argmax(-1)
        lp = torch.log_softmax(logits, -1).gather(-1, next_tokens[:, None])
        next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad_id))
        base_lp = torch.cat([base_lp, lp], 1)
        # a candidate's state is scored at its last real token: not EOS, not padding
        live = unfinished & ~torch.isin(next_tokens, eos)
        unfinished = live
        generated = torch.cat([generated, next_tokens[:, None]], 1)
        if not unfinished.any() and (step + 1) % block_size == 0:
            break
    if winners is None and K > 1:
        # the final (possibly partial) block: choose among candidates as at every boundary
        score_h = torch.where(live[:, None], decoder.step(next_tokens, logits=False).hidden, score_h)
        v = heads.values(score_h).view(B, K)  # (B, K)
        _add_block_kl(block_kl, v, K)
        winners = torch.arange(B, device=device) * K + v.argmax(1)
    elif winners is None:
        winners = torch.arange(B, device=device) * K
    new = generated[winners, ids.shape[1] :].tolist()
    lps = base_lp[winners].tolist()
    eos_ids = set(eos.tolist())
    for b in range(B):
        out, done = cut_at_eos(new[b], eos_ids)
        result.response_ids.append(out)
        result.finished.append(done)
        result.texts.append(tokenizer.decode(out[:-1] if done else out, skip_special_tokens=True))
        result.kl.append(block_kl[b])
        result.base_logprobs.append(lps[b][: len(out)])


def _add_block_kl(block_kl: list[float], v, K: int) -> None:
    """Add each prompt's best-of-K KL estimate for one block, from its K candidates' values ``v (B, K)``.

    Finished candidates are copies of one winner, so their values tie and the block adds 0. Equal
    candidates can differ in the last bits of V (batched matmuls), so values within 1e-4 of each
    other (relative to the largest, at least 1) count as tied."""
    for b, values in enumerate(v.float().tolist()):
        tol = 1e-4 * max(1.0, max(abs(x) for x in values))
        block_kl[b] += best_of_n_kl_estimate(values, K, tol=tol)
