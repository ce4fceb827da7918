"""PPO (and A2C) with a V critic on a causal LM: sample with the current policy, score, update the
critic by its TD(lambda) error and the actor by the clipped surrogate on GAE advantages, repeat.

Sources: Schulman et al. 2017 (PPO), Schulman et al. 2016 (GAE), Ziegler et al. 2019 (KL penalty
per token in the reward, adaptive KL controller), Mnih et al. 2016 (A2C: the ``a2c`` preset).
Conventions and formulas: shared/DESIGN.md, "Online learning and evaluation".

Critic-free advantages on the same loop (``advantage = rloo | grpo``, issue 23): the same rollouts,
KL options and clipped surrogate, with a baseline from the other responses to the same prompt
(:func:`qvlm.online.group_advantages` on the KL-penalised per-token rewards GAE would take) instead
of ``V_old``; no V head runs, no value loss, no critic parameter group. Whitening applies to GAE only:
RLOO's advantages are used as their sources define them (Ahmadian et al. 2024; TRL's RLOOTrainer
leaves ``normalize_advantages`` off), and GRPO's are already normalised within each prompt's responses,
where a second whitening over the batch would give the prompts whose responses all scored alike
(advantage 0, no signal) a nonzero push.

One iteration::

    # rollout   prompts -> responses (DecodeStep via sample_rollout; log pi_old recorded there)
    # reward    the batch reward (prompts, responses) -> floats, checked finite
    # targets   log pi_ref (adapters off), V_old, k1 penalty in the reward, GAE, whitening
    #           (rloo / grpo: the group baseline instead of V_old and GAE)
    # optimise  ppo_epochs x minibatches of clipped policy + clipped value (+ k3, entropy) losses
    # log and checkpoint

A run directory holds the policy (``adapter/`` or ``policy.safetensors``), the V head,
``training.json``, ``metrics.jsonl``, ``tb/`` and ``checkpoint/`` (resumable bit for bit on CPU).

Several processes (``torchrun`` / ``accelerate launch``, docs/distributed.md): each samples, scores
and computes the targets of its block of the iteration's prompts; the targets are gathered on every
process (advantages whitened over the global batch), each minibatch is split over the processes with
token-weighted losses and summed gradients, so N processes take the steps one process takes. Every
response draws from its own random stream keyed by (seed, iteration, row), so the tokens sampled do
not depend on the number of processes either. ``--fsdp`` shards a full trunk's weights (FSDP2);
``--deepspeed`` partitions its AdamW moments (ZeRO-1) and gradients (ZeRO-2) instead
(:mod:`qvlm.train.zero`); both take the steps one plain process takes.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from qvlm.algos.actor_critic import ActorCritic, save_policy_run
from qvlm.configs import DecodeConfig, PPOConfig, flat
from qvlm.decoding.sampling import encode_prompts, sample_rollout, sampling_seeds
from qvlm.errors import QVLMError
from qvlm.losses import Stats, clipped_value_loss, ppo_policy_loss
from qvlm.masked import masked_mean, masked_whiten
from qvlm.online import (
    explained_variance,
    group_advantages,
    k1_kl,
    k3_kl,
    kl_controller,
    kl_penalised_rewards,
    ppo_advantages,
)
from qvlm.rewards import RewardFn, get_reward, score
from qvlm.rollout import Rollout
from qvlm.train.distributed import all_reduce_sum, block, gather_rows, raise_if_any_failed, shard_rows, world_size
from qvlm.train.harness import Run, check_finite
from qvlm.train.metrics import stats_to_floats
from qvlm.train.optim import optimizer_step
from qvlm.train.zero import ZeroOptimizer, zero_initialize

__all__ = [
    "PPOConfig",
    "PPOBatch",
    "iteration_prompts",
    "sample_shard",
    "gather_batch",
    "uses_critic",
    "make_targets",
    "ppo_loss",
    "optimise",
    "train_ppo",
]


@dataclass
class PPOBatch:
    """A scored rollout with its PPO targets; tensors ``(B, T)`` unless noted."""

    rollout: Rollout
    old_logprobs: torch.Tensor  # log pi_old, recorded by the decoding step that sampled
    ref_logprobs: torch.Tensor  # log pi_ref (adapters disabled / frozen copy)
    old_values: torch.Tensor  # V_old(s_t) (0 without a critic)
    advantages: torch.Tensor  # whitened GAE, or the group baseline's (rloo, grpo)
    returns: torch.Tensor  # value targets A + V_old (0 without a critic)
    kl: torch.Tensor  # (B,) sum over steps of k1 (log pi_old - log pi_ref)

    def select(self, rows: torch.Tensor) -> PPOBatch:
        r = self.rollout
        sub = Rollout(r.prompt_ids[rows], r.prompt_mask[rows], r.response_ids[rows], r.response_mask[rows],
                      r.finished[rows], pad_id=r.pad_id)  # fmt: skip
        fields = ("old_logprobs", "ref_logprobs", "old_values", "advantages", "returns", "kl")
        return PPOBatch(sub, *(getattr(self, f)[rows] for f in fields))


def iteration_prompts(prompts: Sequence, per_iter: int, seed: int, iteration: int) -> list:
    """The prompts of ``iteration``: epoch ``e`` visits all prompts in a permutation drawn from
    ``seed + e``, so any iteration's prompts are known without replaying earlier ones (resume)."""
    n = len(prompts)
    out = []
    for k in range(iteration * per_iter, (iteration + 1) * per_iter):
        epoch, i = divmod(k, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        out.append(prompts[order[i]])
    return out


def prompts_fingerprint(prompts: Sequence) -> str:
    return hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()


def sample_shard(
    ac: ActorCritic, tokenizer, batch_prompts: list, decode: DecodeConfig, seed: int, iteration: int
) -> tuple[Rollout, list]:
    """This process's rollout of an iteration and its prompts: its block of ``batch_prompts`` (all
    of them in one process), left-padded to the iteration's longest prompt, each response drawn from
    its own stream (:func:`sampling_seeds`) keyed by its row in the iteration."""
    encoded = encode_prompts(tokenizer, batch_prompts, decode, ac.policy)
    mine, n = block(len(batch_prompts)), decode.num_return_sequences
    rollout = sample_rollout(
        ac.policy,
        tokenizer,
        encoded[mine.start : mine.stop],
        cfg=decode,
        ref_logprobs=False,
        row_seeds=sampling_seeds(seed, iteration, range(mine.start * n, mine.stop * n)),
        pad_to=max(len(p) for p in encoded),
    )
    return rollout, batch_prompts[mine.start : mine.stop]


def gather_batch(batch: PPOBatch) -> PPOBatch:
    """Every process's rows of ``batch`` on every process, in rank order (the one-process order);
    responses right-padded to the longest. The prompts of every process have the same padded
    length (:func:`sample_shard`). ``batch`` itself in one process."""
    if world_size() == 1:
        return batch
    r, pad = batch.rollout, batch.rollout.pad_id
    rollout = Rollout(
        gather_rows(r.prompt_ids, pad),
        gather_rows(r.prompt_mask),
        gather_rows(r.response_ids, pad),
        gather_rows(r.response_mask),
        gather_rows(r.finished),
        logprobs=gather_rows(batch.old_logprobs),
        rewards=gather_rows(r.rewards),
        pad_id=pad,
    )
    fields = ("ref_logprobs", "old_values", "advantages", "returns", "kl")
    return PPOBatch(rollout, rollout.logprobs, *(gather_rows(getattr(batch, f)) for f in fields))


def uses_critic(cfg: PPOConfig) -> bool:
    """Whether ``cfg``'s advantages need the V critic (GAE) or none (rloo, grpo)."""
    return cfg.advantage == "gae"


@torch.no_grad()
def make_targets(ac: ActorCritic, rollout: Rollout, kl_coef: float, cfg: PPOConfig) -> PPOBatch:
    """Reference log-probs, the KL-penalised rewards (k1 in the reward when ``cfg.kl_mode ==
    'reward'``), then the advantages: GAE with ``V_old`` (whitened) and value targets, or, for
    ``cfg.advantage`` rloo / grpo, the baseline of the other responses to the same prompt on the
    same penalised rewards (no V pass; values and value targets 0).

    Each process computes them on its own rows (whole prompts, so whole groups); the batch returned is
    the global one (:func:`gather_batch`), GAE advantages whitened over all its real tokens, as in one
    process."""
    mask = rollout.response_mask
    ref_logprobs = ac.ref_logprobs(rollout)
    in_reward = kl_coef if cfg.kl_mode == "reward" else 0.0
    token_rewards = kl_penalised_rewards(rollout.rewards, rollout.logprobs, ref_logprobs, mask, in_reward)
    if uses_critic(cfg):
        old = ac.evaluate(rollout, with_policy=False)
        done = rollout.done(cfg.fixed_horizon)
        advantages, returns = ppo_advantages(
            token_rewards, old.values, old.last_values, done, mask, cfg.gamma, cfg.lam, whiten=False
        )
        old_values = old.values
    else:  # the responses to one prompt are contiguous rows (sample_rollout's layout)
        advantages = group_advantages(cfg.advantage, token_rewards, mask, cfg.responses_per_prompt)
        old_values = returns = torch.zeros_like(advantages)
    kl = (k1_kl(rollout.logprobs, ref_logprobs) * mask).sum(-1)
    batch = gather_batch(PPOBatch(rollout, rollout.logprobs, ref_logprobs, old_values, advantages, returns, kl))
    if cfg.whiten and uses_critic(cfg):  # over the global batch's real tokens (DESIGN.md); module docstring
        batch.advantages = masked_whiten(batch.advantages, batch.rollout.response_mask)
    return batch


def ppo_loss(ac: ActorCritic, batch: PPOBatch, cfg: PPOConfig, kl_coef: float, critic_only: bool):
    """Clipped policy loss + ``vf_coef`` x clipped value loss (+ ``kl_coef`` x k3, - ``ent_coef`` x
    entropy) on one minibatch. Critic-only (warm-up): the value loss alone. Without a critic (rloo,
    grpo) there is no value loss and the V head is not run."""
    mask = batch.rollout.response_mask
    critic = uses_critic(cfg)
    out = ac.evaluate(batch.rollout, with_policy=not critic_only, with_values=critic)
    stats: Stats = {}
    loss = torch.zeros((), device=mask.device)
    if critic:
        if cfg.value_clip > 0:
            v_loss, v_stats = clipped_value_loss(out.values, batch.old_values, batch.returns, mask, cfg.value_clip)
        else:
            v_loss = 0.5 * masked_mean((out.values - batch.returns) ** 2, mask)
            v_stats = {"loss": v_loss.detach()}
        stats["losses/value"] = v_stats["loss"]
        loss = cfg.vf_coef * v_loss
    if critic_only:
        return loss, stats
    pg_loss, pg_stats = ppo_policy_loss(out.logprobs, batch.old_logprobs, batch.advantages, mask, cfg.clip_eps)
    entropy = masked_mean(out.entropy, mask)
    loss = loss + pg_loss - cfg.ent_coef * entropy
    stats.update(
        {
            "losses/policy": pg_stats["loss"],
            "charts/clipfrac": pg_stats["clipfrac"],
            "charts/approx_kl": pg_stats["approx_kl"],
            "charts/entropy": entropy.detach(),
        }
    )
    if cfg.kl_mode == "loss":
        k3 = masked_mean(k3_kl(out.logprobs, batch.ref_logprobs), mask)
        loss = loss + kl_coef * k3
        stats["losses/k3"] = k3.detach()
    return loss, stats


def optimise(
    ac: ActorCritic,
    optimizer: torch.optim.Optimizer,
    batch: PPOBatch,
    cfg: PPOConfig,
    kl_coef: float,
    iteration: int,
    critic_only: bool,
) -> dict[str, float]:
    """``ppo_epochs`` passes of shuffled minibatches (order seeded by ``seed`` and ``iteration``);
    returns the mean of every stat over the steps.

    Several processes: each takes every ``world``-th row of a minibatch, its loss weighted by its
    share of the minibatch's response tokens (every loss term is a masked mean over them), and the
    gradients are summed over the processes (:func:`qvlm.train.distributed.shard_rows`); the stats
    are the global minibatches' (token-weighted sums over the processes)."""
    B = len(batch.rollout)
    tokens = batch.rollout.response_mask.sum(-1)  # (B,) response tokens per row
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + iteration)
    sums: dict[str, torch.Tensor] = {}
    steps = 0
    if isinstance(optimizer, ZeroOptimizer):  # warm-up: a plain AdamW skips the policy (no gradients)
        optimizer.idle_groups = {0} if critic_only else set()
    ac.train()
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(B, generator=gen).to(batch.rollout.response_ids.device)
        for start in range(0, B, cfg.minibatch_size):
            rows, weight = shard_rows(order[start : start + cfg.minibatch_size], tokens)
            loss, stats = ppo_loss(ac, batch.select(rows), cfg, kl_coef, critic_only)
            grad_norm = optimizer_step(loss * weight if weight != 1.0 else loss, optimizer, cfg.grad_clip)
            stats["_objective"] = loss.detach()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + weight * v.detach().to(torch.float64)
            # the norm of the summed gradient: the same on every process, not reduced
            sums["charts/grad_norm"] = sums.get("charts/grad_norm", 0.0) + grad_norm.to(torch.float64)
            steps += 1
    ac.eval()
    if world_size() > 1:
        reduced = all_reduce_sum(torch.stack([v for k, v in sums.items() if k != "charts/grad_norm"]))
        keys = [k for k in sums if k != "charts/grad_norm"]
        sums = {**dict(zip(keys, reduced.unbind())), "charts/grad_norm": sums["charts/grad_norm"]}
    floats = stats_to_floats({k: v / steps for k, v in sums.items()})
    check_finite(iteration, floats.pop("_objective"), floats)
    return floats


