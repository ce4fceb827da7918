"""LoRA adapters on the fast decoding path (issue 23, item 4): a peft LoRA policy decodes on
:class:`qvlm.decoding.fast.FastDecodeStep` without merging.

A LoRA projection computes ``y = x W^T + b + s (x A^T) B^T`` (Hu et al. 2021, eq. 3; ``s`` = alpha / r,
peft's ``scaling``). The fast step keeps ``W`` fused and packed once (the base weights never change
while the adapters train), and adds the low-rank term of the projections one fused matmul stands
for (q/k/v, gate/up) with two small matmuls: the adapters' ``A`` stacked, ``(R, in)``, and their
``s B`` block-diagonal, ``(out, R)``. So:

- an optimiser step on the adapters costs no rebuild of the packed base weights (about a second
  for SmolLM2-135M), only of these small factors, which every :class:`FastDecodeStep` reads afresh;
- the policy decoded is the one trained, in any dtype: merging ``W + s B A`` into bfloat16 weights
  would round away updates smaller than ``W``'s bf16 resolution (2^-8 relative), which a policy a
  few small steps from its base is made of;
- the adapters' arithmetic follows peft's: the input cast to the adapters' dtype (float32 for a
  bfloat16 model, peft's ``autocast_adapter_dtype``), the sum cast back to the layer's dtype.

Adapters disabled (``disable_adapter()``, the reference policy) or merged contribute nothing here:
the base weights (merged ones included) are what the fused copy holds. Refused with a
:class:`QVLMError`: DoRA and other LoRA variants, LoRA biases, ``fan_in_fan_out`` layers, active
dropout (a module in training mode with ``lora_dropout > 0``), disabled adapters that are merged.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qvlm.errors import QVLMError

__all__ = [
    "LoraDelta",
    "is_lora_layer",
    "lora_layers",
    "base_linear",
    "lora_delta",
    "adapter_parameter_ids",
    "merged_adapters",
]


@functools.cache
def _lora_layer_class() -> type | None:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # without peft there are no LoRA layers
        return None
    return LoraLayer


def is_lora_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a peft LoRA layer (it holds ``base_layer``, ``lora_A`` and ``lora_B``)."""
    cls = _lora_layer_class()
    return cls is not None and isinstance(module, cls)


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """The peft LoRA layers of ``model``, in module order (one walk over its modules)."""
    return [m for m in model.modules() if is_lora_layer(m)]


def base_linear(module: nn.Module) -> nn.Linear:
    """The plain ``nn.Linear`` a projection computes with: itself, or a LoRA layer's ``base_layer``.
    Raises :class:`QVLMError` for anything else (quantised layers, other adapters)."""
    if type(module) is nn.Linear:
        return module
    if is_lora_layer(module) and type(module.base_layer) is nn.Linear:
        return module.base_layer
    raise QVLMError(
        f"the fast decoding path needs plain Linear layers or LoRA on plain Linear layers; found "
        f"{type(module).__name__}: decode without --fast"
    )


def _active(module: nn.Module, name: str) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """The active adapters of one projection as ``(A (r, in), B (out, r), scaling)``, checked."""
    if not is_lora_layer(module):
        return []
    if module.disable_adapters:
        if module.merged:
            raise QVLMError(
                f"{name}: LoRA adapters are merged into the weights and disabled; unmerge them "
                "(unmerge_adapter()) before decoding with --fast"
            )
        return []
    if module.merged:  # the base weights already hold them
        return []
    if getattr(module, "fan_in_fan_out", False):
        raise QVLMError(f"{name}: a fan_in_fan_out LoRA layer (Conv1D-style weights); decode without --fast")
    out = []
    for adapter in module.active_adapters:
        if adapter not in module.lora_A:
            continue
        if adapter in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(adapter, False):
            raise QVLMError(f"{name}: adapter {adapter!r} is a LoRA variant (DoRA, ...); decode without --fast")
        A, B = module.lora_A[adapter], module.lora_B[adapter]
        if B.bias is not None:
            raise QVLMError(f"{name}: adapter {adapter!r} has a LoRA bias; decode without --fast")
        dropout = module.lora_dropout[adapter]
        if isinstance(dropout, nn.Dropout) and dropout.p > 0 and dropout.training:
            raise QVLMError(
                f"{name}: adapter {adapter!r} has dropout {dropout.p} in training mode, which the fast path "
                "does not sample; call model.eval() before decoding, or decode without --fast"
            )
        out.append((A.weight, B.weight, float(module.scaling[adapter])))
    return out


