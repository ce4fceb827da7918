"""The loop every offline trainer shares (ILQL, value regression), on the run harness
(:mod:`qvlm.train.harness`): batches of scored samples, a loss, an optimiser step.

A run directory holds ``heads.safetensors`` + ``heads_config.json`` (the final heads),
``checkpoint/`` (the latest resumable state), ``metrics.jsonl`` and ``tb/`` (TensorBoard).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from qvlm.errors import QVLMError
from qvlm.loading import context_length
from qvlm.mdp import EncodedSample, Sample, TokenBatch, collate, encode_samples
from qvlm.model import QVModel
from qvlm.train.checkpoint import data_fingerprint, save_run
from qvlm.train.distributed import reduce_weighted, shard, token_weight
from qvlm.train.harness import Run, batch_indices, check_finite
from qvlm.train.metrics import stats_to_floats
from qvlm.train.optim import make_optimizer, optimizer_step

__all__ = [
    "batch_indices",
    "local_batch",
    "check_context",
    "check_finite",
    "cache_first_epoch",
    "train_loop",
]


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


def cache_first_epoch(model: QVModel, items: list[EncodedSample], cfg, steps: int, pad_token_id: int) -> None:
    """A resumed run's frozen-trunk features, computed in the batches the interrupted run computed them in:
    the first epoch's, up to ``steps`` (the cache keeps each sample's features from the first batch it was
    in). Features of one sample differ in the last bits from batch to batch (other padding, other matmul
    shapes), so features recomputed in other batches would move every later step off the uninterrupted
    run's (issue 25). Nothing to do for a trunk that trains (no cache)."""
    if model.feature_cache is None:
        return
    per_epoch = -(-len(items) // cfg.batch_size)
    with torch.no_grad():
        for _, idx in batch_indices(len(items), cfg.batch_size, cfg.seed, 0, min(steps, per_epoch)):
            model.features(local_batch(items, idx, cfg.batch_size, pad_token_id)[0])


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
    """The loop every offline trainer shares, on the run harness (:class:`qvlm.train.harness.Run`);
    returns the metric history.

    ``cfg`` carries seed, max_length, batch_size, epochs, steps, lr, trunk_lr, weight_decay,
    grad_clip, checkpoint_every and progress; the model's trunk config says whether the trunk is
    sharded (FSDP). ``loss_fn`` returns the loss and its stats as detached tensors. Each step: the
    batch on the model's device, ``loss_fn``, an optimiser step, ``after_step(step)`` (e.g. target
    sync), then the stats as floats (the step's one device sync), a divergence check, log,
    checkpoint, ``callbacks`` as ``cb(step, stats)``. With ``run_dir``: checkpoints, final heads,
    metrics.jsonl, TensorBoard; ``resume=True`` continues from the latest checkpoint to the state an
    uninterrupted run reaches, on the same data.
    """
    items = encode_samples(samples, tokenizer, cfg.max_length)
    check_context(model, samples, items)
    total = cfg.steps or cfg.epochs * -(-len(items) // cfg.batch_size)
    run = Run(cfg, run_dir, desc=f"train {name}", total=total, callbacks=callbacks)
    run.join(model.device, fsdp=model.trunk_config.fsdp, batch_size=cfg.batch_size)
    if model.trunk_config.fsdp:  # before the optimiser, which must hold the shards
        model.shard()
    optimizer = make_optimizer(model, cfg.lr, cfg.trunk_lr, cfg.weight_decay)
    run.track(model, optimizer, fingerprint=data_fingerprint(items))
    if resume:
        run.restore()
        cache_first_epoch(model, items, cfg, run.start, tokenizer.pad_token_id)
    model.train()
    with run:
        for step, idx in batch_indices(len(items), cfg.batch_size, cfg.seed, run.start, total):
            # batch: this rank's shard of the global batch (all of it in one process)
            batch, weight = local_batch(items, idx, cfg.batch_size, tokenizer.pad_token_id)
            batch = batch.to(model.device)
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
            run.log(step, floats, postfix=[k for k in floats if k.startswith("losses/")])
            run.advance(step + 1, floats)
    run.finish(lambda: save_run(run_dir, model, cfg, {"algorithm": name, "samples": len(samples), "steps": total}))
    return run.history
