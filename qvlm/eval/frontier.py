"""The measured reward-KL frontier of a set of decoding methods: metrics.json's ``"frontier"`` block.

Rows of the metrics table whose names carry a setting become curves, one per method family:
``NAME_beta_B`` -> family ``NAME`` at ``{"beta": B}``; ``best_of_N`` -> ``best_of_n`` at ``{"n": N}``;
``NAME_kK`` (blockwise: best of K candidate blocks) -> ``NAME`` at ``{"n": K}``. Plain sampling
(``base``) is the start of every curve: beta 0 of each guided family and N = 1 of best-of-N.
Each point keeps ``reward_mean``, ``reward_ci95``, ``kl_to_base``, ``kl_kind`` and ``cost``
(issue 10's format).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

from qvlm.configs import DecodeConfig
from qvlm.decoding import best_of_n_kl_estimate, generate, select_best_of_n
from qvlm.errors import QVLMError
from qvlm.eval.metrics import summarize
from qvlm.rewards import score

__all__ = ["FRONTIER_KEYS", "frontier_point", "build_frontier", "evaluate_best_of_n"]

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


def evaluate_best_of_n(
    model, tokenizer, prompts: list[str], reward, ns: Sequence[int], cfg=None, progress: bool = False
):
    """Best-of-N for each N in ``ns`` from one set of ``max(ns)`` base draws per prompt (best-of-N uses
    the first N of them): ``{N: metrics row}`` with the KL per prompt estimated from all the prompt's
    draws (:func:`qvlm.decoding.best_of_n.best_of_n_kl_estimate`, ``kl_kind`` "estimate"; N = 1 is
    plain sampling, KL 0, "exact"). The cost of best-of-N is N samples."""

    if not ns or any(n < 1 for n in ns):
        raise QVLMError(f"--best-of {list(ns)}: give whole numbers >= 1, e.g. 1,2,4,8,16,32")
    group = max(ns)
    draw_cfg = dataclasses.replace(cfg or DecodeConfig(), beta=0.0, num_return_sequences=group)
    res = generate(model, tokenizer, prompts, cfg=draw_cfg, track_kl=True, progress=progress)
    rewards = score(reward, [p for p in prompts for _ in range(group)], res.texts)
    rows = {}
    for n in sorted(set(ns)):
        picks = select_best_of_n(rewards, group, n)
        kl = [best_of_n_kl_estimate(rewards[i * group : (i + 1) * group], n) for i in range(len(prompts))]
        rows[n] = summarize(
            [res.texts[j] for j in picks],
            [rewards[j] for j in picks],
            kl,
            [res.base_logprobs[j] for j in picks],
            cost=float(n),
            kl_kind="estimate" if n > 1 else "exact",
        ).as_dict()
    return rows
