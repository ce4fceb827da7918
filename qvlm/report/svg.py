"""Inline SVG and coloured HTML for per-token value maps: the advantage colour scale, the sparkline of
V over a response, the token spans and the legend.

The value map colours each response token y_t by its advantage A(s_t, y_t) = Q(s_t, y_t) - V(s_t)
(DESIGN.md: both read at the position whose logits predict y_t): green where writing the token raised
the expected reward, red where it lowered it, white where it changed nothing. The markup uses the
classes of ``report.css``.
"""

from __future__ import annotations

import html
from typing import Sequence

from qvlm.errors import QVLMError
from qvlm.report.fmt import esc, finite, fmt, max_abs, signed

__all__ = ["advantage_color", "value_sparkline_svg", "value_map_html", "value_map_legend_html"]

# Diverging palette of the value map (ColorBrewer RdYlGn ends, white centre).
_NEGATIVE_RGB = (215, 48, 39)
_POSITIVE_RGB = (26, 152, 80)
_WHITE_RGB = (255, 255, 255)


def _mix(rgb: tuple[int, int, int], weight: float) -> tuple[int, int, int]:
    """Blend white toward `rgb` by `weight` in [0, 1]."""
    return tuple(round(w + (c - w) * weight) for c, w in zip(rgb, _WHITE_RGB))  # type: ignore[return-value]


def advantage_color(advantage: float, scale: float) -> tuple[str, str]:
    """(background, text) CSS colours for one advantage on a diverging red-white-green scale.

    `advantage / scale` is clipped to [-1, 1]; -1 is full red, 0 white, +1 full green. Non-finite
    advantages are shown white. The text turns white on dark backgrounds so it stays readable.
    """
    a = finite(advantage)
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


def value_sparkline_svg(values: Sequence[float], *, width: int = 640, height: int = 56) -> str:
    """Inline SVG line of V(s_t) over response steps t = 1..T, with a dashed zero line if in range.

    Each step carries a `<title>` tooltip "t=…, V=…". Non-finite values break the line.
    """
    points = [(t, finite(v)) for t, v in enumerate(values)]
    present = [v for _, v in points if v is not None]
    if not present:
        return ""
    lo, hi = min(present + [0.0]), max(present + [0.0])
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

    Each token span has a tooltip "V=…, Q-V=…". The markup uses the classes of ``report.css``.

    Raises:
        QVLMError: the three lists differ in length.
    """
    _check_same_length(tokens=tokens, values=values, advantages=advantages)
    if scale is None or not (finite(scale) or 0) > 0:
        scale = max_abs(advantages) or 1.0
    spans = []
    for t, (token, v, adv) in enumerate(zip(tokens, values, advantages), start=1):
        bg, fg = advantage_color(adv, scale)
        tip = f"t={t}  token={token!r}\nV={fmt(v, 4)}, Q-V={signed(adv, 4)}"
        spans.append(
            f'<span class="tok" style="background:{bg};color:{fg}" title="{esc(tip)}">{_token_display(token)}</span>'
        )
    spark = value_sparkline_svg(values)
    spark_block = (
        f'<div class="spark-wrap"><div class="spark-label">V(s<sub>t</sub>) over the response '
        f"(min {fmt(min((f for f in map(finite, values) if f is not None), default=None))}, "
        f"max {fmt(max((f for f in map(finite, values) if f is not None), default=None))})"
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
        f'<span class="legend-tick">{signed(-scale, 2)}</span>'
        f'<span class="legend-bar" style="background:linear-gradient(90deg,{neg},#ffffff,{pos})"></span>'
        f'<span class="legend-tick">{signed(scale, 2)}</span>'
        '<span class="legend-note">red: the token lowered the expected reward · green: raised it · '
        "hover a token for V and Q−V · ↵ newline</span>"
        "</div>"
    )
