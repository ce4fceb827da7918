"""A self-contained HTML report for a qvlm run: metrics, plots, samples, per-token value maps.

Pure rendering from plain Python data (lists, dicts, floats); no model code. The page embeds its
images as base64 PNG data URIs and its CSS inline, and loads nothing from the network, so the one
file can be mailed or archived. Plots need matplotlib (`pip install qvlm[report]`).

The per-token value map colours each response token y_t by its advantage A(s_t, y_t) = Q(s_t, y_t)
- V(s_t) (DESIGN.md: both read at the position whose logits predict y_t): green where writing the
token raised the expected reward, red where it lowered it, white where it changed nothing.

`methods` everywhere is the metrics.json format:
    {NAME: {"reward_mean", "reward_ci95" (95% CI half-width), "kl_to_base", "distinct_2",
            "perplexity", "cost"}}; missing or None fields render as a dash and are left out of plots.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from typing import Any, Mapping, Sequence

from qvlm.errors import QVLMError
from qvlm.fileio import atomic_write_text

__all__ = [
    "running_median",
    "advantage_color",
    "value_sparkline_svg",
    "value_map_html",
    "value_map_legend_html",
    "plot_losses",
    "plot_reward_vs_kl",
    "plot_reward_vs_cost",
    "metrics_table_html",
    "render_report",
    "render_value_map_page",
]

# Diverging palette of the value map (ColorBrewer RdYlGn ends, white centre).
_NEGATIVE_RGB = (215, 48, 39)
_POSITIVE_RGB = (26, 152, 80)
_WHITE_RGB = (255, 255, 255)

# ------------------------------------------------------------------ small helpers


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _finite(x: Any) -> float | None:
    """`x` as a float when it is a finite number, else None (None, NaN, strings...)."""
    if isinstance(x, bool):
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _fmt(x: Any, digits: int = 3) -> str:
    f = _finite(x)
    if f is None:
        return "—"
    if f != 0 and (abs(f) >= 1e4 or abs(f) < 10**-digits):
        return f"{f:.{digits - 1}e}"
    return f"{f:.{digits}f}"


def _signed(x: Any, digits: int = 3) -> str:
    f = _finite(x)
    return "—" if f is None else f"{f:+.{digits}f}"


def _mix(rgb: tuple[int, int, int], weight: float) -> tuple[int, int, int]:
    """Blend white toward `rgb` by `weight` in [0, 1]."""
    return tuple(round(w + (c - w) * weight) for c, w in zip(rgb, _WHITE_RGB))  # type: ignore[return-value]


def advantage_color(advantage: float, scale: float) -> tuple[str, str]:
    """(background, text) CSS colours for one advantage on a diverging red-white-green scale.

    `advantage / scale` is clipped to [-1, 1]; -1 is full red, 0 white, +1 full green. Non-finite
    advantages are shown white. The text turns white on dark backgrounds so it stays readable.
    """
    a = _finite(advantage)
    x = 0.0 if a is None or scale <= 0 else max(-1.0, min(1.0, a / scale))
    rgb = _mix(_NEGATIVE_RGB if x < 0 else _POSITIVE_RGB, abs(x))
    text = "#ffffff" if abs(x) > 0.6 else "#1b1f24"
    return "rgb({},{},{})".format(*rgb), text


def _token_display(token: str) -> str:
    """Escaped HTML for one decoded token piece, with whitespace made visible but kept in place.

    Spaces stay spaces (the span uses `white-space: pre-wrap`), a newline shows as ↵ and then breaks
    the line, a tab as →, an empty piece (e.g. a special token decoded to "") as ∅.
    """
    if token == "":
        return '<span class="ws">∅</span>'
    parts = []
    for ch in token:
        if ch == "\n":
            parts.append('<span class="ws">↵</span>\n')
        elif ch == "\t":
            parts.append('<span class="ws">→</span>')
        elif ch == "\r":
            continue
        else:
            parts.append(html.escape(ch, quote=True))
    return "".join(parts)


def _check_same_length(**seqs: Sequence) -> None:
    lengths = {name: len(seq) for name, seq in seqs.items()}
    if len(set(lengths.values())) > 1:
        raise QVLMError(f"value map inputs differ in length: {lengths}; pass one value per token")


def _max_abs(values: Sequence[float]) -> float:
    finite = [abs(f) for f in map(_finite, values) if f is not None]
    return max(finite, default=0.0)


# ------------------------------------------------------------------ value maps


def value_sparkline_svg(values: Sequence[float], *, width: int = 640, height: int = 56) -> str:
    """Inline SVG line of V(s_t) over response steps t = 1..T, with a dashed zero line if in range.

    Each step carries a `<title>` tooltip "t=…, V=…". Non-finite values break the line.
    """
    points = [(t, _finite(v)) for t, v in enumerate(values)]
    finite = [v for _, v in points if v is not None]
    if not finite:
        return ""
    lo, hi = min(finite + [0.0]), max(finite + [0.0])
    if hi - lo < 1e-12:
        lo, hi = lo - 1.0, hi + 1.0
    pad_x, pad_y = 4.0, 5.0
    n = max(len(points) - 1, 1)

    def xy(t: int, v: float) -> tuple[float, float]:
        x = pad_x + (width - 2 * pad_x) * (t / n if len(points) > 1 else 0.5)
        y = pad_y + (height - 2 * pad_y) * (hi - v) / (hi - lo)
        return x, y

    segments, current = [], []
    for t, v in points:
        if v is None:
            if current:
                segments.append(current)
            current = []
        else:
            current.append(xy(t, v))
    if current:
        segments.append(current)

    parts = [
        f'<svg class="spark" viewBox="0 0 {width} {height}" preserveAspectRatio="none" '
        f'role="img" aria-label="V over response steps">'
    ]
    _, y0 = xy(0, 0.0)
    parts.append(
        f'<line x1="0" y1="{y0:.1f}" x2="{width}" y2="{y0:.1f}" class="spark-zero" vector-effect="non-scaling-stroke"/>'
    )
    for seg in segments:
        pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in seg)
        parts.append(f'<polyline points="{pts}" class="spark-line" vector-effect="non-scaling-stroke"/>')
    step_w = (width - 2 * pad_x) / max(len(points), 1)
    for t, v in points:
        if v is None:
            continue
        x, _ = xy(t, v)
        # Invisible full-height hover strip per step: the tooltip works anywhere above the point.
        parts.append(
            f'<rect x="{x - step_w / 2:.1f}" y="0" width="{step_w:.1f}" height="{height}" '
            f'class="spark-hit"><title>t={t + 1}, V={v:.4f}</title></rect>'
        )
    parts.append("</svg>")
    return "".join(parts)


def value_map_html(
    tokens: list[str],
    values: list[float],
    advantages: list[float],
    scale: float | None = None,
) -> str:
    """HTML for one response: tokens coloured by advantage Q - V, with a sparkline of V beneath.

    Args:
        tokens: decoded response pieces y_1..y_T (raw strings; HTML is escaped, whitespace shown).
        values: V(s_t) for t = 1..T, the value of the state before writing y_t.
        advantages: Q(s_t, y_t) - V(s_t) for t = 1..T.
        scale: |advantage| that maps to full colour; default max |advantage| over this map. Pass a
            shared scale to compare colours across maps.

    Each token span has a tooltip "V=…, Q-V=…". The markup uses classes styled by `REPORT_CSS`.

    Raises:
        QVLMError: the three lists differ in length.
    """
    _check_same_length(tokens=tokens, values=values, advantages=advantages)
    if scale is None or not (_finite(scale) or 0) > 0:
        scale = _max_abs(advantages) or 1.0
    spans = []
    for t, (token, v, adv) in enumerate(zip(tokens, values, advantages), start=1):
        bg, fg = advantage_color(adv, scale)
        tip = f"t={t}  token={token!r}\nV={_fmt(v, 4)}, Q-V={_signed(adv, 4)}"
        spans.append(
            f'<span class="tok" style="background:{bg};color:{fg}" title="{_esc(tip)}">{_token_display(token)}</span>'
        )
    spark = value_sparkline_svg(values)
    spark_block = (
        f'<div class="spark-wrap"><div class="spark-label">V(s<sub>t</sub>) over the response '
        f"(min {_fmt(min((f for f in map(_finite, values) if f is not None), default=None))}, "
        f"max {_fmt(max((f for f in map(_finite, values) if f is not None), default=None))})"
        f"</div>{spark}</div>"
        if spark
        else ""
    )
    return f'<div class="vmap"><div class="tokens">{"".join(spans)}</div>{spark_block}</div>'


def value_map_legend_html(scale: float) -> str:
    """A red-white-green colour bar labelled -scale, 0, +scale for the value maps."""
    neg = "rgb({},{},{})".format(*_NEGATIVE_RGB)
    pos = "rgb({},{},{})".format(*_POSITIVE_RGB)
    return (
        '<div class="legend">'
        '<span class="legend-title">token colour = advantage '
        "Q(s<sub>t</sub>, y<sub>t</sub>) − V(s<sub>t</sub>)</span>"
        f'<span class="legend-tick">{_signed(-scale, 2)}</span>'
        f'<span class="legend-bar" style="background:linear-gradient(90deg,{neg},#ffffff,{pos})"></span>'
        f'<span class="legend-tick">{_signed(scale, 2)}</span>'
        '<span class="legend-note">red: the token lowered the expected reward · green: raised it · '
        "hover a token for V and Q−V · ↵ newline</span>"
        "</div>"
    )


# ------------------------------------------------------------------ plots (matplotlib, Agg)


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
        pts = [(_finite(step), _finite(loss)) for step, loss in points]
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


def _plot_reward_against(methods: Mapping[str, Mapping[str, Any]], key: str, xlabel: str, title: str) -> str:
    fig, ax = _new_figure(5.6, 4.0)
    points = []
    for name, m in methods.items():
        x, y = _finite(m.get(key)), _finite(m.get("reward_mean"))
        if x is None or y is None:
            continue
        points.append((name, x, y, _finite(m.get("reward_ci95")) or 0.0))
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
            markeredgecolor="white",
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


# Candidate label offsets (points) around a marker, tried in order: right, left, above, below.
_LABEL_OFFSETS = (
    (7, 4, "left", "bottom"),
    (7, -4, "left", "top"),
    (-7, 4, "right", "bottom"),
    (-7, -4, "right", "top"),
    (0, 9, "center", "bottom"),
    (0, -9, "center", "top"),
)


def _place_labels(fig, ax, points: Sequence[tuple[str, float, float, float]], colors: Sequence[str]) -> None:
    """Label each (name, x, y, ci) point, taking for each the first offset whose text box overlaps no
    earlier label and no other point's error bar (greedy; the first offset when none is free)."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    bars = [Bbox(ax.transData.transform([(x, y - ci), (x, y + ci)])).padded(4) for _, x, y, ci in points]
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

        for offset in _LABEL_OFFSETS:
            ann, box = annotate(*offset)
            free = (
                not any(box.overlaps(bar) for j, bar in enumerate(bars) if j != i)
                and not any(box.overlaps(other) for other in placed)
                and ax.bbox.contains(box.x0, box.y0)
                and ax.bbox.contains(box.x1, box.y1)
            )
            if free:
                break
            ann.remove()
        else:
            ann, box = annotate(*_LABEL_OFFSETS[0])
        placed.append(box)


