"""`qvlm demo --seeds 0,1,2`: the demo once per seed (``OUT/seed-S``, each a complete demo run with its
own report), then the means over the seeds with their spread (``OUT/seeds.json``, ``OUT/seeds.html``).

A seed changes everything random: the training samples, the heads' initialisation and data order, the
PPO run, the validation and eval draws. The prompts stay the same. Per method the summary holds the
mean of the seeds' eval rewards, their sample standard deviation, min and max, and the same for the KL
to the base model (whose kind, exact or estimate, is each run's).

Two frontier checks (issue 10) are computed for every seed from its eval table, never used to choose:

- ``cheap_vs_best_of_16``: does a guided method at <= 1.5x the cost of plain sampling reach best-of-16's
  mean reward within its 95% CI (reward >= best-of-16's mean - its CI half-width)? Reported for the
  method chosen on validation (what the demo shows) and, labelled as such, for the best one on eval.
- ``matched_kl_vs_best_of_4``: among guided methods whose KL is at most 1.25 times best-of-4's estimated
  KL, is the best reward at least best-of-4's minus 0.02?
"""

from __future__ import annotations

import dataclasses
import html
import math
import statistics
from pathlib import Path
from typing import Callable, Sequence

from qvlm.apps.demo_context import save_json
from qvlm.configs import DemoConfig, flat
from qvlm.errors import QVLMError
from qvlm.fileio import atomic_write_text

__all__ = ["parse_seeds", "run_demo_seeds", "aggregate_seeds", "frontier_checks", "spread", "write_seeds_html"]

CHEAP_COST = 1.5  # "at most 1.5x the cost of plain sampling"
KL_FACTOR = 1.25  # matched KL: at most 1.25x best-of-4's estimated KL
KL_MARGIN = 0.02  # ... and a reward at least best-of-4's minus 0.02


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; at least two distinct non-negative integers."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise QVLMError(f"--seeds is {text!r}; give comma-separated integers, e.g. --seeds 0,1,2") from None
    if len(seeds) < 2 or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise QVLMError(f"--seeds is {text!r}; give at least two distinct non-negative integers, e.g. --seeds 0,1,2")
    return seeds


def spread(values: Sequence[float | None]) -> dict:
    """Mean, sample standard deviation (0 for one value), min, max and the values of the finite ones."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return {"mean": None, "sd": None, "min": None, "max": None, "n": 0, "values": list(values)}
    return {
        "mean": statistics.fmean(xs),
        "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "min": min(xs),
        "max": max(xs),
        "n": len(xs),
        "values": list(values),
    }


def _guided(name: str, row: dict) -> bool:
    """A guided decoding method: everything but base sampling, best-of-N and the trained policy."""
    return name != "base" and name != "ppo" and not name.startswith("best_of")


def frontier_checks(metrics: dict) -> dict:
    """The two checks of the module docstring on one run's metrics.json."""
    methods, shown = metrics["methods"], metrics["shown"]["method"]
    bo16 = methods.get("best_of_16")
    bo4 = methods.get("best_of_4")
    out: dict = {}
    if bo16 is not None:
        bar = bo16["reward_mean"] - bo16["reward_ci95"]
        cheap = {k: m for k, m in methods.items() if _guided(k, m) and m["cost"] <= CHEAP_COST}
        best = max(cheap, key=lambda k: cheap[k]["reward_mean"]) if cheap else None
        row = methods[shown]
        out["cheap_vs_best_of_16"] = {
            "bar": bar,
            "best_of_16": bo16["reward_mean"],
            "shown": shown,
            "shown_reward": row["reward_mean"],
            "shown_cost": row["cost"],
            "shown_passes": row["cost"] <= CHEAP_COST and row["reward_mean"] >= bar,
            "eval_best": best,
            "eval_best_reward": cheap[best]["reward_mean"] if best else None,
            "eval_best_passes": bool(best) and cheap[best]["reward_mean"] >= bar,
        }
    if bo4 is not None and bo4.get("kl_to_base") is not None:
        limit = KL_FACTOR * bo4["kl_to_base"]
        matched = {
            k: m
            for k, m in methods.items()
            if _guided(k, m) and m.get("kl_to_base") is not None and m["kl_to_base"] <= limit
        }
        best = max(matched, key=lambda k: matched[k]["reward_mean"]) if matched else None
        out["matched_kl_vs_best_of_4"] = {
            "kl_limit": limit,
            "best_of_4_kl": bo4["kl_to_base"],
            "best_of_4_kl_kind": bo4.get("kl_kind"),
            "bar": bo4["reward_mean"] - KL_MARGIN,
            "best": best,
            "best_reward": matched[best]["reward_mean"] if best else None,
            "best_kl": matched[best]["kl_to_base"] if best else None,
            "passes": bool(best) and matched[best]["reward_mean"] >= bo4["reward_mean"] - KL_MARGIN,
        }
    return out


