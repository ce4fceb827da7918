"""``qvlm demo``: the main job. Steer the embedded SmolLM2 toward a reward with Q/V heads."""

from __future__ import annotations

import argparse

from qvlm.cli._common import add_config_args, config_from_args
from qvlm.configs import DemoConfig


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="main job: steer the embedded SmolLM2 toward a reward; compare with best-of-N; report",
        description="Sample responses from the embedded SmolLM2-135M-Instruct on qvlm's training prompts, "
        "score them with VADER, train ILQL Q/V heads and Monte-Carlo Q/V heads (a prefix scorer) on the "
        "frozen trunk, and evaluate on held-out prompts: base sampling, best-of-4 and best-of-16 by the "
        "true reward, ILQL-guided and Monte-Carlo-Q-guided decoding at several betas, V-guided blockwise "
        "decoding. The full preset also trains a PPO policy online (LoRA adapters, a V head on the trunk; "
        "--ppo-iterations, the count chosen on validation prompts) and adds its ppo row with the exact KL to "
        "the base and its reward and KL curves. Writes OUT/metrics.json and OUT/report.html. Each phase is "
        "cached in OUT: a rerun resumes. --quick takes about 2.5 minutes on 2 CPU cores, the full demo about 6. "
        "--seeds 0,1,2 runs the whole demo once per seed (OUT/seed-S) and writes the means over the seeds "
        "with their spread (OUT/seeds.json, OUT/seeds.html).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default="qvlm-demo", help="output directory (phases cached here)")
    p.add_argument(
        "--seeds",
        default="",
        help="comma-separated seeds (e.g. 0,1,2): one complete demo per seed in OUT/seed-S, then means and "
        "standard deviations over the seeds in OUT/seeds.json and OUT/seeds.html (overrides --seed)",
    )
    add_config_args(p, DemoConfig, title="demo settings")
    p.set_defaults(handler=run)


def run(args) -> int:
    from qvlm.apps.demo import run_demo
    from qvlm.fileio import check_output_dir
    from qvlm.rewards import get_reward

    cfg = config_from_args(DemoConfig, args)
    check_output_dir(args.out, "--out", inputs=(cfg.model,))
    if cfg.reward:
        get_reward(cfg.reward)  # an unknown name is refused before the model loads
    _check_work(cfg)
    if args.seeds:
        return _run_seeds(cfg, args)
    summary = run_demo(cfg, args.out)

    def num(x, width: int, digits: int) -> str:  # None (not finite, or not tracked) prints as a dash
        return f"{'-':>{width}}" if x is None else f"{x:>{width}.{digits}f}"

    print(
        f"\n{'method':<20} {'reward':>8} {'+-95%':>7} {'KL':>8} {'dist-2':>7} {'ppl':>7} {'top-k':>6} "
        f"{'cost':>6} {'time':>6}"
    )
    for name, m in summary["methods"].items():
        kl = {"bound": "<=", "estimate": "~ "}.get(m.get("kl_kind"), "  ") + num(m["kl_to_base"], 6, 2)
        print(
            f"{name:<20} {num(m['reward_mean'], 8, 3)} {num(m['reward_ci95'], 7, 3)} {kl} "
            f"{num(m['distinct_2'], 7, 3)} {num(m['perplexity'], 7, 2)} {num(m.get('topk_mass'), 6, 2)} "
            f"{num(m['cost'], 6, 2)} {num(m.get('time_ratio'), 6, 2)}"
        )
    shown = summary["shown"]
    print(
        f"\nshown in the report: {shown['method']}, chosen on {shown['validation_prompts']} validation prompts "
        f"(reward {num(shown['validation_reward'], 0, 3).strip()}) by the rule: {shown['rule']}"
        + ("" if shown.get("passed_rule", True) else " (none passed: the least validation KL is shown)")
    )
    print("KL: ~ an estimate (best-of-N, blockwise: from the draws' reward ranks), <= a bound, else exact")
    if "ppo" in summary:
        ppo = summary["ppo"]
        print(
            f"ppo: iteration count {ppo['iterations']}, chosen among {','.join(map(str, ppo['stages']))} on "
            f"{ppo['validation_prompts']} validation prompts; {summary['methods']['ppo']['reward_calls']} reward calls"
        )
    print(f"report: {args.out}/report.html   metrics: {args.out}/metrics.json")
    return 0


def _check_work(cfg) -> None:
    """Refuse, before SmolLM2 loads, counts whose responses or tokens exceed the limits of
    :mod:`qvlm.cli._limits` (issue 25); a 0 (the preset) is the preset's own, small count."""
    from qvlm.apps.demo_prompts import load_demo_prompts
    from qvlm.cli._limits import check_count, check_ppo_stages, check_tokens, check_width

    train = len(load_demo_prompts("train")[: cfg.train_prompts or None])  # the shipped prompts bound the counts
    evals = len(load_demo_prompts("eval")[: cfg.eval_prompts or None])
    if cfg.max_new_tokens:
        check_tokens(cfg.max_new_tokens)
    if cfg.samples_per_prompt:
        check_count(cfg.samples_per_prompt, "--samples-per-prompt", train)
    check_count(cfg.best_of, "--best-of", evals)
    check_count(cfg.candidates, "--candidates", evals)
    check_tokens(cfg.block_size, "--block-size")
    check_width(cfg.head_hidden, "--head-hidden", "0: the trunk's hidden size")
    check_ppo_stages(cfg.ppo_iterations, cfg.ppo)


def _run_seeds(cfg, args) -> int:
    from qvlm.apps.demo_seeds import parse_seeds, run_demo_seeds

    seeds = parse_seeds(args.seeds)
    summary = run_demo_seeds(cfg, args.out, seeds)

    def ms(s: dict, digits: int) -> str:
        return "-" if s["mean"] is None else f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"

    print(f"\nmeans ± standard deviations over seeds {','.join(map(str, seeds))} (each seed's eval mean)")
    print(f"{'method':<20} {'reward':>15} {'KL':>14} {'KL kind':>9} {'dist-2':>7} {'cost':>6}")
    for name, m in summary["methods"].items():
        cost = m["cost"]["mean"]
        print(
            f"{name:<20} {ms(m['reward'], 3):>15} {ms(m['kl_to_base'], 2):>14} {'/'.join(m['kl_kind']):>9} "
            f"{'-' if m['distinct_2']['mean'] is None else format(m['distinct_2']['mean'], '.3f'):>7} "
            f"{'-' if cost is None else f'{cost:.2f}':>6}"
        )
    shown = summary["shown"]
    print(
        f"\nshown (chosen on validation, per seed): {', '.join(shown['per_seed'])}; eval reward "
        f"{ms(shown['eval_reward'], 3)}"
    )
    print(f"summary: {args.out}/seeds.html   {args.out}/seeds.json   per seed: {args.out}/seed-S/report.html")
    return 0
