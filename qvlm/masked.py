"""Reductions over the real entries of a padded batch (DESIGN.md, "Padding"): every reduction over tokens is
a masked mean with the count of real entries, clamped to >= 1, as its denominator."""

from __future__ import annotations

import torch

__all__ = ["masked_mean", "masked_var", "masked_whiten"]


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is 1.

    The denominator is the count of real entries clamped to >= 1, so an all-padding row gives 0,
    not NaN (DESIGN.md, "Padding").

    Shape: ``x`` and ``mask`` broadcastable to the same shape; the result drops ``dim`` (or is a
    scalar when ``dim`` is None).
    """
    # select rather than multiply, so a NaN or inf in a padding slot cannot leak into the mean
    x = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    mask = mask.to(x.dtype)
    if dim is None:
        return x.sum() / mask.sum().clamp(min=1.0)
    return x.sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the real entries of ``x`` (Bessel-corrected by default). Scalar."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        var = var * n / (n - 1).clamp(min=1.0)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise the real entries of ``x`` to unit variance (and zero mean if ``shift_mean``).

    Padding entries come back as 0. Used on PPO advantages (Schulman et al. 2017, implementation
    detail; torchtune ``rlhf.whiten``). Shape: same as ``x``.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)
