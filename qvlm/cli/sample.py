"""``qvlm sample``: responses for a prompt file, scored by a reward, into samples.jsonl."""

from __future__ import annotations

import argparse

from qvlm.cli._common import (
    add_config_args,
    add_model_arg,
    check_count,
    check_non_negative,
    config_from_args,
    load,
)
from qvlm.cli._limits import check_tokens
from qvlm.configs import DecodeConfig
from qvlm.rewards import REWARD_HELP, check_reward


def register(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="sample responses from the base model and score them (-> samples.jsonl)",
        description="Sample N responses per prompt from the base model, score each with a reward, and "
        "write one JSON line per response: {prompt, response, reward, finished, response_ids} (the exact "
        "tokens sampled). This is the offline data for `qvlm train`. Each prompt is prefilled once for "
        "its N responses.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arg(p)
    p.add_argument("--prompts", required=True, help="prompt file: .txt (one per line) or .jsonl (field 'prompt')")
    p.add_argument("--reward", default="vader", help=REWARD_HELP)
    p.add_argument("--max-prompts", type=int, default=0, help="use only the first N prompts (0: all)")
    p.add_argument("--n", type=int, default=4, help="responses per prompt")
    p.add_argument("--out", default="samples.jsonl", help="output JSONL (written atomically)")
    p.add_argument(
        "--fixed-horizon",
        action="store_true",
        help="the reward scores exactly the first max_new_tokens tokens, so a response cut there "
        "ends its episode (terminal) instead of being truncated (bootstrapped past)",
    )
    add_config_args(p, DecodeConfig, exclude=("beta", "do_sample", "num_return_sequences"), title="decoding")
    p.set_defaults(handler=run)


def run(args) -> int:
    from qvlm.decoding import generate
    from qvlm.fileio import check_output_file
    from qvlm.mdp import read_prompts, write_samples
    from qvlm.rewards import (
        get_reward,
        is_token_level,
        needs_reference,
        read_references,
        response_tokens,
        score,
        score_tokens,
    )
    from qvlm.rollout import rollout_to_samples

    check_count(args.n, "--n")
    check_tokens(args.max_new_tokens)
    check_non_negative(args.max_prompts, "--max-prompts", "0: all")
    check_output_file(args.out, "--out", inputs=(args.prompts, args.model))
    cfg = config_from_args(DecodeConfig, args, do_sample=True, num_return_sequences=args.n)
    prompts = read_prompts(args.prompts)
    if args.max_prompts > 0:
        prompts = prompts[: args.max_prompts]
    check_count(args.n, "--n", len(prompts))
    name = f"reward {args.reward}"
    references = read_references(args.prompts, name) if needs_reference(args.reward) else None
    check_reward(args.reward)  # a bad reward fails before the model loads
    model, tokenizer = load(args)
    reward = get_reward(args.reward, references=references, tokenizer=tokenizer, device=model.device)
    repeated = [p for p in prompts for _ in range(args.n)]
    result = generate(model, tokenizer, prompts, cfg=cfg, progress=True)
    if is_token_level(reward):  # per-token rewards on the sampled tokens (EOS excluded): token_rewards
        ids = [i[:-1] if f else i for i, f in zip(result.response_ids, result.finished)]
        token_rewards = score_tokens(reward, repeated, response_tokens(tokenizer, ids), name=name)
        samples = rollout_to_samples(result, tokenizer, prompts, [0.0] * len(ids), fixed_horizon=args.fixed_horizon)
        for s, row in zip(samples, token_rewards):
            s.token_rewards = row
        rewards = [sum(row) for row in token_rewards]
    else:
        rewards = score(reward, repeated, result.texts, name=name)
        samples = rollout_to_samples(result, tokenizer, prompts, rewards, fixed_horizon=args.fixed_horizon)
    write_samples(args.out, samples)
    mean = sum(rewards) / len(rewards)
    print(f"wrote {len(samples)} samples ({len(prompts)} prompts x {args.n}) to {args.out}; mean reward {mean:.4f}")
    return 0
