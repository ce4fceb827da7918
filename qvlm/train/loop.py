"""The loop every offline trainer shares (ILQL, value regression), on the run harness
(:mod:`qvlm.train.harness`): batches of scored samples or multi-turn episodes, a loss, an optimiser step.

The data is a list of :class:`qvlm.mdp.Sample` (single-turn: prompt and response) or of
:class:`qvlm.envs.episodes.Episode` (multi-turn: one token sequence per conversation, the
environment's tokens observations, docs/envs.md). Both become :class:`qvlm.mdp.TokenBatch` batches
whose steps are the agent's tokens; an episode's batch carries ``next_state_positions`` (``V(s_{t+1})``
across a turn boundary is read at the last token of the environment's reply), so every loss reads
the same fields either way.

A run directory holds ``heads.safetensors`` + ``heads_config.json`` (the final heads),
``checkpoint/`` (the latest resumable state), ``metrics.jsonl`` and ``tb/`` (TensorBoard).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence, Union

import torch

from qvlm.envs.episodes import Episode, encode_episodes
from qvlm.envs.tokens import EpisodeTokens, collate_episodes
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
    "encode_data",
    "collate_items",
    "local_batch",
    "check_context",
    "check_finite",
    "cache_first_epoch",
    "train_loop",
]

Item = Union[EncodedSample, EpisodeTokens]


def encode_data(
    data: Sequence[Sample] | Sequence[Episode], tokenizer, max_length: int, vocab_size: int | None = None
) -> list[Item]:
    """Samples as :func:`qvlm.mdp.encode_samples` encodes them, or episodes as their token view
    (:func:`qvlm.envs.episodes.encode_episodes`: never cut, ids checked against ``vocab_size``)."""
    episodes = [isinstance(d, Episode) for d in data]
    if any(episodes) and not all(episodes):
        raise QVLMError("the training data mixes samples and episodes; train on one kind (--data or --episodes)")
    if data and episodes[0]:
        return encode_episodes(data, max_length, vocab_size)
    return encode_samples(data, tokenizer, max_length)


def collate_items(items: Sequence[Item], pad_token_id: int, index: Sequence[int]) -> TokenBatch:
    """Right-pad encoded samples or episodes (not both) into a :class:`TokenBatch`."""
    if isinstance(items[0], EpisodeTokens):
        return collate_episodes(items, pad_token_id).token_batch(index)
    return collate(items, pad_token_id, index=index)


def local_batch(items: list[Item], idx: list[int], batch_size: int, pad_token_id: int) -> tuple[TokenBatch, float]:
    """This rank's batch of the global batch ``idx`` and its loss weight (:func:`token_weight`).

    One process: the whole batch, weight 1. A rank whose shard is empty (the short last batch of an
    epoch) takes the batch's first sample with weight 0, so that every rank runs the same
    collectives.
    """
    local = shard(idx, batch_size)
    tokens = sum(items[i].n_steps for i in local)
    weight = token_weight(tokens, sum(items[i].n_steps for i in idx))
    if not local:
        local, weight = idx[:1], 0.0
    return collate_items([items[i] for i in local], pad_token_id, local), weight


def check_context(model: QVModel, samples: Sequence[Sample] | Sequence[Episode], items: list[Item]) -> None:
    """Refuse an encoded sample or episode longer than the trunk's context (positions past it do not
    exist), naming its file and line."""
    limit = context_length(model.trunk.config)
    for i, (s, e) in enumerate(zip(samples, items)):
        if limit and e.n_tokens > limit:
            where = s.label(i) if isinstance(s, Sample) else s.where or f"episode {i + 1}"
            what = "prompt + response" if isinstance(s, Sample) else "the conversation"
            raise QVLMError(
                f"{where}: {e.n_tokens} tokens ({what}) exceed the model's context of {limit}; "
                f"pass --max-length {limit} or less"
            )


def cache_first_epoch(model: QVModel, items: list[Item], cfg, steps: int, pad_token_id: int) -> None:
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
    samples: Sequence[Sample] | Sequence[Episode],
    cfg,
    loss_fn: Callable[[QVModel, TokenBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    name: str,
    run_dir: str | Path | None = None,
    resume: bool = False,
    callbacks=(),
    after_step: Callable[[int], None] | None = None,
) -> dict[str, list[tuple[int, float]]]:
    """The loop every offline trainer shares, on the run harness (:class:`qvlm.train.harness.Run`);
    returns the metric history. ``samples``: scored samples or multi-turn episodes (module docstring).

    ``cfg`` carries seed, max_length, batch_size, epochs, steps, lr, trunk_lr, weight_decay,
    grad_clip, checkpoint_every and progress; the model's trunk config says whether the trunk is
    sharded (FSDP). ``loss_fn`` returns the loss and its stats as detached tensors. Each step: the
    batch on the model's device, ``loss_fn``, an optimiser step, ``after_step(step)`` (e.g. target
    sync), then the stats as floats (the step's one device sync), a divergence check, log,
    checkpoint, ``callbacks`` as ``cb(step, stats)``. With ``run_dir``: checkpoints, final heads,
    metrics.jsonl, TensorBoard; ``resume=True`` continues from the latest checkpoint to the state an
    uninterrupted run reaches, on the same data.
    """
    items = encode_data(samples, tokenizer, cfg.max_length, model.trunk.get_output_embeddings().weight.shape[0])
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
    kind = "episodes" if items and isinstance(items[0], EpisodeTokens) else "samples"
    run.finish(lambda: save_run(run_dir, model, cfg, {"algorithm": name, kind: len(samples), "steps": total}))
    return run.history
