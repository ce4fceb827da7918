"""What the round-based online learners share (soft Q-learning, Q#): rounds of (decode with the current
guided policy, score, add to a replay set that keeps every round, fit on minibatches of all of it).

- :func:`decode_round`: this process's block of a round's prompts, every response from its own random
  stream keyed by (seed, round, row), so N processes sample the tokens one process samples;
- :func:`score_round`: the reward of each response (a failure stops the run, naming the round and the
  checkpoint kept), the scored samples gathered on every process in the one-process order;
- :func:`cache_features` / :func:`owned_items`: a frozen trunk's features computed once, when a round is
  added, by the process that decoded them, in fixed batches (a resume recomputes them in the same ones);
- :func:`fit_round`: optimiser steps on minibatches drawn uniformly from the whole replay set, each
  process taking the samples it owns with its loss weighted by their share of the tokens;
- :func:`restore_replay`: a checkpoint's replay set and features, refused for other prompts.
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable, Sequence

import torch

from qvlm.configs import DecodeConfig
from qvlm.decoding.sampling import encode_prompts, sample_rollout, sampling_seeds
from qvlm.errors import QVLMError
from qvlm.jsonl import sample_from_dict
from qvlm.mdp import EncodedSample, Sample, TokenBatch, collate, encode_samples
from qvlm.model import QVModel
from qvlm.rewards import RewardFn, score
from qvlm.rollout import Rollout, rollout_to_samples
from qvlm.train.distributed import (
    block,
    gather_objects,
    gather_rows,
    raise_if_any_failed,
    rank,
    reduce_weighted,
    token_weight,
    world_size,
)
from qvlm.train.harness import Run, check_finite
from qvlm.train.metrics import stats_to_floats
from qvlm.train.optim import optimizer_step

__all__ = [
    "round_prompts",
    "prompts_sha",
    "decode_round",
    "score_round",
    "owned_items",
    "cache_features",
    "fit_round",
    "restore_replay",
]

LossFn = Callable[[QVModel, TokenBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def round_prompts(prompts: Sequence[str], round_idx: int, per_round: int) -> list[str]:
    """The prompts of round ``round_idx``: the next ``per_round`` of the list, cycling through it.

    5 prompts, 2 per round: round 0 -> (0, 1), round 2 -> (4, 0)."""
    start = round_idx * per_round
    return [prompts[(start + i) % len(prompts)] for i in range(per_round)]


def prompts_sha(prompts: Sequence[str]) -> str:
    """A fingerprint of the prompt list, so a resume on other prompts is refused."""
    return hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()


@torch.no_grad()
def decode_round(
    model: QVModel,
    tokenizer,
    prompts: list[str],
    decode: DecodeConfig,
    seed: int,
    round_idx: int,
    guide_steps: Sequence[int] | None = None,
) -> tuple[Rollout, list[str]]:
    """This process's rollout of a round and its prompts: its block of ``prompts`` (all of them in one
    process), ``decode.num_return_sequences`` each, left-padded to the round's longest prompt, guided by
    the model's heads at ``decode.beta``; ``guide_steps`` (one per response of the whole round) stops the
    guidance of each response after that many tokens (:func:`qvlm.decoding.sampling.sample_rollout`)."""
    model.eval()
    n = decode.num_return_sequences
    encoded = encode_prompts(tokenizer, prompts, decode, model.trunk)
    mine = block(len(prompts))
    rows = range(mine.start * n, mine.stop * n)
    rollout = sample_rollout(
        model.trunk, tokenizer, encoded[mine.start : mine.stop], model.heads if decode.beta else None, decode,
        track_kl=True, logprobs=False, row_seeds=sampling_seeds(seed, round_idx, rows),
        pad_to=max(len(p) for p in encoded), guide_steps=None if guide_steps is None else [guide_steps[i] for i in rows],
    )  # fmt: skip
    return rollout, prompts[mine.start : mine.stop]


def score_round(
    reward: RewardFn,
    rollout: Rollout,
    tokenizer,
    local_prompts: list[str],
    round_idx: int,
    run: Run | None = None,
    fixed_horizon: bool = False,
) -> tuple[list[Sample], dict[str, float]]:
    """Score this process's rollout; every process gets the whole round's samples (one-process order)
    and its charts: the mean reward, the exact KL of the sampling distribution to the base summed per
    response, the mean length. A reward that fails stops the run, naming the round and (with ``run``)
    the checkpoint kept."""
    n = len(rollout) // max(len(local_prompts), 1)
    repeated = [p for p in local_prompts for _ in range(n)]
    rewards, error = None, None
    try:
        rewards = score(reward, repeated, rollout.texts(tokenizer))
    except QVLMError as err:
        error = run.stopped(err, f"round {round_idx}") if run is not None else err
    raise_if_any_failed(error, f"round {round_idx}: the reward")
    local = rollout_to_samples(rollout, tokenizer, local_prompts, rewards, fixed_horizon=fixed_horizon)
    samples = gather_objects(local)
    kl, lengths = gather_rows(rollout.kl), gather_rows(rollout.lengths)
    charts = {
        "charts/guided_reward": sum(s.reward for s in samples) / len(samples),
        "charts/kl": float(kl.mean()),  # summed per response, exact for the sampling distribution
        "charts/response_length": float(lengths.float().mean()),
    }
    return samples, charts


def owned_items(indices: range) -> list[int]:
    """This process's indices among one round's ``indices``: the block it decoded (all of them in one
    process)."""
    world = world_size()
    if world == 1:
        return list(indices)
    per = len(indices) // world
    return list(indices[rank() * per : (rank() + 1) * per])


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
    loss_fn: LossFn,
    *,
    mine: set[int],
    steps: int,
    batch_size: int,
    seed: int,
    round_idx: int,
    first_step: int,
    pad_id: int,
    grad_clip: float,
    after_step: Callable[[], None] | None = None,
    tokens_of: Callable[[int], int] | None = None,
) -> list[dict[str, float]]:
    """``steps`` optimiser steps on minibatches drawn uniformly from the whole replay set ``items`` (seeded
    by round), each followed by ``after_step()`` (e.g. a Polyak update); per step, its stats.

    Several processes: each takes the samples of the minibatch it owns (``mine``: those it decoded, whose
    features it cached), its loss weighted by their share of the minibatch's loss-bearing tokens (an empty
    share: one of its samples, weight 0); the gradients are summed over the processes and the stats are
    the minibatch's. ``tokens_of(i)``: the tokens item ``i``'s loss averages over (default: its response
    tokens); it must count what ``loss_fn``'s mean divides by, or N processes stop equalling one."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + round_idx)
    model.train()
    out = []
    for k in range(steps):
        idx = torch.randint(len(items), (batch_size,), generator=gen).tolist()
        local = [i for i in idx if i in mine]
        tokens = [tokens_of(i) if tokens_of is not None else len(items[i].response_ids) for i in idx]
        weight = token_weight(sum(t for i, t in zip(idx, tokens) if i in mine), sum(tokens))
        if not local:
            local, weight = [min(mine)], 0.0
        batch = collate([items[i] for i in local], pad_id, index=local).to(model.device)
        loss, stats = loss_fn(model, batch)
        grad_norm = optimizer_step(loss * weight if weight != 1.0 else loss, optimizer, grad_clip)
        if after_step is not None:
            after_step()
        stats = reduce_weighted({**stats, "_objective": loss.detach()}, weight)
        floats = stats_to_floats({**stats, "charts/grad_norm": grad_norm})
        check_finite(first_step + k, floats.pop("_objective"), floats)
        out.append(floats)
    model.eval()
    return out


