"""Calibration of a classifier or reward model: reliability bins, expected calibration error (Guo et
al. 2017, "On Calibration of Modern Neural Networks", eq. 3) and a reliability diagram as SVG."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from qvlm.fileio import atomic_write_bytes

__all__ = ["calibration_bins", "expected_calibration_error", "write_calibration_svg"]


def calibration_bins(probs: Sequence[float], outcomes: Sequence[float], n_bins: int = 10) -> list[dict]:
    """Equal-width bins of predicted probability on [0, 1]: per non-empty bin its mean prediction
    (``confidence``), the fraction of outcomes that are 1 (``frequency``) and ``count``."""
    sums = [[0.0, 0.0, 0] for _ in range(n_bins)]
    for p, y in zip(probs, outcomes):
        b = min(int(p * n_bins), n_bins - 1)
        sums[b][0] += p
        sums[b][1] += y
        sums[b][2] += 1
    return [
        {"low": i / n_bins, "high": (i + 1) / n_bins, "confidence": s / n, "frequency": f / n, "count": n}
        for i, (s, f, n) in enumerate(sums)
        if n
    ]


def expected_calibration_error(bins: Sequence[dict]) -> float:
    """``sum_b (n_b / n) |frequency_b - confidence_b|`` over the bins of :func:`calibration_bins`."""
    total = sum(b["count"] for b in bins)
    return sum(b["count"] / total * abs(b["frequency"] - b["confidence"]) for b in bins) if total else float("nan")


def write_calibration_svg(bins: Sequence[dict], path: str | Path, title: str, xlabel: str, ylabel: str) -> None:
    """A reliability diagram (observed frequency against mean prediction per bin, the diagonal is
    perfect calibration; marker area grows with the bin's count), written atomically as SVG."""
    from qvlm.report.plots import _new_figure, figure_bytes

    fig, ax = _new_figure(5.2, 4.4)
    ax.plot([0, 1], [0, 1], color="#9ca3af", linestyle="--", linewidth=1, label="perfectly calibrated")
    if bins:
        biggest = max(b["count"] for b in bins)
        xs, ys = [b["confidence"] for b in bins], [b["frequency"] for b in bins]
        ax.plot(xs, ys, color="#2563eb", linewidth=1.5)
        ax.scatter(xs, ys, s=[20 + 180 * b["count"] / biggest for b in bins], color="#2563eb", zorder=3, label="bins")
    ax.set_xlim(-0.03, 1.03)  # room for the markers of the end bins
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", frameon=False, fontsize=8)
    atomic_write_bytes(path, figure_bytes(fig, "svg"))
