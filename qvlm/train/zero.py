"""DeepSpeed ZeRO stage 1 or 2 for a trainer's optimiser (``qvlm train ppo --trunk full --deepspeed``).

ZeRO-1 partitions the AdamW moments over the processes, ZeRO-2 the gradients as well; every process
keeps the whole model (stage 3, which partitions the weights, is refused: qvlm's forwards and decoding
call the model directly, not through the engine; use ``--fsdp`` for sharded weights). qvlm keeps its
own data sharding and loss weights (each process's loss weighted by its share of the minibatch's
tokens, :func:`qvlm.train.distributed.token_weight`): DeepSpeed averages the gradients over the
processes, so :meth:`ZeroOptimizer.step_loss` multiplies the loss by the world size and the average
is the sum qvlm's plain data parallel takes. N ZeRO processes therefore take the steps one plain
process takes (tests/test_distributed_deepspeed.py).

Checkpoints keep the layout of an unsharded run: :meth:`ZeroOptimizer.state_dict` gathers the
partitioned moments into a ``torch.optim.AdamW`` state dict (a collective: every process calls it),
and :meth:`ZeroOptimizer.load_state_dict` loads one back into the partitions. DeepSpeed is optional:
``pip install deepspeed`` (docs/distributed.md, "DeepSpeed ZeRO", for what was measured on a CPU).
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from qvlm.errors import QVLMError
from qvlm.train.distributed import launch_world
from qvlm.train.rng import rng_state, set_rng_state

__all__ = ["accelerate_deepspeed", "check_deepspeed", "deepspeed_config", "ZeroOptimizer", "zero_initialize"]

_PRESETS = {"zero1": 1, "zero2": 2}
# AdamW's moments: the tensors DeepSpeed partitions (its step count is one scalar per parameter group)
_MOMENTS = ("exp_avg", "exp_avg_sq")


def accelerate_deepspeed() -> str:
    """``zero1`` / ``zero2`` when ``accelerate launch`` was started with a DeepSpeed config
    (examples/accelerate/deepspeed_zero2.yaml sets ``ACCELERATE_USE_DEEPSPEED`` and the stage), its
    ``deepspeed_config_file`` when it names one, else ``''``."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() not in ("1", "true"):
        return ""
    if os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none").lower() != "none":
        return os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"]
    for kind in ("OFFLOAD_OPTIMIZER", "OFFLOAD_PARAM"):
        if os.environ.get(f"ACCELERATE_DEEPSPEED_{kind}_DEVICE", "none").lower() != "none":
            raise QVLMError(f"accelerate's DeepSpeed config asks for {kind.lower()} to a device; qvlm supports none")
    return f"zero{os.environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '2')}"


def check_deepspeed(spec: str) -> None:
    """Refuse, before the model loads, ``--deepspeed`` in one process or without the package (the
    world size is read from ``WORLD_SIZE`` when no group exists yet)."""
    if not spec:
        return
    if launch_world() < 2:
        raise QVLMError(
            "--deepspeed partitions the optimiser over several processes, but this is one; start it with "
            "`torchrun --nproc_per_node N` or `accelerate launch --num_processes N` (N >= 2), or drop --deepspeed"
        )
    try:
        import deepspeed  # noqa: F401
    except ImportError as err:
        raise QVLMError(f"--deepspeed needs the deepspeed package (pip install deepspeed): {err}") from None