def make_optimizer(ac: ActorCritic, cfg: PPOConfig) -> torch.optim.Optimizer:
    """AdamW: the policy's trainable tensors at ``lr``, the critic's at ``critic_lr`` (no critic group
    for the critic-free advantages: the V head then stays as it was built)."""
    groups = [{"params": ac.policy_parameters(), "lr": cfg.lr}]
    if uses_critic(cfg):
        groups.append({"params": ac.critic_parameters(), "lr": cfg.critic_lr})
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def score_rollout(
    reward: RewardFn, rollout: Rollout, tokenizer, prompts: list, iteration: int, run: Run
) -> torch.Tensor:
    """``(B,)`` rewards of a rollout's responses; a non-finite or malformed reward stops the run,
    naming the iteration and the checkpoint left intact (on every process when one process's
    reward failed)."""
    repeated = [p for p in prompts for _ in range(len(rollout) // len(prompts))]
    values, error = None, None
    try:
        values = score(reward, repeated, rollout.texts(tokenizer))
    except QVLMError as err:
        error = run.stopped(err, f"iteration {iteration}")
    raise_if_any_failed(error, f"iteration {iteration}: the reward")
    return torch.tensor(values, dtype=torch.float32, device=rollout.response_ids.device)


def train_ppo(
    ac: ActorCritic,
    tokenizer,
    prompts: Sequence,
    reward: str | RewardFn,
    cfg: PPOConfig | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    callbacks: Sequence[Callable[[int, dict[str, float]], None]] = (),
) -> dict[str, list[tuple[int, float]]]:
    """Train ``ac``'s policy and critic online on ``prompts`` (texts, or token-id lists) toward
    ``reward`` (a name of :func:`qvlm.rewards.get_reward` or a batch callable
    ``(prompts, responses) -> floats``). Returns the metrics history ``{name: [(iteration, value)]}``.

    ``resume`` continues from ``run_dir``'s latest checkpoint bit for bit on CPU: policy, critic,
    optimiser, KL controller, every RNG, and the prompt order (a function of seed and iteration).

    Under ``torchrun`` / ``accelerate launch`` the processes join one group (gloo on CPU, NCCL on
    CUDA) and share each iteration (module docstring); ``cfg.prompts_per_iter`` must be a multiple
    of their number. Only the main process writes files.
    """
    cfg = cfg or PPOConfig()
    run = Run(cfg, run_dir, desc=cfg.algo, total=cfg.iterations, unit="it", callbacks=callbacks)
    run.join(ac.device, fsdp=cfg.trunk.fsdp, deepspeed=cfg.deepspeed,
             divisible=[(cfg.prompts_per_iter, "--prompts-per-iter", "prompts")])  # fmt: skip
    if cfg.trunk.fsdp:  # before the optimiser, which must hold the shards
        ac.shard()
    prompts = list(prompts)
    if not prompts:
        raise QVLMError("no training prompts; give a prompt file with at least one prompt")
    reward_fn = get_reward(reward)
    optimizer = make_optimizer(ac, cfg)
    if cfg.deepspeed:  # the engine partitions the AdamW moments (and gradients) over the processes
        optimizer = zero_initialize(ac, optimizer, cfg.deepspeed, cfg.grad_clip)
    ctl = kl_controller(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    run.track(ac, optimizer, fingerprint=prompts_fingerprint(prompts))
    if resume:
        ctl.load_state_dict(run.restore().extra["kl_controller"])
    decode = DecodeConfig(
        max_new_tokens=cfg.max_new_tokens,
        num_return_sequences=cfg.responses_per_prompt,
        batch_size=cfg.decode_batch_size,
        chat=cfg.chat,
        fast=cfg.fast,
    )
    with run:
        for it in run.steps():
            t0 = time.perf_counter()
            # rollout (this process's block of the iteration's prompts)
            batch_prompts = iteration_prompts(prompts, cfg.prompts_per_iter, cfg.seed, it)
            rollout, local_prompts = sample_shard(ac, tokenizer, batch_prompts, decode, cfg.seed, it)
            # reward
            rollout.rewards = score_rollout(reward_fn, rollout, tokenizer, local_prompts, it, run)
            # targets (of the global batch, on every process)
            kl_coef = ctl.value
            batch = make_targets(ac, rollout, kl_coef, cfg)
            rollout = batch.rollout
            # optimise
            if cfg.anneal_lr:  # a function of the iteration alone: nothing to checkpoint
                for group, lr in zip(optimizer.param_groups, (cfg.lr, cfg.critic_lr)):
                    group["lr"] = lr * (1.0 - it / cfg.iterations)
            stats = optimise(ac, optimizer, batch, cfg, kl_coef, it, critic_only=it < cfg.critic_warmup)
            kl_mean = float(batch.kl.mean())
            ctl.update(kl_mean, len(rollout))
            # log and checkpoint
            n_tokens = float(rollout.response_mask.sum())
            floats = {
                "charts/reward": float(rollout.rewards.mean()),
                "charts/kl": kl_mean,
                "charts/kl_coef": kl_coef,
                "charts/response_length": n_tokens / len(rollout),
                **stats,
                "charts/tokens_per_s": n_tokens / (time.perf_counter() - t0),
            }
            if uses_critic(cfg):
                ev = explained_variance(batch.old_values, batch.returns, rollout.response_mask)
                floats["charts/explained_variance"] = float(ev)
            run.log(it, floats, postfix=("charts/reward", "charts/kl", "losses/value"))
            run.advance(it + 1, floats, extra={"kl_controller": ctl.state_dict()})
    info = {"algorithm": cfg.algo, "config": flat(cfg), "base_model": ac.heads.config.base_model,
            "prompts": len(prompts), "iterations": cfg.iterations, "kl_coef_final": ctl.value}  # fmt: skip
    run.finish(lambda: save_policy_run(run_dir, ac, info))
    return run.history
