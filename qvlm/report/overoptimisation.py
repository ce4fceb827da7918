"""The over-optimisation chart of `qvlm proxy`: gold and proxy reward of best-of-N by the proxy (and,
when they ran, of PPO against the proxy and of guidance by heads fitted to the proxy) against KL to the base model, on one chart (two y-axes: the
rewards have different units), with the gold reward's peaks marked."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from qvlm.fileio import atomic_write_bytes

__all__ = ["write_overoptimisation_svg"]

GOLD, PROXY = "#b45309", "#2563eb"
PPO_GOLD, PPO_PROXY = "#7c2d12", "#1e3a8a"
GUIDE_GOLD, GUIDE_PROXY = "#15803d", "#7c3aed"


def write_overoptimisation_svg(curve: Sequence[Mapping], result: Mapping, path: str | Path) -> None:
    """Write the chart as SVG atomically. ``curve``: rows ``{n, kl_bound, gold, proxy}``; ``result``:
    ``gold`` (its name), ``gold_peak``, ``proxy_pairs``, ``proxy_pair_accuracy``, and, when PPO ran,
    ``ppo_curve`` (rows ``{iterations, kl, gold, proxy}``, exact KL) and ``ppo_gold_peak``, and, when
    guidance ran, ``guidance_curve`` (rows ``{beta, kl, gold, proxy}``, exact KL) and ``guidance_gold_peak``."""
    from qvlm.report.plots import _new_figure, figure_bytes

    ppo = result.get("ppo_curve") or []
    guide = result.get("guidance_curve") or []
    fig, ax = _new_figure(7.2, 4.4 if not (ppo or guide) else 4.8)
    kl = [r["kl_bound"] for r in curve]
    ax.plot(kl, [r["gold"] for r in curve], "o-", color=GOLD, label=f"gold reward ({result['gold']})")
    others = " and ".join(name for name, rows in (("PPO", ppo), ("guidance", guide)) if rows)
    # a push far beyond best-of-N's KL would squeeze its curve into the left edge: linear up to 1 nat, log above
    wide = max((r["kl"] for r in ppo + guide), default=0.0) > 4 * max(kl)
    if wide:
        ax.set_xscale("symlog", linthresh=1.0, linscale=1.0)
    ax.set_xlabel(
        f"KL to the base model, nats{' (linear to 1, log above)' if wide else ''}\n"
        f"best-of-N: the bound log N − (N−1)/N; {others}: exact"
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
    # PPO's and guidance's gold peaks: a ring on the curve, named in the legend (annotations would collide)
    if ppo:
        ptop = result["ppo_gold_peak"]
        label = f"gold reward, PPO against the proxy: peaks after {ptop['iterations']} iterations"
        _curve_with_peak(ax, [r["kl"] for r in ppo], [r["gold"] for r in ppo], ptop, "^-", PPO_GOLD,
                         label + (" (the last)" if ptop["at_last"] else ""))  # fmt: skip
        twin.plot([r["kl"] for r in ppo], [r["proxy"] for r in ppo], "v--", color=PPO_PROXY, label="proxy reward, PPO")
    if guide:
        gtop = result["guidance_gold_peak"]
        label = f"gold reward, guidance by the proxy: peaks at beta {gtop['beta']:g}"
        _curve_with_peak(ax, [r["kl"] for r in guide], [r["gold"] for r in guide], gtop, "D-", GUIDE_GOLD,
                         label + (" (the largest)" if gtop["at_last"] else ""))  # fmt: skip
        twin.plot([r["kl"] for r in guide], [r["proxy"] for r in guide], "d--", color=GUIDE_PROXY,
                  label="proxy reward, guidance")  # fmt: skip
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
    if wide:
        n_axis.set_xscale("symlog", linthresh=1.0, linscale=1.0)
    n_axis.set_xticks(kl, labels=[str(r["n"]) for r in curve], fontsize=7)
    n_axis.set_xlabel("N (best-of-N)", fontsize=8)
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    if others:  # six curves: the legend goes under the chart, clear of them
        ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=2,
                  frameon=False, fontsize=8)  # fmt: skip
    else:
        ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", frameon=False, fontsize=8)
    ax.set_title(
        f"{_joined(['Best-of-N'] + [n for n, r in (('PPO', ppo), ('guidance', guide)) if r])} by a proxy trained on "
        f"{result['proxy_pairs']} gold-labelled pairs "
        f"(held-out pair accuracy {result['proxy_pair_accuracy']:.1%})",
        fontsize=9,
    )
    atomic_write_bytes(path, figure_bytes(fig, "svg", bbox_inches="tight"))


def _joined(names: Sequence[str]) -> str:
    """``["a"]`` -> ``"a"``; ``["a", "b", "c"]`` -> ``"a, b and c"``."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _curve_with_peak(ax, kl: Sequence[float], gold: Sequence[float], top: Mapping, style: str, color: str, label: str):
    ax.plot(kl, gold, style, color=color, label=label)
    ax.plot([top["kl"]], [top["gold"]], "o", markersize=13, markerfacecolor="none", markeredgecolor=color, zorder=4)
