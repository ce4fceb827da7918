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


def _panel(
    x0: float,
    points: list[tuple[int, float | None]],
    title: str,
    label: str,
    colour: str,
    snapshots: Sequence[int],
    chosen: int | None,
    last: int,
) -> str:
    """One panel at horizontal offset ``x0``: axes, ticks, the line (broken at missing values), a
    tooltip per point, and a dashed vertical line per snapshot."""
    w, h = _PANEL_W - _LEFT - _RIGHT, _PANEL_H - _TOP - _BOTTOM
    present = [v for _, v in points if v is not None]
    y_ticks = nice_ticks(min(present), max(present)) if present else [0.0, 1.0]
    lo, hi = y_ticks[0], y_ticks[-1]
    x_ticks = nice_ticks(1, max(last, 2), 5, min_step=1)
    x_lo, x_hi = x_ticks[0], x_ticks[-1]

    def sx(it: float) -> float:
        return x0 + _LEFT + w * (it - x_lo) / (x_hi - x_lo)

    def sy(v: float) -> float:
        return _TOP + h * (hi - v) / (hi - lo)

    parts = [f'<text x="{x0 + _LEFT}" y="16" class="ppo-title" font-size="13" font-weight="600">{esc(title)}</text>']
    for v in y_ticks:
        y = sy(v)
        parts.append(f'<line x1="{x0 + _LEFT}" y1="{y:.1f}" x2="{x0 + _LEFT + w}" y2="{y:.1f}" stroke="#e4e7eb"/>')
        parts.append(
            f'<text x="{x0 + _LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11" fill="#4b5563">'
            f"{_label(v)}</text>"
        )
    for it in x_ticks:
        x = sx(it)
        parts.append(
            f'<text x="{x:.1f}" y="{_TOP + h + 16}" text-anchor="middle" font-size="11" fill="#4b5563">{it:g}</text>'
        )
    parts.append(
        f'<text x="{x0 + _LEFT + w / 2:.1f}" y="{_PANEL_H - 6}" text-anchor="middle" font-size="11" '
        'fill="#4b5563">iteration</text>'
    )
    parts.append(
        f'<polyline points="{x0 + _LEFT},{_TOP} {x0 + _LEFT},{_TOP + h} {x0 + _LEFT + w},{_TOP + h}" '
        'fill="none" stroke="#9ca3af"/>'
    )
    for n in snapshots:
        x = sx(n)
        strong = n == chosen
        parts.append(
            f'<line x1="{x:.1f}" y1="{_TOP}" x2="{x:.1f}" y2="{_TOP + h}" stroke="{"#111827" if strong else "#9ca3af"}" '
            f'stroke-dasharray="4 3" class="ppo-snapshot{" chosen" if strong else ""}">'
            f"<title>policy after {n} iterations{' (chosen on validation)' if strong else ''}</title></line>"
        )
        if strong:  # the label on the side with room: right of the line in the left half
            left_half = x < x0 + _LEFT + w / 2
            parts.append(
                f'<text x="{x + (4 if left_half else -4):.1f}" y="{_TOP + 11}" '
                f'text-anchor="{"start" if left_half else "end"}" font-size="10" fill="#111827">chosen</text>'
            )
    segment: list[str] = []
    segments = []
    for it, v in points:
        if v is None:
            segments.append(segment)
            segment = []
        else:
            segment.append(f"{sx(it):.1f},{sy(v):.1f}")
    segments.append(segment)
    for seg in segments:
        if len(seg) > 1:
            parts.append(
                f'<polyline points="{" ".join(seg)}" fill="none" stroke="{colour}" stroke-width="2" class="ppo-line"/>'
            )
    for it, v in points:
        if v is not None:
            parts.append(
                f'<circle cx="{sx(it):.1f}" cy="{sy(v):.1f}" r="2.6" fill="{colour}" class="ppo-point">'
                f"<title>iteration {it}: {esc(label)} {v:.4f}</title></circle>"
            )
    return "".join(parts)


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
    panels = [
        _panel(k * (_PANEL_W + _GAP), series[name], *titles[name], _COLOURS[name], snapshots, chosen, last)
        for k, name in enumerate(("reward", "kl"))
    ]
    return head + "".join(panels) + "</svg>"
