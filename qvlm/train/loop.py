"""The loop every offline trainer shares: seeding, batch order, optimiser, steps; metrics
(:mod:`qvlm.train.metrics`) and checkpoints (:mod:`qvlm.train.checkpoint`).

A run directory holds ``heads.safetensors`` + ``heads_config.json`` (the final heads),
``checkpoint/`` (the latest resumable state), ``metrics.jsonl`` and ``tb/`` (TensorBoard).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Callable, Iterator

import torch

from qvlm.mdp import EncodedSample, Sample, TokenBatch, collate, encode_samples
from qvlm.model import QVModel
from qvlm.progress import progress
from qvlm.train.checkpoint import load_checkpoint, save_checkpoint, save_run
from qvlm.train.metrics import MetricsLogger

__all__ = [
    "batch_schedule",
    "set_seed",
    "make_optimizer",
    "train_loop",
]


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def batch_schedule(
    items: list[EncodedSample], batch_size: int, seed: int, start_step: int, total_steps: int, pad_token_id: int
) -> Iterator[tuple[int, TokenBatch]]:
    """``(step, batch)`` for steps ``start_step .. total_steps - 1``.

    Epoch ``e`` visits the samples in a permutation drawn from ``seed + e``, so the batch of any
    step is known without replaying earlier ones: a resumed run sees the batches an uninterrupted
    run would.
    """
    per_epoch = math.ceil(len(items) / batch_size)
    for step in range(start_step, total_steps):
        epoch, k = divmod(step, per_epoch)
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        idx = order[k * batch_size : (k + 1) * batch_size]
        yield step, collate([items[i] for i in idx], pad_token_id, index=idx)


def make_optimizer(model: QVModel, lr: float, trunk_lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the heads (``lr``) and the trunk's trainable tensors (``trunk_lr``), if any."""
    groups = [{"params": [p for p in model.heads.parameters() if p.requires_grad], "lr": lr}]
    trunk = [p for p in model.trunk.parameters() if p.requires_grad]
    if trunk:
        groups.append({"params": trunk, "lr": trunk_lr})
    return torch.optim.AdamW(groups, weight_decay=weight_decay)


def train_loop(
    model: QVModel,
    tokenizer,
    samples: list[Sample],
    cfg,
    loss_fn: Callable[[QVModel, TokenBatch], tuple[torch.Tensor, dict[str, float]]],
    name: str,
    run_dir: str | Path | None = None,
    resume: bool = False,
    callbacks=(),
    after_step: Callable[[int], None] | None = None,
) -> dict[str, list[tuple[int, float]]]:
    """The loop every offline trainer shares; returns the metric history.

    ``cfg`` carries seed, max_length, batch_size, epochs, steps, lr, trunk_lr, weight_decay,
    grad_clip, checkpoint_every and progress. Each step: ``loss_fn`` on the step's batch, backward,
    clip, optimiser step, ``after_step(step)`` (e.g. target sync), log, checkpoint, ``callbacks``.
    With ``run_dir``: checkpoints, final heads, metrics.jsonl, TensorBoard; ``resume=True``
    continues from ``run_dir/checkpoint`` to the state an uninterrupted run reaches.
    """
    run_dir = Path(run_dir) if run_dir is not None else None
    set_seed(cfg.seed)
    items = encode_samples(samples, tokenizer, cfg.max_length)
    total = cfg.steps or cfg.epochs * -(-len(items) // cfg.batch_size)
    optimizer = make_optimizer(model, cfg.lr, cfg.trunk_lr, cfg.weight_decay)
    start = load_checkpoint(run_dir, model, optimizer, cfg) if resume and run_dir else 0
    logger = MetricsLogger(run_dir, resume_step=start)
    model.train()
    bar = progress(total=total, initial=start, desc=f"train {name}", enabled=cfg.progress, unit="step")
    try:
        for step, batch in batch_schedule(items, cfg.batch_size, cfg.seed, start, total, tokenizer.pad_token_id):
            loss, stats = loss_fn(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                params = [p for g in optimizer.param_groups for p in g["params"]]
                stats["charts/grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            optimizer.step()
            if after_step is not None:
                after_step(step)
            logger.log(step, stats)
            bar.update(1)
            bar.set_postfix({k.split("/")[-1]: f"{v:.4f}" for k, v in stats.items() if k.startswith("losses/")})
            if run_dir and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                save_checkpoint(run_dir, model, optimizer, step + 1, cfg)
            for cb in callbacks:
                cb(step, stats)
    finally:
        bar.close()
        logger.close()
        model.eval()
    if run_dir:
        save_checkpoint(run_dir, model, optimizer, total, cfg)
        save_run(run_dir, model, cfg, {"algorithm": name, "samples": len(samples), "steps": total})
    return logger.history
