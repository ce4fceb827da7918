"""Decoding loops on :class:`qvlm.decoding.step.DecodeStep`: plain and value-guided sampling from
``log pi_ref + beta * (Q - V)`` (DESIGN.md).

Two ways in:

- :func:`sample_rollout`: a KV-cached loop, batched with left padding, each row stopping at its own
  EOS, into a :class:`qvlm.rollout.Rollout` (tensors on the device). It runs the decoder once per
  step, reads the last hidden state for both the LM head and the Q/V heads, and records what is
  asked for: the sampled tokens' log-probs under the sampling and the base distributions, ``V(s_t)``,
  exact per-token KL to the base model, hidden states. :func:`generate` returns the same as lists
  and texts (:class:`GenerationResult`).
- :class:`qvlm.decoding.guidance.ValueGuidanceLogitsProcessor`: the same guidance inside
  ``model.generate``.

The guided scores are ``logits + beta * (Q - V)``: ``log pi_ref`` is ``logits`` minus a constant per
state, which softmax ignores. So with ``beta = 0`` the scores are the raw logits bit for bit, and
both paths reproduce Hugging Face ``generate`` token for token, greedy or seeded sampling (the
warpers are transformers' own, applied in its order: temperature, top-k, top-p).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from transformers import (
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qvlm.configs import DecodeConfig
from qvlm.decoding.fast import FastDecodeStep, fast_heads
from qvlm.decoding.guidance import candidate_mass, guided_scores
from qvlm.decoding.step import DecodeStep
from qvlm.errors import QVLMError
from qvlm.heads import QVHeads
from qvlm.loading import context_length
from qvlm.mdp import check_fits, encode_prompt
from qvlm.progress import progress as progress_bar
from qvlm.rollout import Rollout

__all__ = [
    "DecodeConfig",
    "GenerationResult",
    "generate",
    "sample_rollout",
    "left_pad",
    "cut_at_eos",
    "warpers",
    "encode_prompts",
    "batch_inputs",
    "sample_rows",
    "sampling_seeds",
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
    # with track_kl and guidance_top_k: per response, the mean over its steps of the sampling
    # distribution's mass on the base model's guidance_top_k likeliest tokens
    topk_mass: list[float] = field(default_factory=list)

    @classmethod
    def from_rollout(cls, rollout: Rollout, tokenizer: PreTrainedTokenizerBase) -> GenerationResult:
        """Lists and texts from a rollout; ``base_logprobs`` from its ``ref_logprobs``."""
        response_ids = rollout.response_lists()
        lengths = [len(r) for r in response_ids]
        result = cls(rollout.prompt_lists(), response_ids, rollout.texts(tokenizer), rollout.finished.tolist())
        if rollout.kl is not None:
            result.kl = rollout.kl.tolist()
        if rollout.ref_logprobs is not None:
            result.base_logprobs = [row[:n] for row, n in zip(rollout.ref_logprobs.tolist(), lengths)]
        if rollout.hidden is not None:
            result.hidden = [h[: n + 1].clone() for h, n in zip(rollout.hidden, lengths)]
        if rollout.topk_mass is not None:
            result.topk_mass = rollout.topk_mass.tolist()
        return result


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


def left_pad(seqs: list[list[int]], pad_id: int, length: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to the longest, or to ``length`` when that is longer: ->
    ``input_ids, attention_mask`` (B, L)."""
    L = max(length, max(len(s) for s in seqs))
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
    config = getattr(model, "config", None)
    limit = context_length(config) if config is not None else None
    if limit:
        for i, p in enumerate(prompts):
            if not isinstance(p, list):
                check_fits(tokenizer, p, limit - cfg.max_new_tokens, f"prompt {i + 1}", "lower max_new_tokens")
    encoded = [p if isinstance(p, list) else encode_prompt(tokenizer, p, cfg.chat) for p in prompts]
    for i, p in enumerate(encoded):
        if not p:
            raise QVLMError(f"prompt {i + 1} is empty after tokenisation")
        if limit and len(p) + cfg.max_new_tokens > limit:
            raise QVLMError(
                f"prompt {i + 1} has {len(p)} tokens; with max_new_tokens={cfg.max_new_tokens} it exceeds "
                f"the model's context of {limit}; shorten the prompt or lower max_new_tokens"
            )
    return encoded


