"""Evaluate a trained policy (``qvlm train ppo``) against its base model: the same metrics as
:func:`qvlm.eval.metrics.evaluate_decoding`, with the KL and perplexity taken under the **base**
model, not under the policy that sampled.

The KL is exact per step and summed along each sampled response, as for guided decoding: the
sampling distribution at ``s_t`` (the policy's logits, guided by ``heads`` when ``cfg.beta != 0``,
then the warpers) against the base's, both from one teacher-forced pass over the rollout.
"""

from __future__ import annotations

import torch

from qvlm.algos.actor_critic import response_hidden
from qvlm.configs import DecodeConfig
from qvlm.decoding.guidance import guided_scores
from qvlm.decoding.sampling import sample_rollout, warpers
from qvlm.eval.metrics import MethodMetrics, summarize
from qvlm.rewards import RewardFn, score
from qvlm.rollout import Rollout

__all__ = ["sampling_logprobs", "kl_to_base", "evaluate_policy_decoding", "rollout_metrics"]


@torch.no_grad()
def sampling_logprobs(model, rollout: Rollout, heads=None, cfg: DecodeConfig | None = None) -> torch.Tensor:
    """Log of the distribution each step was sampled from, teacher-forced: ``(B, T, V)``.

    ``model``'s logits, plus ``beta (Q - V)`` from ``heads`` when ``cfg.beta != 0``, then the
    warpers of ``cfg`` (temperature, top-k, top-p), as :func:`qvlm.decoding.sampling.sample_rollout`
    applies them.
    """
    cfg = cfg or DecodeConfig()
    T = rollout.response_ids.shape[1]
    h = response_hidden(model, rollout)[:, :T]  # (B, T, H)
    B, _, H = h.shape
    scores = model.get_output_embeddings()(h).to(torch.float32).reshape(B * T, -1)  # (B T, V)
    if cfg.beta != 0:
        scores = guided_scores(scores, heads, h.reshape(B * T, H), cfg.beta, cfg.guidance_top_k, cfg.centre_candidates)
    scores = warpers(cfg)(rollout.response_ids.reshape(B * T, 1), scores)  # the warpers ignore the ids
    return torch.log_softmax(scores, dim=-1).reshape(B, T, -1)


@torch.no_grad()
def kl_to_base(sampling_logp: torch.Tensor, base_logp: torch.Tensor, rollout: Rollout, do_sample: bool = True):
    """``(B,)`` sum over each response's steps of KL(sampling || base); greedy decoding is a point
    mass on the argmax (KL = -log pi_base of the written token)."""
    if do_sample:
        step = (sampling_logp.exp() * (sampling_logp - base_logp)).nan_to_num(0.0).sum(-1)  # (B, T); 0 log 0 = 0
    else:
        step = -base_logp.gather(-1, rollout.response_ids[..., None]).squeeze(-1)
    return (step * rollout.response_mask).sum(-1)


@torch.no_grad()
def evaluate_policy_decoding(
    policy,
    base,
    tokenizer,
    prompts: list[str],
    reward: RewardFn,
    heads=None,
    cfg: DecodeConfig | None = None,
    progress: bool = False,
) -> tuple[MethodMetrics, list[str], list[float]]:
    """Decode ``prompts`` with ``policy`` (guided by ``heads`` when ``cfg.beta != 0``) and measure
    reward (95% CI), exact KL to ``base``, distinct-2 and perplexity under ``base``."""
    cfg = cfg or DecodeConfig()
    rollout = sample_rollout(
        policy, tokenizer, prompts, heads, cfg, progress=progress, logprobs=False, ref_logprobs=False
    )
    return rollout_metrics(policy, base, tokenizer, prompts, rollout, reward, heads, cfg)


@torch.no_grad()
def rollout_metrics(
    policy,
    base,
    tokenizer,
    prompts: list[str],
    rollout: Rollout,
    reward: RewardFn,
    heads=None,
    cfg: DecodeConfig | None = None,
) -> tuple[MethodMetrics, list[str], list[float]]:
    """The metrics of :func:`evaluate_policy_decoding` for a rollout ``policy`` already sampled with
    ``cfg`` (so a caller can time the decoding alone)."""
    cfg = cfg or DecodeConfig()
    texts = rollout.texts(tokenizer)
    repeated = [p for p in prompts for _ in range(cfg.num_return_sequences)]
    rewards = score(reward, repeated, texts)
    T = rollout.response_ids.shape[1]
    base_logp = torch.log_softmax(base.get_output_embeddings()(response_hidden(base, rollout)[:, :T]).float(), -1)
    kl = kl_to_base(sampling_logprobs(policy, rollout, heads, cfg), base_logp, rollout, cfg.do_sample)
    taken = base_logp.gather(-1, rollout.response_ids[..., None]).squeeze(-1)  # (B, T)
    base_lists = [row[:n] for row, n in zip(taken.tolist(), rollout.lengths.tolist())]
    return summarize(texts, rewards, kl.tolist(), base_lists, group_size=cfg.num_return_sequences), texts, rewards
