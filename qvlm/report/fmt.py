"""Small formatting helpers shared by the report modules: escaping and number formatting."""

from __future__ import annotations

import html
import math
from typing import Any, Sequence

__all__ = ["esc", "finite", "fmt", "signed", "max_abs"]


def esc(value: Any) -> str:
    """``str(value)`` escaped for HTML text and attribute values."""
    return html.escape(str(value), quote=True)


def finite(x: Any) -> float | None:
    """`x` as a float when it is a finite number, else None (None, NaN, strings...)."""
    if isinstance(x, bool):
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def fmt(x: Any, digits: int = 3) -> str:
    """``x`` with ``digits`` decimals (scientific when tiny or huge); a dash when missing or not finite."""
    f = finite(x)
    if f is None:
        return "—"
    if f != 0 and (abs(f) >= 1e4 or abs(f) < 10**-digits):
        return f"{f:.{digits - 1}e}"
    return f"{f:.{digits}f}"


def signed(x: Any, digits: int = 3) -> str:
    """``x`` with a sign and ``digits`` decimals; a dash when missing or not finite."""
    f = finite(x)
    return "—" if f is None else f"{f:+.{digits}f}"


def max_abs(values: Sequence[float]) -> float:
    """Largest |value| over the finite values; 0 when there are none."""
    return max((abs(f) for f in map(finite, values) if f is not None), default=0.0)
