"""Ablation of centred top-k guidance, on held-out TRAINING prompts (never the eval split).

Loads the Monte-Carlo Q/V heads of a `qvlm demo` run (DIR/value, trained on the first 128 training
prompts) and decodes the training prompts the demo does not use (160-218) with top-20 guidance,
with and without centring the candidates' advantages, at several betas. Same seed, same prompts,
one run. Prints a table and writes JSON.

    python benchmarks/guidance_centring.py --heads qvlm-demo/value
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qvlm.configs import DecodeConfig  # noqa: E402
from qvlm.decoding import generate  # noqa: E402
from qvlm.eval.metrics import mean_ci95, perplexity  # noqa: E402
from qvlm.fileio import atomic_write_text  # noqa: E402
from qvlm.jsonl import read_prompts  # noqa: E402
from qvlm.loading import load_model  # noqa: E402
from qvlm.model import load_qv_model  # noqa: E402
from qvlm.rewards import get_reward, score  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", required=True, help="a demo run's value/ directory (Monte-Carlo Q/V heads)")
    ap.add_argument("--betas", default="8,16,32")
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--json", default="benchmarks/results/guidance_centring.json")
    args = ap.parse_args()
    import torch

    model, tok = load_model("smollm2-135m-instruct")
    heads = load_qv_model(model, args.heads).heads
    prompts = read_prompts("demo:train")[160:]
    reward = get_reward("vader")
    rows = []
    print(f"{len(prompts)} held-out training prompts, guidance top-k {args.top_k}")
    print(f"{'centred':<8} {'beta':>5} {'reward':>8} {'+-95%':>7} {'KL':>7} {'ppl':>7}")
    for centre in (False, True):
        for beta in [float(b) for b in args.betas.split(",")]:
            cfg = DecodeConfig(
                max_new_tokens=20, batch_size=64, seed=0, beta=beta, guidance_top_k=args.top_k, centre_candidates=centre
            )
            res = generate(model, tok, prompts, heads=heads, cfg=cfg, track_kl=True)
            mean, ci = mean_ci95(score(reward, prompts, res.texts))
            row = {
                "centred": centre,
                "beta": beta,
                "reward_mean": mean,
                "reward_ci95": ci,
                "kl_to_base": sum(res.kl) / len(res.kl),
                "perplexity": perplexity(res.base_logprobs),
            }
            rows.append(row)
            print(
                f"{str(centre):<8} {beta:>5g} {mean:>8.3f} {ci:>7.3f} {row['kl_to_base']:>7.2f} {row['perplexity']:>7.2f}"
            )
    machine = {
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    atomic_write_text(
        args.json,
        json.dumps({"command": " ".join(sys.argv), "heads": args.heads, "machine": machine, "rows": rows}, indent=2)
        + "\n",
    )
    print(f"machine: {machine}\nwrote {args.json}")


if __name__ == "__main__":
    main()
