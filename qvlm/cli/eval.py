"""``qvlm eval``: mean reward (95% CI), KL to the base model and distinct-n, per guidance strength."""

from __future__ import annotations

import argparse

from qvlm.cli._common import add_config_args, add_model_arg, config_from_args, load, parse_floats
from qvlm.configs import DecodeConfig


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
    p.add_argument(
        "--policy",
        help="run directory of `qvlm train ppo`: add its policy (beta 0) and, with --heads, the policy guided "
        "(other betas); KL and perplexity stay under the base model",
    )
    p.add_argument("--prompts", required=True, help="prompt file: .txt or .jsonl (field 'prompt')")
    p.add_argument("--reward", default="vader", help="reward: vader, vader-negative, count:TEXT, length")
    p.add_argument("--max-prompts", type=int, default=0, help="use only the first N prompts (0: all)")
    p.add_argument("--betas", default="0,1,2", help="comma-separated guidance strengths; 0 is the base model")
    p.add_argument("--json", help="write the metrics here as JSON (atomically)")
    add_config_args(p, DecodeConfig, exclude=("beta", "num_return_sequences"), title="decoding")
    p.set_defaults(handler=run)


def run(args) -> int:
    import json

    from qvlm.errors import QVLMError
    from qvlm.eval.metrics import distinct_n, evaluate_decoding, json_safe
    from qvlm.fileio import atomic_write_text
    from qvlm.mdp import read_prompts
    from qvlm.model import load_qv_model
    from qvlm.rewards import get_reward

    betas = parse_floats(args.betas, "--betas")
    if any(b != 0 for b in betas) and not args.heads:
        raise QVLMError("--betas other than 0 need --heads DIR (trained with `qvlm train ilql`)")
    prompts = read_prompts(args.prompts)
    if args.max_prompts > 0:
        prompts = prompts[: args.max_prompts]
    reward = get_reward(args.reward)
    model, tokenizer = load(args)
    heads = None
    if args.heads:
        qv = load_qv_model(model, args.heads)
        model, heads = qv.trunk, qv.heads
    policy = None
    if args.policy:
        from qvlm.algos.actor_critic import load_policy

        policy = load_policy(load(args)[0], args.policy)  # a second copy: the base stays the reference
    methods = {}
    print(f"{'method':<14} {'reward':>8} {'95% CI':>16} {'KL':>8} {'dist-1':>7} {'dist-2':>7} {'ppl':>8}")
    runs = [(beta, False) for beta in betas if policy is None or beta == 0] + [(b, True) for b in betas if policy]
    for beta, with_policy in runs:
        cfg = config_from_args(DecodeConfig, args, beta=beta)
        if with_policy:
            from qvlm.eval.policy import evaluate_policy_decoding

            metrics, texts, _ = evaluate_policy_decoding(policy, model, tokenizer, prompts, reward, heads, cfg)
            name = "policy" if beta == 0 else f"policy_beta_{beta:g}"
        else:
            metrics, result, _ = evaluate_decoding(model, tokenizer, prompts, reward, heads, cfg)
            texts = result.texts
            name = "base" if beta == 0 else f"guided_beta_{beta:g}"
        row = metrics.as_dict()
        row["distinct_1"] = distinct_n(texts, 1)
        methods[name] = row
        lo, hi = row["reward_mean"] - row["reward_ci95"], row["reward_mean"] + row["reward_ci95"]
        print(
            f"{name:<14} {row['reward_mean']:>8.4f} [{lo:>6.3f}, {hi:>6.3f}] {row['kl_to_base']:>8.3f} "
            f"{row['distinct_1']:>7.3f} {row['distinct_2']:>7.3f} {row['perplexity']:>8.2f}"
        )
    if args.json:
        atomic_write_text(
            args.json,
            json.dumps(json_safe({"reward": args.reward, "n_prompts": len(prompts), "methods": methods}), indent=2)
            + "\n",
        )
    return 0
