"""The sweep that chose ``qvlm train ppo``'s defaults (issue 23): PPO settings trained with the
budget of ``benchmarks/peer_trl.py`` (720 reward calls, vader, SmolLM2-135M-Instruct, the first 160
prompts of demo:train) and measured on the validation prompts only (the rest of demo:train, never
trained on). The eval prompts are not decoded here: they belong to peer_trl.py's table.

    python benchmarks/ppo_sweep.py                       # the committed grid (an hour or two on 2 CPUs)
    python benchmarks/ppo_sweep.py --point lr=1e-3,ppo_epochs=2 --point trunk=full,lr=2e-5
    python benchmarks/ppo_sweep.py --smoke               # minutes: proves it runs

Each point is a set of ``PPOConfig`` fields (``kl_coef`` and ``advantage`` included) over the
defaults; every point is one run in a fresh process, timed (seconds per reward call, as
peer_trl.py). The rule that picks the defaults is fixed before the runs: the highest validation
reward among the points whose validation KL (exact) is at most ``--kl-budget`` (default log 16 -
15/16 = 1.83 nats, the bound on best-of-16's KL that the demo's headline rule uses) and whose cost
per reward call is at most ``--max-cost`` times the cheapest point's (default 1.5: the issue asks
for PPO's wall-clock per call to be at most TRL GRPO's, which does one optimiser step per batch of
responses).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import peer_trl  # noqa: E402

# The committed grid (benchmarks/README.md): LoRA's learning rate at one epoch over minibatches of 8
# (the cost TRL GRPO pays is one forward-backward pass per response), then one more epoch, larger
# minibatches, the KL coefficient, RLOO's critic-free advantage, and the full trunk.
POINTS = (
    "lr=1e-4,ppo_epochs=1",
    "lr=3e-4,ppo_epochs=1,kl_coef=0.2",
    "lr=3e-4,ppo_epochs=1,minibatch_size=20",
    "trunk=full,lr=1e-5,ppo_epochs=1",
    "lr=1e-4,ppo_epochs=2",
    "lr=1e-3,ppo_epochs=1",
    "lr=3e-4,ppo_epochs=1",
    "lr=3e-4,ppo_epochs=1,kl_coef=0.1",
    "lr=3e-4,ppo_epochs=1,kl_coef=0.2,advantage=rloo",
    "trunk=full,lr=3e-6,ppo_epochs=1,kl_coef=0.2",
    "trunk=full,lr=1e-5,ppo_epochs=1,kl_coef=0.2",
    "lr=3e-4,ppo_epochs=1,kl_coef=0.1,advantage=rloo",
    "lr=3e-4,ppo_epochs=1,kl_coef=0.05,advantage=rloo",
)
SMOKE = dict(n_train=8, max_val_prompts=4, reward_calls=8, prompts_per_step=2, generations=2, max_new_tokens=8,
             eval_samples=2, threads=1, points=["lr=1e-3,ppo_epochs=1", "lr=1e-3,ppo_epochs=1,kl_coef=0.2"])  # fmt: skip


METHODS = {"gae": "qvlm-ppo", "rloo": "qvlm-rloo", "grpo": "qvlm-grpo"}


def parse_point(text: str) -> dict[str, str]:
    """``"lr=1e-3,ppo_epochs=1"`` -> ``{"lr": "1e-3", "ppo_epochs": "1"}`` (checked against PPOConfig)."""
    point = peer_trl.parse_sets([x for x in text.split(",") if x.strip()])
    if point.get("advantage", "gae") not in METHODS:
        raise SystemExit(f"--point {text}: advantage must be one of {sorted(METHODS)}")
    peer_trl.ppo_overrides({k: v for k, v in point.items() if k not in ("kl_coef", "advantage")})  # fails early
    return point


def point_specs(points: list[dict[str, str]], common: dict, advantage: str, kl_coef: float) -> list[dict]:
    """peer_trl.py's run specs: the base model first, then one per point; a point's ``advantage``
    picks the method (``gae`` is qvlm-ppo) and its ``kl_coef`` the coefficient, else the flags'.

    >>> [s["name"] for s in point_specs([{"lr": "1e-4"}, {"advantage": "rloo", "kl_coef": "0.2"}], {}, "gae", 0.05)]
    ['base', 'qvlm-ppo_lr-1e-4_kl0.05', 'qvlm-rloo_defaults_kl0.2']
    """
    specs = [{**common, "method": "base", "kl_coef": 0.0, "ppo": {}, "name": "base"}]
    for point in points:
        method = METHODS[point.get("advantage", advantage)]
        ppo = {k: v for k, v in point.items() if k not in ("kl_coef", "advantage")}
        kl = float(point.get("kl_coef", kl_coef))
        slug = "_".join(f"{k}-{v}" for k, v in sorted(ppo.items())) or "defaults"
        specs.append({**common, "method": method, "kl_coef": kl, "ppo": ppo, "name": f"{method}_{slug}_kl{kl:g}"})
    return specs


def choose(runs: list[dict], kl_budget: float, max_cost: float) -> dict | None:
    """The rule: the best validation reward among the runs with validation KL <= ``kl_budget`` and
    seconds per reward call <= ``max_cost`` x the cheapest run's; None when no run qualifies.

    >>> r = lambda R, kl, s: {"val": {"reward_mean": R, "kl_to_base": kl}, "seconds_per_call": s}
    >>> choose([r(0.6, 2.5, 1.0), r(0.5, 1.0, 1.0), r(0.55, 1.0, 2.0)], 1.83, 1.5)["val"]["reward_mean"]
    0.5
    """
    cheapest = min((r["seconds_per_call"] for r in runs), default=0.0)
    ok = [r for r in runs if r["val"]["kl_to_base"] <= kl_budget and r["seconds_per_call"] <= max_cost * cheapest]
    return max(ok, key=lambda r: r["val"]["reward_mean"]) if ok else None


def choose_by_trunk(points: list[dict], runs: list[dict], kl_budget: float, max_cost: float) -> dict:
    """The rule within each trunk mode (``{"lora": run, "full": run}``, None where none qualifies): a LoRA
    policy and a full fine-tune get a default each (``PPOConfig.lr`` per trunk), and the cost bound
    compares a point with the cheapest of its own mode."""
    groups: dict[str, list[dict]] = {}
    for point, run in zip(points, runs):
        groups.setdefault(point.get("trunk", "lora"), []).append(run)
    return {trunk: choose(group, kl_budget, max_cost) for trunk, group in groups.items()}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    peer_trl.add_budget_args(ap)  # the same model, prompts, reward and budget as peer_trl.py
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every run")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (each in its own process)")
    ap.add_argument("--point", dest="points", action="append", default=[], help="KEY=V[,KEY=V...] (repeat)")
    ap.add_argument("--advantage", default="gae", choices=("gae", "rloo", "grpo"), help="PPO's advantage")
    ap.add_argument(
        "--kl-coef",
        type=float,
        default=0.05,
        help="KL coefficient of the points that set none (0.05: the default when the grid began)",
    )
    ap.add_argument("--fast", action="store_true", help="rollouts on the fast decoding path")
    ap.add_argument("--eval-samples", type=int, default=4, help="responses per validation prompt")
    ap.add_argument("--kl-budget", type=float, default=math.log(16) - 15 / 16, help="the rule's KL bound (nats)")
    ap.add_argument("--max-cost", type=float, default=1.5, help="the rule's cost bound (x the cheapest point)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every run and of the validation decoding")
    ap.add_argument("--keep", default="", help="a folder for the runs (finished runs of the same spec are reused)")
    ap.add_argument("--smoke", action="store_true", help="a tiny budget that runs in minutes: " + str(SMOKE))
    ap.add_argument("--json", default="", help="results file (default benchmarks/results/ppo_sweep[_smoke].json)")
    args = ap.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    args.points = args.points or list(POINTS)
    args.json = args.json or f"benchmarks/results/ppo_sweep{'_smoke' if args.smoke else ''}.json"
    per_step = args.prompts_per_step * args.generations
    if args.reward_calls % per_step:
        ap.error(f"--reward-calls {args.reward_calls} is not a multiple of {per_step}")
    args.steps = args.reward_calls // per_step
    try:
        args.parsed = [parse_point(p) for p in args.points]
    except SystemExit as e:
        ap.error(str(e))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    from qvlm.eval.metrics import json_safe
    from qvlm.fileio import atomic_write_text
    from qvlm.jsonl import read_prompts
    from qvlm.loading import resolve_dtype

    dtype = str(resolve_dtype(args.dtype, args.device)).removeprefix("torch.")
    info = peer_trl.machine(dtype, args.threads)
    side = read_prompts(args.train_prompts)
    train, val = side[: args.n_train], side[args.n_train :]
    val = val[: args.max_val_prompts] if args.max_val_prompts else val
    if not train or not val:
        raise SystemExit(f"need training and validation prompts; have {len(train)}, {len(val)}")
    common = dict(model=args.model, device=args.device, dtype=dtype, threads=args.threads, reward=args.reward,
                  train=train, val=val, eval=[], reward_calls=args.reward_calls, steps=args.steps,
                  prompts_per_step=args.prompts_per_step, generations=args.generations,
                  max_new_tokens=args.max_new_tokens, eval_samples=args.eval_samples, seed=args.seed,
                  trl_lr=0.0, fast=args.fast)  # fmt: skip
    specs = point_specs(args.parsed, common, args.advantage, args.kl_coef)
    print(
        f"{len(train)} training, {len(val)} validation prompts; {args.reward_calls} reward calls; "
        f"{len(args.points)} points, {args.jobs} at a time",
        flush=True,
    )
    start = time.perf_counter()

    def done(r: dict) -> None:
        print(f"  done: {r['method']} kl {r['kl_coef']:g}: val {r['val']['reward_mean']:.3f}", flush=True)

    with tempfile.TemporaryDirectory(prefix="ppo_sweep_") as tmp:
        workdir = Path(args.keep or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        base, *runs = peer_trl.run_many(specs, workdir, args.jobs, done)
    for point, r in zip(args.points, runs):
        r["point"] = point
    chosen_by_trunk = choose_by_trunk(args.parsed, runs, args.kl_budget, args.max_cost)
    chosen = chosen_by_trunk.get("lora")
    b = base["val"]
    print(f"\nvalidation ({len(val)} prompts x {args.eval_samples}; KL exact), base {b['reward_mean']:.3f}:")
    print(f"{'point':<50}{'kl_coef':>8}{'val R':>8}{'+-95%':>7}{'val KL':>8}{'dist-2':>7}{'s/call':>8}{'peak MB':>9}")
    for r in runs:
        v = r["val"]
        mark = next((f" <- chosen ({t})" for t, c in chosen_by_trunk.items() if c is r), "")
        print(
            f"{r['point']:<50}{r['kl_coef']:>8g}{v['reward_mean']:>8.3f}{v['reward_ci95']:>7.3f}{v['kl_to_base']:>8.3f}"
            f"{v['distinct_2']:>7.3f}{r['seconds_per_call']:>8.3f}{r['peak_rss_mb']:>9.0f}{mark}"
        )
    rule = (
        f"highest validation reward with validation KL <= {args.kl_budget:.3g} nats and s/call <= "
        f"{args.max_cost:g} x the cheapest point's"
    )
    picks = ", ".join(f"{t}: {c['point'] if c else 'none qualifies'}" for t, c in chosen_by_trunk.items())
    print(f"\nrule (within each trunk mode): {rule}; chosen: {picks}")
    info["loadavg_end"] = os.getloadavg()
    settings = {k: v for k, v in vars(args).items() if k != "parsed"}
    out = {"settings": settings, "machine": info, "rule": rule, "seconds": time.perf_counter() - start,
           "base": base, "runs": runs, "chosen": chosen["point"] if chosen else None,
           "chosen_by_trunk": {t: c["point"] if c else None for t, c in chosen_by_trunk.items()}}  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.json, json.dumps(json_safe(out), indent=2, allow_nan=False) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
