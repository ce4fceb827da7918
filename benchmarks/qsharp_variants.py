"""Q# variants compared on the demo's validation prompts (issue 22): each variant's heads are trained on a
finished demo's base samples (round 0) plus its own roll-in rounds on the training prompts, then decode the
validation prompts (training side, never trained on) several times at each beta; reward with its 95% CI
and the exact KL, beside the demo's Monte-Carlo Q heads decoded the same way and best-of-N from the demo's
validation draws. Nothing here touches the eval prompts.

Usage: python benchmarks/qsharp_variants.py --demo OUT --variants default,next_z [--betas 2,4,8] [--samples 4]
       [--json benchmarks/results/qsharp_variants.json]
Each variant is a set of QSharpConfig / heads overrides named in VARIANTS below; its run lies in
OUT/variants/NAME (reused when finished).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from decode_speed import machine_info  # noqa: E402

from qvlm.algos.qsharp import train_qsharp  # noqa: E402
from qvlm.apps.demo import VAL_START, resolve  # noqa: E402
from qvlm.apps.demo_prompts import load_demo_prompts  # noqa: E402
from qvlm.apps.demo_train import QSHARP_BINS, QSHARP_RANK, support_of  # noqa: E402
from qvlm.apps.runs import train_or_load  # noqa: E402
from qvlm.configs import DecodeConfig, DemoConfig, TrunkConfig, from_flat  # noqa: E402
from qvlm.decoding import best_of_n_kl_estimate, generate  # noqa: E402
from qvlm.eval.metrics import json_safe, summarize  # noqa: E402
from qvlm.features import FeatureCache  # noqa: E402
from qvlm.fileio import atomic_write_text  # noqa: E402
from qvlm.jsonl import read_samples  # noqa: E402
from qvlm.loading import load_model  # noqa: E402
from qvlm.model import QVModel, load_qv_model  # noqa: E402
from qvlm.rewards import as_sequence_reward, get_reward, score  # noqa: E402

# name -> (QSharpConfig overrides, heads overrides)
VARIANTS = {
    "default": ({}, {}),
    "next_z": ({"q_target": "next_z"}, {}),
    "next_z_steps600": ({"q_target": "next_z", "steps_per_round": 600}, {}),
    "next_z_rounds8": ({"q_target": "next_z", "rounds": 8}, {}),
    "next_z_wide": ({"q_target": "next_z"}, {"head_hidden": 512}),
    "next_z_lr3e-3": ({"q_target": "next_z", "lr": 3e-3}, {}),
    "rounds8_ppr64": ({"rounds": 8, "prompts_per_round": 64}, {}),
    "tilt": ({}, {"dist_head": "tilt"}),
    "tilt_next_z": ({"q_target": "next_z"}, {"dist_head": "tilt"}),
    "tilt_next_z_lr3e-3": ({"q_target": "next_z", "lr": 3e-3}, {"dist_head": "tilt"}),
    "tilt_next_z_lr3e-3_steps600": ({"q_target": "next_z", "lr": 3e-3, "steps_per_round": 600}, {"dist_head": "tilt"}),
    "tilt_lr3e-3_steps600": ({"lr": 3e-3, "steps_per_round": 600}, {"dist_head": "tilt"}),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", required=True, help="a finished `qvlm demo` output (one seed)")
    ap.add_argument("--variants", default="default,next_z")
    ap.add_argument("--betas", default="2,4,8")
    ap.add_argument("--samples", type=int, default=4, help="responses per validation prompt")
    ap.add_argument("--json", default="benchmarks/results/qsharp_variants.json")
    args = ap.parse_args()
    out = Path(args.demo)
    demo = from_flat(DemoConfig, json.loads((out / "demo_config.json").read_text()), strict=False)
    demo = resolve(demo)
    torch.manual_seed(demo.seed)
    model, tok = load_model(demo.model, device="cpu", dtype=demo.dtype)
    reward_name = demo.reward or ("vader" if demo.target == "positive" else "vader-negative")
    reward = as_sequence_reward(get_reward(reward_name), tok)
    train_prompts = load_demo_prompts("train")[: demo.train_prompts]
    val = load_demo_prompts("train")[VAL_START : VAL_START + demo.val_prompts]
    samples = read_samples(out / "samples.jsonl")
    betas = [float(b) for b in args.betas.split(",")]
    n = args.samples
    repeated = [p for p in val for _ in range(n)]
    cache = FeatureCache()

    def evaluate(heads, beta: float) -> dict:
        cfg = DecodeConfig(max_new_tokens=demo.max_new_tokens, batch_size=64, seed=demo.seed + 7, beta=beta,
                           guidance_top_k=demo.guidance_top_k, num_return_sequences=n)  # fmt: skip
        res = generate(model, tok, val, heads if beta else None, cfg, track_kl=True)
        rewards = score(reward, repeated, res.texts)
        m = summarize(res.texts, rewards, res.kl, res.base_logprobs, group_size=n).as_dict()
        return {k: m[k] for k in ("reward_mean", "reward_ci95", "kl_to_base", "distinct_2")}

    rows = {"base": evaluate(None, 0.0)}
    mcq = load_qv_model(model, out / "value")
    for b in betas:
        rows[f"mcq_beta_{b:g}"] = evaluate(mcq.heads, b)
    draws = json.loads((out / "val" / "draws.json").read_text())
    N = demo.best_of
    for k in (4, 16):
        if k <= N:
            groups = [draws["rewards"][i * N : (i + 1) * N] for i in range(len(val))]
            best = [max(g[:k]) for g in groups]
            rows[f"best_of_{k}"] = {"reward_mean": statistics.mean(best),
                                    "kl_to_base": statistics.mean(best_of_n_kl_estimate(g, k) for g in groups)}  # fmt: skip
    for name in args.variants.split(","):
        qover, hover = VARIANTS[name]
        torch.manual_seed(demo.seed)
        qv = QVModel.from_trunk(model, TrunkConfig("frozen"), head_hidden=hover.get("head_hidden", demo.head_hidden),
                                base_model=demo.model, feature_cache=cache, bins=QSHARP_BINS,
                                support=support_of(samples), dist_rank=hover.get("dist_rank", QSHARP_RANK),
                                dist_head=hover.get("dist_head", "bilinear"))  # fmt: skip
        qcfg = dataclasses.replace(demo.qsharp, max_new_tokens=demo.max_new_tokens, guidance_top_k=demo.guidance_top_k,
                                   decode_batch_size=64, seed=demo.seed, progress=False, **qover)  # fmt: skip
        start = time.perf_counter()
        train_or_load(out / "variants" / name, qv,
                      lambda d, r: train_qsharp(qv, tok, train_prompts, reward, qcfg, d, r, initial=samples), print)  # fmt: skip
        seconds = time.perf_counter() - start
        for b in betas:
            rows[f"{name}_beta_{b:g}"] = {**evaluate(qv.heads, b), "train_seconds": seconds}
        print(f"{name}: " + ", ".join(f"beta {b:g} {rows[f'{name}_beta_{b:g}']['reward_mean']:.3f} "
                                      f"@ {rows[f'{name}_beta_{b:g}']['kl_to_base']:.2f}" for b in betas), flush=True)  # fmt: skip
    print(f"\n{'row':<28} {'reward':>7} {'+-95%':>6} {'KL':>7} {'dist-2':>7}")
    for k, r in rows.items():
        ci = r.get("reward_ci95")
        print(f"{k:<28} {r['reward_mean']:>7.3f} {'-' if ci is None else format(ci, '.3f'):>6} {r['kl_to_base']:>7.2f} "
              f"{r.get('distinct_2', float('nan')):>7.3f}")  # fmt: skip
    machine = machine_info()
    print(f"CPU: {machine['cpu_model']}, {machine['cpu_count']} CPUs, {machine['torch_threads']} torch threads")
    payload = {"demo": str(out), "machine": machine, "samples_per_prompt": n, "val_prompts": len(val), "rows": rows,
               "variants": {k: VARIANTS[k] for k in args.variants.split(",")}}  # fmt: skip
    atomic_write_text(args.json, json.dumps(json_safe(payload), indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
