"""Online soft Q-learning for a language model (issue 10): the guided policy samples, the reward
scores, and the heads move toward the soft Bellman target on everything sampled so far.

Each round:

1. rollout: decode the round's prompts with the current guided policy
   ``softmax(log pi_ref + beta (Q - V))``, ``beta = 1/alpha`` (DESIGN.md: with the soft-optimal Q this
   samples ``pi* ~ pi_ref exp(Q*/alpha)``), through the shared decoding step
   (:func:`qvlm.decoding.sampling.sample_rollout`);
2. score the responses (:mod:`qvlm.rewards`) and add them to the replay set, which keeps every round
   (Q#, Zhou et al. 2025, and iterated value optimisation aggregate the guided policy's own data:
   values fitted only on the base model's states are wrong on the states guidance visits);
3. fit: ``steps_per_round`` minibatches drawn from the whole replay set, Q toward
   ``r_t + gamma (1 - done_t) alpha log sum_a pi_ref(a|s_{t+1}) exp(Qbar(s_{t+1}, a) / alpha)``
   (:func:`qvlm.losses.soft_q_loss`, target heads ``Qbar`` by Polyak averaging; ``pi_ref`` is the
   frozen trunk's own LM head on the same features) and V toward the soft value of ``Qbar`` at
   ``s_t``; the target heads follow after every step.

With a frozen trunk (the default) each sample's trunk features are computed once, when its round
is added, and kept in the model's :class:`qvlm.features.FeatureCache`; every later minibatch reads
them. A checkpoint after each round holds the heads (target heads included), the optimiser, every
RNG state and the replay set; decoding and minibatches are seeded per round, and a resumed run
recomputes the cached features round by round in the same batches, so it ends with the heads an
uninterrupted run ends with.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import torch

from qvlm.configs import DecodeConfig, SoftQConfig
from qvlm.decoding.sampling import sample_rollout
from qvlm.errors import QVLMError
from qvlm.losses import Stats, soft_q_loss, soft_value, value_regression_loss
from qvlm.mdp import EncodedSample, Sample, TokenBatch, collate, encode_samples, sample_from_dict, write_samples
from qvlm.model import QVModel
from qvlm.progress import progress
from qvlm.returns import masked_mean
from qvlm.rewards import RewardFn, score
from qvlm.rollout import rollout_to_samples
from qvlm.train.checkpoint import load_checkpoint, save_checkpoint, save_run
from qvlm.train.loop import check_finite
from qvlm.train.metrics import MetricsLogger, stats_to_floats
from qvlm.train.optim import make_optimizer, optimizer_step
from qvlm.train.rng import set_seed

__all__ = ["SoftQConfig", "softq_loss", "round_prompts", "sample_round", "cache_features", "fit_round", "train_softq"]


def softq_loss(model: QVModel, batch: TokenBatch, cfg: SoftQConfig) -> tuple[torch.Tensor, Stats]:
    """Soft Bellman regression of every online Q head plus ``v_scale`` times V's regression onto
    ``soft_value(Qbar(s_t, .), log pi_ref(.|s_t), alpha)``. Stats are detached 0-dim tensors."""
    h, h_next = model.features(batch)  # (B, T, H) each
    mask = batch.response_mask
    with torch.no_grad():
        next_target_q = model.heads.target_q_values(h_next)  # (B, T, V): min over target heads
        next_ref = torch.log_softmax(model.lm_logits(h_next).float(), dim=-1)  # (B, T, V): log pi_ref(.|s_{t+1})
        ref = torch.log_softmax(model.lm_logits(h).float(), dim=-1)  # (B, T, V)
        v_target = soft_value(model.heads.target_q_values(h).float(), ref, cfg.alpha)  # (B, T)
    q_losses = [
        soft_q_loss(q, next_target_q, next_ref, batch.rewards, batch.done, mask, cfg.gamma, cfg.alpha)
        for q in model.heads.q_taken(h, batch.actions)
    ]
    q_loss = torch.stack([loss for loss, _ in q_losses]).mean()
    v_loss, v_stats = value_regression_loss(model.heads.values(h).float(), v_target, mask)
    loss = q_loss + cfg.v_scale * v_loss
    q_stats = q_losses[0][1]
    return loss, {
        "losses/q": q_loss.detach(),
        "losses/v": v_stats["loss"],
        "losses/total": loss.detach(),
        "values/q_taken": q_stats["q_mean"],
        "values/target": q_stats["target_mean"],
        "values/v": v_stats["v_mean"],
        "values/v_target": masked_mean(v_target, mask),
    }


def round_prompts(prompts: Sequence[str], round_idx: int, per_round: int) -> list[str]:
    """The prompts of round ``round_idx``: the next ``per_round`` of the list, cycling through it.

    5 prompts, 2 per round: round 0 -> (0, 1), round 2 -> (4, 0)."""
    start = round_idx * per_round
    return [prompts[(start + i) % len(prompts)] for i in range(per_round)]


@torch.no_grad()
def sample_round(
    model: QVModel, tokenizer, prompts: list[str], reward: RewardFn, cfg: SoftQConfig, round_idx: int
) -> tuple[list[Sample], dict[str, float]]:
    """Decode ``prompts`` with the current guided policy (``beta = 1/alpha``), ``samples_per_prompt``
    each, seeded by round; score them. Returns the scored samples and the round's charts."""
    decode = DecodeConfig(
        max_new_tokens=cfg.max_new_tokens,
        beta=1.0 / cfg.alpha,
        num_return_sequences=cfg.samples_per_prompt,
        batch_size=cfg.decode_batch_size,
        seed=cfg.seed * 1_000_003 + round_idx,
        guidance_top_k=cfg.guidance_top_k,
    )
    model.eval()
    rollout = sample_rollout(model.trunk, tokenizer, prompts, model.heads, decode, track_kl=True, logprobs=False)
    repeated = [p for p in prompts for _ in range(cfg.samples_per_prompt)]
    rewards = score(reward, repeated, rollout.texts(tokenizer))
    charts = {
        "charts/guided_reward": sum(rewards) / len(rewards),
        "charts/kl": float(rollout.kl.mean()),  # summed per response, exact for the sampling distribution
        "charts/response_length": float(rollout.lengths.float().mean()),
    }
    return rollout_to_samples(rollout, tokenizer, prompts, rewards), charts


