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

Several processes (``torchrun`` / ``accelerate launch``, docs/distributed.md): each decodes and scores
its block of the round's prompts, every response from its own random stream keyed by (seed, round,
row), and the scored samples are gathered, so every process holds the replay set one process holds.
A process caches the features of the samples it decoded only, and takes those of each minibatch
(its loss weighted by their share of the minibatch's response tokens, gradients summed over the
processes), so N processes take the steps one process takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from qvlm.algos.rounds import (
    cache_features,
    decode_round,
    fit_round,
    owned_items,
    prompts_sha,
    restore_replay,
    round_prompts,
    score_round,
)
from qvlm.configs import DecodeConfig, SoftQConfig
from qvlm.errors import QVLMError
from qvlm.jsonl import write_samples
from qvlm.losses import Stats, soft_q_loss, soft_value, value_regression_loss
from qvlm.masked import masked_mean
from qvlm.mdp import Sample, TokenBatch, encode_samples
from qvlm.model import QVModel
from qvlm.rewards import RewardFn
from qvlm.train.checkpoint import save_run
from qvlm.train.distributed import (
    is_main_process,
)
from qvlm.train.harness import Run
from qvlm.train.optim import make_optimizer

__all__ = ["SoftQConfig", "softq_loss", "sample_round", "train_softq"]


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


@torch.no_grad()
def sample_round(
    model: QVModel,
    tokenizer,
    prompts: list[str],
    reward: RewardFn,
    cfg: SoftQConfig,
    round_idx: int,
    run: Run | None = None,
) -> tuple[list[Sample], dict[str, float]]:
    """Decode ``prompts`` with the current guided policy (``beta = 1/alpha``), ``samples_per_prompt``
    each, every response from its own stream keyed by (seed, round, row); score them. Returns the
    scored samples and the round's charts (:func:`qvlm.algos.rounds.decode_round`, :func:`score_round`)."""
    decode = DecodeConfig(
        max_new_tokens=cfg.max_new_tokens,
        beta=1.0 / cfg.alpha,
        num_return_sequences=cfg.samples_per_prompt,
        batch_size=cfg.decode_batch_size,
        guidance_top_k=cfg.guidance_top_k,
    )
    rollout, local_prompts = decode_round(model, tokenizer, prompts, decode, cfg.seed, round_idx)
    return score_round(reward, rollout, tokenizer, local_prompts, round_idx, run)


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
    run = Run(cfg, run_dir, desc="train softq", total=cfg.rounds, unit="round", callbacks=callbacks)
    run.join(model.device, divisible=[(cfg.prompts_per_round, "--prompts-per-round", "prompts")])
    pad_id = tokenizer.pad_token_id
    optimizer = make_optimizer(model, cfg.lr, cfg.trunk_lr, cfg.weight_decay)
    run.track(model, optimizer)
    step, replay, items, sizes = 0, [], [], []
    if resume:
        resumed = run.restore()
        step = resumed.step  # optimiser steps; the run's units are rounds
        run.start, replay, items, sizes = restore_replay(resumed, model, tokenizer, prompts, cfg.max_length,
                                                         cfg.batch_size)  # fmt: skip
    mine = {i for k, n in enumerate(sizes) for i in owned_items(range(sum(sizes[:k]), sum(sizes[: k + 1])))}
    with run:
        for r in run.steps():
            # rollout: the current guided policy on this round's prompts, scored
            new, charts = sample_round(
                model, tokenizer, round_prompts(prompts, r, cfg.prompts_per_round), reward, cfg, r, run
            )
            # replay: every round is kept; a frozen trunk's features are computed once, here
            own = owned_items(range(len(items), len(items) + len(new)))
            replay, sizes, mine = replay + new, sizes + [len(new)], mine | set(own)
            items += encode_samples(new, tokenizer, cfg.max_length)
            cache_features(model, items, own, cfg.batch_size, pad_id)
            # optimise: soft Bellman regression on minibatches of the whole replay set
            per_step = fit_round(
                model, optimizer, items, lambda m, b: softq_loss(m, b, cfg), mine=mine, steps=cfg.steps_per_round,
                batch_size=cfg.batch_size, seed=cfg.seed, round_idx=r, first_step=step, pad_id=pad_id,
                grad_clip=cfg.grad_clip, after_step=lambda: model.heads.sync_targets(cfg.polyak),
            )  # fmt: skip
            # log and checkpoint
            charts.update({"charts/round": float(r), "charts/replay_size": float(len(replay))})
            for k, floats in enumerate(per_step):
                last = k == len(per_step) - 1
                run.log(step + k, {**floats, **charts} if last else floats,
                        postfix=("charts/guided_reward", "losses/q") if last else ())  # fmt: skip
            step += len(per_step)
            extra = {"round": r + 1, "prompts_sha": prompts_sha(prompts), "round_sizes": list(sizes)}
            run.advance(r + 1, charts, step=step, data_position=r + 1,
                        extra=lambda: {**extra, "replay": [s.to_json() for s in replay]})  # fmt: skip

    def save() -> None:
        if is_main_process():
            write_samples(run.run_dir / "replay.jsonl", replay)
        save_run(run.run_dir, model, cfg, {"algorithm": "softq", "samples": len(replay), "steps": step})

    run.finish(save)
    return run.history
