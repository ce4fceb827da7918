"""Reward-KL and reward-cost frontiers as curves: one line per method over its setting (beta, N or
alpha), each point with its 95% CI where it has one. Used by ``qvlm exact --plot`` (exact points)
and by the demo report (measured points with CIs).

A frontier is ``{METHOD: [{"reward" or "reward_mean", "reward_ci95" (optional), "kl_to_base",
"kl_kind", "cost", and one of "n", "beta", "alpha"}, ...]}`` (metrics.json's ``"frontier"`` block).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from qvlm.errors import QVLMError
from qvlm.fileio import atomic_write_bytes
from qvlm.report.fmt import finite
from qvlm.report.plots import _figure_data_uri, _new_figure, figure_bytes

__all__ = ["plot_frontier", "frontier_figure", "write_frontier_plot"]

_STYLE = {  # method -> (colour, line style); others cycle through the default colours
    "soft_optimum": ("#111827", "-"),
    "best_of_n": ("#d97706", "--"),
    "controlled_decoding": ("#2563eb", ":"),
}
_OTHERS = ("#16a34a", "#dc2626", "#7c3aed", "#0891b2", "#db2777", "#65a30d", "#92400e", "#4b5563")


def _reward(p: Mapping[str, Any]) -> float | None:
    return finite(p.get("reward_mean", p.get("reward")))


def frontier_figure(frontier: Mapping[str, Sequence[Mapping[str, Any]]], x: str = "kl_to_base", title: str = ""):
    """A matplotlib Figure: reward against ``x`` (``kl_to_base`` or ``cost``), one curve per method.

    Points whose ``kl_kind`` is not exact get open markers (an estimate or a bound on the KL)."""
    fig, ax = _new_figure(6.4, 4.2)
    others = iter(_OTHERS * 4)
    for name, points in frontier.items():
        pts = [p for p in points if finite(p.get(x)) is not None and _reward(p) is not None]
        if not pts:
            continue
        pts = sorted(pts, key=lambda p: p[x])
        colour, style = _STYLE.get(name) or (next(others), "-")
        xs, ys = [p[x] for p in pts], [_reward(p) for p in pts]
        err = [finite(p.get("reward_ci95")) or 0.0 for p in pts]
        hollow = any(p.get("kl_kind", "exact") != "exact" for p in pts) and x == "kl_to_base"
        marker = "o" if name != "soft_optimum" else ""
        ax.errorbar(
            xs,
            ys,
            yerr=err if any(err) else None,
            color=colour,
            linestyle=style,
            marker=marker,
            markersize=4,
            markerfacecolor="white" if hollow else colour,
            capsize=2,
            linewidth=1.4,
            label=name + (" (KL estimated)" if hollow else ""),
        )
    ax.set_xlabel(
        "KL to the base policy (nats per response)"
        if x == "kl_to_base"
        else "cost (compute per response, plain sampling = 1)"
    )
    ax.set_ylabel("reward")
    if x == "cost":
        ax.set_xscale("log", base=2)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    return fig


def plot_frontier(frontier: Mapping[str, Sequence[Mapping[str, Any]]], x: str = "kl_to_base", title: str = "") -> str:
    """PNG data URI of :func:`frontier_figure` (for the HTML report)."""
    return _figure_data_uri(frontier_figure(frontier, x, title))


def write_frontier_plot(
    frontier: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, x: str = "kl_to_base", title: str = ""
) -> None:
    """Write :func:`frontier_figure` to ``path`` (``.png`` or ``.svg``), atomically."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("png", "svg"):
        raise QVLMError(f"plot file {path}: use a .png or .svg name")
    fig = frontier_figure(frontier, x, title)
    atomic_write_bytes(path, figure_bytes(fig, fmt))
