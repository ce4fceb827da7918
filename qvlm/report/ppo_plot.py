"""Inline SVG of a PPO run's training curves: the mean reward of each iteration's rollout and its KL to
the reference (both logged to the run's metrics.jsonl as ``charts/reward`` and ``charts/kl``), side by
side, with the iteration counts whose policy was kept (snapshots) marked and the chosen one named.

Pure text from plain data, like :mod:`qvlm.report.svg`: no matplotlib, so the plot is part of the page's
markup (each point has a tooltip) and renders the same everywhere.
"""

from __future__ import annotations

import math
from typing import Sequence

from qvlm.report.fmt import esc, finite

__all__ = ["nice_ticks", "ppo_curves_svg"]

_PANEL_W, _PANEL_H, _GAP = 360, 220, 40  # one panel's size and the gap between the two
_LEFT, _RIGHT, _TOP, _BOTTOM = 52, 12, 28, 40  # plot area margins inside a panel
_COLOURS = {"reward": "#1a9850", "kl": "#d73027"}


def nice_ticks(lo: float, hi: float, count: int = 4, min_step: float = 0.0) -> list[float]:
    """About ``count`` round tick values covering ``[lo, hi]``: steps of 1, 2, 2.5 or 5 times a power of
    ten, and at least ``min_step`` (1 for whole numbers such as iterations).

    ``nice_ticks(0, 1)`` -> ``[0, 0.25, 0.5, 0.75, 1]``; ``nice_ticks(0.13, 0.92)`` -> ``[0, 0.2, ..., 1]``;
    ``nice_ticks(1, 2, min_step=1)`` -> ``[1, 2]``.
    """
    if not hi > lo:
        lo, hi = lo - 1.0, hi + 1.0
    raw = (hi - lo) / max(count, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = max(next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw), min_step)
    first = math.floor(lo / step + 1e-9) * step
    ticks, k = [], 0
    while True:
        value = round(first + k * step, 12)
        ticks.append(value)
        if value >= hi - 1e-9 * step:
            return ticks
        k += 1


def _label(value: float) -> str:
    return f"{value:.4g}"


class _Frame:
    """Data to pixel coordinates of one panel at horizontal offset ``x0``: iterations on x (whole-number
    ticks), values on y (round ticks covering the values; SVG's y grows downward)."""

    def __init__(self, x0: float, values: list[float], last: int):
        self.x0, self.w, self.h = x0 + _LEFT, _PANEL_W - _LEFT - _RIGHT, _PANEL_H - _TOP - _BOTTOM
        self.y_ticks = nice_ticks(min(values), max(values)) if values else [0.0, 1.0]
        self.x_ticks = nice_ticks(1, max(last, 2), 5, min_step=1)

    def x(self, it: float) -> float:
        lo, hi = self.x_ticks[0], self.x_ticks[-1]
        return self.x0 + self.w * (it - lo) / (hi - lo)

    def y(self, v: float) -> float:
        lo, hi = self.y_ticks[0], self.y_ticks[-1]
        return _TOP + self.h * (hi - v) / (hi - lo)


def _axes(f: _Frame, title: str) -> list[str]:
    """Title, horizontal grid lines with their values, iteration ticks, the axis lines."""
    grey = 'font-size="11" fill="#4b5563"'
    parts = [f'<text x="{f.x0}" y="16" class="ppo-title" font-size="13" font-weight="600">{esc(title)}</text>']
    for v in f.y_ticks:
        y = f.y(v)
        parts.append(f'<line x1="{f.x0}" y1="{y:.1f}" x2="{f.x0 + f.w}" y2="{y:.1f}" stroke="#e4e7eb"/>')
        parts.append(f'<text x="{f.x0 - 6}" y="{y + 4:.1f}" text-anchor="end" {grey}>{_label(v)}</text>')
    for it in f.x_ticks:
        parts.append(f'<text x="{f.x(it):.1f}" y="{_TOP + f.h + 16}" text-anchor="middle" {grey}>{it:g}</text>')
    parts.append(f'<text x="{f.x0 + f.w / 2:.1f}" y="{_PANEL_H - 6}" text-anchor="middle" {grey}>iteration</text>')
    corner = f"{f.x0},{_TOP} {f.x0},{_TOP + f.h} {f.x0 + f.w},{_TOP + f.h}"
    parts.append(f'<polyline points="{corner}" fill="none" stroke="#9ca3af"/>')
    return parts


