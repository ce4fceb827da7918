"""``qvlm eval``: mean reward (95% CI), KL to the base model and distinct-n, per guidance strength."""

from __future__ import annotations

import argparse

from qvlm.cli._common import (
    add_config_args,
    add_model_arg,
    check_count,
    check_non_negative,
    config_from_args,
    load,
    parse_floats,
)
from qvlm.cli._limits import check_tokens, check_total
from qvlm.configs import DecodeConfig
from qvlm.rewards import REWARD_HELP, check_reward


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate base vs guided decoding: reward with 95%% CI, KL to base, distinct-n",
        description="Decode the prompts at each --betas value (0 = the base model) and report the mean "
        "reward with a 95%% CI (Student t), the exact KL of the sampling distribution to the base "
        "model summed per response, distinct-1/2, and perplexity under the base model. With --best-of, "
        "also best-of-N by the reward, its KL estimated from each prompt's draws (marked ~).",
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
    p.add_argument("--reward", default="vader", help=REWARD_HELP + "; a per-token reward is summed")
    p.add_argument("--max-prompts", type=int, default=0, help="use only the first N prompts (0: all)")
    p.add_argument("--betas", default="0,1,2", help="comma-separated guidance strengths; 0 is the base model")
    p.add_argument(
        "--best-of",
        default="",
        help="also best-of-N by the reward for these N (e.g. 1,2,4,8,16,32), from max(N) base draws per prompt; "
        "its KL is estimated from each prompt's draws (kl_kind estimate); the JSON gains a 'frontier' block",
    )
    p.add_argument(
        "--samples-per-prompt",
        type=int,
        default=1,
        help="responses decoded per prompt for each method; the 95%% CI is then over the prompts' mean rewards",
    )
    p.add_argument("--json", help="write the metrics here as JSON (atomically)")
    add_config_args(p, DecodeConfig, exclude=("beta", "num_return_sequences"), title="decoding")
    p.set_defaults(handler=run)


def run(args) -> int:
    import json

    from qvlm.errors import QVLMError
    from qvlm.eval.metrics import evaluate_decoding, json_safe
    from qvlm.fileio import atomic_write_text, check_output_file
    from qvlm.jsonl import read_prompts
    from qvlm.model import load_qv_model
    from qvlm.rewards import as_sequence_reward, get_reward, needs_reference, read_references

    betas = parse_floats(args.betas, "--betas")
    raw_ns = parse_floats(args.best_of, "--best-of") if args.best_of else []
    if any(n < 1 or n != int(n) for n in raw_ns):
        raise QVLMError(f"--best-of {args.best_of}: give whole numbers >= 1, e.g. 1,2,4,8,16,32")
    ns = [int(n) for n in raw_ns]
    if any(b != 0 for b in betas) and not args.heads:
        raise QVLMError("--betas other than 0 need --heads DIR (trained with `qvlm train ilql`)")
    check_non_negative(args.max_prompts, "--max-prompts", "0: all")
    if args.samples_per_prompt < 1:
        raise QVLMError(f"--samples-per-prompt is {args.samples_per_prompt}; it must be at least 1")
    k = args.samples_per_prompt
    # every count that multiplies work, before the prompts are read and the model loads (issue 25)
    check_count(k, "--samples-per-prompt")
    if ns:
        check_count(max(ns), "--best-of")
    check_tokens(args.max_new_tokens)
    for beta in betas:  # every config is valid before any work
        config_from_args(DecodeConfig, args, beta=beta, num_return_sequences=k)
    if args.json:
        check_output_file(args.json, "--json", inputs=(args.prompts, args.heads, args.policy, args.model))
    prompts = read_prompts(args.prompts)
    if args.max_prompts > 0:
        prompts = prompts[: args.max_prompts]
    decodes = len(betas) * (2 if args.policy else 1)  # each beta: the base (or heads), and the policy
    best = max(ns, default=0)
    check_total(
        len(prompts) * (k * decodes + best),
        f"{len(prompts)} prompt(s) x ({k} --samples-per-prompt x {decodes} decoding run(s) + {best} --best-of draws)",
        advice="use fewer prompts (--max-prompts) or smaller counts",
    )
    references = read_references(args.prompts, f"reward {args.reward}") if needs_reference(args.reward) else None
    check_reward(args.reward)  # a bad reward fails before the model loads
    model, tokenizer = load(args)
    reward = get_reward(args.reward, references=references, tokenizer=tokenizer, device=model.device)
    reward = as_sequence_reward(reward, tokenizer)  # a per-token reward: its sum over the response
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
        cfg = config_from_args(DecodeConfig, args, beta=beta, num_return_sequences=k)
        if with_policy:
            from qvlm.eval.policy import evaluate_policy_decoding

            metrics, texts, _ = evaluate_policy_decoding(policy, model, tokenizer, prompts, reward, heads, cfg)
            name = "policy" if beta == 0 else f"policy_beta_{beta:g}"
        else:
            metrics, result, _ = evaluate_decoding(model, tokenizer, prompts, reward, heads, cfg)
            texts = result.texts
            name = "base" if beta == 0 else f"guided_beta_{beta:g}"
        from qvlm.eval.metrics import distinct_n

        row = metrics.as_dict()
        row["distinct_1"] = distinct_n(texts, 1)
        _print_row(name, methods.setdefault(name, row))
    if ns:
        from qvlm.eval.frontier import evaluate_best_of_n

        for n, row in evaluate_best_of_n(
            model, tokenizer, prompts, reward, ns, config_from_args(DecodeConfig, args)
        ).items():
            if n > 1:
                methods[f"best_of_{n}"] = row
                _print_row(f"best_of_{n}", row)
    payload = {"reward": args.reward, "n_prompts": len(prompts), "samples_per_prompt": k, "methods": methods}
    if ns:
        from qvlm.eval.frontier import build_frontier

        payload["frontier"] = build_frontier(methods)
    if args.json:
        atomic_write_text(args.json, json.dumps(json_safe(payload), indent=2) + "\n")
    return 0


def _print_row(name: str, row: dict) -> None:
    lo, hi = row["reward_mean"] - row["reward_ci95"], row["reward_mean"] + row["reward_ci95"]
    kl = {"estimate": "~", "bound": "<="}.get(row.get("kl_kind"), "")
    print(
        f"{name:<14} {row['reward_mean']:>8.4f} [{lo:>6.3f}, {hi:>6.3f}] {kl + format(row['kl_to_base'], '.3f'):>8} "
        f"{row.get('distinct_1', float('nan')):>7.3f} {row['distinct_2']:>7.3f} {row['perplexity']:>8.2f}"
    )