def plot_reward_vs_kl(methods: Mapping[str, Mapping[str, Any]], kl_label: str = "KL(method ‖ base)") -> str:
    """PNG data URI: one point per method, reward mean (95% CI error bar) against its `kl_to_base`.

    `kl_label` names the x axis (say the unit: nats per token or per response).
    """
    return _plot_reward_against(methods, "kl_to_base", kl_label, "Reward vs. KL to base")


def plot_reward_vs_cost(methods: Mapping[str, Mapping[str, Any]], cost_label: str = "decoding cost") -> str:
    """PNG data URI: one point per method, reward mean (95% CI error bar) against its `cost` field.

    `cost_label` names the x axis (the unit is whatever the caller put in metrics.json).
    """
    return _plot_reward_against(methods, "cost", cost_label, "Reward vs. cost")


# ------------------------------------------------------------------ tables and sections

_COLUMNS = (
    ("kl_to_base", "KL to base", "lower = closer to the base model"),
    ("distinct_2", "Distinct-2", "share of distinct bigrams (diversity)"),
    ("perplexity", "Perplexity", "under the base model (fluency)"),
    ("cost", "Cost", "decoding cost"),
)


def metrics_table_html(methods: Mapping[str, Mapping[str, Any]]) -> str:
    """HTML table, one row per method: reward mean ± 95% CI, KL to base, distinct-2, perplexity, cost.

    The best reward mean is highlighted. Missing fields show as a dash.
    """
    if not methods:
        return '<p class="muted">No metrics recorded.</p>'
    rewards = {name: _finite(m.get("reward_mean")) for name, m in methods.items()}
    best = max((r for r in rewards.values() if r is not None), default=None)
    head = "".join(f'<th class="num" title="{_esc(tip)}">{_esc(label)}</th>' for _, label, tip in _COLUMNS)
    rows = []
    for name, m in methods.items():
        r, ci = rewards[name], _finite(m.get("reward_ci95"))
        reward = _fmt(r) + (f' <span class="ci">± {_fmt(ci)}</span>' if ci is not None else "")
        cls = ' class="best"' if r is not None and r == best else ""
        cells = "".join(f'<td class="num">{_fmt(m.get(key))}</td>' for key, _, _ in _COLUMNS)
        rows.append(f'<tr{cls}><th scope="row">{_esc(name)}</th><td class="num">{reward}</td>{cells}</tr>')
    return (
        '<table class="metrics"><thead><tr><th>Method</th>'
        '<th class="num" title="mean reward on eval prompts, ± 95% CI half-width">Reward ± 95% CI</th>'
        f"{head}"
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _reward_badge(reward: Any) -> str:
    f = _finite(reward)
    cls = "pos" if f is not None and f > 0 else "neg" if f is not None and f < 0 else "zero"
    return f'<span class="badge {cls}">reward {_signed(f)}</span>'


def _samples_html(samples: Sequence[Mapping[str, Any]]) -> str:
    if not samples:
        return '<p class="muted">No samples recorded.</p>'
    cards = []
    for s in samples:
        base_r, guided_r = _finite(s.get("base_reward")), _finite(s.get("guided_reward"))
        delta = (
            f'<span class="delta">Δ {_signed(guided_r - base_r)}</span>'
            if base_r is not None and guided_r is not None
            else ""
        )
        cards.append(
            '<article class="card sample">'
            f'<header><span class="method">{_esc(s.get("method", ""))}</span>{delta}</header>'
            f'<p class="prompt"><span class="label">Prompt</span>{_esc(s.get("prompt", ""))}</p>'
            '<div class="pair">'
            f'<div class="side base"><div class="side-head">Base model {_reward_badge(base_r)}</div>'
            f'<p class="text">{_esc(s.get("base", ""))}</p></div>'
            f'<div class="side guided"><div class="side-head">Guided {_reward_badge(guided_r)}</div>'
            f'<p class="text">{_esc(s.get("guided", ""))}</p></div>'
            "</div></article>"
        )
    return "".join(cards)


def _value_maps_html(value_maps: Sequence[Mapping[str, Any]]) -> str:
    if not value_maps:
        return '<p class="muted">No value maps recorded.</p>'
    # One colour scale for all maps, so the same colour means the same advantage everywhere.
    scale = max((_max_abs(vm.get("advantages", [])) for vm in value_maps), default=0.0) or 1.0
    parts = [value_map_legend_html(scale)]
    for vm in value_maps:
        parts.append(
            '<article class="card">'
            f'<header><p class="prompt"><span class="label">Prompt</span>{_esc(vm.get("prompt", ""))}</p>'
            f"{_reward_badge(vm.get('reward'))}</header>"
            f"{value_map_html(list(vm['tokens']), list(vm['values']), list(vm['advantages']), scale)}"
            "</article>"
        )
    return "".join(parts)


_EXPLANATION = """
<div class="explain">
  <p>A language model writing a response is an agent: the <em>state</em> s<sub>t</sub> is the prompt plus
  the tokens written so far, the <em>action</em> is the next token y<sub>t</sub>, and the reward (here a
  score of the finished text) arrives at the end.</p>
  <dl>
    <dt>V(s<sub>t</sub>)</dt><dd>value of a state: the reward we expect if the model carries on from this
    prefix.</dd>
    <dt>Q(s<sub>t</sub>, a)</dt><dd>value of an action: the reward we expect after writing token
    <em>a</em> next and then carrying on.</dd>
    <dt>Advantage Q − V</dt><dd>how much one token choice moves the expected reward compared with the
    model's typical continuation; positive tokens steer toward higher reward.</dd>
    <dt>Value-guided decoding</dt><dd>the base model stays frozen; at each step its log-probabilities are
    shifted by the advantage, <code>logits′ = log π<sub>ref</sub>(·|s) + β (Q(s,·) − V(s))</code>, so tokens
    that raise the expected reward become likelier. β = 0 gives back the base model.</dd>
  </dl>
</div>
"""

REPORT_CSS = """
:root { --fg:#1b1f24; --muted:#6b7280; --line:#e4e7eb; --bg:#f6f7f9; --card:#ffffff; --accent:#2f5d9e;
        --pos:#1a9850; --neg:#d73027; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
       font: 15px/1.55 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1080px; margin: 0 auto; padding: 28px 28px 60px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 36px 0 12px; padding-bottom: 6px; border-bottom: 2px solid var(--line); }
nav { font-size: 13px; color: var(--muted); margin-bottom: 18px; }
nav a { color: var(--accent); text-decoration: none; margin-right: 14px; }
code, pre, .tokens { font-family: "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", monospace; }
code { font-size: 13px; background: #eef1f5; padding: 1px 4px; border-radius: 3px; }
.muted { color: var(--muted); }
.intro { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 14px 18px; }
.explain { margin-top: 14px; background: #f0f4fa; border-left: 4px solid var(--accent);
           border-radius: 6px; padding: 10px 18px; font-size: 14px; }
.explain dl { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; margin: 8px 0; }
.explain dt { font-weight: 600; } .explain dd { margin: 0; }
table.metrics { width: 100%; border-collapse: collapse; background: var(--card);
                border: 1px solid var(--line); border-radius: 8px; overflow: hidden; font-size: 14px; }
table.metrics th, table.metrics td { padding: 8px 12px; border-bottom: 1px solid var(--line); text-align: left; }
table.metrics thead th { background: #eef1f5; font-weight: 600; white-space: nowrap; }
table.metrics .num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.metrics tbody tr:last-child th, table.metrics tbody tr:last-child td { border-bottom: none; }
table.metrics tr.best { background: #ecf7ef; }
table.metrics tr.best th::after { content: " ★"; color: var(--pos); }
.ci { color: var(--muted); font-size: 12px; }
.plots { display: grid; grid-template-columns: 1fr 1fr; gap: 14px; }
.plots figure { margin: 0; background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 8px; }
.plots figure.wide { grid-column: 1 / -1; }
.plots img { width: 100%; height: auto; display: block; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px;
        margin-bottom: 12px; }
.card header { display: flex; align-items: baseline; justify-content: space-between; gap: 12px; }
.method { font-weight: 600; color: var(--accent); font-size: 13px; }
.delta { font-size: 13px; color: var(--muted); font-variant-numeric: tabular-nums; }
.prompt { margin: 4px 0 8px; font-style: italic; }
.label { font-style: normal; font-size: 11px; text-transform: uppercase; letter-spacing: .05em;
         color: var(--muted); margin-right: 8px; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
.side { border-radius: 6px; padding: 8px 12px; background: #f8f9fb; border: 1px solid var(--line); }
.side.guided { border-color: #bcd3f0; background: #f4f8fd; }
.side-head { font-size: 12px; color: var(--muted); display: flex; justify-content: space-between; }
.text { margin: 4px 0 0; white-space: pre-wrap; }
.badge { font-size: 12px; padding: 1px 7px; border-radius: 10px; white-space: nowrap;
         font-variant-numeric: tabular-nums; font-style: normal; }
.badge.pos { background: #dff1e5; color: #14683a; } .badge.neg { background: #fadedb; color: #9e2019; }
.badge.zero { background: #eceff3; color: var(--muted); }
.legend { display: flex; flex-wrap: wrap; align-items: center; gap: 8px; margin: 4px 0 14px; font-size: 13px; }
.legend-title { font-weight: 600; margin-right: 6px; }
.legend-bar { display: inline-block; width: 220px; height: 14px; border: 1px solid #cfd4da; border-radius: 3px; }
.legend-tick { font-variant-numeric: tabular-nums; color: var(--muted); }
.legend-note { flex-basis: 100%; color: var(--muted); font-size: 12px; }
.tokens { font-size: 14px; line-height: 2.0; white-space: pre-wrap; word-break: break-word; }
.tok { white-space: pre-wrap; padding: 2px 0; border-radius: 2px; box-shadow: inset 0 0 0 0.5px rgba(0,0,0,.12); }
.tok:hover { outline: 2px solid var(--fg); }
.ws { opacity: .55; }
.spark-wrap { margin-top: 8px; }
.spark-label { font-size: 11px; color: var(--muted); }
svg.spark { width: 100%; height: 56px; display: block; background: #fafbfc; border-radius: 4px; }
.spark-line { fill: none; stroke: var(--accent); stroke-width: 1.8; }
.spark-zero { stroke: #9aa3ad; stroke-width: 1; stroke-dasharray: 4 3; }
.spark-hit { fill: transparent; } .spark-hit:hover { fill: rgba(47,93,158,.12); }
details { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 10px 16px; }
summary { cursor: pointer; font-weight: 600; }
pre.config { font-size: 12.5px; overflow-x: auto; margin: 10px 0 0; }
footer { margin-top: 40px; font-size: 12px; color: var(--muted); }
@media (max-width: 760px) { .plots, .pair { grid-template-columns: 1fr; } }
"""


def render_report(
    path: str | os.PathLike,
    *,
    title: str,
    intro_html: str,
    methods: Mapping[str, Mapping[str, Any]],
    loss_history: Mapping[str, Sequence[tuple[int, float]]],
    samples: Sequence[Mapping[str, Any]],
    value_maps: Sequence[Mapping[str, Any]],
    config: Mapping[str, Any],
) -> None:
    """Write the full self-contained HTML report to `path` (atomically).

    Args:
        title: page title (plain text, escaped).
        intro_html: trusted HTML from the caller saying what was run and why; shown first, followed
            by a fixed explanation of Q, V, advantage and value-guided decoding.
        methods: metrics.json format, {NAME: {"reward_mean", "reward_ci95", "kl_to_base",
            "distinct_2", "perplexity", "cost"}}.
        loss_history: {series: [(step, loss), ...]} for the training-loss plot.
        samples: [{"prompt", "base", "guided", "base_reward", "guided_reward", "method"}].
        value_maps: [{"prompt", "tokens", "values", "advantages", "reward"}]; all maps share one
            colour scale (max |advantage| over all of them).
        config: shown as JSON in a collapsible block (non-JSON values via str()).
    """
    config_json = json.dumps(config, indent=2, sort_keys=True, default=str, ensure_ascii=False)
    sections = [
        ("about", "What was done and why", f'<div class="intro">{intro_html}{_EXPLANATION}</div>'),
        ("metrics", "Metrics on eval prompts", metrics_table_html(methods)),
        (
            "plots",
            "Plots",
            '<div class="plots">'
            f'<figure><img alt="reward vs KL to base" src="{plot_reward_vs_kl(methods)}"></figure>'
            f'<figure><img alt="reward vs cost" src="{plot_reward_vs_cost(methods)}"></figure>'
            f'<figure class="wide"><img alt="training losses" src="{plot_losses(loss_history)}"></figure>'
            "</div>",
        ),
        ("samples", "Samples: base model vs. guided", _samples_html(samples)),
        ("value-maps", "Per-token value maps", _value_maps_html(value_maps)),
        (
            "config",
            "Configuration",
            f"<details><summary>Run configuration ({len(config)} keys)</summary>"
            f'<pre class="config">{_esc(config_json)}</pre></details>',
        ),
    ]
    nav = "".join(f'<a href="#{sid}">{_esc(name)}</a>' for sid, name, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{_esc(name)}</h2>{content}</section>' for sid, name, content in sections)
    page = (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{REPORT_CSS}</style></head>"
        f"<body><main><h1>{_esc(title)}</h1><nav>{nav}</nav>{body}"
        "<footer>Generated by qvlm.report. Self-contained: every image is embedded; nothing is "
        "loaded from the network.</footer></main></body></html>\n"
    )
    atomic_write_text(path, page)


def render_value_map_page(path: str | os.PathLike, *, title: str, value_maps: Sequence[Mapping[str, Any]]) -> None:
    """A small self-contained page of value maps only (``qvlm inspect``), written atomically."""
    page = (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_esc(title)}</title><style>{REPORT_CSS}</style></head>"
        f"<body><main><h1>{_esc(title)}</h1>{_EXPLANATION}"
        f'<section id="value-maps"><h2>Per-token value map</h2>{_value_maps_html(value_maps)}</section>'
        "</main></body></html>\n"
    )
    atomic_write_text(path, page)
