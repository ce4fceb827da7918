"""``qvlm inspect``: a per-token value map of any text under trained heads, or V per turn of an episode."""

from __future__ import annotations

import argparse

from qvlm.cli._common import add_model_arg, load


def register(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="per-token value map of a text: V(s_t) and the advantage Q - V of each token",
        description="Score TEXT as a response to PROMPT with trained heads: for each token, V(s_t) (the "
        "reward expected from the prefix before it) and Q(s_t, y_t) - V(s_t) (how much writing it "
        "raised or lowered that expectation). Prints a table; --out writes an HTML map.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arg(p)
    p.add_argument("--heads", required=True, help="run directory with heads.safetensors (ilql, or value)")
    p.add_argument("--text", action="append", help="the response text to score (repeatable)")
    p.add_argument("--prompt", default="Write one sentence.", help="the prompt the text answers")
    p.add_argument("--out", help="write a self-contained HTML value map here")
    p.add_argument(
        "--episodes",
        help="instead of --text: an episodes JSONL (qvlm sample --env); prints V before each turn of an episode, "
        "V after it, the reward and the discounted return that followed (docs/envs.md)",
    )
    p.add_argument("--episode", type=int, default=1, help="with --episodes: which episode (1-based line order)")
    p.add_argument("--gamma", type=float, default=1.0, help="with --episodes: discount per action token of the return")
    p.set_defaults(handler=run)


def run_episode(args) -> int:
    """``qvlm inspect --episodes FILE``: V per turn of one episode."""
    from qvlm.envs.episodes import read_episodes
    from qvlm.envs.values import episode_turn_values
    from qvlm.errors import QVLMError
    from qvlm.loading import context_length
    from qvlm.model import load_qv_model

    if args.text or args.out:
        raise QVLMError("--episodes shows V per turn of an episode; drop --text and --out")
    if not 0 <= args.gamma <= 1:
        raise QVLMError(f"--gamma is {args.gamma}; it must be in [0, 1]")
    episodes = read_episodes(args.episodes)
    if not 1 <= args.episode <= len(episodes):
        raise QVLMError(f"--episode is {args.episode}; {args.episodes} holds episodes 1 to {len(episodes)}")
    episode = episodes[args.episode - 1]
    model, tokenizer = load(args)
    limit = context_length(model.config)
    if limit and len(episode.token_ids) > limit:
        raise QVLMError(
            f"{episode.where}: {len(episode.token_ids)} tokens exceed the model's context of {limit}; "
            "pass the --model the episodes were sampled with"
        )
    if max(episode.token_ids) >= model.get_output_embeddings().weight.shape[0]:
        raise QVLMError(f"{episode.where}: token ids outside this model's vocabulary; pass the --model that sampled it")
    qv = load_qv_model(model, args.heads)
    rows = episode_turn_values(qv, tokenizer, episode, args.gamma)
    end = "terminated" if episode.terminated else "truncated"
    print(
        f"episode {args.episode} of {args.episodes}: {episode.env}, seed {episode.seed}, {episode.policy or 'policy ?'}, "
        f"return {episode.total_return:.3f} ({end})"
    )
    print(f"  {'':6} {'V(s)':>8} {'reward':>8} {'G_t':>8} {'V after':>8} {'Q-V':>8}  observation -> action")
    for r in rows:
        after = "-" if r["value_after"] is None else f"{r['value_after']:.3f}"
        adv = "-" if r["advantage"] is None else f"{r['advantage']:.3f}"
        obs = " ".join(r["observation"].split())
        obs = obs if len(obs) <= 40 else obs[:37] + "..."
        print(
            f"  turn {r['turn']:<2}{r['value']:>7.3f} {r['reward']:>8.3f} {r['return_to_go']:>8.3f} {after:>8} "
            f"{adv:>8}  {obs!r} -> {r['action']!r}"
        )
    return 0


def run(args) -> int:
    from qvlm.errors import QVLMError
    from qvlm.eval.valuemap import value_maps
    from qvlm.fileio import check_output_file
    from qvlm.loading import context_length
    from qvlm.mdp import check_fits, encode_prompt
    from qvlm.model import load_qv_model

    if args.episodes is not None:
        return run_episode(args)
    if not args.text:
        raise QVLMError("give --text TEXT (a response to score) or --episodes FILE (V per turn of an episode)")
    if not args.prompt.strip():
        raise QVLMError("--prompt is empty; give the prompt the text answers")
    if args.out:
        check_output_file(args.out, "--out", inputs=(args.heads, args.model))
    model, tokenizer = load(args)
    qv = load_qv_model(model, args.heads)
    limit = context_length(model.config) or 1 << 30
    prompt_len = len(encode_prompt(tokenizer, args.prompt))
    for i, text in enumerate(args.text):  # the text, its EOS step and the prompt must fit in the context
        what = f"--text {i + 1}"
        check_fits(tokenizer, text, limit - prompt_len - 1, what, "shorten --prompt")
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
        if prompt_len + n > limit:
            raise QVLMError(
                f"{what} has {n} tokens (with its EOS); with the prompt's {prompt_len} that exceeds the model's "
                f"context of {limit}; shorten it or the prompt"
            )
    maps = value_maps(qv, tokenizer, [args.prompt] * len(args.text), args.text, max_length=limit)
    for m in maps:
        print(f"{'token':<16} {'V(s_t)':>8} {'Q-V':>8}")
        for tok, v, a in zip(m["tokens"], m["values"], m["advantages"]):
            bar = ("+" * min(20, int(abs(a) * 40))) if a > 0 else ("-" * min(20, int(abs(a) * 40)))
            print(f"{tok!r:<16} {v:>8.3f} {a:>8.3f} {bar}")
        print()
    if args.out:
        from qvlm.report import render_value_map_page

        render_value_map_page(args.out, title=f"qvlm inspect: {args.heads}", value_maps=maps)
        print(f"wrote {args.out}")
    return 0
