"""The demo's ``ppo`` method (issue 9): the policy itself trained online, PPO with a LoRA policy and a
V critic on its trunk (:func:`qvlm.algos.ppo.train_ppo`), on the demo's training prompts toward the
demo's reward, under the protocol of the other methods (DESIGN.md, "Evaluation protocol"):

- train: one resumable ``train_ppo`` run in ``OUT/ppo`` (its own checkpoint), for the largest of the
  ``--ppo-iterations`` counts, keeping a snapshot of the policy after each smaller count
  (``OUT/ppo/it_N``; the policy after the last count is ``OUT/ppo`` itself);
- validation: each snapshot decodes the validation prompts once (``val/ppo_it_N.json``); the iteration
  count with the highest mean validation reward is the one evaluated (ties: the fewest iterations);
- eval: that policy decodes the eval prompts once (``eval/ppo.json``): the ``ppo`` row, with the exact
  KL of its sampling distribution to the base model's, summed per response (:mod:`qvlm.eval.policy`).

The task has the demo's fixed horizon: the reward scores exactly the first ``max_new_tokens`` tokens,
so a response cut there ends its episode (``fixed_horizon``), as in the offline data.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

from qvlm.algos.actor_critic import load_policy
from qvlm.apps.demo_context import DemoContext, save_json
from qvlm.apps.demo_eval import choose_shown
from qvlm.apps.runs import parse_iterations, snapshot_dir, train_with_snapshots
from qvlm.configs import DemoConfig, PPOConfig, flat
from qvlm.decoding.sampling import sample_rollout
from qvlm.eval.metrics import json_safe
from qvlm.eval.policy import rollout_metrics
from qvlm.fileio import read_json
from qvlm.train.metrics import read_history

__all__ = [
    "ppo_stages",
    "ppo_config",
    "train_ppo_phase",
    "training_cost",
    "ppo_phase",
]


def ppo_stages(cfg: DemoConfig) -> list[int]:
    """The iteration counts to choose from (``--ppo-iterations``, resolved); empty: no ppo method."""
    return parse_iterations(cfg.ppo_iterations)


def ppo_config(cfg: DemoConfig, progress: bool = True) -> PPOConfig:
    """The demo's PPO settings (``cfg.ppo``: LoRA policy, shared V critic, k1 KL penalty in the reward,
    fixed) with what the demo decides for every method: the length and its fixed horizon, the seed, the
    heads' width and the decode batch; as many iterations as the largest count."""
    return dataclasses.replace(
        cfg.ppo,
        iterations=ppo_stages(cfg)[-1],
        max_new_tokens=cfg.max_new_tokens,
        head_hidden=cfg.head_hidden,
        decode_batch_size=cfg.batch_size,
        seed=cfg.seed,
        progress=progress,
    )


def train_ppo_phase(ctx: DemoContext) -> tuple[Path, list[int]]:
    """Train (or resume, or find cached) the PPO run in ``OUT/ppo`` with its snapshots; returns the run
    directory and the iteration counts."""
    stages, run_dir = ppo_stages(ctx.cfg), ctx.out / "ppo"
    pcfg = ppo_config(ctx.cfg, ctx.progress)
    train_with_snapshots(
        run_dir, ctx.model, ctx.tokenizer, ctx.train_prompts, ctx.reward, pcfg, stages, ctx.cfg.model, ctx.log
    )
    return run_dir, stages


def training_cost(history: dict, pcfg: PPOConfig, iterations: int) -> dict:
    """Wall time and reward calls of the first ``iterations`` iterations, from metrics.jsonl: each
    iteration's wall time is its response tokens over its ``tokens_per_s`` (how train_ppo computes it)."""
    per_iter = pcfg.prompts_per_iter * pcfg.responses_per_prompt
    lengths, speeds = dict(history["charts/response_length"]), dict(history["charts/tokens_per_s"])
    seconds = sum(lengths[i] * per_iter / speeds[i] for i in range(iterations))
    return {"train_seconds": seconds, "reward_calls": iterations * per_iter, "iterations": iterations}


def _decode(ctx: DemoContext, split: str, prompts: list[str], policy_dir: Path, name: str) -> dict:
    """Decode ``prompts`` once with the policy in ``policy_dir`` (LoRA merged into a copy of the base)
    and score them: ``{"texts", "rewards", "metrics"}``, cached in ``OUT/SPLIT/NAME.json``."""
    file = ctx.out / split / f"{name}.json"
    if file.is_file():
        ctx.log(f"[{split} {name}] cached")
        saved = read_json(file, "delete it to compute that phase again", (dict, list))
    else:
        saved = _decode_once(ctx, prompts, policy_dir, name, split)
        save_json(file, saved)
    m = saved["metrics"]
    ci = "-" if m["reward_ci95"] is None else f"{m['reward_ci95']:.3f}"  # None: one response (CI infinite)
    ctx.log(f"  reward {m['reward_mean']:.3f} +- {ci}, exact KL {m['kl_to_base']:.3f}")
    return saved


