"""Proxy reward-model variants, compared on a `qvlm proxy` run's VALIDATION pairs (never the held-out ones).

Make the validation run first: `qvlm proxy --out runs/proxy_val --train-prompts 175 ...` trains on pairs
of the first 140 training prompts and keeps the pairs of prompts 140-174 as its `heldout_pairs.jsonl`,
none of them among the 44 prompts the final run holds out. Each variant below trains a proxy on the
run's `pairs.jsonl` with `qvlm train rm` settings (AdamW, constant lr, default pooling) and scores those
pairs; `--seeds 0,1,2` trains one proxy a seed and adds their mean logit (an ensemble); `--closure`
adds the pairs each prompt's labelled pairs imply by transitivity (no new gold labels); `--more-pairs N`
draws N pairs from the run's samples the way `qvlm proxy` does (its first `--pairs` are the run's own).
Prints a table and writes JSON.

    python benchmarks/proxy_variants.py --run runs/proxy_val --seeds 0,1,2 --out runs/proxy_variants_seeds

Each variant wants its own --out: a proxy cached there is reused only for the same pairs and settings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qvlm.algos.reward_model import RMData, train_reward_model  # noqa: E402
from qvlm.configs import RewardModelConfig  # noqa: E402
from qvlm.eval.overoptimisation import gold_pairs  # noqa: E402
from qvlm.fileio import atomic_write_text  # noqa: E402
from qvlm.rewards import get_reward, score  # noqa: E402


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def closure(pairs: list[dict]) -> list[dict]:
    """Every pair implied by transitivity within a prompt: a > b and b > c give a > c (the labelled
    pairs included), in a seeded order."""
    better: dict[str, dict[str, set[str]]] = {}
    for p in pairs:
        better.setdefault(p["prompt"], {}).setdefault(p["chosen"], set()).add(p["rejected"])
    out = []
    for prompt, graph in better.items():
        for top in graph:
            seen, stack = set(), list(graph[top])
            while stack:  # everything below `top`
                node = stack.pop()
                if node not in seen:
                    seen.add(node)
                    stack.extend(graph.get(node, ()))
            out += [{"prompt": prompt, "chosen": top, "rejected": low} for low in sorted(seen - {top})]
    random.Random(0).shuffle(out)
    return out


def more_pairs(run: Path, n: int) -> list[dict]:
    """``n`` pairs drawn as `qvlm proxy` draws its training pairs (same seed: its own come first)."""
    cfg = json.loads((run / "config.json").read_text())
    rows, k = read_jsonl(run / "train_samples.jsonl"), cfg["samples_per_prompt"]
    groups = [[(r["response"], r["reward"]) for r in rows[i : i + k]] for i in range(0, len(rows), k)]
    prompts = [rows[i]["prompt"] for i in range(0, len(rows), k)]
    n_fit = max(1, round(len(prompts) * (1 - cfg["held_out"])))
    return gold_pairs(groups[:n_fit], prompts[:n_fit], cfg["label_noise"], random.Random(cfg["seed"]))[:n]


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())


def variant(data: RMData, cfg: RewardModelConfig) -> dict:
    """What a trained proxy was trained on and how: a cached one is reused only for the same."""
    return {"pairs": data.fingerprint(), "backbone": cfg.backbone, "lr": cfg.lr, "epochs": cfg.epochs, "seed": cfg.seed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a qvlm proxy output directory (its pairs and held-out pairs)")
    ap.add_argument("--out", default="runs/proxy_variants", help="where the variants' proxies are trained")
    ap.add_argument("--seeds", default="0", help="one proxy per seed; more than one: also their ensemble")
    ap.add_argument("--closure", action="store_true", help="add the pairs implied by transitivity")
    ap.add_argument("--more-pairs", type=int, default=0, help="draw this many pairs instead of the run's")
    ap.add_argument("--backbone", default="", help="the proxies' backbone (empty: all-MiniLM-L6-v2)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--json", default="benchmarks/results/proxy_variants.json")
    args = ap.parse_args()
    import torch

    run = Path(args.run)
    fit = more_pairs(run, args.more_pairs) if args.more_pairs else read_jsonl(run / "pairs.jsonl")
    fit = closure(fit) if args.closure else fit
    test = read_jsonl(run / "heldout_pairs.jsonl")
    prompts = [p["prompt"] for p in test]
    data = RMData("preference", prompts=[p["prompt"] for p in fit], chosen=[p["chosen"] for p in fit],
                  rejected=[p["rejected"] for p in fit])  # fmt: skip
    rows, chosen, rejected = [], [], []
    for seed in [int(s) for s in args.seeds.split(",")]:
        cfg = RewardModelConfig(backbone=args.backbone, lr=args.lr, epochs=args.epochs, held_out=0.0, seed=seed)
        out = Path(args.out) / f"seed-{seed}"
        start = time.perf_counter()
        if not (out / "eval.json").is_file():
            train_reward_model(data, cfg, out, device="cpu", log=lambda s: None)
            atomic_write_text(out / "variant.json", json.dumps(variant(data, cfg)) + "\n")
        elif not (out / "variant.json").is_file() or json.loads((out / "variant.json").read_text()) != variant(
            data, cfg
        ):
            sys.exit(f"{out} holds a proxy trained on other pairs or settings; choose another --out")
        proxy = get_reward(f"hf:{out}", device="cpu")
        chosen.append(torch.tensor(score(proxy, prompts, [p["chosen"] for p in test], name="proxy")))
        rejected.append(torch.tensor(score(proxy, prompts, [p["rejected"] for p in test], name="proxy")))
        accuracy = (chosen[-1] > rejected[-1]).float().mean().item()
        seconds = time.perf_counter() - start  # training (unless cached) and scoring
        rows.append({"proxy": f"seed {seed}", "accuracy": accuracy, "seconds": seconds})
        print(f"seed {seed}: {accuracy:.4f} on {len(test)} validation pairs", flush=True)
    if len(rows) > 1:
        accuracy = (sum(chosen) > sum(rejected)).float().mean().item()
        rows.append({"proxy": f"ensemble of {len(rows)} (mean logit)", "accuracy": accuracy, "seconds": None})
    machine = f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}, CPU only"
    print(f"\n{len(fit)} training pairs, {len(test)} validation pairs ({machine})")
    print("| proxy | validation pair accuracy |\n|---|---|")
    for r in rows:
        print(f"| {r['proxy']} | {r['accuracy']:.1%} |")
    result = {"run": str(run), "pairs": len(fit), "validation_pairs": len(test), "args": vars(args), "machine": machine,
              "rows": rows}  # fmt: skip
    atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
