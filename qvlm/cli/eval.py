"""``qvlm eval``: mean reward (95% CI), KL to the base model and distinct-n, per guidance strength."""

from __future__ import annotations

import argparse

from qvlm.cli._common import (
    add_config_args,
    add_model_arg,
    check_non_negative,
    config_from_args,
    load,
    parse_floats,
)
from qvlm.configs import DecodeConfig
from qvlm.rewards import REWARD_HELP, check_reward


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate base vs guided decoding: reward with 95%% CI, KL to base, distinct-n",
        description="Decode the prompts at each --betas value (0 = the base model) and report the mean "
        "reward with a 95%% CI (Student t), the exact KL of the sampling distribution to the base "
        "model summed per response, distinct-1/2, and perplexity under the base model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arg(p)
    p.add_argument("--heads", help="run directory of `qvlm train ilql` (needed for betas other than 0)")
    p.add_argument("--prompts", required=True, help="prompt file: .txt or .jsonl (field 'prompt')")
    p.add_argument("--reward", default="vader", help=REWARD_HELP + "; a per-token reward is summed")
    p.add_argument("--max-prompts", type=int, default=0, help="use only the first N prompts (0: all)")
    p.add_argument("--betas", default="0,1,2", help="comma-separated guidance strengths; 0 is the base model")
    p.add_argument("--json", help="write the metrics here as JSON (atomically)")
    add_config_args(p, DecodeConfig, exclude=("beta", "num_return_sequences"), title="decoding")
    p.set_defaults(handler=run)


def run(args) -> int:
    import json

    from qvlm.errors import QVLMError
    from qvlm.eval.metrics import distinct_n, evaluate_decoding, json_safe
    from qvlm.fileio import atomic_write_text, check_output_file
    from qvlm.mdp import read_prompts
    from qvlm.model import load_qv_model
    from qvlm.rewards import as_sequence_reward, get_reward, needs_reference, read_references

    betas = parse_floats(args.betas, "--betas")
    if any(b != 0 for b in betas) and not args.heads:
        raise QVLMError("--betas other than 0 need --heads DIR (trained with `qvlm train ilql`)")
    check_non_negative(args.max_prompts, "--max-prompts", "0: all")
    for beta in betas:  # every config is valid before any work
        config_from_args(DecodeConfig, args, beta=beta)
    if args.json:
        check_output_file(args.json, "--json", inputs=(args.prompts,))
    prompts = read_prompts(args.prompts)
    if args.max_prompts > 0:
        prompts = prompts[: args.max_prompts]
    references = read_references(args.prompts, f"reward {args.reward}") if needs_reference(args.reward) else None
    check_reward(args.reward)  # a bad reward fails before the model loads
    model, tokenizer = load(args)
    reward = get_reward(args.reward, references=references, tokenizer=tokenizer, device=model.device)
    reward = as_sequence_reward(reward, tokenizer)  # a per-token reward: its sum over the response
    heads = None
    if args.heads:
        qv = load_qv_model(model, args.heads)
        model, heads = qv.trunk, qv.heads
    methods = {}
    print(f"{'method':<12} {'reward':>8} {'95% CI':>16} {'KL':>8} {'dist-1':>7} {'dist-2':>7} {'ppl':>8}")
    for beta in betas:
        cfg = config_from_args(DecodeConfig, args, beta=beta)
        metrics, result, _ = evaluate_decoding(model, tokenizer, prompts, reward, heads, cfg)
        name = "base" if beta == 0 else f"guided_beta_{beta:g}"
        row = metrics.as_dict()
        row["distinct_1"] = distinct_n(result.texts, 1)
        methods[name] = row
        lo, hi = row["reward_mean"] - row["reward_ci95"], row["reward_mean"] + row["reward_ci95"]
        print(
            f"{name:<12} {row['reward_mean']:>8.4f} [{lo:>6.3f}, {hi:>6.3f}] {row['kl_to_base']:>8.3f} "
            f"{row['distinct_1']:>7.3f} {row['distinct_2']:>7.3f} {row['perplexity']:>8.2f}"
        )
    if args.json:
        atomic_write_text(
            args.json,
            json.dumps(json_safe({"reward": args.reward, "n_prompts": len(prompts), "methods": methods}), indent=2)
            + "\n",
        )
    return 0
