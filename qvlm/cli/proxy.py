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

    hf_logging.disable_progress_bar()
    run_proxy(config_from_args(ProxyConfig, args), args.out, device=args.device, dtype=args.dtype)
    return 0
