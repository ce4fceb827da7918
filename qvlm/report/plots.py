"""Matplotlib figures of the report as PNG data URIs (Agg canvas, no pyplot state): training losses,
and reward against KL to the base model and against cost, one point per method with its 95% CI.

Plots need matplotlib (``pip install qvlm[report]``).
"""

from __future__ import annotations

import base64
import io
from typing import Any, Mapping, Sequence

from qvlm.errors import QVLMError
from qvlm.report.fmt import finite

__all__ = ["running_median", "plot_losses", "plot_reward_vs_kl", "plot_reward_vs_cost"]


def _new_figure(width: float = 6.4, height: float = 4.0):
    """A matplotlib Figure on an Agg canvas, without touching pyplot's global state."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise QVLMError("plots need matplotlib: pip install 'qvlm[report]'") from exc
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.grid(True, color="#e4e7eb", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax


def figure_bytes(fig, fmt: str, **kwargs) -> bytes:
    """``fig`` as PNG or SVG bytes that depend on the figure alone: no date or software metadata, and
    SVG element ids hashed from a fixed salt (matplotlib draws them at random otherwise), so the same
    data gives the same bytes (issue 25). ``kwargs`` go to ``savefig`` (e.g. ``bbox_inches``)."""
    import matplotlib

    metadata = {"Software": None} if fmt == "png" else {"Creator": None, "Date": None}
    buf = io.BytesIO()
    fig.tight_layout()
    with matplotlib.rc_context({"svg.hashsalt": "qvlm"}):
        fig.savefig(buf, format=fmt, metadata=metadata, **kwargs)
    return buf.getvalue()


def _figure_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    # No "Software" metadata: the same data gives the same bytes.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _empty_plot(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#6b7280")
    ax.set_xticks([])
    ax.set_yticks([])


def running_median(values: Sequence[float], window: int) -> list[float]:
    """Median of the last ``window`` values at each point (fewer at the start): a trailing moving
    median, which follows the typical loss and ignores the odd spike (the faint line shows those)."""
    out = []
    for i in range(len(values)):
        recent = sorted(values[max(0, i - window + 1) : i + 1])
        mid = len(recent) // 2
        out.append(recent[mid] if len(recent) % 2 else (recent[mid - 1] + recent[mid]) / 2)
    return out


def plot_losses(history: Mapping[str, Sequence[tuple[int, float]]]) -> str:
    """PNG data URI of training loss curves, one line per series.

    Args:
        history: {series name: [(step, value), ...]}, e.g. {"losses/q": [...], "losses/v": [...]}.
            Non-finite values are dropped. The y axis is logarithmic when every value is positive.
    """
    fig, ax = _new_figure(11.0, 3.6)
    series = {}
    for name, points in history.items():
        pts = [(finite(step), finite(loss)) for step, loss in points]
        pts = [(step, loss) for step, loss in pts if step is not None and loss is not None]
        if pts:
            series[name] = pts
    if not series:
        _empty_plot(ax, "no training losses recorded")
        return _figure_data_uri(fig)
    smoothed = False
    for name, pts in series.items():
        steps, vals = zip(*sorted(pts))
        window = max(1, len(vals) // 25)
        if window > 1:  # per-step losses are noisy: draw them faint, their running median bold
            line = ax.plot(steps, vals, linewidth=0.8, alpha=0.25)[0]
            ax.plot(steps, running_median(vals, window), label=name, linewidth=1.8, color=line.get_color())
            smoothed = True
        else:
            ax.plot(steps, vals, label=name, linewidth=1.6, marker="o" if len(pts) < 3 else None)
    if all(v > 0 for pts in series.values() for _, v in pts):
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss")
    title = "Training losses" + (" (faint: each step; bold: running median)" if smoothed else "")
    ax.set_title(title, loc="left", fontsize=11)
    ax.legend(frameon=False, fontsize=8, ncol=min(len(series), 4))
    return _figure_data_uri(fig)


def _plot_reward_against(
    methods: Mapping[str, Mapping[str, Any]], key: str, xlabel: str, title: str, hollow: Sequence[str] = ()
) -> str:
    """Reward (95% CI bars) against ``m[key]``, one labelled point per method; the methods named in
    ``hollow`` get an open marker (the KL plot: an upper bound, not the exact value)."""
    fig, ax = _new_figure(5.6, 4.0)
    points = []
    for name, m in methods.items():
        x, y = finite(m.get(key)), finite(m.get("reward_mean"))
        if x is None or y is None:
            continue
        points.append((name, x, y, finite(m.get("reward_ci95")) or 0.0))
    if not points:
        _empty_plot(ax, f"no method reports both reward and {key}")
        return _figure_data_uri(fig)
    colors = [f"C{i % 10}" for i in range(len(points))]
    for (name, x, y, ci), color in zip(points, colors):
        ax.errorbar(
            x,
            y,
            yerr=ci,
            fmt="o",
            color=color,
            ecolor=color,
            elinewidth=1.4,
            capsize=4,
            markersize=7,
            markeredgecolor=color if name in hollow else "white",
            markerfacecolor="white" if name in hollow else color,
            markeredgewidth=1.6 if name in hollow else 1.0,
            zorder=3,
        )
    xs = [x for _, x, _, _ in points]
    if min(xs) > 0 and max(xs) / min(xs) > 30:
        ax.set_xscale("log")
    else:
        # Leave room on the right for the labels.
        lo, hi = min(xs), max(xs)
        span = (hi - lo) or max(abs(hi), 1.0)
        ax.set_xlim(lo - 0.08 * span, hi + 0.3 * span)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("reward (mean, 95% CI)")
    ax.set_title(title, loc="left", fontsize=11)
    fig.tight_layout()
    _place_labels(fig, ax, points, colors)
    return _figure_data_uri(fig)


# Candidate label offsets (points) around a marker, tried in order: right, left, above, below, then
# further out on the diagonals.
_LABEL_OFFSETS = (
    (7, 4, "left", "bottom"),
    (7, -4, "left", "top"),
    (-7, 4, "right", "bottom"),
    (-7, -4, "right", "top"),
    (0, 9, "center", "bottom"),
    (0, -9, "center", "top"),
    (10, 12, "left", "bottom"),
    (10, -12, "left", "top"),
    (-10, 12, "right", "bottom"),
    (-10, -12, "right", "top"),
)


def _overlap_area(a, b) -> float:
    """Area (pixels^2) shared by two display-space boxes."""
    w, h = min(a.x1, b.x1) - max(a.x0, b.x0), min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _place_labels(fig, ax, points: Sequence[tuple[str, float, float, float]], colors: Sequence[str]) -> None:
    """Label each (name, x, y, ci) point, taking for each the first offset whose text box overlaps no
    earlier label and no other point's error bar and stays inside the axes; when none is free, the
    offset with the least overlap (greedy, in the order of the points)."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    bars = [Bbox(ax.transData.transform([(x, y - ci), (x, y + ci)])).padded(5) for _, x, y, ci in points]
    placed: list = []
    for i, (name, x, y, _) in enumerate(points):

        def annotate(dx: float, dy: float, ha: str, va: str):
            ann = ax.annotate(
                name,
                (x, y),
                textcoords="offset points",
                xytext=(dx, dy),
                ha=ha,
                va=va,
                fontsize=8.5,
                color=colors[i],
                zorder=4,
            )
            return ann, ann.get_window_extent(renderer).expanded(1.05, 1.15)

        best = None  # (overlap, annotation, box)
        for offset in _LABEL_OFFSETS:
            ann, box = annotate(*offset)
            overlap = sum(_overlap_area(box, bar) for j, bar in enumerate(bars) if j != i)
            overlap += sum(_overlap_area(box, other) for other in placed)
            if not (ax.bbox.contains(box.x0, box.y0) and ax.bbox.contains(box.x1, box.y1)):
                overlap += box.width * box.height  # outside the axes: as bad as covering a label
            if best is None or overlap < best[0]:
                if best is not None:
                    best[1].remove()
                best = (overlap, ann, box)
            else:
                ann.remove()
            if overlap == 0:
                break
        placed.append(best[2])


def plot_reward_vs_kl(methods: Mapping[str, Mapping[str, Any]], kl_label: str = "KL(method ‖ base)") -> str:
    """PNG data URI: one point per method, reward mean (95% CI error bar) against its `kl_to_base`.

    `kl_label` names the x axis (say the unit: nats per token or per response). A method whose
    `kl_kind` is "bound" (best-of-N's ``log N - (N-1)/N``) or "estimate" (best-of-N's KL from the base
    reward CDF) gets an open marker, and the axis says so.
    """
    bound = [name for name, m in methods.items() if m.get("kl_kind") in ("bound", "estimate")]
    if bound:
        kl_label += "\n(open marker: best-of-N selection, KL estimated or bounded)"
    return _plot_reward_against(methods, "kl_to_base", kl_label, "Reward vs. KL to base", hollow=bound)


def plot_reward_vs_cost(methods: Mapping[str, Mapping[str, Any]], cost_label: str = "decoding cost") -> str:
    """PNG data URI: one point per method, reward mean (95% CI error bar) against its `cost` field.

    `cost_label` names the x axis (the unit is whatever the caller put in metrics.json).
    """
    return _plot_reward_against(methods, "cost", cost_label, "Reward vs. cost")
