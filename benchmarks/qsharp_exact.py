"""Choose the defaults of the exact Q# learner (``qvlm exact --learners qsharp``) by measurement.

Issue 22's bar, on the default exact MDP (vocab 4, horizon 5, count of ``a`` / 5, Dirichlet pi_ref; the
seed of ``qvlm exact --seed S`` sets both the MDP and the learner): ONE run per seed reaches objective
ratio >= 0.99 at every alpha in {0.05, 0.1, 0.2, 0.5, 1} and ``Q*_alpha`` RMSE <= 0.02 over the states
``pi*_alpha`` reaches with probability >= 1% (every action there). Each variant below changes the
``QSharpConfig`` defaults in one or two fields; every one is run on every seed; the table gives the
worst ratio and the worst RMSE over seeds and alphas, how many runs pass, the cost (episodes = reward
calls, tokens) and the time. ``--detail NAME`` prints that variant's numbers per seed and alpha.
``--learner-seeds 0-19`` runs several learner seeds on each MDP seed (how often the bar is met, not only
for the seeds of the bar); ``--horizon 8`` a harder MDP (3,280 states, where pi_ref rarely reaches the
states the optimal policy visits at small alpha).

    python benchmarks/qsharp_exact.py                      # the sweep, seeds 0, 1, 2 (a few minutes)
    python benchmarks/qsharp_exact.py --only default --learner-seeds 0-19 --json benchmarks/results/qsharp_exact_seeds.json
    python benchmarks/qsharp_exact.py --horizon 8 --only "default,rollin=pi_ref only,stronger: x4" \\
        --json benchmarks/results/qsharp_exact_h8.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qvlm.exact import MDPConfig, build_mdp, build_tree  # noqa: E402
from qvlm.exact.distribution import return_distribution  # noqa: E402
from qvlm.exact.learners import measure_alphas, train_learner  # noqa: E402
from qvlm.exact.qsharp_learner import QSHARP_ALPHAS, QSharpConfig  # noqa: E402
from qvlm.fileio import atomic_write_text  # noqa: E402

RATIO_BAR, RMSE_BAR = 0.99, 0.02

# name -> changes to the QSharpConfig defaults ("half", "double": of the default; "budget": the default's
# whole budget, rounds x episodes_per_round, in one round)
VARIANTS: dict[str, dict] = {
    "default": {},
    # the labels: Q#'s one pair per episode, or every pair of the pi_ref roll-out
    "label=cut": {"label": "cut"},
    # the action at the cut
    "cut_action=ref": {"cut_action": "ref"},
    "cut_action=guided": {"cut_action": "guided"},
    # the fit: pseudo-labels of the uniform prior; Adam on the same cross-entropy; a finer support
    "prior=0.01": {"prior": 0.01},
    "prior=1": {"prior": 1.0},
    "fit=adam": {"fit": "adam"},
    "fit=adam steps=300": {"fit": "adam", "steps": 300},
    "bins=51": {"bins": 51},
    # the roll-in: one round of pi_ref roll-ins with the same budget (no guidance)
    "rollin=pi_ref only": {"rounds": 1, "episodes_per_round": "budget"},
    # one alpha's guided roll-ins only (every alpha still read from the same run)
    "schedule=(0.05,)": {"alphas": (0.05,)},
    "schedule=(1,)": {"alphas": (1.0,)},
    # the budget
    "x0.25: 20 x 2000": {"rounds": 20, "episodes_per_round": 2000},
    "x0.5: 40 x 2000": {"rounds": 40, "episodes_per_round": 2000},
    "x0.75: 30 x 4000": {"rounds": 30, "episodes_per_round": 4000},
    "20 x 8000": {"rounds": 20, "episodes_per_round": 8000},
    "80 x 2000": {"rounds": 80, "episodes_per_round": 2000},
    "stronger: x4": {"rounds": "double", "episodes_per_round": "double"},
}


def _config(name: str, seed: int) -> QSharpConfig:
    base = QSharpConfig(seed=seed)
    changes = {}
    for key, value in VARIANTS[name].items():
        if value == "half":
            value = getattr(base, key) // 2
        elif value == "double":
            value = getattr(base, key) * 2
        elif value == "budget":  # one round holding the default run's whole budget
            value = base.rounds * base.episodes_per_round
        changes[key] = value
    return replace(base, **changes)


def run(name: str, seed: int, learner_seed: int, mdp: MDPConfig) -> dict:
    tree = build_tree(build_mdp(replace(mdp, seed=seed)))
    exact = return_distribution(tree)
    config = _config(name, learner_seed)
    start = time.perf_counter()
    heads = train_learner("qsharp", tree, config, config.alphas[0])  # the schedule is exactly config.alphas
    seconds = time.perf_counter() - start
    per_alpha = measure_alphas(tree, heads, list(QSHARP_ALPHAS), exact)
    return {
        "seed": seed,
        "learner_seed": learner_seed,
        "config": asdict(config),
        "seconds": seconds,
        **heads.extra,
        "per_alpha": per_alpha,
        "min_ratio": min(r["objective_ratio"] for r in per_alpha.values()),
        "max_q_rmse": max(r["q_rmse_reach"] for r in per_alpha.values()),
    }


def _passes(r: dict) -> bool:
    return r["min_ratio"] >= RATIO_BAR and r["max_q_rmse"] <= RMSE_BAR


def _seeds(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2", help="MDP seeds: comma-separated or a range lo-hi")
    ap.add_argument(
        "--learner-seeds",
        default="same",
        help="learner seeds run on each MDP seed ('same': the MDP's own seed, as qvlm exact --seed does)",
    )
    ap.add_argument("--vocab", type=int, default=4, help="the MDP's vocabulary (EOS included)")
    ap.add_argument("--horizon", type=int, default=5, help="the MDP's horizon")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--detail", default="default", help="comma-separated variants to print per seed and alpha")
    ap.add_argument("--json", default="benchmarks/results/qsharp_exact.json")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    seeds = _seeds(args.seeds)
    mdp = MDPConfig(vocab_size=args.vocab, horizon=args.horizon)
    pairs = [(s, ls) for s in seeds for ls in ([s] if args.learner_seeds == "same" else _seeds(args.learner_seeds))]
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"--only: unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    print(
        f"exact MDP: vocab {args.vocab}, horizon {args.horizon}, count(a)/{args.horizon}, Dirichlet pi_ref; MDP seeds "
        f"{seeds}, learner seeds {args.learner_seeds} ({len(pairs)} runs per variant)"
    )
    print(f"bar: ratio >= {RATIO_BAR} and Q*_alpha RMSE (states pi*_alpha reaches >= 1%) <= {RMSE_BAR} at alphas")
    print(f"{QSHARP_ALPHAS}, from one run per seed\n")
    head = f"{'variant':<26}{'pass':>6}{'min ratio':>11}{'max Q rmse':>12}{'max W1':>9}{'episodes':>10}{'tokens':>10}{'s/run':>7}"
    print(head)
    results = {}
    for name in names:
        runs = [run(name, seed, learner_seed, mdp) for seed, learner_seed in pairs]
        results[name] = {"changes": VARIANTS[name], "runs": runs}
        print(
            f"{name:<26}{sum(map(_passes, runs)):>3d}/{len(runs):<2d}{min(r['min_ratio'] for r in runs):>11.4f}"
            f"{max(r['max_q_rmse'] for r in runs):>12.4f}"
            f"{max(a['w1_reach'] for r in runs for a in r['per_alpha'].values()):>9.4f}"
            f"{runs[0]['episodes']:>10d}{sum(r['tokens'] for r in runs) // len(runs):>10d}"
            f"{sum(r['seconds'] for r in runs) / len(runs):>7.2f}",
            flush=True,
        )
    for name in [n.strip() for n in args.detail.split(",") if n.strip() in results]:
        print(f"\n{name}: per seed and alpha (ratio / Q*_alpha RMSE / V RMSE / mean W1, over the states pi* reaches)")
        print(f"{'seed':>5}{'alpha':>6}{'ratio':>9}{'Q rmse':>9}{'Q max':>8}{'V rmse':>9}{'W1':>8}{'states':>8}")
        for r in results[name]["runs"]:
            for alpha, a in r["per_alpha"].items():
                print(
                    f"{r['seed']:>2}/{r['learner_seed']:<2}{alpha:>6}{a['objective_ratio']:>9.4f}{a['q_rmse_reach']:>9.4f}"
                    f"{a['q_err_max_reach']:>8.3f}{a['v_rmse_reach']:>9.4f}{a['w1_reach']:>8.4f}{a['reached_states']:>8d}"
                )
    out = {
        "command": "python " + " ".join(sys.argv),
        "mdp": asdict(mdp),
        "learner_seeds": args.learner_seeds,
        "bar": {"objective_ratio": RATIO_BAR, "q_rmse_reach": RMSE_BAR, "alphas": list(QSHARP_ALPHAS)},
        "seeds": seeds,
        "machine": {"processor": platform.processor(), "python": platform.python_version(), "torch": torch.__version__},
        "variants": results,
    }
    atomic_write_text(Path(args.json), json.dumps(out, indent=1) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
