"""``qvlm train ppo``: online actor-critic (PPO or A2C) on a causal LM toward a reward."""

from __future__ import annotations

from qvlm.cli._common import add_config_args, add_model_arg, config_from_args, load, online_inputs, online_reward
from qvlm.configs import PPOConfig
from qvlm.rewards import REWARD_HELP


def register(algos) -> None:
    text = "PPO (or --algo a2c) with a V critic: sample, score, update the policy and critic online"
    a = algos.add_parser(
        "ppo",
        help=text,
        description=text + ". Writes adapter/ (peft) or policy.safetensors, heads.safetensors (the V head), "
        "training.json, metrics.jsonl, tb/ and checkpoint/ to --out. See docs/ppo.md.",
    )
    add_model_arg(a)
    a.add_argument(
        "--prompts", required=True, help="training prompts: .txt (one per line), .jsonl (field 'prompt') or demo:train"
    )
    a.add_argument("--reward", required=True, help=REWARD_HELP + "; a per-token reward is summed over the response")
    a.add_argument("--out", required=True, help="run directory for the policy, critic, checkpoints and logs")
    a.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint (same settings)")
    add_config_args(a, PPOConfig, title="ppo settings")
    a.set_defaults(handler=run, config_cls=PPOConfig)


def run(args) -> int:
    from pathlib import Path

    from qvlm.algos.actor_critic import ActorCritic
    from qvlm.algos.ppo import train_ppo
    from qvlm.cli._limits import check_count, check_tokens, check_total, check_width
    from qvlm.fileio import check_output_dir
    from qvlm.train.distributed import accelerate_fsdp, check_divides, check_fsdp, is_main_process
    from qvlm.train.rng import set_seed
    from qvlm.train.zero import accelerate_deepspeed, check_deepspeed

    # `accelerate launch` with an FSDP config (examples/accelerate/fsdp.yaml) asks for --fsdp, with a
    # DeepSpeed one (examples/accelerate/deepspeed_zero2.yaml) for --deepspeed zero2
    args.fsdp, args.deepspeed = args.fsdp or accelerate_fsdp(), args.deepspeed or accelerate_deepspeed()
    cfg = config_from_args(PPOConfig, args)
    check_divides(cfg.prompts_per_iter, "--prompts-per-iter", "prompts")  # under a launcher: before the model loads
    check_fsdp(cfg.trunk.fsdp)
    check_deepspeed(cfg.deepspeed)
    check_output_dir(args.out, "--out", inputs=(args.model, cfg.critic_init))
    # the work one run asks for, before the prompts are read and the model loads (issue 25)
    check_count(cfg.responses_per_prompt, "--responses-per-prompt")
    check_total(
        cfg.prompts_per_iter * cfg.responses_per_prompt,
        f"--prompts-per-iter {cfg.prompts_per_iter:,} x --responses-per-prompt {cfg.responses_per_prompt:,}",
        "responses per iteration",
    )
    check_total(
        cfg.iterations * cfg.prompts_per_iter * cfg.responses_per_prompt,
        f"--iterations {cfg.iterations:,} x --prompts-per-iter {cfg.prompts_per_iter:,} x --responses-per-prompt "
        f"{cfg.responses_per_prompt:,}",
        advice="ask for fewer iterations or responses",
    )
    check_tokens(cfg.max_new_tokens)
    check_width(cfg.head_hidden, "--head-hidden", "0: the trunk's hidden size")
    check_width(cfg.trunk.lora_r, "--lora-r")
    prompts, references = online_inputs(args)
    out = Path(args.out)
    model, tokenizer = load(args)
    reward = online_reward(args, references, model, tokenizer)
    set_seed(cfg.seed)  # the V head's initialisation
    ac = ActorCritic(model, cfg.trunk, cfg.critic, cfg.head_hidden, base_model=args.model)
    if cfg.critic_init:
        ac.init_critic_from(cfg.critic_init)
    history = train_ppo(ac, tokenizer, prompts, reward, cfg, run_dir=out, resume=args.resume)
    if not is_main_process():
        return 0  # rank 0 reports for the run
    last = {k.split("/")[-1]: v[-1][1] for k, v in history.items() if k in ("charts/reward", "charts/kl")}
    print(
        f"trained {cfg.algo} for {cfg.iterations} iterations on {len(prompts)} prompts; policy in {out}; last "
        + ", ".join(f"{k}={v:.4f}" for k, v in last.items())
    )
    return 0
