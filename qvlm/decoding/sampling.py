"""Value-guided decoding: sample from ``log pi_ref + beta * (Q - V)`` (DESIGN.md).

Two ways in:

- :func:`generate`: a KV-cached loop, batched with left padding, each row stopping at its own
  EOS. It runs the decoder once per step, reads the last hidden state for both the LM head and the
  Q/V heads, and can record exact per-token KL to the base model.
- :class:`ValueGuidanceLogitsProcessor`: the same guidance inside ``model.generate``. A forward
  hook on the decoder captures the last hidden state of each step, so the heads cost no second
  trunk pass.

The guided scores are ``logits + beta * (Q - V)``: ``log pi_ref`` is ``logits`` minus a constant per
state, which softmax ignores. So with ``beta = 0`` the scores are the raw logits bit for bit, and
both paths reproduce Hugging Face ``generate`` token for token, greedy or seeded sampling (the
warpers are transformers' own, applied in its order: temperature, top-k, top-p).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qvlm.configs import DecodeConfig
from qvlm.decoding.guidance import guided_scores
from qvlm.errors import QVLMError
from qvlm.heads import QVHeads
from qvlm.mdp import encode_prompt
from qvlm.progress import progress as progress_bar
from qvlm.trunk import trunk_hidden_states

__all__ = [
    "DecodeConfig",
    "GenerationResult",
    "generate",
    "left_pad",
    "cut_at_eos",
    "warpers",
    "encode_prompts",
    "batch_inputs",
]


@dataclass
class GenerationResult:
    """Per response (prompt-major: a prompt's ``num_return_sequences`` rows are adjacent): prompt
    and response token ids (EOS included when written), text, and step statistics."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    texts: list[str]
    finished: list[bool]
    kl: list[float] = field(default_factory=list)  # sum over steps of KL(sampling dist || base)
    base_logprobs: list[list[float]] = field(default_factory=list)  # log pi_ref(y_t | s_t)
    # with return_hidden: per response, the trunk's last hidden states of s_1 .. s_{T+1}, (T + 1, H),
    # the features a frozen-trunk learner trains on (QVModel.prime_features)
    hidden: list[torch.Tensor] = field(default_factory=list)


def warpers(cfg: DecodeConfig) -> LogitsProcessorList:
    """transformers' sampling warpers for ``cfg``, in the order ``generate`` applies them."""
    out = LogitsProcessorList()
    if not cfg.do_sample:
        return out
    if cfg.temperature != 1.0:
        out.append(TemperatureLogitsWarper(cfg.temperature))
    if cfg.top_k:
        out.append(TopKLogitsWarper(top_k=cfg.top_k, min_tokens_to_keep=1))
    if cfg.top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=cfg.top_p, min_tokens_to_keep=1))
    return out


