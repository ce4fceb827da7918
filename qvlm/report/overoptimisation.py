"""The over-optimisation chart of `qvlm proxy`: gold and proxy reward of best-of-N by the proxy (and,
when they ran, of PPO against the proxy and of guidance by heads fitted to the proxy) against KL to the base model, on one chart (two y-axes: the
rewards have different units), with the gold reward's peaks marked."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Sequence

from qvlm.fileio import atomic_write_text

__all__ = ["write_overoptimisation_svg"]

GOLD, PROXY = "#b45309", "#2563eb"
PPO_GOLD, PPO_PROXY = "#7c2d12", "#1e3a8a"
GUIDE_GOLD, GUIDE_PROXY = "#15803d", "#7c3aed"


def write_overoptimisation_svg(curve: Sequence[Mapping], result: Mapping, path: str | Path) -> None:
    """Write the chart as SVG atomically. ``curve``: rows ``{n, kl_bound, gold, proxy}``; ``result``:
    ``gold`` (its name), ``gold_peak``, ``proxy_pairs``, ``proxy_pair_accuracy``, and, when PPO ran,
    ``ppo_curve`` (rows ``{iterations, kl, gold, proxy}``, exact KL) and ``ppo_gold_peak``, and, when
    guidance ran, ``guidance_curve`` (rows ``{beta, kl, gold, proxy}``, exact KL) and ``guidance_gold_peak``."""
    from qvlm.report.plots import _new_figure

    fig, ax = _new_figure(7.2, 4.4)
    kl = [r["kl_bound"] for r in curve]
    ax.plot(kl, [r["gold"] for r in curve], "o-", color=GOLD, label=f"gold reward ({result['gold']})")
    ppo = result.get("ppo_curve") or []
    guide = result.get("guidance_curve") or []
    others = " and ".join(name for name, rows in (("PPO", ppo), ("guidance", guide)) if rows)
    ax.set_xlabel(
        f"KL to the base model, nats (best-of-N: the bound log N − (N−1)/N; {others}: exact)"
        if others
        else "KL(best-of-N ‖ base), nats: log N − (N−1)/N"
    )
    ax.set_ylabel(f"gold reward ({result['gold']})", color=GOLD)
    ax.tick_params(axis="y", colors=GOLD)
    twin = ax.twinx()
    twin.plot(kl, [r["proxy"] for r in curve], "s--", color=PROXY, label="proxy reward (its logit)")
    twin.set_ylabel("proxy reward (reward-model logit)", color=PROXY)
    twin.tick_params(axis="y", colors=PROXY)
    twin.spines["top"].set_visible(False)
    if ppo:
        pkl = [r["kl"] for r in ppo]
        ax.plot(pkl, [r["gold"] for r in ppo], "^-", color=PPO_GOLD, label="gold reward, PPO against the proxy")
        twin.plot(pkl, [r["proxy"] for r in ppo], "v--", color=PPO_PROXY, label="proxy reward, PPO")
        ptop = result["ppo_gold_peak"]
        ax.annotate(
            f"PPO: gold peaks after {ptop['iterations']} iterations" + (" (the last)" if ptop["at_last"] else ""),
            (ptop["kl"], ptop["gold"]),
            xytext=(0, 10),
            textcoords="offset points",
            ha="right" if ptop["at_last"] else "center",
            color=PPO_GOLD,
            fontsize=8,
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 1},
            zorder=5,
        )
    if guide:
        gkl = [r["kl"] for r in guide]
        ax.plot(gkl, [r["gold"] for r in guide], "D-", color=GUIDE_GOLD, label="gold reward, guidance by the proxy")
        twin.plot(gkl, [r["proxy"] for r in guide], "d--", color=GUIDE_PROXY, label="proxy reward, guidance")
        gtop = result["guidance_gold_peak"]
        ax.annotate(
            f"guidance: gold peaks at beta {gtop['beta']:g}" + (" (the largest)" if gtop["at_last"] else ""),
            (gtop["kl"], gtop["gold"]),
            xytext=(0, -16),
            textcoords="offset points",
            ha="right" if gtop["at_last"] else "center",
            color=GUIDE_GOLD,
            fontsize=8,
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 1},
            zorder=5,
        )
    top = result["gold_peak"]
    ax.axvline(top["kl_bound"], color=GOLD, linestyle=":", linewidth=1)
    ax.annotate(  # above the peak: nothing of the gold curve is higher
        f"gold peaks at N = {top['n']}" + (" (the largest N tried)" if top["at_largest_n"] else ""),
        (top["kl_bound"], top["gold"]),
        xytext=(0, -34) if top["at_largest_n"] else (0, 9),  # clear of the proxy curve at the right end
        textcoords="offset points",
        # inside the axes: right of the line when PPO stretches the axis beyond best-of-N's largest N
        ha=("left" if others else "right") if top["at_largest_n"] else "center",
        color=GOLD,
        fontsize=8,
        bbox={"facecolor": "white", "edgecolor": "none", "pad": 1},
        zorder=5,
    )
    ax.margins(y=0.12)
    n_axis = ax.secondary_xaxis("top")  # the same x, labelled by N
    n_axis.set_xticks(kl, labels=[str(r["n"]) for r in curve], fontsize=7)
    n_axis.set_xlabel("N (best-of-N)", fontsize=8)
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="lower right" if others else "upper left", frameon=False,
              fontsize=8)  # fmt: skip
    ax.set_title(
        f"{', '.join(['Best-of-N'] + [n for n, r in (('PPO', ppo), ('guidance', guide)) if r])} by a proxy trained on {result['proxy_pairs']} gold-labelled pairs "
        f"(held-out pair accuracy {result['proxy_pair_accuracy']:.1%})",
        fontsize=9,
    )
    buf = io.StringIO()
    fig.tight_layout()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    atomic_write_text(path, buf.getvalue())