def aggregate_seeds(runs: dict[int, dict]) -> dict:
    """``{seed: metrics.json}`` -> seeds.json: per method (those in every run, in the first run's
    order) the spread over the seeds of its eval reward, KL, cost and time; the method each seed's
    validation chose; the frontier checks of every seed."""
    seeds = list(runs)
    first = runs[seeds[0]]["methods"]
    names = [k for k in first if all(k in runs[s]["methods"] for s in seeds)]
    methods = {}
    for name in names:
        rows = [runs[s]["methods"][name] for s in seeds]
        methods[name] = {
            "reward": spread([r["reward_mean"] for r in rows]),
            "reward_ci95": [r["reward_ci95"] for r in rows],
            "kl_to_base": spread([r.get("kl_to_base") for r in rows]),
            "kl_kind": sorted({str(r.get("kl_kind")) for r in rows}),
            "cost": spread([r["cost"] for r in rows]),
            "time_ratio": spread([r.get("time_ratio") for r in rows]),
            "distinct_2": spread([r.get("distinct_2") for r in rows]),
            "perplexity": spread([r.get("perplexity") for r in rows]),
        }
    shown = [runs[s]["shown"] for s in seeds]
    checks = {s: frontier_checks(runs[s]) for s in seeds}
    return {
        "seeds": seeds,
        "methods": methods,
        "shown": {
            "per_seed": [sh["method"] for sh in shown],
            "chosen_on": "validation",
            "rule": [sh.get("rule") for sh in shown],  # each seed's own numbers in its rule
            # the headline: each seed's validation-chosen method, its eval reward
            "eval_reward": spread([sh["eval_reward"] for sh in shown]),
        },
        "checks": checks,
        "reward": runs[seeds[0]].get("reward"),
        "ppo": all("ppo" in runs[s]["methods"] for s in seeds),
    }


def _fmt(s: dict, digits: int = 3) -> str:
    if s["mean"] is None:
        return "-"
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"


def write_seeds_html(summary: dict, path: Path, title: str) -> None:
    """A one-page summary: the table of means ± standard deviations over the seeds, the checks, and
    links to every seed's own report."""
    seeds = summary["seeds"]
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{_fmt(m['reward'])}</td><td>{_fmt(m['kl_to_base'], 2)}</td>"
        f"<td>{html.escape('/'.join(m['kl_kind']))}</td><td>{_fmt(m['distinct_2'])}</td><td>{_fmt(m['perplexity'], 1)}</td>"
        f"<td>{_fmt(m['cost'], 3)}</td><td>{_fmt(m['time_ratio'], 2)}</td>"
        f"<td>{' '.join(f'{v:.3f}' for v in m['reward']['values'])}</td></tr>"
        for k, m in summary["methods"].items()
    )
    checks = []
    for s in seeds:
        c = summary["checks"][s]
        a, b = c.get("cheap_vs_best_of_16"), c.get("matched_kl_vs_best_of_4")
        parts = []
        if a:
            parts.append(
                f"shown {html.escape(a['shown'])} {a['shown_reward']:.3f} vs best-of-16's bar {a['bar']:.3f}: "
                f"{'reached' if a['shown_passes'] else 'not reached'}; best cheap guided method on eval "
                f"{html.escape(str(a['eval_best']))} {a['eval_best_reward']:.3f}"
            )
        if b:
            best = f"{html.escape(str(b['best']))} {b['best_reward']:.3f}" if b["best"] else "none"
            parts.append(
                f"at KL ≤ {b['kl_limit']:.2f}: best guided {best} vs best-of-4's bar {b['bar']:.3f}: "
                f"{'reached' if b['passes'] else 'not reached'}"
            )
        checks.append(f"<li>seed {s}: {'; '.join(parts)}</li>")
    shown = summary["shown"]
    links = " ".join(f'<a href="seed-{s}/report.html">seed {s}</a>' for s in seeds)
    first_rule = next((r for r in shown.get("rule", []) if r), None)
    rule = f" The rule (seed {seeds[0]}'s numbers): {html.escape(first_rule)}." if first_rule else ""
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:70em;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border-bottom:1px solid #ddd;padding:.3em .7em;text-align:right}}
td:first-child,th:first-child{{text-align:left}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Seeds {", ".join(map(str, seeds))}: each is a complete demo run (its own samples, heads,
{"PPO run, " if summary.get("ppo") else ""}draws; the same prompts). Numbers are means over the seeds ± their
sample standard deviation of each seed's eval mean. Method shown per seed, chosen on validation:
{html.escape(", ".join(shown["per_seed"]))}; its eval reward {_fmt(shown["eval_reward"])}.{rule} A high reward at a large KL with a low distinct-2 is text that
games the reward (repetition of the words it likes): read the samples in each seed's report.</p>
<table><tr><th>method</th><th>reward</th><th>KL to base</th><th>KL kind</th><th>distinct-2</th>
<th>perplexity</th><th>cost</th><th>time</th>
<th>reward per seed</th></tr>{rows}</table>
<h2>Frontier checks (issue 10), per seed</h2><ul>{"".join(checks)}</ul>
<p>Each seed's report: {links}</p></body></html>
"""
    atomic_write_text(path, page)


def run_demo_seeds(
    cfg: DemoConfig, out: str | Path, seeds: Sequence[int], log: Callable[[str], None] = print, progress: bool = True
) -> dict:
    """Run (or resume) the demo for every seed into ``OUT/seed-S``, then write ``OUT/seeds.json`` and
    ``OUT/seeds.html``; returns the summary."""
    from qvlm.apps.demo import run_demo

    out = Path(out)
    runs = {}
    for s in seeds:
        log(f"== seed {s} ({len(runs) + 1} of {len(seeds)}) ==")
        runs[s] = run_demo(dataclasses.replace(cfg, seed=s), out / f"seed-{s}", log=log, progress=progress)
    summary = aggregate_seeds(runs)
    summary["config"] = {**flat(cfg), "seed": None, "seeds": list(seeds)}
    save_json(out / "seeds.json", summary)
    write_seeds_html(summary, out / "seeds.html", f"qvlm demo over {len(seeds)} seeds: {summary['reward']}")
    return summary
