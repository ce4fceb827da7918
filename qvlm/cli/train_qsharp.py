"""``qvlm train qsharp``: Q# (issue 22): learn the distribution of the reference policy's return from guided
roll-ins and reference roll-outs, then guide at any beta with Q*_alpha from one set of heads."""

from __future__ import annotations

from qvlm.cli._common import add_config_args, add_model_arg, config_from_args, load, online_inputs, online_reward
from qvlm.configs import QSharpConfig
from qvlm.rewards import REWARD_HELP

DESCRIPTION = (
    "Q# (Zhou et al. 2025): distributional heads Z(s, a) and Z(s) on a fixed support learn the law of the "
    "reference policy's return. Round 0 labels the reference policy's own samples (--initial, or decoded "
    "here); each later round rolls in with the current guided policy to a random cut point, rolls out with "
    "the reference policy, scores the response with --reward, and labels every reference step with the "
    "return; the heads fit all rounds by cross-entropy. Decode with the heads at any --beta: guidance "
    "reads Q*_alpha = alpha log E[exp(R/alpha)] at alpha = 1/beta, no retraining. The trunk stays frozen "
    "and each sample's features are computed once. Writes heads.safetensors, heads_config.json, "
    "training.json (with the reward calls and decoded tokens spent), replay.jsonl, metrics.jsonl, tb/ and "
    "checkpoint/ to --out. See docs/qsharp.md."
)


def register(algos) -> None:
    a = algos.add_parser("qsharp", help="Q#: return distributions for guidance at any beta", description=DESCRIPTION)
    add_model_arg(a)
    a.add_argument(
        "--prompts", required=True, help="prompt file: .txt (one per line), .jsonl (field 'prompt') or demo:train"
    )
    a.add_argument("--reward", default="vader", help=REWARD_HELP + "; a per-token reward is summed over the response")
    a.add_argument("--max-prompts", type=int, default=0, help="use only the first N prompts (0: all)")
    a.add_argument(
        "--initial",
        default="",
        help="round 0: a samples JSONL of the reference policy's complete responses (qvlm sample --fixed-horizon; "
        "every step is labelled) instead of decoding round 0 here",
    )
    a.add_argument("--out", required=True, help="run directory for heads, checkpoints, replay set and logs")
    a.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint (same settings and prompts)")
    a.add_argument(
        "--head-hidden", type=int, default=128, help="width of the heads' hidden layer (0: the trunk's hidden size)"
    )
    a.add_argument("--bins", type=int, default=51, help="atoms of the return distributions' support")
    a.add_argument("--support-low", type=float, default=-1.0, help="the lowest atom: at most the lowest return")
    a.add_argument("--support-high", type=float, default=1.0, help="the highest atom: at least the highest return")
    a.add_argument(
        "--dist-rank", type=int, default=64, help="rank of Z(s, a)'s state-token interaction (--dist-head bilinear)"
    )
    a.add_argument(
        "--dist-head",
        choices=("bilinear", "tilt"),
        default="bilinear",
        help="Z(s, a)'s form: bilinear (a rank --dist-rank form between the state and the candidate's output "
        "embedding) or tilt (Z(s) tilted by one tied scalar per token); docs/qsharp.md",
    )
    add_config_args(a, QSharpConfig, title="qsharp settings")
    a.set_defaults(handler=run)


def run(args) -> int:
    from pathlib import Path

    from qvlm.algos.qsharp import train_qsharp
    from qvlm.cli._common import check_non_negative
    from qvlm.cli._limits import check_count, check_tokens, check_total, check_width
    from qvlm.configs import TrunkConfig
    from qvlm.fileio import check_output_dir
    from qvlm.heads import HeadsConfig
    from qvlm.jsonl import read_samples
    from qvlm.model import QVModel
    from qvlm.train.distributed import check_divides, is_main_process
    from qvlm.train.rng import set_seed

    cfg = config_from_args(QSharpConfig, args)
    check_divides(cfg.prompts_per_round, "--prompts-per-round", "prompts")  # under a launcher: before the model loads
    check_non_negative(args.max_prompts, "--max-prompts", "0: all")
    check_width(args.head_hidden, "--head-hidden", "0: the trunk's hidden size")
    check_width(args.dist_rank, "--dist-rank")
    check_total(args.bins, f"--bins {args.bins:,}", "atoms")
    HeadsConfig(
        1,
        1,
        bins=args.bins,
        support_low=args.support_low,
        support_high=args.support_high,
        dist_rank=args.dist_rank,
        dist_head=args.dist_head,
    )  # checked before the model loads
    check_output_dir(args.out, "--out", inputs=(args.model, args.initial))
    # the work one run asks for, before the prompts are read and the model loads (issue 25)
    check_count(cfg.samples_per_prompt, "--samples-per-prompt")
    check_total(
        (cfg.rounds + 1) * cfg.prompts_per_round * cfg.samples_per_prompt,
        f"(--rounds {cfg.rounds:,} + 1) x --prompts-per-round {cfg.prompts_per_round:,} x --samples-per-prompt "
        f"{cfg.samples_per_prompt:,}",
        what="replay samples per run",
        advice="ask for fewer rounds or samples",
    )
    check_total(cfg.batch_size, f"--batch-size {cfg.batch_size:,}", "samples per gradient step", "ask for fewer")
    check_tokens(cfg.max_new_tokens)
    initial = read_samples(args.initial) if args.initial else None
    prompts, references = online_inputs(args, args.max_prompts)
    model, tokenizer = load(args)
    reward = online_reward(args, references, model, tokenizer)
    set_seed(cfg.seed)  # the heads' random initialisation: same seed, same heads
    qv = QVModel.from_trunk(
        model,
        TrunkConfig("frozen"),  # pi_ref is the trunk itself: it must not move
        head_hidden=args.head_hidden,
        base_model=args.model,
        bins=args.bins,
        support=(args.support_low, args.support_high),
        dist_rank=args.dist_rank,
        dist_head=args.dist_head,
    )
    history = train_qsharp(qv, tokenizer, prompts, reward, cfg, run_dir=Path(args.out), resume=args.resume,
                           initial=initial)  # fmt: skip
    rewards = [v for _, v in history.get("charts/guided_reward", [])]
    if is_main_process():  # rank 0 reports for the run
        calls = history.get("charts/reward_calls", [(0, 0)])[-1][1]
        print(
            f"trained qsharp for {cfg.rounds + 1} rounds on {len(prompts)} prompts ({calls:.0f} reward calls); roll-in "
            "reward per round "
            + " ".join(f"{r:.3f}" for r in rewards)
            + f"; heads in {args.out} (decode with any --beta)"
        )
    return 0
