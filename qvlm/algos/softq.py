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

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import torch

from qvlm.configs import DecodeConfig, SoftQConfig
from qvlm.decoding.sampling import encode_prompts, sample_rollout, sampling_seeds
from qvlm.errors import QVLMError
from qvlm.jsonl import sample_from_dict, write_samples
from qvlm.losses import Stats, soft_q_loss, soft_value, value_regression_loss
from qvlm.masked import masked_mean
from qvlm.mdp import EncodedSample, Sample, TokenBatch, collate, encode_samples
from qvlm.model import QVModel
from qvlm.rewards import RewardFn, score
from qvlm.rollout import rollout_to_samples
from qvlm.train.checkpoint import save_run
from qvlm.train.distributed import (
    block,
    gather_objects,
    gather_rows,
    is_main_process,
    raise_if_any_failed,
    rank,
    reduce_weighted,
    token_weight,
    world_size,
)
from qvlm.train.harness import Run, check_finite
from qvlm.train.metrics import stats_to_floats
from qvlm.train.optim import make_optimizer, optimizer_step

__all__ = [
    "SoftQConfig",
    "softq_loss",
    "round_prompts",
    "sample_round",
    "owned_items",
    "cache_features",
    "fit_round",
    "train_softq",
]


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
    scored samples and the round's charts.

    Several processes: each decodes and scores its block of ``prompts`` (left-padded to the round's
    longest), and every process gets the whole round's samples, in the one-process order. A reward that
    fails stops the run, naming the round and (with ``run``) the checkpoint kept."""
    n = cfg.samples_per_prompt
    decode = DecodeConfig(
        max_new_tokens=cfg.max_new_tokens,
        beta=1.0 / cfg.alpha,
        num_return_sequences=n,
        batch_size=cfg.decode_batch_size,
        guidance_top_k=cfg.guidance_top_k,
    )
    model.eval()
    encoded = encode_prompts(tokenizer, prompts, decode, model.trunk)
    mine = block(len(prompts))
    rollout = sample_rollout(
        model.trunk, tokenizer, encoded[mine.start : mine.stop], model.heads, decode, track_kl=True, logprobs=False,
        row_seeds=sampling_seeds(cfg.seed, round_idx, range(mine.start * n, mine.stop * n)),
        pad_to=max(len(p) for p in encoded),
    )  # fmt: skip
    local_prompts = prompts[mine.start : mine.stop]
    repeated = [p for p in local_prompts for _ in range(n)]
    rewards, error = None, None
    try:
        rewards = score(reward, repeated, rollout.texts(tokenizer))
    except QVLMError as err:
        error = run.stopped(err, f"round {round_idx}") if run is not None else err
    raise_if_any_failed(error, f"round {round_idx}: the reward")
    samples = gather_objects(rollout_to_samples(rollout, tokenizer, local_prompts, rewards))
    kl, lengths = gather_rows(rollout.kl), gather_rows(rollout.lengths)
    charts = {
        "charts/guided_reward": sum(s.reward for s in samples) / len(samples),
        "charts/kl": float(kl.mean()),  # summed per response, exact for the sampling distribution
        "charts/response_length": float(lengths.float().mean()),
    }
    return samples, charts


def owned_items(indices: range, per_round: int) -> list[int]:
    """This process's replay indices among ``indices``: the samples it decoded (its block of each
    round of ``per_round`` samples); all of them in one process."""
    world = world_size()
    if world == 1:
        return list(indices)
    per = per_round // world
    return [i for i in indices if (i % per_round) // per == rank()]


@torch.no_grad()
def cache_features(
    model: QVModel, items: list[EncodedSample], indices: list[int], batch_size: int, pad_id: int
) -> None:
    """Compute the trunk features of ``items[i]`` for ``i`` in ``indices``, in fixed batches, and keep
    them in the model's cache (a frozen trunk; a training trunk has no cache and computes features
    every step)."""
    if model.feature_cache is None:
        return
    for lo in range(0, len(indices), batch_size):
        idx = indices[lo : lo + batch_size]
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
    (seeded by round), each followed by a Polyak update of the target heads; per step, its stats.

    Several processes: each takes the samples of the minibatch that it decoded
    (:func:`owned_items`, whose features it cached), its loss weighted by their share of the
    minibatch's response tokens (an empty share: one of its samples, weight 0); the gradients are
    summed over the processes and the stats are the minibatch's."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + round_idx)
    device = next(model.heads.parameters()).device
    per_round = cfg.prompts_per_round * cfg.samples_per_prompt
    mine = set(owned_items(range(len(items)), per_round))
    model.train()
    out = []
    for k in range(cfg.steps_per_round):
        idx = torch.randint(len(items), (cfg.batch_size,), generator=gen).tolist()
        local = [i for i in idx if i in mine]
        tokens = [len(items[i].response_ids) for i in idx]
        weight = token_weight(sum(t for i, t in zip(idx, tokens) if i in mine), sum(tokens))
        if not local:
            local, weight = [min(mine)], 0.0
        batch = collate([items[i] for i in local], pad_id, index=local).to(device)
        loss, stats = softq_loss(model, batch, cfg)
        grad_norm = optimizer_step(loss * weight if weight != 1.0 else loss, optimizer, cfg.grad_clip)
        model.heads.sync_targets(cfg.polyak)
        stats = reduce_weighted({**stats, "_objective": loss.detach()}, weight)
        floats = stats_to_floats({**stats, "charts/grad_norm": grad_norm})
        check_finite(first_step + k, floats.pop("_objective"), floats)
        out.append(floats)
    model.eval()
    return out


def _prompts_sha(prompts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()


def _replay(resumed, run: Run, model, tokenizer, cfg: SoftQConfig, prompts: Sequence[str]):
    """A checkpoint's replay set, refused for other prompts; returns (next round, replay samples, encoded
    replay), with the frozen trunk's features recomputed round by round in the batches the first run used."""
    if resumed.extra.get("prompts_sha") != _prompts_sha(prompts):
        raise QVLMError(
            f"{resumed.path}: the run started with other prompts; resume with the same --prompts "
            "(and --max-prompts), or start a new run directory"
        )
    replay = [sample_from_dict(d, f"{resumed.path} replay[{i}]") for i, d in enumerate(resumed.extra["replay"])]
    items = encode_samples(replay, tokenizer, cfg.max_length)
    per_round = cfg.prompts_per_round * cfg.samples_per_prompt
    for r in range(int(resumed.extra["round"])):  # the features, in the batches the first run used
        own = owned_items(range(r * per_round, (r + 1) * per_round), per_round)
        cache_features(model, items, own, cfg.batch_size, tokenizer.pad_token_id)
    return int(resumed.extra["round"]), replay, items


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
    per_round = cfg.prompts_per_round * cfg.samples_per_prompt
    optimizer = make_optimizer(model, cfg.lr, cfg.trunk_lr, cfg.weight_decay)
    run.track(model, optimizer)
    step, replay, items = 0, [], []
    if resume:
        resumed = run.restore()
        step = resumed.step  # optimiser steps; the run's units are rounds
        run.start, replay, items = _replay(resumed, run, model, tokenizer, cfg, prompts)
    with run:
        for r in run.steps():
            # rollout: the current guided policy on this round's prompts, scored
            new, charts = sample_round(
                model, tokenizer, round_prompts(prompts, r, cfg.prompts_per_round), reward, cfg, r, run
            )
            # replay: every round is kept; a frozen trunk's features are computed once, here
            replay += new
            items += encode_samples(new, tokenizer, cfg.max_length)
            cache_features(model, items, owned_items(range(len(items) - len(new), len(items)), per_round),
                           cfg.batch_size, pad_id)  # fmt: skip
            # optimise: soft Bellman regression on minibatches of the whole replay set
            per_step = fit_round(model, optimizer, items, cfg, r, step, pad_id)
            # log and checkpoint
            charts.update({"charts/round": float(r), "charts/replay_size": float(len(replay))})
            for k, floats in enumerate(per_step):
                last = k == len(per_step) - 1
                run.log(step + k, {**floats, **charts} if last else floats,
                        postfix=("charts/guided_reward", "losses/q") if last else ())  # fmt: skip
            step += len(per_step)
            extra = {"round": r + 1, "prompts_sha": _prompts_sha(prompts)}
            run.advance(r + 1, charts, step=step, data_position=r + 1,
                        extra=lambda: {**extra, "replay": [s.to_json() for s in replay]})  # fmt: skip

    def save() -> None:
        if is_main_process():
            write_samples(run.run_dir / "replay.jsonl", replay)
        save_run(run.run_dir, model, cfg, {"algorithm": "softq", "samples": len(replay), "steps": step})

    run.finish(save)
    return run.history