def _decode_once(ctx: DemoContext, prompts: list[str], policy_dir: Path, name: str, split: str) -> dict:
    """The uncached part of :func:`_decode`: load the policy, decode (timed alone), measure."""
    ctx.log(f"[{split} {name}] {time.strftime('%H:%M:%S')}")
    policy = load_policy(copy.deepcopy(ctx.model), policy_dir)
    start = time.perf_counter()
    rollout = sample_rollout(policy, ctx.tokenizer, prompts, cfg=ctx.decode, progress=ctx.progress,
                             logprobs=False, ref_logprobs=False)  # fmt: skip
    seconds = time.perf_counter() - start
    # reward, exact KL to the base (summed per response), distinct-2, perplexity under the base; a merged
    # LoRA policy costs what the base costs per token (cost 1)
    metrics, texts, rewards = rollout_metrics(policy, ctx.model, ctx.tokenizer, prompts, rollout, ctx.reward,
                                              cfg=ctx.decode)  # fmt: skip
    tokens = int(rollout.response_mask.sum())
    row = json_safe({**metrics.as_dict(), "seconds": seconds, "seconds_per_token": seconds / max(tokens, 1)})
    return {"texts": texts, "rewards": rewards, "metrics": row}


def ppo_phase(ctx: DemoContext, base_seconds_per_token: float | None = None) -> dict | None:
    """Train, choose the iteration count on validation, evaluate once. Returns metrics.json's ``"ppo"``
    block, or None with ``--ppo-iterations 0``: ``{"row": the eval row (with training cost),
    "validation": {"ppo_it_N": row}, "chosen", "iterations", "stages", "settings", "history":
    {"reward": [(step, value)], "kl": [...]}}`` (``history`` from the run's metrics.jsonl; step ``i`` is
    iteration ``i + 1``'s rollout, sampled before that iteration's update)."""
    if not ppo_stages(ctx.cfg):
        return None
    run_dir, stages = train_ppo_phase(ctx)
    pcfg = ppo_config(ctx.cfg, ctx.progress)
    (ctx.out / "val").mkdir(exist_ok=True)
    validation = {}
    for n in stages:
        name = f"ppo_it_{n}"
        validation[name] = _decode(ctx, "val", ctx.val_prompts, snapshot_dir(run_dir, n, stages[-1]), name)["metrics"]
    chosen = choose_shown(validation)  # the first of equals: the fewest iterations
    iterations = stages[list(validation).index(chosen)]
    (ctx.out / "eval").mkdir(exist_ok=True)
    saved = _decode(ctx, "eval", ctx.eval_prompts, snapshot_dir(run_dir, iterations, stages[-1]), "ppo")
    history = read_history(run_dir / "metrics.jsonl")
    row = {**saved["metrics"], **training_cost(history, pcfg, iterations)}
    if base_seconds_per_token:
        row["time_ratio"] = row["seconds_per_token"] / base_seconds_per_token
    ctx.log(
        f"  ppo, iteration count {iterations} (chosen on validation): reward {row['reward_mean']:.3f}, "
        f"exact KL {row['kl_to_base']:.3f}, {row['reward_calls']} reward calls, {row['train_seconds']:.0f} s training"
    )
    settings = flat(pcfg)
    return {
        "row": row,
        "validation": validation,
        "chosen": chosen,
        "chosen_on": "validation",
        "validation_prompts": len(ctx.val_prompts),
        "iterations": iterations,
        "stages": stages,
        "train_seconds_total": training_cost(history, pcfg, stages[-1])["train_seconds"],
        "settings": {k: settings[k] for k in SETTINGS_SHOWN},
        "history": {"reward": history.get("charts/reward", []), "kl": history.get("charts/kl", [])},
    }


# the PPO settings metrics.json records (the rest are PPOConfig's defaults)
SETTINGS_SHOWN = ("trunk", "critic", "lora_r", "prompts_per_iter", "responses_per_prompt", "ppo_epochs",
                  "minibatch_size", "lr", "critic_lr", "kl_coef", "kl_mode", "fixed_horizon", "max_new_tokens")  # fmt: skip