def _snapshot_marks(f: _Frame, snapshots: Sequence[int], chosen: int | None) -> list[str]:
    """A dashed vertical line at the end of each iteration whose policy was kept; the chosen one dark
    and labelled (on the side with room: right of the line in the panel's left half)."""
    parts = []
    for n in snapshots:
        x, strong = f.x(n), n == chosen
        parts.append(
            f'<line x1="{x:.1f}" y1="{_TOP}" x2="{x:.1f}" y2="{_TOP + f.h}" stroke="{"#111827" if strong else "#9ca3af"}" '
            f'stroke-dasharray="4 3" class="ppo-snapshot{" chosen" if strong else ""}">'
            f"<title>policy kept after iteration {n}{' (chosen on validation)' if strong else ''}</title></line>"
        )
        if strong:
            left_half = x < f.x0 + f.w / 2
            parts.append(
                f'<text x="{x + (4 if left_half else -4):.1f}" y="{_TOP + 11}" '
                f'text-anchor="{"start" if left_half else "end"}" font-size="10" fill="#111827">chosen</text>'
            )
    return parts


def _series(f: _Frame, points: list[tuple[int, float | None]], label: str, colour: str) -> list[str]:
    """The line (broken where a value is missing) and a point with a tooltip per value."""
    segments: list[list[str]] = [[]]
    for it, v in points:
        if v is None:
            segments.append([])
        else:
            segments[-1].append(f"{f.x(it):.1f},{f.y(v):.1f}")
    parts = [
        f'<polyline points="{" ".join(seg)}" fill="none" stroke="{colour}" stroke-width="2" class="ppo-line"/>'
        for seg in segments
        if len(seg) > 1
    ]
    for it, v in points:
        if v is not None:
            parts.append(
                f'<circle cx="{f.x(it):.1f}" cy="{f.y(v):.1f}" r="2.6" fill="{colour}" class="ppo-point">'
                f"<title>iteration {it}: {esc(label)} {v:.4f}</title></circle>"
            )
    return parts


def ppo_curves_svg(
    reward: Sequence[tuple[int, float]],
    kl: Sequence[tuple[int, float]],
    snapshots: Sequence[int] = (),
    chosen: int | None = None,
) -> str:
    """Inline SVG, two panels: the mean reward and the KL to the reference (nats per response) of each
    iteration's rollout, against the iteration (1-based).

    Args:
        reward, kl: ``[(step, value)]`` as metrics.jsonl logs them (step 0 is iteration 1's rollout,
            sampled before its update); non-finite or missing values break the line.
        snapshots: iteration counts whose policy was kept (dashed vertical lines at those iterations).
        chosen: the count chosen on validation (its line dark and labelled).
    """
    series = {name: [(int(step) + 1, finite(v)) for step, v in pts] for name, pts in (("reward", reward), ("kl", kl))}
    last = max((it for pts in series.values() for it, _ in pts), default=0)
    width = 2 * _PANEL_W + _GAP
    head = (
        f'<svg class="ppo-curves" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {_PANEL_H}" '
        f'width="100%" style="max-width:{width}px" role="img" '
        'aria-label="PPO: mean reward and KL to the reference over iterations" font-family="sans-serif">'
    )
    if not last:
        return (
            head + f'<text x="{width / 2}" y="{_PANEL_H / 2}" text-anchor="middle" fill="#6b7280">'
            "no PPO iterations recorded</text></svg>"
        )
    titles = {
        "reward": ("Reward (mean per response)", "reward"),
        "kl": ("KL to the reference (nats per response)", "KL"),
    }
    parts = []
    for k, name in enumerate(("reward", "kl")):
        title, label = titles[name]
        frame = _Frame(k * (_PANEL_W + _GAP), [v for _, v in series[name] if v is not None], last)
        parts += _axes(frame, title) + _snapshot_marks(frame, snapshots, chosen)
        parts += _series(frame, series[name], label, _COLOURS[name])
    return head + "".join(parts) + "</svg>"