class LoraDelta:
    """The low-rank term of the projections one fused matmul stands for: ``x -> (x A^T) B_s^T``,
    added to the fused base output.

    ``A (R, in)``: every active adapter's down-projection, stacked; ``B_s (out, R)``: their
    up-projections times their ``scaling``, block-diagonal (zero where an adapter does not reach an
    output). Kept transposed, ``(R, out)``, for one ``addmm``: two tensor ops a projection in the
    model's dtype (a decoding step of SmolLM2 runs 30 layers x 4 fused projections of them).
    """

    def __init__(self, A: torch.Tensor, B_scaled: torch.Tensor):
        self.A, self.B_t = A, B_scaled.t().contiguous()

    def add(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y + (x A^T) B_s^T`` in the adapters' dtype, cast back to ``y``'s: y (N, out), x (N, in)."""
        if x.dtype == self.A.dtype:
            return torch.addmm(y, F.linear(x, self.A), self.B_t)
        # peft's arithmetic: the input cast to the adapters' dtype, the sum cast back
        return torch.addmm(y.to(self.A.dtype), F.linear(x.to(self.A.dtype), self.A), self.B_t).to(y.dtype)


@torch.no_grad()
def lora_delta(projections: Sequence[nn.Module], name: str = "layer") -> LoraDelta | None:
    """The :class:`LoraDelta` of ``projections`` whose outputs are concatenated (q, k, v; gate, up),
    from their adapters' current weights; None where none has an active unmerged adapter."""
    blocks = []  # (first output row, A, B, scaling)
    rows = 0
    for i, proj in enumerate(projections):
        blocks += [(rows, A, B, s) for A, B, s in _active(proj, f"{name} projection {i}")]
        rows += base_linear(proj).out_features
    if not blocks:
        return None
    ranks = [A.shape[0] for _, A, _, _ in blocks]
    first = blocks[0][1]
    A = torch.cat([A.detach() for _, A, _, _ in blocks]).to(first.dtype)  # (R, in)
    B = first.new_zeros((rows, sum(ranks)))  # (out, R), block-diagonal
    col = 0
    for (row, _, b, s), r in zip(blocks, ranks):
        B[row : row + b.shape[0], col : col + r] = b.detach() * s
        col += r
    return LoraDelta(A, B)


def adapter_parameter_ids(layers: Sequence[nn.Module]) -> set[int]:
    """``id`` of every adapter parameter (``lora_A``, ``lora_B``, ...) of the LoRA ``layers``
    (:func:`lora_layers`): what the fused base weights do not depend on."""
    ids = set()
    for module in layers:
        for key in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
            part = getattr(module, key, None)
            if isinstance(part, nn.ParameterDict):
                ids.update(id(p) for p in part.values())
            elif isinstance(part, nn.ModuleDict):
                ids.update(id(p) for sub in part.values() for p in sub._parameters.values() if p is not None)
    return ids


def merged_adapters(layers: Sequence[nn.Module]) -> tuple[tuple[str, ...], ...]:
    """Which adapters each of the LoRA ``layers`` has merged into its base weights: peft merges and
    unmerges through ``weight.data``, which moves no version counter, so the fused base weights key
    on this too (:func:`qvlm.decoding.fast.built_for`)."""
    return tuple(tuple(m.merged_adapters) for m in layers)
