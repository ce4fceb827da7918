"""How the learned heads extrapolate to tokens their data never took (issue 22): for a finished demo run,
decode the validation prompts with the base model, and at every state take the base model's top-k
candidates (the tokens guidance moves). Split them into tokens the heads' training data took somewhere
(the demo's samples; for Q# also its roll-in rounds) and tokens it never took, and report, per head
(Q# at alpha = 1/beta, the same Q# heads' mean, Monte-Carlo Q), the logit shift guidance gives each
candidate: ``beta * (A(s, c) - sum_c' pi~(c') A(s, c'))``, the advantage centred under the base model's
renormalised probabilities. Nothing here is a reward: it shows where the heads move the most probability,
on tokens with data or on tokens without. Validation prompts only (``demo:train`` 160-191).

Usage: python benchmarks/qsharp_extrapolation.py --run OUT/seed-0 [--betas 4,16] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from decode_speed import machine_info  # noqa: E402

from qvlm.apps.demo import VAL_START, resolve  # noqa: E402
from qvlm.apps.demo_prompts import load_demo_prompts  # noqa: E402
from qvlm.configs import DecodeConfig, DemoConfig, from_flat  # noqa: E402
from qvlm.decoding import generate  # noqa: E402
from qvlm.decoding.guidance import centre_on_candidates  # noqa: E402
from qvlm.fileio import atomic_write_text  # noqa: E402
from qvlm.heads import MeanView  # noqa: E402
from qvlm.jsonl import read_samples  # noqa: E402
from qvlm.loading import load_model  # noqa: E402
from qvlm.model import load_qv_model  # noqa: E402


def taken_tokens(*files: Path) -> set[int]:
    """Every token id a response of these sample files took."""
    seen: set[int] = set()
    for f in files:
        if f.is_file():
            for s in read_samples(f):
                seen.update(s.response_ids or [])
    return seen


def shifts(heads, h: torch.Tensor, logits: torch.Tensor, cand: torch.Tensor, beta: float) -> torch.Tensor:
    """``beta * (A - sum pi~ A)`` over the candidates (:func:`qvlm.decoding.guidance.centre_on_candidates`):
    ``h (N, H)``, ``logits (N, V)``, ``cand (N, k)`` -> ``(N, k)``."""
    return beta * centre_on_candidates(logits, cand, heads.advantages(h, cand, beta=beta).float())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="one seed's finished `qvlm demo` output")
    ap.add_argument("--betas", default="4,16", help="guidance strengths (Q# reads Q*_alpha at alpha = 1/beta)")
    ap.add_argument("--top-k", type=int, default=20, help="candidates per state (the demo's guidance top-k)")
    ap.add_argument("--json", default="benchmarks/results/qsharp_extrapolation.json")
    args = ap.parse_args()
    out = Path(args.run)
    demo = resolve(from_flat(DemoConfig, json.loads((out / "demo_config.json").read_text()), strict=False))
    torch.manual_seed(demo.seed)
    model, tok = load_model(demo.model, device="cpu", dtype=demo.dtype)
    val = load_demo_prompts("train")[VAL_START : VAL_START + demo.val_prompts]
    qsharp = load_qv_model(model, out / "qsharp").heads
    heads = {"qsharp": qsharp, "qsharp_mean": MeanView(qsharp), "mcq": load_qv_model(model, out / "value").heads}
    base_seen = taken_tokens(out / "samples.jsonl")
    seen = {"qsharp": base_seen | taken_tokens(out / "qsharp" / "replay.jsonl"), "mcq": base_seen}
    seen["qsharp_mean"] = seen["qsharp"]
    res = generate(model, tok, val, cfg=DecodeConfig(max_new_tokens=demo.max_new_tokens, seed=demo.seed),
                   return_hidden=True)  # fmt: skip
    h = torch.cat([x[:-1] for x in res.hidden])  # (N, H): the states each response's tokens were written in
    with torch.no_grad():
        logits = model.get_output_embeddings()(h.to(model.dtype)).float()  # (N, V)
        top = logits.topk(args.top_k, dim=-1)
        probs = torch.softmax(top.values, dim=-1)
        result = {}
        for beta in [float(b) for b in args.betas.split(",")]:
            result[f"{beta:g}"] = per_beta = {}
            for name, hd in heads.items():
                s = shifts(hd, h, logits, top.indices, beta)  # (N, k)
                unseen = torch.tensor([[int(t) not in seen[name] for t in row] for row in top.indices.tolist()])
                a = s.abs()
                per_beta[name] = {
                    "candidates": int(unseen.numel()),
                    "unseen_share": float(unseen.float().mean()),
                    "mean_abs_shift_seen": float(a[~unseen].mean()),
                    "mean_abs_shift_unseen": float(a[unseen].mean()) if unseen.any() else None,
                    "mass_unseen_before": float((probs * unseen).sum(-1).mean()),
                    "mass_unseen_after": float((torch.softmax(top.values + s, -1) * unseen).sum(-1).mean()),
                    "largest_shift_on_unseen": float(unseen.gather(-1, a.argmax(-1)[:, None]).float().mean()),
                }
    payload = {"run": str(out), "betas": args.betas, "top_k": args.top_k, "states": int(h.shape[0]),
               "val_prompts": len(val), "machine": machine_info(), "per_beta": result,
               "seen_tokens": {k: len(v) for k, v in seen.items()}}  # fmt: skip
    print(f"{h.shape[0]} states of {len(val)} validation prompts, top-{args.top_k} candidates")
    print(f"{'beta':>5} {'heads':<12} {'unseen':>7} {'|shift| seen':>13} {'|shift| unseen':>15} {'mass unseen':>18} "
          f"{'max on unseen':>14}")  # fmt: skip
    for beta, per_beta in result.items():
        for name, r in per_beta.items():
            print(f"{beta:>5} {name:<12} {r['unseen_share']:>7.3f} {r['mean_abs_shift_seen']:>13.3f} "
                  f"{r['mean_abs_shift_unseen'] or float('nan'):>15.3f} {r['mass_unseen_before']:>8.3f} -> "
                  f"{r['mass_unseen_after']:.3f} {r['largest_shift_on_unseen']:>14.3f}")  # fmt: skip
    atomic_write_text(args.json, json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
