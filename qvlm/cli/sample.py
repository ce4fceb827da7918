"""``qvlm sample``: responses for a prompt file, scored by a reward, into samples.jsonl; or, with
``--env``, multi-turn episodes of an environment into episodes.jsonl (docs/envs.md)."""

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
from qvlm.envs.policies import DEFAULT_EPSILON, POLICY_KINDS
from qvlm.rewards import REWARD_HELP, check_reward


def register(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="sample responses from the base model and score them (-> samples.jsonl)",
        description="Sample N responses per prompt from the base model, score each with a reward, and "
        "write one JSON line per response: {prompt, response, reward, finished, response_ids} (the exact "
        "tokens sampled). This is the offline data for `qvlm train`. Each prompt is prefilled once for "
        "its N responses. With --env NAME instead of --prompts: episodes of a text environment played by the "
        "base model or a scripted policy, one JSON line per episode (turns, exact token ids, action mask, "
        "rewards, env and seed, return; docs/envs.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arg(p)
    p.add_argument("--prompts", help="prompt file: .txt (one per line) or .jsonl (field 'prompt')")
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
    env = p.add_argument_group("environments (instead of --prompts; docs/envs.md)")
    env.add_argument(
        "--env", help="environment name, e.g. qvlm/GuessTheNumber-v0 or Maze-v0 (the qvlm/ may be left out)"
    )
    env.add_argument("--episodes", type=int, default=16, help="episodes to play (default: %(default)s)")
    env.add_argument(
        "--policy",
        default="base",
        choices=("base",) + POLICY_KINDS,
        help="who plays: the base model, the scripted optimal player, the noisy one (epsilon-random "
        "actions) or the random one (default: %(default)s)",
    )
    env.add_argument("--epsilon", type=float, default=DEFAULT_EPSILON, help="noisy policy: the random-action rate")
    env.add_argument("--env-seed", type=int, default=0, help="episode i is reset with seed env-seed + i")
    add_env_arg(env)
    env.add_argument(
        "--heads",
        help="--policy base, guided by trained heads (a `qvlm train ilql|value --episodes` run): --beta guides "
        "each token by Q - V, --candidates picks each turn's reply by Q",
    )
    env.add_argument("--beta", type=float, default=0.0, help="with --heads: token-level guidance strength on Q - V")
    env.add_argument(
        "--candidates",
        type=int,
        default=1,
        help="with --heads: decode this many replies per turn and keep the one with the highest Q at its last "
        "token (turn-level guidance; default: %(default)s, off)",
    )
    add_config_args(p, DecodeConfig, exclude=("beta", "do_sample", "num_return_sequences"), title="decoding")
    p.set_defaults(handler=run)


def add_env_arg(group) -> None:
    """``--env-arg KEY=VALUE`` (repeatable), read by :func:`parse_env_args`."""
    group.add_argument(
        "--env-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an argument of the environment (repeatable; VALUE as JSON, else a string), e.g. n=30",
    )


def parse_env_args(items: list[str]) -> dict:
    """``["n=30", "layout=..."]`` -> ``{"n": 30, "layout": "..."}`` (values as JSON, else strings)."""
    import json

    from qvlm.errors import QVLMError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise QVLMError(f"--env-arg {item!r}: give KEY=VALUE, e.g. --env-arg n=30")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def run_env(args) -> int:
    """``qvlm sample --env``: episodes of a policy in an environment, as multi-turn JSONL."""
    import math

    from qvlm.envs import make, optimal_and_random, scripted_policy
    from qvlm.envs.episodes import write_episodes
    from qvlm.envs.rollout import run_lm, run_scripted
    from qvlm.envs.scores import score_summary
    from qvlm.errors import QVLMError
    from qvlm.fileio import check_output_file

    check_count(args.episodes, "--episodes")
    check_output_file(args.out, "--out", inputs=tuple(x for x in (args.model, args.heads) if x))
    kwargs = parse_env_args(args.env_arg)
    env = make(args.env, **kwargs)  # an unknown name or argument fails before the model loads
    if args.policy != "base":
        scripted_policy(env, args.policy, args.epsilon)
    guided = args.heads is not None
    if (args.beta != 0 or args.candidates != 1) and not guided:
        raise QVLMError("--beta and --candidates guide the base model with trained heads: pass --heads DIR")
    if guided and args.policy != "base":
        raise QVLMError(f"--heads guides the base model; drop --policy {args.policy}")
    if not math.isfinite(args.beta):
        raise QVLMError(f"--beta is {args.beta}; give a finite number")
    if not 1 <= args.candidates <= 64:
        raise QVLMError(f"--candidates is {args.candidates}; give 1 to 64 replies per turn")
    cfg = config_from_args(DecodeConfig, args, do_sample=True, num_return_sequences=1, beta=args.beta)
    model, tokenizer = load(args)
    seeds = range(args.env_seed, args.env_seed + args.episodes)
    if args.policy == "base":
        heads = None
        if guided:
            from qvlm.model import load_qv_model

            heads = load_qv_model(model, args.heads).heads
            if args.candidates > 1 and not heads.has_q:
                raise QVLMError(
                    f"--candidates picks replies by Q, but {args.heads} has no Q heads (train value --with-q)"
                )
            if args.beta != 0 and not heads.has_q:
                raise QVLMError(f"--beta guides by Q - V, but {args.heads} has no Q heads (train value --with-q)")
        label = "base" if not guided else f"guided(beta={args.beta:g}, candidates={args.candidates})"
        episodes = run_lm(
            model, tokenizer, args.env, seeds, cfg, heads=heads, env_kwargs=kwargs, sample_seed=cfg.seed or 0,
            progress=True, policy_name=label, candidates=args.candidates,
        )  # fmt: skip
    else:
        episodes = run_scripted(args.env, seeds, args.policy, args.epsilon, tokenizer, cfg.chat, kwargs)
    write_episodes(args.out, episodes)
    optimal, random = optimal_and_random(env)
    s = score_summary([e.total_return for e in episodes], random, optimal)
    who = episodes[0].policy if guided else args.policy
    line = f"wrote {len(episodes)} episodes of {episodes[0].env} ({who}) to {args.out}; "
    line += f"mean return {s['mean_return']:.4f} +- {s['ci95']:.4f} (95% CI)"
    if "normalised" in s:
        line += f"; normalised {s['normalised']:.1f} +- {s['normalised_ci95']:.1f} (optimal {optimal:.4f}, random {random:.4f}, exact)"
    print(line)
    return 0


def run(args) -> int:
    from qvlm.errors import QVLMError

    if (args.env is None) == (args.prompts is None):
        raise QVLMError("give --prompts FILE (single-turn samples) or --env NAME (episodes), one of them")
    if args.env is not None:
        return run_env(args)
    from qvlm.decoding import generate
    from qvlm.fileio import check_output_file
    from qvlm.jsonl import read_prompts, write_samples
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