def cut_at_eos(ids: list[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    """A row's tokens up to and including its first EOS, and whether it had one."""
    for i, tok in enumerate(ids):
        if tok in eos_ids:
            return ids[: i + 1], True
    return ids, False


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists: -> ``input_ids, attention_mask`` (B, L)."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, L - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[b, L - len(s) :] = 1
    return ids, mask


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise QVLMError("the model has no EOS token id; set model.generation_config.eos_token_id")
    return torch.tensor(eos if isinstance(eos, list) else [eos])


def encode_prompts(tokenizer, prompts: list[str] | list[list[int]], cfg: DecodeConfig, model=None) -> list[list[int]]:
    """Prompts (strings, chat-templated when the tokenizer has a template, or token ids) -> token
    ids, checked: none empty, none that leaves no room for ``max_new_tokens`` in the context."""
    if not prompts:
        raise QVLMError("no prompts to decode")
    encoded = [p if isinstance(p, list) else encode_prompt(tokenizer, p, cfg.chat) for p in prompts]
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    for i, p in enumerate(encoded):
        if not p:
            raise QVLMError(f"prompt {i} is empty after tokenisation")
        if limit and len(p) + cfg.max_new_tokens > limit:
            raise QVLMError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={cfg.max_new_tokens} it exceeds "
                f"the model's context of {limit}; shorten the prompt or lower max_new_tokens"
            )
    return encoded


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str] | list[list[int]],
    heads: QVHeads | None = None,
    cfg: DecodeConfig | None = None,
    track_kl: bool = False,
    progress: bool = False,
    return_hidden: bool = False,
) -> GenerationResult:
    """Decode ``cfg.num_return_sequences`` responses for each of ``prompts`` (strings, encoded with
    the chat template, or token ids).

    Each prompt is prefilled once and its KV cache shared by its responses (Hugging Face
    ``generate`` prefills every copy). ``return_hidden`` also returns, per response, the hidden
    states of its states ``s_1 .. s_{T+1}`` (one extra decoder step for the last), so a frozen-trunk
    learner needs no second pass over the data.
    """
    cfg = cfg or DecodeConfig()
    if cfg.beta != 0 and heads is None:
        raise QVLMError(f"beta is {cfg.beta} but no heads were given; pass trained heads or beta=0")
    encoded = encode_prompts(tokenizer, prompts, cfg, model)
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    n = cfg.num_return_sequences
    result = GenerationResult([p for p in encoded for _ in range(n)], [], [], [])

    per_batch = max(1, cfg.batch_size // n)  # batch_size counts responses decoded together
    starts = range(0, len(encoded), per_batch)
    for start in progress_bar(starts, desc="decode", enabled=progress, unit="batch"):
        _decode_batch(model, tokenizer, encoded[start : start + per_batch], heads, cfg, track_kl, return_hidden, result)
    return result


def batch_inputs(model, tokenizer, prompt_ids: list[list[int]]):
    """One decoding batch's set-up: ``pad_id``, EOS ids and the left-padded prompts, on the model's device."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids, attention_mask = left_pad(prompt_ids, pad_id)
    return pad_id, _eos_ids(model, tokenizer).to(device), input_ids.to(device), attention_mask.to(device)


def _decode_batch(model, tokenizer, prompt_ids, heads, cfg, track_kl, return_hidden, result) -> None:
    pad_id, eos, input_ids, attention_mask = batch_inputs(model, tokenizer, prompt_ids)
    device = input_ids.device
    n = cfg.num_return_sequences
    prompt_len = input_ids.shape[1]
    B = input_ids.shape[0] * n
    warp = warpers(cfg)
    cache = DynamicCache()
    lm_head = model.get_output_embeddings()
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    generated = input_ids.repeat_interleave(n, 0)
    step_input = input_ids
    kl = torch.zeros(B, device=device)
    base_lp: list[torch.Tensor] = []
    states: list[torch.Tensor] = []  # (B, H) per step, with return_hidden
    for step in range(cfg.max_new_tokens + 1):
        # after the last token, one more decoder step only to read the features of s_{T+1}
        last = step == cfg.max_new_tokens or not unfinished.any()
        if last and not return_hidden:
            break
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -step_input.shape[1] :]
        h, _ = trunk_hidden_states(
            model,
            step_input,
            attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        h_last = h[:, -1]  # (B or B / n, H)
        if step == 0 and n > 1:  # one prefill per prompt; its responses share the cache rows
            cache.batch_repeat_interleave(n)
            attention_mask = attention_mask.repeat_interleave(n, 0)
            h_last = h_last.repeat_interleave(n, 0)
        if return_hidden:
            states.append(h_last)
        if last:
            break
        logits = lm_head(h_last[:, None])[:, -1].to(torch.float32)  # (B, V)
        scores = logits
        if cfg.beta != 0:
            scores = guided_scores(logits, heads, h_last, cfg.beta, cfg.guidance_top_k, cfg.centre_candidates)
        scores = warp(generated, scores)
        if cfg.do_sample:
            next_tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            next_tokens = torch.argmax(scores, dim=-1)
        if track_kl:
            ref_logp = torch.log_softmax(logits, dim=-1)
            if cfg.do_sample:
                logp = torch.log_softmax(scores, dim=-1)
                step_kl = (logp.exp() * (logp - ref_logp)).nan_to_num(0.0).sum(-1)  # 0 log 0 = 0
            else:  # greedy is a point mass on the argmax: KL = -log pi_ref(argmax)
                step_kl = -ref_logp.gather(-1, next_tokens[:, None]).squeeze(-1)
            kl += step_kl * unfinished
            base_lp.append(ref_logp.gather(-1, next_tokens[:, None]).squeeze(-1))
        next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad_id))
        generated = torch.cat([generated, next_tokens[:, None]], dim=1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((B, 1))], dim=1)
        unfinished = unfinished & ~torch.isin(next_tokens, eos)
        step_input = next_tokens[:, None]
    new = generated[:, prompt_len:].tolist()
    eos_ids = set(eos.tolist())
    hidden = torch.stack(states, 1) if return_hidden else None  # (B, steps + 1, H)
    for b in range(B):
        ids, done = cut_at_eos(new[b], eos_ids)
        result.response_ids.append(ids)
        result.finished.append(done)
        text_ids = ids[:-1] if done else ids
        result.texts.append(tokenizer.decode(text_ids, skip_special_tokens=True))
        if track_kl:
            result.kl.append(float(kl[b]))
            result.base_logprobs.append([float(base_lp[t][b]) for t in range(len(ids))])
        if return_hidden:
            result.hidden.append(hidden[b, : len(ids) + 1].clone())
