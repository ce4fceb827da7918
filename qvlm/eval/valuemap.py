"""Per-token value maps: for each response token, ``V(s_t)`` and the advantage
``Q(s_t, y_t) - V(s_t)`` of writing it, so a reader sees where the expected reward rose or fell."""

from __future__ import annotations

import torch

from qvlm.mdp import Sample, collate, encode_samples
from qvlm.model import QVModel

__all__ = ["value_maps"]


@torch.no_grad()
def value_maps(
    model: QVModel,
    tokenizer,
    prompts: list[str],
    responses: list[str],
    max_length: int = 512,
    batch_size: int = 8,
    finished: list[bool] | None = None,
) -> list[dict]:
    """One map per (prompt, response): ``{"prompt", "tokens", "values", "advantages"}``.

    ``values[t] = V(s_t)``; ``advantages[t] = Q(s_t, y_t) - V(s_t)`` with Q the min over the twin
    heads (a V-only prefix scorer shows ``V(s_{t+1}) - V(s_t)`` instead; distributional heads their
    means, the expected return).
    A finished response (the default) ends with its EOS step, shown as the token ``"<eos>"``; pass
    ``finished[i] = False`` for a response cut by the length limit (no EOS was written).
    """
    out = []
    finished = finished if finished is not None else [True] * len(prompts)
    for start in range(0, len(prompts), batch_size):
        sl = slice(start, start + batch_size)
        chunk = [Sample(p, r, 0.0, finished=f) for p, r, f in zip(prompts[sl], responses[sl], finished[sl])]
        batch = collate(encode_samples(chunk, tokenizer, max_length), tokenizer.pad_token_id)
        h, h_next = model.features(batch)  # (B, T, H)
        v = model.heads.values(h)  # (B, T)
        if model.heads.distributional:
            adv = model.heads.mean_q_taken(h, batch.actions) - v
        elif model.heads.has_q:
            q = torch.stack(model.heads.q_values(h)).min(0).values  # (B, T, V)
            adv = q.gather(-1, batch.actions[..., None]).squeeze(-1) - v
        else:
            adv = model.heads.values(h_next) * (1 - batch.done) - v
        for b, sample in enumerate(chunk):
            n = int(batch.response_mask[b].sum())
            ids = batch.actions[b, :n].tolist()
            tokens = ["<eos>" if i == tokenizer.eos_token_id else tokenizer.decode([i]) for i in ids]
            out.append(
                {
                    "prompt": sample.prompt,
                    "response": sample.response,
                    "tokens": tokens,
                    "values": v[b, :n].tolist(),
                    "advantages": adv[b, :n].tolist(),
                }
            )
    return out
