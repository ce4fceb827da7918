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
import sys
import types
from typing import Callable, Mapping, Sequence

import torch

from qvlm.errors import QVLMError
from qvlm.trunk import _forward, _logits

__all__ = [
    "is_main_process",
    "world_size",
    "launch_world",
    "rank",
    "init_distributed",
    "launcher_device",
    "check_batch_size",
    "check_divides",
    "accelerate_fsdp",
    "check_fsdp",
    "shard",
    "block",
    "shard_rows",
    "token_weight",
    "all_reduce_grads",
    "all_reduce_sum",
    "reduce_weighted",
    "gather_rows",
    "gather_objects",
    "raise_if_any_failed",
    "barrier",
    "is_dtensor",
    "transformer_layers",
    "fully_shard_model",
    "fully_shard_trunk",
    "has_sharded_parameters",
    "full_state_dict",
    "trainable_state",
    "full_optimizer_state_dict",
    "load_full_state_dict",
    "load_full_optimizer_state_dict",
]


def _initialised() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _collective_device() -> torch.device:
    """Where a small bookkeeping tensor must live for a collective: this process's GPU under NCCL
    (which takes CUDA tensors only), else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
    return torch.device("cpu")


def is_dtensor(x: torch.Tensor) -> bool:
    """True for a sharded tensor of FSDP2 (``torch.distributed.tensor.DTensor``)."""
    return type(x).__name__ == "DTensor"


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


def init_distributed(device: torch.device | str = "cpu", deepspeed: bool = False) -> int:
    """Join the process group a launcher described in the environment; return the world size.

    Does nothing (returns 1) when ``WORLD_SIZE`` is unset or 1, or when a group already exists
    (returns its size). Backend: NCCL for a CUDA device, gloo otherwise. ``deepspeed``: the trainer
    builds a DeepSpeed engine (qvlm.train.zero), so accelerate's DeepSpeed config is applied.
    """
    if _initialised():
        return torch.distributed.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return 1
    use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")
    if use_deepspeed and not deepspeed and is_main_process():
        # examples/accelerate/deepspeed_zero2.yaml: only qvlm train ppo --trunk full builds an engine
        print(
            "qvlm: warning: accelerate's DeepSpeed config is not applied: this trainer runs its own data-parallel "
            "loop (no ZeRO partitioning; ZeRO is wired for qvlm train ppo --trunk full only); to shard a full "
            "trunk use --fsdp (examples/accelerate/fsdp.yaml)",
            file=sys.stderr,
        )
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise QVLMError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set; start several processes with "
            "`accelerate launch` or `torchrun`, which set them"
        )
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl" and torch.device(device).index is not None:  # all_gather_object uses the current device
        torch.cuda.set_device(torch.device(device))
    torch.distributed.init_process_group(backend=backend)
    return torch.distributed.get_world_size()


def launch_world() -> int:
    """The group's size, or the launcher's ``WORLD_SIZE`` before the group exists."""
    return world_size() if _initialised() else int(os.environ.get("WORLD_SIZE", "1") or 1)


def check_batch_size(batch_size: int) -> None:
    """Refuse, before any work, a global batch size that the launcher's world size does not divide
    (read from ``WORLD_SIZE`` when no group exists yet)."""
    world = launch_world()
    if world > 1 and batch_size % world:
        raise QVLMError(
            f"batch size {batch_size} does not divide over {world} processes; use a --batch-size that is a "
            f"multiple of {world} (the batch size is global: each process takes batch_size / {world})"
        )


def check_divides(count: int, flag: str, what: str) -> None:
    """Refuse, before any work, a global per-step count (``flag``'s value: ``what`` per step) that the
    launcher's world size does not divide, e.g. PPO's ``--prompts-per-iter``."""
    world = launch_world()
    if world > 1 and count % world:
        raise QVLMError(
            f"{flag} {count} does not divide over {world} processes; use a {flag} that is a multiple of {world} "
            f"(it is global: each process takes {flag} / {world} {what})"
        )


def accelerate_fsdp() -> bool:
    """Whether ``accelerate launch`` was started with an FSDP config (it sets ``ACCELERATE_USE_FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def check_fsdp(fsdp: bool) -> None:
    """Refuse, before any work, FSDP in a single process (sharding over one process shards nothing).

    The world size is read from ``WORLD_SIZE`` when no group exists yet."""
    if fsdp and launch_world() < 2:
        raise QVLMError(
            "--fsdp shards the weights over several processes, but this is one; start it with "
            "`torchrun --nproc_per_node N` or `accelerate launch --num_processes N` (N >= 2), or drop --fsdp"
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


def block(n: int) -> range:
    """This rank's contiguous block of ``n`` items (``n`` divisible by the world size): gathered in
    rank order (:func:`gather_rows`), the blocks give back the one-process order."""
    per = n // world_size()
    return range(rank() * per, (rank() + 1) * per)


def shard_rows(rows: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, float]:
    """This rank's part of a global minibatch ``rows`` (every ``world``-th, from its rank) of a batch
    every rank holds, and its loss weight (:func:`token_weight`); ``tokens`` (B,) counts each row's
    response tokens. An empty part takes the minibatch's first row with weight 0, so that every rank
    runs the same collectives. One process: ``rows``, weight 1.
    """
    world = world_size()
    if world == 1:
        return rows, 1.0
    local = rows[rank() :: world]
    weight = token_weight(int(tokens[local].sum()), int(tokens[rows].sum()))
    if len(local) == 0:
        return rows[:1], 0.0
    return local, weight


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

    A parameter without a gradient on this rank contributes zeros; one without a gradient on every
    rank (e.g. a policy during critic warm-up) keeps none, so that the optimiser skips it as it would
    in one process."""
    if world_size() == 1:
        return
    # FSDP-sharded parameters (DTensors) have their gradients reduced by FSDP itself
    params = [p for p in params if p.requires_grad and not is_dtensor(p)]
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=_collective_device())
    torch.distributed.all_reduce(has_grad, op=torch.distributed.ReduceOp.MAX)
    params = [p for p, flag in zip(params, has_grad.tolist()) if flag]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over the ranks (a new tensor; ``x`` itself in one process)."""
    if world_size() == 1:
        return x
    out = x.detach().clone()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out


def reduce_weighted(stats: Mapping[str, torch.Tensor], weight: float) -> dict[str, torch.Tensor]:
    """``sum_r weight_r * stat_r`` for each 0-dim stat, in one collective: with token weights, the
    global batch's masked means. Returns ``stats`` unchanged in one process."""
    if world_size() == 1 or not stats:
        return dict(stats)
    keys = sorted(stats)
    flat = torch.stack([stats[k].detach().float().reshape(()) for k in keys]) * weight
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    return {k: flat[i] for i, k in enumerate(keys)}


def gather_rows(x: torch.Tensor, pad_value: float | int = 0) -> torch.Tensor:
    """Every rank's ``x`` (B, ...) concatenated along dim 0 in rank order, on every rank; a 2-D or
    deeper ``x`` is first right-padded along dim 1 with ``pad_value`` to the longest over the ranks
    (every rank's B must be equal). One process: ``x`` itself.
    """
    world = world_size()
    if world == 1:
        return x
    if x.dim() >= 2:
        length = torch.tensor([x.shape[1]], dtype=torch.int64, device=x.device)
        torch.distributed.all_reduce(length, op=torch.distributed.ReduceOp.MAX)
        extra = int(length) - x.shape[1]
        if extra:
            x = torch.cat([x, x.new_full((x.shape[0], extra, *x.shape[2:]), pad_value)], dim=1)
    dtype = x.dtype
    x = x.to(torch.uint8) if dtype == torch.bool else x.contiguous()  # gloo has no bool all_gather
    parts = [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(parts, x)
    return torch.cat(parts, dim=0).to(dtype)


def gather_objects(items: list) -> list:
    """Every rank's list of picklable ``items``, concatenated in rank order, on every rank (``items``
    itself in one process)."""
    world = world_size()
    if world == 1:
        return items
    parts: list = [None] * world
    torch.distributed.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def raise_if_any_failed(error: Exception | None, what: str) -> None:
    """Make every rank stop together when one failed (instead of waiting in the next collective
    for a rank that is gone): re-raise ``error`` on the rank that has it, and on the others a
    :class:`QVLMError` that names ``what``. One process: re-raise ``error`` if any."""
    failed = torch.tensor([error is not None], dtype=torch.int32)
    if world_size() > 1:
        failed = failed.to(_collective_device())
        torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
    if error is not None:
        raise error
    if int(failed):
        raise QVLMError(f"{what} failed in another process (its message is in that process's output)")


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if world_size() > 1:
        torch.distributed.barrier()


# where Hugging Face backbones (``model.base_model``) keep their list of transformer layers
_LAYER_LISTS = ("layers", "encoder.layer", "h", "decoder.layers")


def transformer_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer layers of a Hugging Face model, FSDP2's units: the layer list of its backbone
    (``model.base_model``): ``layers`` (Llama-like decoders), ``encoder.layer`` (BERT-like encoders),
    ``h`` (GPT-2-like) or ``decoder.layers`` (OPT-like); else the modules of the classes the model
    names in ``_no_split_modules``. A :class:`QVLMError` when there are none."""
    for path in _LAYER_LISTS:
        layers = model.base_model
        for name in path.split("."):
            layers = getattr(layers, name, None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            return list(layers)
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in blocks]
    if not layers:
        raise QVLMError(
            f"{type(model).__name__} has no layer list ({', '.join(_LAYER_LISTS)} under its base model) and names no "
            "layer class (_no_split_modules); cannot shard it"
        )
    return layers


def fully_shard_model(model: torch.nn.Module, forward_methods: Mapping[str, Callable]) -> None:
    """Shard a Hugging Face model's weights over the processes with FSDP2 (``fully_shard``).

    Each transformer layer (:func:`transformer_layers`) is a unit, and the whole model the root unit
    that holds the rest (embeddings, final norm, heads: a tied head stays one parameter with the
    embedding, FSDP2 keeps the two names on one tensor). The root gathers its weights in its
    ``forward`` only: each ``forward_methods[name]``, a function ``f(model, ...)`` that runs parts of
    the model other than its ``forward``, becomes the method ``model.name`` and a forward of the root
    unit (``register_fsdp_forward_method``), so the root's weights are gathered around it and its
    gradients reduced once after the backward pass.

    Gradients are summed over the processes, not averaged, as :func:`all_reduce_grads` sums the
    replicated weights' (each process weights its loss by its share of the batch: :func:`token_weight`).
    Checkpoints and saved runs gather the full weights collectively (:func:`full_state_dict`).
    """

    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    for layer in transformer_layers(model):
        fully_shard(layer)
    fully_shard(model)
    for name, fn in forward_methods.items():  # instance methods, which callers look up with vars(model)
        setattr(model, name, types.MethodType(fn, model))
        register_fsdp_forward_method(model, name)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no pre-multiplied sum


def fully_shard_trunk(trunk: torch.nn.Module) -> None:
    """Shard a Hugging Face causal LM's weights over the processes with FSDP2 (:func:`fully_shard_model`).

    :func:`qvlm.trunk.trunk_forward` (hidden states and LM logits in one pass) and
    :func:`qvlm.trunk.trunk_logits` become forward methods of the root unit, so the root's weights
    (embeddings, final norm, LM head) are gathered around them; every qvlm forward of a trunk goes
    through them (:func:`qvlm.trunk.sharded` checks for them).
    """

    fully_shard_model(trunk, {"qvlm_forward": _forward, "qvlm_logits": _logits})


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # full tensors, gathered to the CPU of rank 0 only (the other ranks get an empty dict)
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def has_sharded_parameters(module: torch.nn.Module) -> bool:
    """Whether any parameter of ``module`` is an FSDP2 shard."""
    return any(is_dtensor(p) for p in module.parameters())


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with full tensors, gathered collectively from FSDP2 shards.

    A module with sharded parameters is gathered collectively: every rank must call this, rank 0 gets the full tensors on the CPU,
    the other ranks an empty dict. A module without shards: its ``state_dict()``, no collective."""
    if not has_sharded_parameters(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_full_options())


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of ``module`` that trains, by name (a tied parameter once, under its first
    name), detached. Sharded weights are gathered collectively (every rank calls this; rank 0 gets
    the full tensors, the others an empty dict)."""
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    if not has_sharded_parameters(module):
        params = dict(module.named_parameters())
        return {n: params[n].detach().contiguous() for n in names}
    full = full_state_dict(module)
    return {n: full[n].contiguous() for n in names if n in full}


def full_optimizer_state_dict(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimiser state of a module with sharded parameters, gathered collectively, keyed by name.

    Every rank calls it; rank 0 gets it (keyed by parameter names instead of positions), the others ``{}``."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=_full_options())


def load_full_state_dict(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load full tensors (part of ``module``'s state dict, held by every rank) into a sharded module.

    Each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, dict(state), options=StateDictOptions(full_state_dict=True, strict=False))


def load_full_optimizer_state_dict(module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load an optimiser state of :func:`full_optimizer_state_dict` (held by every rank).

    A parameter that never had a gradient (e.g. BERT's pooler under mean pooling) has no saved state
    and starts without one, as ``optimizer.load_state_dict`` leaves it in an unsharded run."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_optimizer_state_dict(module, optimizer, state, options=options)
