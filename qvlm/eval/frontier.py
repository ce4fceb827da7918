"""The measured reward-KL frontier of a set of decoding methods: metrics.json's ``"frontier"`` block.

Rows of the metrics table whose names carry a setting become curves, one per method family:
``NAME_beta_B`` -> family ``NAME`` at ``{"beta": B}``; ``best_of_N`` -> ``best_of_n`` at ``{"n": N}``;
``NAME_kK`` (blockwise: best of K candidate blocks) -> ``NAME`` at ``{"n": K}``. Plain sampling
(``base``) is the start of every curve: beta 0 of each guided family and N = 1 of best-of-N.
Each point keeps ``reward_mean``, ``reward_ci95``, ``kl_to_base``, ``kl_kind`` and ``cost``
(issue 10's format).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

__all__ = ["FRONTIER_KEYS", "frontier_point", "build_frontier"]

FRONTIER_KEYS = ("reward_mean", "reward_ci95", "kl_to_base", "kl_kind", "cost")
_BETA = re.compile(r"^(?P<family>.+)_beta_(?P<value>[0-9]+(?:\.[0-9]+)?)$")
_BEST_OF = re.compile(r"^best_of_(?P<value>[0-9]+)$")
_BLOCKWISE = re.compile(r"^(?P<family>.+)_k(?P<value>[0-9]+)$")


def frontier_point(row: Mapping[str, Any], setting: str, value: float | int) -> dict:
    """``{setting: value, reward_mean, reward_ci95, kl_to_base, kl_kind, cost}`` from a metrics row."""
    return {setting: value, **{k: row.get(k) for k in FRONTIER_KEYS}}


def build_frontier(
    methods: Mapping[str, Mapping[str, Any]], best_of: Mapping[int, Mapping[str, Any]] | None = None
) -> dict[str, list[dict]]:
    """``{FAMILY: [points sorted by their setting]}`` from metrics rows named as above.

    ``best_of``: extra best-of-N rows by N (points of the curve that the table does not show); a
    table row of the same N wins. Names that carry no setting (other than ``base``) are left out.
    ``{"base": b, "ilql_beta_4": r}`` -> ``{"ilql": [{"beta": 0, **b}, {"beta": 4, **r}]}``.
    """
    curves: dict[str, dict[float, dict]] = {}
    rows = {f"best_of_{n}": row for n, row in (best_of or {}).items()}
    rows.update(methods)
    for name, row in rows.items():
        if m := _BEST_OF.match(name):
            curves.setdefault("best_of_n", {})[int(m["value"])] = frontier_point(row, "n", int(m["value"]))
        elif m := _BETA.match(name):
            beta = float(m["value"])
            curves.setdefault(m["family"], {})[beta] = frontier_point(row, "beta", beta)
        elif m := _BLOCKWISE.match(name):
            curves.setdefault(m["family"], {})[int(m["value"])] = frontier_point(row, "n", int(m["value"]))
    base = methods.get("base")
    if base is not None:
        for family, points in curves.items():
            if family == "best_of_n":
                points.setdefault(1, frontier_point(base, "n", 1))
            elif any("beta" in p for p in points.values()):
                points.setdefault(0.0, frontier_point(base, "beta", 0.0))
    return {family: [points[k] for k in sorted(points)] for family, points in curves.items()}
