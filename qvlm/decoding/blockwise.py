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
from qvlm.decoding.best_of_n import best_of_n_kl_bound
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

    ``result.kl`` holds, per response, the number of blocks times the best-of-K bound (the exact
    KL of the selection has no closed form); ``result.base_logprobs`` the base log-probabilities.
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
    decoder = DecodeStep(model)
    unfinished = torch.ones(B * K, dtype=torch.bool, device=device)
    live = unfinished  # candidates whose last fed token is a real, non-EOS token
    generated = ids.repeat_interleave(K, 0)  # (B*K, L)
    base_lp = torch.zeros((B * K, 0), device=device)
    score_h = None  # (B*K, H): hidden state of each candidate's last non-EOS token
    winners = None  # (B,): set once the winners are known
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
        winners = torch.arange(B, device=device) * K + heads.values(score_h).view(B, K).argmax(1)
    elif winners is None:
        winners = torch.arange(B, device=device) * K
    new = generated[winners, ids.shape[1] :].tolist()
    lps = base_lp[winners].tolist()
    eos_ids = set(eos.tolist())
    kl_per_block = best_of_n_kl_bound(K)
    for b in range(B):
        out, done = cut_at_eos(new[b], eos_ids)
        result.response_ids.append(out)
        result.finished.append(done)
        result.texts.append(tokenizer.decode(out[:-1] if done else out, skip_special_tokens=True))
        result.kl.append(kl_per_block * -(-len(out) // block_size))
        result.base_logprobs.append(lps[b][: len(out)])
