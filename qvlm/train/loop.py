"""The loop every offline trainer shares, composed of the pieces an online trainer uses as well:
:mod:`qvlm.train.optim` (optimiser, one optimiser step), :mod:`qvlm.train.checkpoint` (resumable
state), :mod:`qvlm.train.metrics` (jsonl + TensorBoard), :mod:`qvlm.train.rng` (seeding).

A run directory holds ``heads.safetensors`` + ``heads_config.json`` (the final heads),
``checkpoint/`` (the latest resumable state), ``metrics.jsonl`` and ``tb/`` (TensorBoard).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterator

import torch

from qvlm.errors import QVLMError
from qvlm.loading import context_length
from qvlm.mdp import EncodedSample, Sample, TokenBatch, collate, encode_samples
from qvlm.model import QVModel
from qvlm.progress import progress
from qvlm.train.checkpoint import data_fingerprint, load_checkpoint, save_checkpoint, save_run
from qvlm.train.distributed import check_fsdp, init_distributed, reduce_weighted, shard, token_weight
from qvlm.train.metrics import MetricsLogger, stats_to_floats
from qvlm.train.optim import make_optimizer, optimizer_step
from qvlm.train.rng import set_seed

__all__ = [
    "batch_indices",
    "batch_schedule",
    "local_batch",
    "check_context",
    "check_finite",
    "set_seed",
    "make_optimizer",
    "train_loop",
]


def batch_indices(
    n_items: int, batch_size: int, seed: int, start_step: int, total_steps: int
) -> Iterator[tuple[int, list[int]]]:
    """``(step, sample indices of the global batch)`` for steps ``start_step .. total_steps - 1``.

    Epoch ``e`` visits the samples in a permutation drawn from ``seed + e``, so the batch of any
    step is known without replaying earlier ones: a resumed run sees the batches an uninterrupted
    run would, and every rank of a multi-process run sees the same global batch.
    """
    per_epoch = math.ceil(n_items / batch_size)
    for step in range(start_step, total_steps):
        epoch, k = divmod(step, per_epoch)
        order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        yield step, order[k * batch_size : (k + 1) * batch_size]


def batch_schedule(
    items: list[EncodedSample], batch_size: int, seed: int, start_step: int, total_steps: int, pad_token_id: int
) -> Iterator[tuple[int, TokenBatch]]:
    """``(step, batch)`` for steps ``start_step .. total_steps - 1`` (one process: the whole global
    batch of :func:`batch_indices`)."""
    for step, idx in batch_indices(len(items), batch_size, seed, start_step, total_steps):
        yield step, collate([items[i] for i in idx], pad_token_id, index=idx)


def local_batch(
    items: list[EncodedSample], idx: list[int], batch_size: int, pad_token_id: int
) -> tuple[TokenBatch, float]:
    """This rank's batch of the global batch ``idx`` and its loss weight (:func:`token_weight`).

    One process: the whole batch, weight 1. A rank whose shard is empty (the short last batch of an
    epoch) takes the batch's first sample with weight 0, so that every rank runs the same
    collectives.
    """
    local = shard(idx, batch_size)
    tokens = sum(len(items[i].response_ids) for i in local)
    weight = token_weight(tokens, sum(len(items[i].response_ids) for i in idx))
    if not local:
        local, weight = idx[:1], 0.0
    return collate([items[i] for i in local], pad_token_id, index=local), weight


def check_finite(step: int, objective: float, stats: dict[str, float]) -> None:
    """Stop a diverged run: raise :class:`QVLMError` when the objective, a ``losses/*`` term or the
    gradient norm is NaN or infinite, naming the step and the loss terms."""
    watched = {"objective": objective, **{k: v for k, v in stats.items() if k.startswith("losses/")}}
    if "charts/grad_norm" in stats:
        watched["charts/grad_norm"] = stats["charts/grad_norm"]
    if all(math.isfinite(v) for v in watched.values()):
        return
    terms = ", ".join(f"{k}={v:.6g}" for k, v in watched.items())
    raise QVLMError(
        f"training diverged at step {step}: {terms}. Nothing of this step was saved; the last good checkpoint "
        "stays. Lower lr, keep grad_clip on, or scale the rewards down, then resume or start again"
    )


def check_context(model: QVModel, samples: list[Sample], items: list[EncodedSample]) -> None:
    """Refuse an encoded sample longer than the trunk's context (positions past it do not exist),
    naming the sample's file and line."""
    limit = context_length(model.trunk.config)
    for i, (s, e) in enumerate(zip(samples, items)):
        n = len(e.prompt_ids) + len(e.response_ids)
        if limit and n > limit:
            raise QVLMError(
                f"{s.label(i)}: {n} tokens (prompt + response) exceed the model's context of {limit}; "
                f"pass --max-length {limit} or less"
            )


def train_loop(
    model: QVModel,
    tokenizer,
    samples: list[Sample],
    cfg,
    loss_fn: Callable[[QVModel, TokenBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    name: str,
    run_dir: str | Path | None = None,
    resume: bool = False,
    callbacks=(),
    after_step: Callable[[int], None] | None = None,
) -> dict[str, list[tuple[int, float]]]:
    """The loop every offline trainer shares; returns the metric history.

    ``cfg`` carries seed, max_length, batch_size, epochs, steps, lr, trunk_lr, weight_decay,
    grad_clip, checkpoint_every and progress. ``loss_fn`` returns the loss and its stats as
    detached tensors. Each step: the batch on the model's device, ``loss_fn``, an optimiser step,
    ``after_step(step)`` (e.g. target sync), then the stats as floats (the step's one device
    sync), a divergence check, log, checkpoint, ``callbacks`` as ``cb(step, stats)``.
    With ``run_dir``: checkpoints, final heads, metrics.jsonl, TensorBoard; ``resume=True``
    continues from the latest checkpoint to the state an uninterrupted run reaches, on the same data.
    """
    run_dir = Path(run_dir) if run_dir is not None else None
    device = next(model.heads.parameters()).device
    check_fsdp(cfg.fsdp)
    init_distributed(device)  # a launcher's process group (gloo on CPU, NCCL on CUDA); alone: nothing
    if cfg.fsdp:  # before the optimiser, which must hold the shards
        model.shard()
    set_seed(cfg.seed)
    items = encode_samples(samples, tokenizer, cfg.max_length)
    check_context(model, samples, items)
    fingerprint = data_fingerprint(items)
    total = cfg.steps or cfg.epochs * -(-len(items) // cfg.batch_size)
    optimizer = make_optimizer(model, cfg.lr, cfg.trunk_lr, cfg.weight_decay)
    start = load_checkpoint(run_dir, model, optimizer, cfg, fingerprint=fingerprint).step if resume and run_dir else 0
    saved_at = start if resume else None
    logger = MetricsLogger(run_dir, resume_step=start)
    model.train()
    bar = progress(total=total, initial=start, desc=f"train {name}", enabled=cfg.progress, unit="step")
    try:
        for step, idx in batch_indices(len(items), cfg.batch_size, cfg.seed, start, total):
            # batch: this rank's shard of the global batch (all of it in one process)
            batch, weight = local_batch(items, idx, cfg.batch_size, tokenizer.pad_token_id)
            batch = batch.to(device)
            # loss
            loss, stats = loss_fn(model, batch)
            # optimise (gradients of the token-weighted losses are summed over ranks)
            grad_norm = optimizer_step(loss * weight if weight != 1.0 else loss, optimizer, cfg.grad_clip)
            if after_step is not None:
                after_step(step)
            # log and checkpoint (stats of the global batch)
            stats = reduce_weighted({**stats, "_objective": loss.detach()}, weight)
            floats = stats_to_floats({**stats, "charts/grad_norm": grad_norm})
            check_finite(step, floats.pop("_objective"), floats)
            logger.log(step, floats)
            bar.update(1)
            bar.set_postfix({k.split("/")[-1]: f"{v:.4f}" for k, v in floats.items() if k.startswith("losses/")})
            if run_dir and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                save_checkpoint(run_dir, model, optimizer, step + 1, cfg, fingerprint=fingerprint)
                saved_at = step + 1
            for cb in callbacks:
                cb(step, floats)
    finally:
        bar.close()
        logger.close()
        model.eval()
    if run_dir:
        if saved_at != total:
            save_checkpoint(run_dir, model, optimizer, total, cfg, fingerprint=fingerprint)
        save_run(run_dir, model, cfg, {"algorithm": name, "samples": len(samples), "steps": total})
    return logger.history