def deepspeed_config(spec: str, grad_clip: float) -> dict:
    """The DeepSpeed config of ``spec`` (``zero1``, ``zero2`` or a JSON file), checked and completed.

    qvlm owns the optimiser (AdamW), the batch (``--minibatch-size`` rows per step, its own sharding),
    the precision (``--dtype``) and clipping (``--grad-clip``): a file that sets them otherwise is
    refused with the field named. The batch fields DeepSpeed requires are set to one step per
    minibatch (they only name its bookkeeping here)."""
    if spec in _PRESETS:
        cfg = {"zero_optimization": {"stage": _PRESETS[spec]}}
    else:
        from qvlm.fileio import read_json

        cfg = read_json(spec, "give --deepspeed zero1, zero2 or a DeepSpeed JSON config (an object)")
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2):
        raise QVLMError(
            f"--deepspeed {spec}: ZeRO stage {stage}; qvlm supports stages 1 and 2 (for partitioned weights, "
            "stage 3's use, pass --fsdp instead)"
        )
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise QVLMError(f"--deepspeed {spec}: remove {key!r}: qvlm's AdamW and learning rates are used")
    for key in ("fp16", "bf16"):
        if cfg.get(key, {}).get("enabled") not in (None, False, "auto"):
            raise QVLMError(f"--deepspeed {spec}: remove {key!r}: the model trains in --dtype (float32)")
    if cfg.get("gradient_accumulation_steps", 1) not in (1, "auto"):
        raise QVLMError(f"--deepspeed {spec}: gradient_accumulation_steps must be 1 (one step per minibatch)")
    clip = cfg.get("gradient_clipping", "auto")
    if clip != "auto" and float(clip) != grad_clip:
        raise QVLMError(f"--deepspeed {spec}: gradient_clipping {clip} differs from --grad-clip {grad_clip}")
    cfg = {k: v for k, v in cfg.items() if k != "train_batch_size"}
    cfg.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, gradient_clipping=grad_clip)
    return cfg


