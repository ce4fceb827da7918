"""Issue 22's acceptance on the full demo: Q# against best-of-N at matched KL, every setting chosen on
validation, means and spreads over seeds; and the table at matched KL (Monte-Carlo Q, Q#, the ablation
Q#-mean, ILQL, best-of-N, and soft Q when a run of it was evaluated on the same prompts).

Reads what ``qvlm demo --seeds 0,1,2 --out OUT`` wrote (``OUT/seed-S/metrics.json`` and the validation
draws ``OUT/seed-S/val/draws.json``); decodes nothing. For each seed:

1. matched KL: the Q# beta with the highest validation reward among those whose validation KL is at most
   1.25 x best-of-4's estimated validation KL (from the validation draws); its eval reward against
   best-of-4's minus 0.02 (``qsharp >= best_of_4 - 0.02``), its eval KL against 1.25 x best-of-4's;
2. best-of-16 within reach: the Q# beta with the highest validation reward among those at validation KL
   <= 4 nats and distinct-2 >= 0.9 x the base's; on eval, its reward against best-of-16's minus its 95%
   CI, its KL <= 4, its distinct-2 >= 0.9 x the base's, its cost <= 1.5;
3. the table: each guided family's eval reward interpolated linearly along its curve (base at KL 0) at
   best-of-4's and best-of-16's eval KL (estimates), and the training cost (reward calls) of each.

Usage: python benchmarks/qsharp_demo.py --run OUT [--softq SOFTQ_EVAL.json ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_speed import cpu_model  # noqa: E402

from qvlm.decoding import best_of_n_kl_estimate  # noqa: E402
from qvlm.eval.metrics import json_safe  # noqa: E402
from qvlm.fileio import atomic_write_text  # noqa: E402

MATCH, TOL, KL_CAP, DISTINCT, COST_CAP = 1.25, 0.02, 4.0, 0.9, 1.5
FAMILIES = ("qsharp", "qsharp_mean", "mcq", "ilql", "softq")


def family_rows(rows: dict, family: str) -> dict[float, dict]:
    """``{beta: row}`` of a family's ``FAMILY_beta_B`` rows."""
    out = {}
    for name, row in rows.items():
        if name.startswith(family + "_beta_") and name[len(family) + 6 :].replace(".", "", 1).isdigit():
            out[float(name[len(family) + 6 :])] = row
    return out


def choose(val: dict[float, dict], ok) -> float | None:
    """The beta of highest validation reward among the rows ``ok`` accepts (None: none does)."""
    passing = {b: r for b, r in val.items() if ok(r) and r.get("reward_mean") is not None}
    return max(passing, key=lambda b: (passing[b]["reward_mean"], -b)) if passing else None


def interpolate(points: list[tuple[float, float]], kl: float) -> float | None:
    """The reward at ``kl`` on the curve through ``points`` ((KL, reward), base first), linearly; None past
    its last point (no extrapolation)."""
    points = sorted(points)
    for (k0, r0), (k1, r1) in zip(points, points[1:]):
        if k0 <= kl <= k1:
            return r0 if k1 == k0 else r0 + (r1 - r0) * (kl - k0) / (k1 - k0)
    return None


