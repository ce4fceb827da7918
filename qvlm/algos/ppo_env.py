"""PPO (and A2C) in a multi-turn text environment: the policy writes each turn, the environment replies,
and GAE runs across the turns (issue 24; DESIGN.md, "Distributional values and multi-turn episodes").

The losses, the optimiser and the KL controller are single-turn PPO's (:mod:`qvlm.algos.ppo`); what
differs is the data: an episode is one growing token sequence (:mod:`qvlm.envs.tokens`) whose steps
are the agent's tokens only. The environment's tokens are observations: they are context for the
trunk and nothing else (no log-prob, value, KL or loss is computed at them). A turn's reward sits on
its last action token; ``gamma`` applies per action token; ``V(s_{t+1})`` across a turn boundary is
``V`` at the last token of the environment's reply, which on the action steps is ``V(s_{t+1}) =
values[t + 1]``, so GAE (:func:`qvlm.online.ppo_advantages`) applies as is.

One iteration::

    # rollout   episodes: qvlm.envs.rollout.run_lm on the policy, log pi_old recorded by the decoding step
    # targets   log pi_ref (adapters off), V_old at each action token's state, the k1 penalty per
    #           action token, GAE across turns, whitening over the batch's action tokens
    # optimise  qvlm.algos.ppo.optimise: clipped policy + clipped value (+ k3, entropy) on action tokens
    # log and checkpoint

Iteration ``i`` plays environment seeds ``env_seed + i * prompts_per_iter + k`` (``k <
prompts_per_iter``), ``responses_per_prompt`` episodes each (each its own sampling stream): a run
trains on seeds ``env_seed .. env_seed + iterations * prompts_per_iter - 1`` and never on others, so
held-out seeds are the ones outside that range. One process (no ``torchrun``, ``--fsdp`` or
``--deepspeed`` here).
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
from qvlm.algos.ppo import make_optimizer, optimise, uses_critic
from qvlm.configs import DecodeConfig, PPOConfig, flat
from qvlm.envs.episodes import Episode
from qvlm.envs.registry import make, resolve_name
from qvlm.envs.rollout import MAX_TURNS, run_lm
from qvlm.envs.tokens import EpisodeBatch, collate_episodes
from qvlm.errors import QVLMError
from qvlm.masked import masked_whiten
from qvlm.online import explained_variance, group_advantages, k1_kl, kl_controller, ppo_advantages
from qvlm.train.distributed import world_size
from qvlm.train.harness import Run

__all__ = [
    "EnvPPOBatch",
    "iteration_seeds",
    "step_logprobs",
    "kl_penalised_step_rewards",
    "rollout_episodes",
    "make_env_targets",
    "train_ppo_env",
]


@dataclass
class EnvPPOBatch:
    """Episodes with their PPO targets; tensors ``(B, T)`` over action tokens unless noted. Field names
    are :class:`qvlm.algos.ppo.PPOBatch`'s, so :func:`qvlm.algos.ppo.optimise` takes either."""

    rollout: EpisodeBatch
    old_logprobs: torch.Tensor  # log pi_old, recorded by the decoding step that sampled
    ref_logprobs: torch.Tensor  # log pi_ref (adapters disabled / frozen copy)
    old_values: torch.Tensor  # V_old(s_t)
    advantages: torch.Tensor  # GAE across turns (whitened when cfg.whiten)
    returns: torch.Tensor  # value targets A + V_old
    kl: torch.Tensor  # (B,) sum over action tokens of k1

    def select(self, rows: torch.Tensor) -> EnvPPOBatch:
        fields = ("old_logprobs", "ref_logprobs", "old_values", "advantages", "returns", "kl")
        return EnvPPOBatch(self.rollout.select(rows), *(getattr(self, f)[rows] for f in fields))


def iteration_seeds(env_seed: int, per_iter: int, iteration: int) -> list[int]:
    """The environment seeds of ``iteration``: ``per_iter`` new ones after the previous iterations'."""
    start = env_seed + iteration * per_iter
    return list(range(start, start + per_iter))


def step_logprobs(episodes: Sequence[Episode], T: int) -> torch.Tensor:
    """``(B, T)`` log pi_old of each episode's action tokens in step order (the turns' recorded
    ``action_logprobs`` concatenated), 0 on padding."""
    out = torch.zeros((len(episodes), T))
    for b, e in enumerate(episodes):
        if e.action_logprobs is None:
            raise QVLMError(f"episode of seed {e.seed}: no recorded log-probs; play it with run_lm(logprobs=True)")
        row = [x for turn in e.action_logprobs for x in turn]
        if len(row) != sum(e.action_mask):
            raise QVLMError(f"episode of seed {e.seed}: {len(row)} log-probs for {sum(e.action_mask)} action tokens")
        out[b, : len(row)] = torch.tensor(row)
    return out