def batch_inputs(model, tokenizer, prompt_ids: list[list[int]], pad_to: int = 0):
    """One decoding batch's set-up: ``pad_id``, EOS ids and the prompts left-padded (to at least
    ``pad_to`` tokens), on the model's device."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids, attention_mask = left_pad(prompt_ids, pad_id, pad_to)
    return pad_id, _eos_ids(model, tokenizer).to(device), input_ids.to(device), attention_mask.to(device)


@torch.no_grad()
def sample_rollout(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str] | list[list[int]],
    heads: QVHeads | None = None,
    cfg: DecodeConfig | None = None,
    track_kl: bool = False,
    return_hidden: bool = False,
    progress: bool = False,
    logprobs: bool = True,
    ref_logprobs: bool = True,
    values: bool = False,
    use_cache: bool = True,
    row_seeds: list[int] | None = None,
    pad_to: int = 0,
    guide_steps: list[int] | None = None,
) -> Rollout:
    """Decode ``cfg.num_return_sequences`` responses for each of ``prompts`` (strings, encoded with
    the chat template, or token ids) into a :class:`qvlm.rollout.Rollout` on the model's device.

    Each prompt is prefilled once and its KV cache shared by its responses (Hugging Face
    ``generate`` prefills every copy). Recorded per step, each only when asked for:
    ``logprobs``: log-prob of the sampled token under the distribution it was drawn from (guided
    scores after the warpers; for greedy, the guided scores); ``ref_logprobs``: under the base
    model; ``values``: ``V(s_t)`` from ``heads``; ``track_kl``: per response, the summed KL of the
    sampling distribution to the base (and, with ``cfg.guidance_top_k``, the mean mass it puts on
    the base model's top k); ``return_hidden``: the hidden states of ``s_1 .. s_{T+1}`` (one extra
    decoder step for the last), so a frozen-trunk learner needs no second pass over the data.
    ``use_cache=False`` re-runs the whole sequence every step (the benchmark's reference).

    ``row_seeds`` (one per response, prompt-major) gives every response its own random stream
    (:func:`sample_rows`): its tokens then depend on its prompt and its seed alone, not on which
    other rows share its batch or its process, so data-parallel rollouts sample what one process
    samples (:mod:`qvlm.algos.ppo`). Without it, sampling draws from torch's global generator, as
    Hugging Face ``generate`` does. ``pad_to`` left-pads every prompt to at least that many tokens
    (processes that pad alike compute alike). ``guide_steps`` (one per response, prompt-major) guides each
    response for its first that many tokens only, then samples the base model: a guided roll-in and a
    reference roll-out in one pass (Q#, :mod:`qvlm.algos.qsharp`).
    """
    cfg = cfg or DecodeConfig()
    if cfg.beta != 0 and heads is None:
        raise QVLMError(f"beta is {cfg.beta} but no heads were given; pass trained heads or beta=0")
    if values and heads is None:
        raise QVLMError("values=True needs heads (V(s_t) comes from their V head); pass heads or values=False")
    encoded = encode_prompts(tokenizer, prompts, cfg, model)
    n_rows = len(encoded) * cfg.num_return_sequences
    if row_seeds is not None and len(row_seeds) != n_rows:
        raise QVLMError(f"row_seeds has {len(row_seeds)} seeds for {n_rows} responses; give one per response")
    if guide_steps is not None and len(guide_steps) != n_rows:
        raise QVLMError(f"guide_steps has {len(guide_steps)} counts for {n_rows} responses; give one per response")
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    record = dict(
        track_kl=track_kl,
        return_hidden=return_hidden,
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        values=values,
        use_cache=use_cache,
        pad_to=pad_to,
    )
    per_batch = max(1, cfg.batch_size // cfg.num_return_sequences)  # batch_size counts responses decoded together
    starts = range(0, len(encoded), per_batch)
    n = cfg.num_return_sequences
    batches = []
    for start in progress_bar(starts, desc="decode", enabled=progress, unit="batch"):
        rows = slice(start * n, (start + per_batch) * n)
        seeds = None if row_seeds is None else row_seeds[rows]
        until = None if guide_steps is None else guide_steps[rows]
        batches.append(
            _sample_batch(
                model,
                tokenizer,
                encoded[start : start + per_batch],
                heads,
                cfg,
                **record,
                row_seeds=seeds,
                guide_steps=until,
            )  # fmt: skip
        )
    return Rollout.cat(batches)


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
    the chat template, or token ids): :func:`sample_rollout`, as lists and texts.

    ``track_kl`` fills ``kl``, ``base_logprobs`` (and ``topk_mass`` with ``cfg.guidance_top_k``);
    ``return_hidden`` fills ``hidden``.
    """
    rollout = sample_rollout(
        model,
        tokenizer,
        prompts,
        heads,
        cfg,
        track_kl=track_kl,
        return_hidden=return_hidden,
        progress=progress,
        logprobs=False,
        ref_logprobs=track_kl,
    )
    return GenerationResult.from_rollout(rollout, tokenizer)


def sampling_seeds(seed: int, step: int, rows: range) -> list[int]:
    """The seed of each response row's random stream (``row_seeds`` of :func:`sample_rollout`) in
    a training step (a PPO iteration, a soft-Q round): a hash of (seed, step, row), so that a row
    samples the same tokens whichever process decodes it, and a resumed run samples what an
    uninterrupted one does."""
    keys = (hashlib.blake2b(f"{seed}:{step}:{row}".encode(), digest_size=8).digest() for row in rows)
    return [int.from_bytes(k, "little") >> 1 for k in keys]  # 63 bits: any generator takes them


def sample_rows(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of ``probs`` (B, V), row ``b`` drawn with ``generators[b]`` alone.

    Exponential race: with ``E_v ~ Exp(1)`` independent, ``argmin_v E_v / p_v`` is distributed as
    ``p`` (the Gumbel-max trick in another form); tokens of probability 0 never win. Each call takes
    V uniforms from every generator, so a row's t-th token depends on its probabilities and its
    stream alone. Shape: ``(B, V) -> (B,)``.
    """
    V = probs.shape[-1]
    uniform = torch.stack([torch.rand(V, generator=g, device=probs.device) for g in generators])  # (B, V)
    exponential = -torch.log(uniform)  # Exp(1); u = 0 gives +inf, a token that cannot win
    return torch.argmax(probs.float() / exponential, dim=-1)


def _sample_batch(
    model, tokenizer, prompt_ids, heads, cfg, *, track_kl, return_hidden, logprobs, ref_logprobs, values, use_cache,
    pad_to, row_seeds, guide_steps=None,
) -> Rollout:  # fmt: skip
    pad_id, eos, input_ids, attention_mask = batch_inputs(model, tokenizer, prompt_ids, pad_to)
    device = input_ids.device
    n = cfg.num_return_sequences
    B = input_ids.shape[0] * n
    warp = warpers(cfg)
    topk = cfg.guidance_top_k if track_kl else 0
    if cfg.fast and use_cache:  # the fast path keeps a cache by construction
        decoder = FastDecodeStep(model, max_new_tokens=cfg.max_new_tokens, compile=cfg.fast_compile)
        heads = fast_heads(heads) if heads is not None else None
    else:
        decoder = DecodeStep(model, use_cache=use_cache)
    until = None if guide_steps is None else torch.tensor(guide_steps, device=device)  # (B,)
    generators = None
    if row_seeds is not None and cfg.do_sample:
        generators = [torch.Generator(device=device).manual_seed(s) for s in row_seeds]
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    generated = input_ids.repeat_interleave(n, 0)
    kl = torch.zeros(B, device=device)
    mass = torch.zeros(B, device=device)
    # per step (B,): response mask, log-probs, ref log-probs, values; (B, H): hidden states
    next_tokens = None  # (B,): the tokens written last
    steps: dict[str, list[torch.Tensor]] = {"mask": [], "logprobs": [], "ref_logprobs": [], "values": [], "hidden": []}
    for step in range(cfg.max_new_tokens + 1):
        # after the last token, one more decoder step only to read the features of s_{T+1}
        last = step == cfg.max_new_tokens or not unfinished.any()
        if last and not return_hidden:
            break
        if step == 0:
            out = decoder.prefill(input_ids, attention_mask, repeat=n, logits=not last)
        else:
            out = decoder.step(next_tokens, logits=not last)
        if return_hidden:
            steps["hidden"].append(out.hidden)
        if last:
            break
        logits = out.logits  # (B, V)
        scores = logits
        if cfg.beta != 0:
            scores = guided_scores(logits, heads, out.hidden, cfg.beta, cfg.guidance_top_k, cfg.centre_candidates)
            if until is not None:  # a guided roll-in of until[b] tokens, then the base model
                scores = torch.where((step < until)[:, None], scores, logits)
        scores = warp(generated, scores)
        probs = None
        if cfg.do_sample:
            probs = torch.softmax(scores, dim=-1)
            if generators is None:
                next_tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
            else:
                next_tokens = sample_rows(probs, generators)
        else:
            next_tokens = torch.argmax(scores, dim=-1)
        # log-softmaxes only where something reads them; the sampling one is the base one when
        # neither guidance nor a warper changed the logits
        ref_logp = torch.log_softmax(logits, dim=-1) if track_kl or ref_logprobs else None
        logp = None
        if logprobs or (track_kl and cfg.do_sample):
            logp = ref_logp if scores is logits and ref_logp is not None else torch.log_softmax(scores, dim=-1)
        if track_kl:
            if cfg.do_sample:
                step_kl = (logp.exp() * (logp - ref_logp)).nan_to_num(0.0).sum(-1)  # 0 log 0 = 0
            else:  # greedy is a point mass on the argmax: KL = -log pi_ref(argmax)
                step_kl = -ref_logp.gather(-1, next_tokens[:, None]).squeeze(-1)
            kl += step_kl * unfinished
            if topk:
                if probs is None:  # greedy: a point mass on the argmax
                    probs = torch.zeros_like(scores).scatter_(-1, next_tokens[:, None], 1.0)
                mass += candidate_mass(logits, probs, topk) * unfinished
        if logprobs:
            steps["logprobs"].append(logp.gather(-1, next_tokens[:, None]).squeeze(-1))
        if ref_logprobs:
            steps["ref_logprobs"].append(ref_logp.gather(-1, next_tokens[:, None]).squeeze(-1))
        if values:
            steps["values"].append(heads.values(out.hidden).to(torch.float32))
        steps["mask"].append(unfinished)
        next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad_id))
        generated = torch.cat([generated, next_tokens[:, None]], dim=1)
        unfinished = unfinished & ~torch.isin(next_tokens, eos)
    response_mask = torch.stack(steps["mask"], 1).to(torch.float32)  # (B, T)
    real = response_mask.bool()

    def per_step(name: str) -> torch.Tensor | None:  # (B, T), 0 on padding
        return torch.where(real, torch.stack(steps[name], 1), 0.0) if steps[name] else None

    hidden = None
    if return_hidden:  # (B, T + 1, H): s_1 .. s_{T+1} of each row, 0 past its end
        hidden = torch.stack(steps["hidden"], 1)
        valid = torch.cat([real.new_ones((B, 1)), real], 1)  # state t + 1 exists where step t was real
        hidden = torch.where(valid[..., None], hidden, 0.0)
    return Rollout(
        prompt_ids=input_ids.repeat_interleave(n, 0),
        prompt_mask=attention_mask.repeat_interleave(n, 0),
        response_ids=generated[:, input_ids.shape[1] :],
        response_mask=response_mask,
        finished=~unfinished,
        logprobs=per_step("logprobs"),
        ref_logprobs=per_step("ref_logprobs"),
        values=per_step("values"),
        hidden=hidden,
        kl=kl if track_kl else None,
        topk_mass=mass / response_mask.sum(-1) if topk else None,
        pad_id=pad_id,
    )
