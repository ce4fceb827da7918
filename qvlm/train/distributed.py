"""Multi-process training: which process writes files, how a global batch is split over ranks, and
how gradients and logged statistics are combined so that N processes take the same steps as one.

The same code runs alone and under ``torchrun`` / ``accelerate launch`` (data parallel): the launcher
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_distributed` joins the process group from them (gloo on CPU, NCCL on CUDA). Each rank
takes every ``world``-th sample of the global batch; every loss is a masked mean over response tokens
(DESIGN.md, "Padding"), so a rank's loss weighted by its share of the batch's tokens, with gradients
summed over ranks, is exactly the one-process gradient (:func:`token_weight`, :func:`all_reduce_grads`).
Only the main process writes files (checkpoints, metrics, the run directory).
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import torch

from qvlm.errors import QVLMError

__all__ = [
    "is_main_process",
    "world_size",
    "rank",
    "init_distributed",
    "launcher_device",
    "check_batch_size",
    "shard",
    "token_weight",
    "all_reduce_grads",
    "reduce_weighted",
    "barrier",
]


def _initialised() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_main_process() -> bool:
    """True in the process that writes files: rank 0 of an initialised ``torch.distributed`` group,
    else the process whose ``RANK`` environment variable is 0 or unset (a launcher sets it before
    the group exists), so a single process is always the main one."""
    if _initialised():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0") or 0) == 0


def world_size() -> int:
    """Processes in the group (1 when none is initialised)."""
    return torch.distributed.get_world_size() if _initialised() else 1


def rank() -> int:
    """This process's rank (0 when no group is initialised)."""
    return torch.distributed.get_rank() if _initialised() else 0


def launcher_device() -> str | None:
    """``cuda:LOCAL_RANK`` under a launcher on a GPU machine, else ``None`` (keep the asked device)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0') or 0)}"
    return None


def init_distributed(device: torch.device | str = "cpu") -> int:
    """Join the process group a launcher described in the environment; return the world size.

    Does nothing (returns 1) when ``WORLD_SIZE`` is unset or 1, or when a group already exists
    (returns its size). Backend: NCCL for a CUDA device, gloo otherwise.
    """
    if _initialised():
        return torch.distributed.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return 1
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise QVLMError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set; start several processes with "
            "`accelerate launch` or `torchrun`, which set them"
        )
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend=backend)
    return torch.distributed.get_world_size()


def check_batch_size(batch_size: int) -> None:
    """Refuse, before any work, a global batch size that the launcher's world size does not divide
    (read from ``WORLD_SIZE`` when no group exists yet)."""
    world = world_size() if _initialised() else int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and batch_size % world:
        raise QVLMError(
            f"batch size {batch_size} does not divide over {world} processes; use a --batch-size that is a "
            f"multiple of {world} (the batch size is global: each process takes batch_size / {world})"
        )


def shard(indices: Sequence[int], batch_size: int) -> list[int]:
    """This rank's part of a global batch: every ``world``-th index from its rank.

    The global batch size must be a multiple of the world size, so that every full batch splits
    evenly (the last, short batch of an epoch may give a rank fewer samples, or none).
    """
    world = world_size()
    if world == 1:
        return list(indices)
    check_batch_size(batch_size)
    return list(indices)[rank() :: world]


def token_weight(local_tokens: int, global_tokens: int) -> float:
    """This rank's share of the global batch's response tokens, the weight of its masked-mean loss.

    ``sum_r (n_r / N) mean_r(x) = mean(x)``: with gradients summed over ranks, the weighted losses
    give the one-process gradient exactly (up to float summation order). 1.0 in one process.
    """
    if world_size() == 1:
        return 1.0
    return local_tokens / max(global_tokens, 1)


def all_reduce_grads(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum every gradient over the ranks, in one flattened collective (no-op in one process).

    A parameter without a gradient on this rank (e.g. an empty shard) contributes zeros."""
    if world_size() == 1:
        return
    params = [p for p in params if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def reduce_weighted(stats: Mapping[str, torch.Tensor], weight: float) -> dict[str, torch.Tensor]:
    """``sum_r weight_r * stat_r`` for each 0-dim stat, in one collective: with token weights, the
    global batch's masked means. Returns ``stats`` unchanged in one process."""
    if world_size() == 1 or not stats:
        return dict(stats)
    keys = sorted(stats)
    flat = torch.stack([stats[k].detach().float().reshape(()) for k in keys]) * weight
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    return {k: flat[i] for i, k in enumerate(keys)}


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if world_size() > 1:
        torch.distributed.barrier()