def restore_replay(
    resumed, model: QVModel, tokenizer, prompts: Sequence[str], max_length: int, batch_size: int
) -> tuple[int, list[Sample], list[EncodedSample], list[int]]:
    """A checkpoint's replay set, refused for other prompts: ``(next round, samples, encoded samples,
    round sizes)``, the frozen trunk's features recomputed round by round in the batches the first run
    used. The checkpoint's extra state holds ``round``, ``prompts_sha``, ``replay`` and ``round_sizes``."""
    if resumed.extra.get("prompts_sha") != prompts_sha(prompts):
        raise QVLMError(
            f"{resumed.path}: the run started with other prompts; resume with the same --prompts "
            "(and --max-prompts), or start a new run directory"
        )
    replay = [sample_from_dict(d, f"{resumed.path} replay[{i}]") for i, d in enumerate(resumed.extra["replay"])]
    items = encode_samples(replay, tokenizer, max_length)
    done = int(resumed.extra["round"])
    # checkpoints of soft Q written before round_sizes existed: rounds of one size
    sizes = [int(n) for n in resumed.extra.get("round_sizes") or [len(replay) // max(done, 1)] * done]
    start = 0
    for n in sizes:  # the features, in the batches the first run used
        cache_features(model, items, owned_items(range(start, start + n)), batch_size, tokenizer.pad_token_id)
        start += n
    return done, replay, items, sizes