@torch.no_grad()
def cache_features(model: QVModel, items: list[EncodedSample], start: int, batch_size: int, pad_id: int) -> None:
    """Compute the trunk features of ``items[start:]`` in fixed batches and keep them in the model's
    cache (a frozen trunk; a training trunk has no cache and computes features every step)."""
    if model.feature_cache is None:
        return
    for lo in range(start, len(items), batch_size):
        idx = list(range(lo, min(lo + batch_size, len(items))))
        model.features(collate([items[i] for i in idx], pad_id, index=idx))


def fit_round(
    model: QVModel,
    optimizer: torch.optim.Optimizer,
    items: list[EncodedSample],
    cfg: SoftQConfig,
    round_idx: int,
    first_step: int,
    pad_id: int,
) -> list[dict[str, float]]:
    """``steps_per_round`` optimiser steps on minibatches drawn uniformly from the whole replay set
    (seeded by round), each followed by a Polyak update of the target heads; per step, its stats."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + round_idx)
    device = next(model.heads.parameters()).device
    model.train()
    out = []
    for k in range(cfg.steps_per_round):
        idx = torch.randint(len(items), (cfg.batch_size,), generator=gen).tolist()
        batch = collate([items[i] for i in idx], pad_id, index=idx).to(device)
        loss, stats = softq_loss(model, batch, cfg)
        grad_norm = optimizer_step(loss, optimizer, cfg.grad_clip)
        model.heads.sync_targets(cfg.polyak)
        floats = stats_to_floats({**stats, "charts/grad_norm": grad_norm, "_objective": loss.detach()})
        check_finite(first_step + k, floats.pop("_objective"), floats)
        out.append(floats)
    model.eval()
    return out


def _prompts_sha(prompts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()


def _resume(run_dir: Path, model, tokenizer, optimizer, cfg: SoftQConfig, prompts: Sequence[str]):
    """Restore a checkpoint; returns (next round, next step, replay samples, encoded replay)."""
    resumed = load_checkpoint(run_dir, model, optimizer, cfg)
    if resumed.extra.get("prompts_sha") != _prompts_sha(prompts):
        raise QVLMError(
            f"{resumed.path}: the run started with other prompts; resume with the same --prompts "
            "(and --max-prompts), or start a new run directory"
        )
    replay = [sample_from_dict(d, f"{resumed.path} replay[{i}]") for i, d in enumerate(resumed.extra["replay"])]
    items = encode_samples(replay, tokenizer, cfg.max_length)
    per_round = cfg.prompts_per_round * cfg.samples_per_prompt
    for r in range(int(resumed.extra["round"])):  # the features, in the batches the first run used
        cache_features(model, items[: (r + 1) * per_round], r * per_round, cfg.batch_size, tokenizer.pad_token_id)
    return int(resumed.extra["round"]), resumed.step, replay, items


def train_softq(
    model: QVModel,
    tokenizer,
    prompts: Sequence[str],
    reward: RewardFn,
    cfg: SoftQConfig | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    callbacks: Sequence[Callable[[int, dict[str, float]], None]] = (),
) -> dict[str, list[tuple[int, float]]]:
    """Train ``model``'s Q/V heads by online soft Q-learning; returns the metric history.

    With ``run_dir``: a checkpoint every ``cfg.checkpoint_every`` rounds (``resume=True`` continues
    from it to the heads an uninterrupted run reaches), final heads, ``replay.jsonl`` (every scored
    sample), ``metrics.jsonl`` and TensorBoard. ``callbacks`` are called as ``cb(round, charts)``
    after each round's checkpoint.
    """
    cfg = cfg or SoftQConfig()
    if not model.heads.has_q:
        raise QVLMError("soft Q-learning needs Q heads; build the model with with_q=True")
    if not prompts:
        raise QVLMError("soft Q-learning needs prompts to sample from; give a prompt file with at least one")
    run_dir = Path(run_dir) if run_dir is not None else None
    pad_id = tokenizer.pad_token_id
    set_seed(cfg.seed)
    optimizer = make_optimizer(model, cfg.lr, cfg.trunk_lr, cfg.weight_decay)
    start, step, replay, items = 0, 0, [], []
    if resume and run_dir:
        start, step, replay, items = _resume(run_dir, model, tokenizer, optimizer, cfg, prompts)
    logger = MetricsLogger(run_dir, resume_step=step)
    bar = progress(total=cfg.rounds, initial=start, desc="train softq", enabled=cfg.progress, unit="round")
    try:
        for r in range(start, cfg.rounds):
            # rollout: the current guided policy on this round's prompts, scored
            new, charts = sample_round(
                model, tokenizer, round_prompts(prompts, r, cfg.prompts_per_round), reward, cfg, r
            )
            # replay: every round is kept; a frozen trunk's features are computed once, here
            replay += new
            items += encode_samples(new, tokenizer, cfg.max_length)
            cache_features(model, items, len(items) - len(new), cfg.batch_size, pad_id)
            # optimise: soft Bellman regression on minibatches of the whole replay set
            per_step = fit_round(model, optimizer, items, cfg, r, step, pad_id)
            # log and checkpoint
            charts.update({"charts/round": float(r), "charts/replay_size": float(len(replay))})
            for k, floats in enumerate(per_step):
                logger.log(step + k, {**floats, **charts} if k == len(per_step) - 1 else floats)
            step += len(per_step)
            bar.update(1)
            bar.set_postfix({"reward": f"{charts['charts/guided_reward']:.3f}", "q": f"{per_step[-1]['losses/q']:.4f}"})
            last = r + 1 == cfg.rounds
            if run_dir and ((cfg.checkpoint_every and (r + 1) % cfg.checkpoint_every == 0) or last):
                extra = {"round": r + 1, "replay": [s.to_json() for s in replay], "prompts_sha": _prompts_sha(prompts)}
                save_checkpoint(run_dir, model, optimizer, step, cfg, data_position=r + 1, extra=extra)
            for cb in callbacks:
                cb(r, charts)
    finally:
        bar.close()
        logger.close()
        model.eval()
    if run_dir:
        write_samples(run_dir / "replay.jsonl", replay)
        save_run(run_dir, model, cfg, {"algorithm": "softq", "samples": len(replay), "steps": step})
    return logger.history
