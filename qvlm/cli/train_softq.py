"""``qvlm train softq``: online soft Q-learning for a language model (issue 10): sample with the
current guided policy, score, keep every round, fit Q/V toward the soft Bellman target."""

from __future__ import annotations

from qvlm.cli._common import add_config_args, add_model_arg, config_from_args, load, online_inputs, online_reward
from qvlm.configs import SoftQConfig
from qvlm.rewards import REWARD_HELP

DESCRIPTION = (
    "Online soft Q-learning: rounds of (decode prompts with the current guided policy "
    "log pi_ref + (Q - V)/alpha; score each response with --reward; add them to a replay set that keeps "
    "every round; fit Q toward r + gamma (1 - done) alpha log sum_a pi_ref(a|s') exp(Qbar(s', a)/alpha) "
    "over the full vocabulary, Qbar the Polyak target heads, and V toward the soft value of Qbar). The "
    "trunk stays frozen by default and each sample's features are computed once. Writes "
    "heads.safetensors, heads_config.json, training.json, replay.jsonl, metrics.jsonl, tb/ and "
    "checkpoint/ to --out; decode with the heads at --beta 1/alpha. See docs/softq.md."
)


def register(algos) -> None:
    a = algos.add_parser(
        "softq", help="online soft Q-learning from the guided policy's own samples", description=DESCRIPTION
    )
    add_model_arg(a)
    a.add_argument(
        "--prompts", required=True, help="prompt file: .txt (one per line), .jsonl (field 'prompt') or demo:train"
    )
    a.add_argument("--reward", default="vader", help=REWARD_HELP + "; a per-token reward is summed over the response")
    a.add_argument("--max-prompts", type=int, default=0, help="use only the first N prompts (0: all)")
    a.add_argument("--out", required=True, help="run directory for heads, checkpoints, replay set and logs")
    a.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint (same settings and prompts)")
    a.add_argument(
        "--head-hidden", type=int, default=0, help="width of the heads' hidden layer (0: the trunk's hidden size)"
    )
    a.add_argument(
        "--q-head",
        choices=["tied", "mlp"],
        default="tied",
        help="tied: Q(s,a) = e_a . g(h) + b_a on the LM's frozen output embedding (the full-vocabulary soft "
        "value is one matrix product); mlp: own vocabulary-sized output layer",
    )
    add_config_args(a, SoftQConfig, title="softq settings")
    a.set_defaults(handler=run)


def run(args) -> int:
    from pathlib import Path

    from qvlm.algos.softq import train_softq
    from qvlm.cli._common import check_non_negative
    from qvlm.cli._limits import check_count, check_tokens, check_total, check_width
    from qvlm.configs import TrunkConfig
    from qvlm.fileio import check_output_dir
    from qvlm.model import QVModel
    from qvlm.train.distributed import check_divides, is_main_process
    from qvlm.train.rng import set_seed

    cfg = config_from_args(SoftQConfig, args)
    check_divides(cfg.prompts_per_round, "--prompts-per-round", "prompts")  # under a launcher: before the model loads
    check_non_negative(args.max_prompts, "--max-prompts", "0: all")
    check_width(args.head_hidden, "--head-hidden", "0: the trunk's hidden size")
    check_output_dir(args.out, "--out", inputs=(args.model,))
    # the work one run asks for, before the prompts are read and the model loads (issue 25): every round's
    # samples stay in the replay set, and each gradient step draws --batch-size of them
    check_count(cfg.samples_per_prompt, "--samples-per-prompt")
    check_total(
        cfg.prompts_per_round * cfg.samples_per_prompt,
        f"--prompts-per-round {cfg.prompts_per_round:,} x --samples-per-prompt {cfg.samples_per_prompt:,}",
        "responses per round",
    )
    check_total(
        cfg.rounds * cfg.prompts_per_round * cfg.samples_per_prompt,
        f"--rounds {cfg.rounds:,} x --prompts-per-round {cfg.prompts_per_round:,} x --samples-per-prompt "
        f"{cfg.samples_per_prompt:,}",
        what="replay samples per run",
        advice="ask for fewer rounds or samples",
    )
    check_total(cfg.batch_size, f"--batch-size {cfg.batch_size:,}", "samples per gradient step", "ask for fewer")
    check_tokens(cfg.max_new_tokens)
    prompts, references = online_inputs(args, args.max_prompts)
    out = Path(args.out)
    model, tokenizer = load(args)
    reward = online_reward(args, references, model, tokenizer)
    set_seed(cfg.seed)  # the heads' random initialisation: same seed, same heads
    qv = QVModel.from_trunk(
        model,
        TrunkConfig(mode="frozen"),  # pi_ref is the trunk itself: it must not move (LoRA: not yet)
        num_q_heads=1,
        head_hidden=args.head_hidden,
        base_model=args.model,
        q_head=args.q_head,
    )
    history = train_softq(qv, tokenizer, prompts, reward, cfg, run_dir=out, resume=args.resume)
    rewards = [v for _, v in history.get("charts/guided_reward", [])]
    if rewards and is_main_process():  # rank 0 reports for the run
        print(
            f"trained softq for {cfg.rounds} rounds on {len(prompts)} prompts; guided reward per round "
            + " ".join(f"{r:.3f}" for r in rewards)
            + f"; heads in {out} (decode with --beta {1 / cfg.alpha:g})"
        )
    return 0