def seed_result(seed_dir: Path, extra_eval: dict) -> dict:
    metrics = json.loads((seed_dir / "metrics.json").read_text())
    methods, validation = dict(metrics["methods"]), metrics["validation"]
    methods.update(extra_eval)
    base, bo4, bo16 = methods["base"], methods["best_of_4"], methods[f"best_of_{metrics['config']['best_of']}"]
    draws = json.loads((seed_dir / "val" / "draws.json").read_text())
    N = metrics["config"]["best_of"]
    n_val = len(draws["rewards"]) // N
    val_bo4_kl = statistics.mean(best_of_n_kl_estimate(draws["rewards"][i * N : (i + 1) * N], 4) for i in range(n_val))
    d_min = DISTINCT * base["distinct_2"]
    q_val, q_eval = family_rows(validation, "qsharp"), family_rows(methods, "qsharp")
    out = {"seed_dir": str(seed_dir), "base": base["reward_mean"], "best_of_4": bo4["reward_mean"],
           "best_of_4_kl": bo4["kl_to_base"], "best_of_16": bo16["reward_mean"], "best_of_16_ci95": bo16["reward_ci95"],
           "best_of_16_kl": bo16["kl_to_base"], "val_best_of_4_kl": val_bo4_kl}  # fmt: skip
    # 1. matched KL
    beta = choose(q_val, lambda r: r["kl_to_base"] <= MATCH * val_bo4_kl)
    row = q_eval.get(beta) if beta is not None else None
    out["matched"] = {
        "beta": beta,
        "reward": row and row["reward_mean"],
        "kl": row and row["kl_to_base"],
        "kl_budget": MATCH * bo4["kl_to_base"],
        "passes": bool(row) and row["reward_mean"] >= bo4["reward_mean"] - TOL,
    }
    # 2. best-of-16 within reach
    beta = choose(q_val, lambda r: r["kl_to_base"] <= KL_CAP and r["distinct_2"] >= d_min)
    row = q_eval.get(beta) if beta is not None else None
    reach = bo16["reward_mean"] - bo16["reward_ci95"]
    out["reach"] = {
        "beta": beta,
        "reward": row and row["reward_mean"],
        "kl": row and row["kl_to_base"],
        "distinct_2": row and row["distinct_2"],
        "cost": row and row["cost"],
        "passes": bool(row)
        and row["reward_mean"] >= reach
        and row["kl_to_base"] <= KL_CAP
        and row["distinct_2"] >= d_min
        and row["cost"] <= COST_CAP,
    }
    # 3. the table at matched KL
    table = {}
    for family in FAMILIES:
        rows = family_rows(methods, family)
        if not rows:
            continue
        points = [(0.0, base["reward_mean"])] + [(r["kl_to_base"], r["reward_mean"]) for r in rows.values()]
        table[family] = {
            "at_best_of_4_kl": interpolate(points, bo4["kl_to_base"]),
            "at_best_of_16_kl": interpolate(points, bo16["kl_to_base"]),
            "cost": statistics.mean(r["cost"] for r in rows.values()),
        }
    out["table"] = table
    qsharp_train = json.loads((seed_dir / "qsharp" / "training.json").read_text())
    out["qsharp_training"] = {k: qsharp_train.get(k) for k in ("reward_calls", "decoded_tokens")}
    return out


def spread(values) -> dict:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a qvlm demo output (with seed-S folders, or one seed's)")
    ap.add_argument("--softq", nargs="*", default=[], help="per seed, in order: `qvlm eval --json` files of soft Q")
    ap.add_argument("--json", default="benchmarks/results/qsharp_demo.json")
    args = ap.parse_args()
    run = Path(args.run)
    seeds = sorted(run.glob("seed-*")) or [run]
    results = []
    for i, seed_dir in enumerate(seeds):
        extra = {}
        if i < len(args.softq):
            rows = json.loads(Path(args.softq[i]).read_text())["methods"]
            extra = {n.replace("guided_", "softq_"): r for n, r in rows.items() if n.startswith("guided_beta_")}
        results.append(seed_result(seed_dir, extra))
    summary = {
        "machine": {"cpu_model": cpu_model(), "python": platform.python_version()},  # decodes nothing: no timings
        "seeds": [r["seed_dir"] for r in results],
        "matched_passes": [r["matched"]["passes"] for r in results],
        "reach_passes": [r["reach"]["passes"] for r in results],
        "best_of_4": spread(r["best_of_4"] for r in results),
        "best_of_16": spread(r["best_of_16"] for r in results),
        "qsharp_matched": spread(r["matched"]["reward"] for r in results),
        "qsharp_reach": spread(r["reach"]["reward"] for r in results),
        "table": {
            f: {
                k: spread(r["table"].get(f, {}).get(k) for r in results)
                for k in ("at_best_of_4_kl", "at_best_of_16_kl")
            }
            for f in FAMILIES
            if any(f in r["table"] for r in results)
        },
        "per_seed": results,
    }
    print(
        f"{'seed':<40} {'bo4':>6} {'q# @match (beta, KL)':>24} {'pass':>5} {'bo16-CI':>8} {'q# reach (beta, KL, d2)':>30} {'pass':>5}"
    )
    for r in results:
        m, h = r["matched"], r["reach"]

        def f(x, d=3):
            return "-" if x is None else f"{x:.{d}f}"

        print(
            f"{r['seed_dir'][-38:]:<40} {f(r['best_of_4']):>6} {f(m['reward']):>7} ({m['beta']}, {f(m['kl'], 2)}) "
            f"{str(m['passes']):>5} {f(r['best_of_16'] - r['best_of_16_ci95']):>8} {f(h['reward']):>7} "
            f"({h['beta']}, {f(h['kl'], 2)}, {f(h['distinct_2'], 2)}) {str(h['passes']):>5}"
        )
    print("\nreward at matched KL (mean +- sd over seeds), along each family's eval curve:")
    for fam, cols in summary["table"].items():
        cells = [f"{c['mean']:.3f} +- {c['sd']:.3f}" if c["mean"] is not None else "-" for c in cols.values()]
        print(f"  {fam:<12} at best-of-4's KL {cells[0]:>16}   at best-of-16's KL {cells[1]:>16}")
    atomic_write_text(args.json, json.dumps(json_safe(summary), indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