class ZeroOptimizer:
    """A DeepSpeed ZeRO engine seen as qvlm's optimiser.

    ``param_groups`` are the AdamW's (set ``lr`` there, as for a plain optimiser); ``step_loss`` is
    the backward pass, gradient reduction, clipping and step; ``state_dict`` / ``load_state_dict``
    speak the plain AdamW format. ``idle_groups``: indices of parameter groups that get no gradient
    in the coming steps (PPO's policy during critic warm-up): DeepSpeed steps every group with zero
    gradients, where a plain AdamW skips parameters without one, so those groups' moments, step count
    and weights are kept as they were."""

    def __init__(self, engine, groups: Sequence[Sequence[torch.nn.Parameter]]):
        self.engine = engine
        self.zero = engine.optimizer  # DeepSpeedZeroOptimizer: flat fp32 partitions, one per group
        self.adamw = self.zero.optimizer  # the AdamW passed in, stepping this process's partitions
        self.groups = [list(g) for g in groups]
        self.idle_groups: set[int] = set()

    @property
    def param_groups(self) -> list[dict]:
        return self.adamw.param_groups

    def _partition(self, i: int) -> torch.Tensor:
        return self.zero.single_partition_of_fp32_groups[i]

    def _link(self) -> None:
        """Point DeepSpeed's per-parameter views at the moments. It links them once, after the first
        step, when a group without gradients (the policy during critic warm-up) has none yet."""
        self.zero._hp_optimizer_states_linked = False
        self.zero._lazy_init_hp_params_optimizer_state()

    def step_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Backward on ``loss`` (already weighted by this process's share), reduce, clip, step.
        Returns the global gradient norm before clipping, as :func:`qvlm.train.optim.optimizer_step`."""
        self.engine.backward(loss * self.engine.world_size)  # DeepSpeed averages: times world = qvlm's sum
        kept = {}
        for i in self.idle_groups:  # lr 0 moves nothing (no decay either); the moments are restored after
            state = self.adamw.state.get(self._partition(i), {})
            kept[i] = (self.param_groups[i]["lr"], {k: v.clone() for k, v in state.items()})
            self.param_groups[i]["lr"] = 0.0
        self.engine.step()
        for i, (lr, state) in kept.items():
            self.param_groups[i]["lr"] = lr
            if state:
                for k, v in state.items():
                    self.adamw.state[self._partition(i)][k].copy_(v)
            else:  # never stepped: as a plain AdamW, no state yet (zeros, step 0)
                for v in self.adamw.state[self._partition(i)].values():
                    v.zero_()
        return torch.tensor(float(self.engine.get_global_grad_norm()))

    def state_dict(self) -> dict:
        """The full AdamW state dict (positional, as ``torch.optim.AdamW.state_dict()`` of one plain
        process), gathered from the partitions: a collective, every process calls it. Parameters
        of a group that never stepped have no entry, as in a plain AdamW."""
        from deepspeed.utils import safe_get_full_optimizer_state

        self._link()
        state, groups, index = {}, [], 0
        for i, params in enumerate(self.groups):
            partition = self.adamw.state.get(self._partition(i), {})
            stepped = bool(partition) and float(partition["step"]) > 0
            for p in params:
                full = {k: safe_get_full_optimizer_state(p, k) for k in _MOMENTS} if stepped else None
                if full is not None:
                    state[index] = {"step": partition["step"].clone(), **{k: v.detach().cpu() for k, v in full.items()}}
                index += 1
            hyper = {k: v for k, v in self.param_groups[i].items() if k != "params"}
            groups.append({**hyper, "params": list(range(index - len(params), index))})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state: dict) -> None:
        """Load a plain AdamW state dict (:meth:`state_dict`'s format) into the partitions, after the
        model's weights were loaded (they are copied into DeepSpeed's fp32 master partitions)."""
        from deepspeed.utils import safe_set_full_optimizer_state

        if len(state["param_groups"]) != len(self.groups) or any(
            len(g["params"]) != len(params) for g, params in zip(state["param_groups"], self.groups)
        ):
            raise ValueError("parameter groups differ from the optimiser's")
        for i in range(len(self.groups)):  # DeepSpeed links its per-parameter views after a first step
            flat = self._partition(i)
            if not self.adamw.state.get(flat):
                self.adamw.state[flat] = {"step": torch.tensor(0.0), **{k: torch.zeros_like(flat) for k in _MOMENTS}}
        self._link()
        for i, (saved, params) in enumerate(zip(state["param_groups"], self.groups)):
            entries = [state["state"].get(j) for j in saved["params"]]
            steps = {float(e["step"]) for e in entries if e is not None}
            if len(steps) > 1 or (steps and None in entries):
                raise ValueError(f"group {i}: its parameters were stepped unequally; ZeRO steps a group as one")
            for p, entry in zip(params, entries):
                for k in _MOMENTS:
                    value = entry[k] if entry is not None else torch.zeros_like(p, dtype=torch.float32)
                    safe_set_full_optimizer_state(p, value.to(p.device, torch.float32), k)
            self.adamw.state[self._partition(i)]["step"].fill_(steps.pop() if steps else 0.0)
            self.param_groups[i].update({k: v for k, v in saved.items() if k != "params"})
        self.zero.refresh_fp32_params()  # the master weights from the model's (just loaded)


def zero_initialize(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer, spec: str, grad_clip: float
) -> ZeroOptimizer:
    """Wrap ``module`` (every process's whole model) and its ``optimizer`` (a ``torch.optim.AdamW``)
    in a DeepSpeed ZeRO engine on the process group qvlm already joined. On a CPU model DeepSpeed's
    CPU accelerator is chosen (``DS_ACCELERATOR=cpu``) before deepspeed is imported."""
    if next(module.parameters()).device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if any(p.dtype != torch.float32 for g in optimizer.param_groups for p in g["params"]):
        raise QVLMError("--deepspeed trains float32 weights (ZeRO's master copies); pass --dtype float32")
    import deepspeed

    groups = [list(g["params"]) for g in optimizer.param_groups]
    before = rng_state()  # the run's random streams do not depend on whether an engine was built
    engine, *_ = deepspeed.initialize(
        model=module, optimizer=optimizer, config=deepspeed_config(spec, grad_clip), dist_init_required=False
    )
    set_rng_state(before)
    return ZeroOptimizer(engine, groups)
