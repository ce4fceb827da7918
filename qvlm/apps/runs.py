"""Runs an app trains once and reuses (issue 21): a finished run directory is loaded instead of trained
again, an interrupted one resumes from its checkpoint, and a PPO run keeps policy snapshots at chosen
iteration counts. ``qvlm demo`` and ``qvlm proxy`` both train through here.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Callable

from qvlm.algos.actor_critic import ActorCritic, save_policy_run
from qvlm.algos.ppo import make_optimizer, prompts_fingerprint, train_ppo
from qvlm.configs import PPOConfig, flat
from qvlm.heads import load_heads
from qvlm.model import QVModel
from qvlm.train.checkpoint import checkpoint_step, has_checkpoint, latest_checkpoint, load_checkpoint
from qvlm.train.metrics import read_history
from qvlm.train.rng import set_seed

__all__ = ["parse_iterations", "train_or_load", "snapshot_dir", "train_with_snapshots"]


def parse_iterations(text: str) -> list[int]:
    """``"10,20"`` -> ``[10, 20]``; ``"0"`` or ``""`` -> ``[]`` (no PPO)."""
    counts = [int(x) for x in text.split(",") if x.strip()]
    return [] if counts in ([], [0]) else counts


def train_or_load(
    run_dir: Path, model: QVModel, train: Callable[[Path, bool], dict], log: Callable[[str], None]
) -> dict[str, list[tuple[int, float]]]:
    """Load ``model``'s heads from a finished ``run_dir``, else ``train(run_dir, resume)`` (resuming from
    its checkpoint if one is there); returns the loss history."""
    name = run_dir.name
    if (run_dir / "heads.safetensors").is_file() and (run_dir / "training.json").is_file():
        log(f"[train {name}] cached")
        model.heads.load_state_dict(load_heads(run_dir).state_dict())
        return read_history(run_dir / "metrics.jsonl")
    resume = has_checkpoint(run_dir)
    log(f"[train {name}] {time.strftime('%H:%M:%S')}" + (" resuming from checkpoint" if resume else ""))
    return train(run_dir, resume)


def snapshot_dir(run_dir: Path, n: int, last: int) -> Path:
    """Where the policy after ``n`` of ``last`` iterations lies: ``run_dir/it_N``, or ``run_dir`` itself."""
    return run_dir if n == last else run_dir / f"it_{n}"


def _trained(run_dir: Path, stages: list[int]) -> bool:
    return all((snapshot_dir(run_dir, n, stages[-1]) / "training.json").is_file() for n in stages)


def train_with_snapshots(
    run_dir: Path,
    model,
    tokenizer,
    prompts: list[str],
    reward,
    pcfg: PPOConfig,
    stages: list[int],
    base_model: str,
    log: Callable[[str], None] = print,
) -> None:
    """Train (or resume, or find cached) a PPO run in ``run_dir`` for ``stages[-1]`` iterations (``pcfg``'s
    own count is replaced), keeping a policy snapshot after each smaller count in ``stages``
    (``run_dir/it_N``). ``model`` is copied: the adapters go into the copy."""
    pcfg = dataclasses.replace(pcfg, iterations=stages[-1])
    if _trained(run_dir, stages):
        log("[train ppo] cached")
        return
    resume = has_checkpoint(run_dir)
    log(f"[train ppo] {time.strftime('%H:%M:%S')}" + (" resuming from checkpoint" if resume else ""))
    set_seed(pcfg.seed)  # the V head's initialisation (a resume reads it from the checkpoint)
    ac = ActorCritic(copy.deepcopy(model), pcfg.trunk, pcfg.critic, pcfg.head_hidden, base_model=base_model)
    info = {"algorithm": pcfg.algo, "config": flat(pcfg), "base_model": base_model, "prompts": len(prompts)}

    def snapshot(n: int) -> None:
        save_policy_run(run_dir / f"it_{n}", ac, {**info, "iterations": n, "snapshot_of": str(run_dir)})

    if resume:  # a kill between a checkpoint at a snapshot count and the snapshot itself: write it now
        step = checkpoint_step(latest_checkpoint(run_dir))
        if step in stages[:-1] and not (run_dir / f"it_{step}" / "training.json").is_file():
            load_checkpoint(run_dir, ac, make_optimizer(ac, pcfg), pcfg, fingerprint=prompts_fingerprint(prompts))
            snapshot(step)

    def on_iteration(it: int, _metrics: dict) -> None:
        if it + 1 in stages[:-1]:
            snapshot(it + 1)

    train_ppo(ac, tokenizer, prompts, reward, pcfg, run_dir, resume, callbacks=[on_iteration])