def kl_penalised_step_rewards(
    rewards: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-step rewards of a multi-turn episode with the k1 penalty: ``r~_t = r_t - kl_coef (log pi_old
    - log pi_ref)`` on every action token, where ``r_t`` already holds each turn's reward on its last
    action token (:class:`qvlm.envs.tokens.EpisodeBatch`). Ziegler et al. 2019, eq. 2, per token as in
    :func:`qvlm.online.kl_penalised_rewards`; the environment's tokens take no step, so no KL.

    By hand: rewards ``[[0, -0.1, 0, 0.9]]``, log pi_old - log pi_ref ``[[0.5, 0, -1, 2]]``, kl_coef 0.1
    -> ``[[-0.05, -0.1, 0.1, 0.7]]``. Shape: all ``(B, T)`` -> ``(B, T)``, 0 on padding.
    """
    mask = mask.to(rewards.dtype)
    return (rewards - kl_coef * k1_kl(logprobs, ref_logprobs)) * mask


def rollout_episodes(
    ac: ActorCritic,
    tokenizer,
    env_name: str,
    seeds: Sequence[int],
    decode: DecodeConfig,
    cfg: PPOConfig,
    env_kwargs: dict | None = None,
    max_turns: int = MAX_TURNS,
) -> tuple[list[Episode], EpisodeBatch, torch.Tensor]:
    """``responses_per_prompt`` episodes of the policy per seed (seed-major; each its own sampling
    stream, keyed by ``cfg.seed``), collated on the policy's device, with log pi_old ``(B, T)``."""
    n = cfg.responses_per_prompt
    all_seeds = [s for s in seeds for _ in range(n)]
    sample_seeds = [cfg.seed * n + j for _ in seeds for j in range(n)]
    episodes = run_lm(
        ac.policy, tokenizer, env_name, all_seeds, decode, env_kwargs=env_kwargs, max_turns=max_turns,
        policy_name="ppo", logprobs=True, sample_seeds=sample_seeds,
    )  # fmt: skip
    batch = collate_episodes([e.tokens() for e in episodes], tokenizer.pad_token_id).to(ac.device)
    return episodes, batch, step_logprobs(episodes, batch.actions.shape[1]).to(ac.device)


@torch.no_grad()
def make_env_targets(
    ac: ActorCritic, batch: EpisodeBatch, old_logprobs: torch.Tensor, kl_coef: float, cfg: PPOConfig
) -> EnvPPOBatch:
    """Reference log-probs, the k1-penalised per-step rewards (when ``cfg.kl_mode == 'reward'``), then
    the advantages on the action tokens of ``batch``: GAE across turns with ``V_old`` (whitened) and the
    value targets, or, for ``cfg.advantage`` rloo / grpo, the baseline of the other episodes of the same
    environment seed (``responses_per_prompt`` adjacent rows, :func:`rollout_episodes`) on the same
    penalised rewards, summed over the episode (no V pass; values and value targets 0)."""
    mask = batch.response_mask
    ref_logprobs = ac.ref_logprobs(batch)
    in_reward = kl_coef if cfg.kl_mode == "reward" else 0.0
    step_rewards = kl_penalised_step_rewards(batch.rewards, old_logprobs, ref_logprobs, mask, in_reward)
    if uses_critic(cfg):
        old = ac.evaluate(batch, with_policy=False)
        advantages, returns = ppo_advantages(
            step_rewards, old.values, old.last_values, batch.done, mask, cfg.gamma, cfg.lam, whiten=False
        )
        old_values = old.values
        if cfg.whiten:
            advantages = masked_whiten(advantages, mask)
    else:
        advantages = group_advantages(cfg.advantage, step_rewards, mask, cfg.responses_per_prompt)
        old_values = returns = torch.zeros_like(advantages)
    kl = (k1_kl(old_logprobs, ref_logprobs) * mask).sum(-1)
    return EnvPPOBatch(batch, old_logprobs * mask, ref_logprobs, old_values, advantages, returns, kl)


def env_fingerprint(env_name: str, env_kwargs: dict | None, env_seed: int, max_turns: int) -> str:
    """What a resumed run must play again: the environment, its arguments, the seeds and the turn limit."""
    spec = {"env": resolve_name(env_name), "kwargs": env_kwargs or {}, "env_seed": env_seed, "max_turns": max_turns}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def train_ppo_env(
    ac: ActorCritic,
    tokenizer,
    env_name: str,
    cfg: PPOConfig | None = None,
    env_kwargs: dict | None = None,
    env_seed: int = 0,
    max_turns: int = MAX_TURNS,
    run_dir: str | Path | None = None,
    resume: bool = False,
    callbacks: Sequence[Callable[[int, dict[str, float]], None]] = (),
) -> dict[str, list[tuple[int, float]]]:
    """Train ``ac``'s policy and critic online in the environment ``env_name`` (module docstring);
    returns the metrics history ``{name: [(iteration, value)]}``. ``resume`` continues from
    ``run_dir``'s latest checkpoint bit for bit on CPU (policy, critic, optimiser, KL controller, every
    RNG; the seeds played are a function of the iteration)."""
    cfg = cfg or PPOConfig()
    if world_size() > 1 or cfg.trunk.fsdp or cfg.deepspeed:
        raise QVLMError("qvlm train ppo --env runs in one process: drop torchrun / accelerate, --fsdp and --deepspeed")
    if cfg.fixed_horizon:
        raise QVLMError("--fixed-horizon is for single-turn prompts; in an environment the environment ends episodes")
    make(env_name, **(env_kwargs or {}))  # an unknown name or argument: one line, before any work
    run = Run(cfg, run_dir, desc=f"{cfg.algo} {resolve_name(env_name)}", total=cfg.iterations, unit="it",
              callbacks=callbacks)  # fmt: skip
    run.join(ac.device)
    optimizer = make_optimizer(ac, cfg)
    ctl = kl_controller(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    run.track(ac, optimizer, fingerprint=env_fingerprint(env_name, env_kwargs, env_seed, max_turns))
    if resume:
        ctl.load_state_dict(run.restore().extra["kl_controller"])
    decode = DecodeConfig(
        max_new_tokens=cfg.max_new_tokens, batch_size=cfg.decode_batch_size, chat=cfg.chat, fast=cfg.fast
    )
    with run:
        for it in run.steps():
            t0 = time.perf_counter()
            # rollout (the policy writes each turn, the environment replies)
            seeds = iteration_seeds(env_seed, cfg.prompts_per_iter, it)
            episodes, batch, old_logprobs = rollout_episodes(
                ac, tokenizer, env_name, seeds, decode, cfg, env_kwargs, max_turns
            )
            # targets
            kl_coef = ctl.value
            targets = make_env_targets(ac, batch, old_logprobs, kl_coef, cfg)
            # optimise
            if cfg.anneal_lr:
                for group, lr in zip(optimizer.param_groups, (cfg.lr, cfg.critic_lr)):
                    group["lr"] = lr * (1.0 - it / cfg.iterations)
            stats = optimise(ac, optimizer, targets, cfg, kl_coef, it, critic_only=it < cfg.critic_warmup)
            kl_mean = float(targets.kl.mean())
            ctl.update(kl_mean, len(batch))
            # log and checkpoint
            n_tokens = float(batch.response_mask.sum())
            returns = [e.total_return for e in episodes]
            floats = {
                "charts/return": sum(returns) / len(returns),
                "charts/turns": sum(len(e.turns) for e in episodes) / len(episodes),
                "charts/invalid_actions": sum(t.invalid_action for e in episodes for t in e.turns)
                / max(1, sum(len(e.turns) for e in episodes)),
                "charts/kl": kl_mean,
                "charts/kl_coef": kl_coef,
                "charts/action_tokens": n_tokens / len(batch),
                **stats,
                "charts/tokens_per_s": n_tokens / (time.perf_counter() - t0),
            }
            if uses_critic(cfg):
                ev = explained_variance(targets.old_values, targets.returns, batch.response_mask)
                floats["charts/explained_variance"] = float(ev)
            run.log(it, floats, postfix=("charts/return", "charts/kl", "losses/value"))
            run.advance(it + 1, floats, extra={"kl_controller": ctl.state_dict()})
    info = {"algorithm": cfg.algo, "config": flat(cfg), "base_model": ac.heads.config.base_model,
            "env": resolve_name(env_name), "env_kwargs": env_kwargs or {}, "env_seed": env_seed,
            "train_seeds": [env_seed, env_seed + cfg.iterations * cfg.prompts_per_iter - 1],
            "max_turns": max_turns, "iterations": cfg.iterations, "kl_coef_final": ctl.value}  # fmt: skip
    run.finish(lambda: save_policy_run(run_dir, ac, info))
    return run.history
