"""``qvlm proxy``: reward-model over-optimisation made visible (gold vs proxy reward under best-of-N, PPO and guidance)."""

from __future__ import annotations

import argparse

from qvlm.cli._common import add_config_args
from qvlm.configs import DEVICES_HELP, DTYPE_CHOICES, ProxyConfig


def register(sub) -> None:
    p = sub.add_parser(
        "proxy",
        help="over-optimisation: best-of-N by a learned proxy of a gold reward, scored by both",
        description="A gold reward (VADER) labels pairs of base samples; a proxy reward model (all-MiniLM-L6-v2) "
        "learns from at most --pairs of them; best-of-N by the proxy on held-out prompts is scored by gold and "
        "proxy; with --ppo-iterations a PPO policy, and with --guide-betas Monte-Carlo heads fitted to the proxy's "
        "scores, push on the proxy harder, scored the same way with the exact KL. Writes proxy.json (the proxy's held-out pair accuracy, the curve, where the gold reward peaks) "
        "and overoptimisation.svg (gold and proxy reward against KL). Phases are cached: a rerun resumes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default="qvlm-proxy", help="output directory")
    p.add_argument("--device", default="auto", help=f"where the models run: {DEVICES_HELP}")
    p.add_argument(
        "--dtype", default="float32", choices=DTYPE_CHOICES, help="the base model's weights (auto: bfloat16 where fast)"
    )
    add_config_args(p, ProxyConfig, title="experiment settings")
    p.set_defaults(handler=run)


def run(args) -> int:
    from transformers.utils import logging as hf_logging

    from qvlm.apps.proxy import run_proxy
    from qvlm.cli._common import config_from_args
    from qvlm.fileio import check_output_dir
    from qvlm.rewards import check_reward

    hf_logging.disable_progress_bar()
    cfg = config_from_args(ProxyConfig, args)
    check_output_dir(args.out, "--out", inputs=(cfg.model, cfg.rm.backbone))
    check_work(cfg)
    check_reward(cfg.gold)  # a bad gold reward is refused before the model loads
    run_proxy(cfg, args.out, device=args.device, dtype=args.dtype)
    return 0


def check_work(cfg: ProxyConfig) -> None:
    """Refuse, before any model loads, an experiment whose samples, candidate pairs or draws exceed the
    limits of :mod:`qvlm.cli._limits` (issue 25)."""
    from qvlm.apps.demo_prompts import load_demo_prompts
    from qvlm.cli._limits import check_count, check_ppo_stages, check_tokens, check_total

    train = len(load_demo_prompts("train")[: cfg.train_prompts])  # the shipped prompts bound the counts
    evals = len(load_demo_prompts("eval")[: cfg.eval_prompts])
    check_tokens(cfg.max_new_tokens)
    check_count(cfg.samples_per_prompt, "--samples-per-prompt", train)
    s = cfg.samples_per_prompt
    check_total(
        train * s * (s - 1) // 2, f"{train} prompts x pairs among --samples-per-prompt {s:,}", "candidate pairs"
    )
    check_count(cfg.max_n, "--max-n", evals)
    stages = check_ppo_stages(cfg.ppo_iterations, cfg.ppo)
    if stages:
        check_count(cfg.ppo_eval_samples, "--ppo-eval-samples", evals * len(stages))
    betas = [b for b in cfg.guide_betas.split(",") if b.strip()]
    if betas:
        check_count(cfg.guide_eval_samples, "--guide-eval-samples", evals * (len(betas) + 1))
    check_total(cfg.rm.batch_size, f"--rm-batch-size {cfg.rm.batch_size:,}", "pairs per optimiser step")
