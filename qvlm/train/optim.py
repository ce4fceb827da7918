"""The optimiser and one optimiser step: shared by the offline loop and by online trainers that
run several epochs of minibatches over each rollout (PPO, soft Q-learning)."""

from __future__ import annotations

import torch

from qvlm.model import QVModel
from qvlm.train.distributed import all_reduce_grads, is_dtensor

__all__ = ["make_optimizer", "optimizer_step"]


def make_optimizer(model: QVModel, lr: float, trunk_lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the heads (``lr``) and the trunk's trainable tensors (``trunk_lr``), if any."""
    groups = [{"params": [p for p in model.heads.parameters() if p.requires_grad], "lr": lr}]
    trunk = [p for p in model.trunk.parameters() if p.requires_grad]
    if trunk:
        groups.append({"params": trunk, "lr": trunk_lr})
    return torch.optim.AdamW(groups, weight_decay=weight_decay)


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    grad_clip: float = 0.0,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> torch.Tensor:
    """One step on ``loss``: zero_grad, backward, clip the global gradient norm to ``grad_clip``
    (0: off), ``optimizer.step()``, then ``scheduler.step()`` when given.

    Under a multi-process launcher the gradients are summed over ranks before clipping
    (:func:`qvlm.train.distributed.all_reduce_grads`): each rank passes its loss already weighted by
    its share of the global batch. Returns the global gradient norm before clipping as a detached
    0-dim tensor (no device sync).

    A DeepSpeed ZeRO optimiser (:class:`qvlm.train.zero.ZeroOptimizer`, its clipping set when it was
    built) runs the backward pass, reduction, clipping and step in its engine.
    """
    if hasattr(optimizer, "step_loss"):
        return optimizer.step_loss(loss)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    all_reduce_grads(params)
    if any(p.grad is not None and is_dtensor(p.grad) for p in params):
        grad_norm = _clip_sharded(params, grad_clip)
    elif grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return grad_norm.detach()


def _clip_sharded(params: list[torch.nn.Parameter], grad_clip: float) -> torch.Tensor:
    """The global gradient norm, and clipping, when some gradients are FSDP shards (DTensors) and
    others plain tensors (replicated heads), which torch's clipping cannot mix: the norms of the two
    kinds are combined (the shards' through a collective), and every gradient is scaled by
    ``min(1, grad_clip / (norm + 1e-6))`` as :func:`torch.nn.utils.clip_grad_norm_` does."""
    sharded = [p.grad for p in params if p.grad is not None and is_dtensor(p.grad)]
    plain = [p.grad for p in params if p.grad is not None and not is_dtensor(p.grad)]
    squared = torch.nn.utils.get_total_norm(sharded).full_tensor() ** 2
    if plain:
        squared = squared + torch.nn.utils.get_total_norm(plain).to(squared.device) ** 2
    norm = squared.sqrt()
    if grad_clip > 0:
        coef = min(1.0, grad_clip / (float(norm) + 1e-6))
        for g in sharded + plain:
            g.mul_(coef)
    return norm
