"""``qvlm train ppo``: online actor-critic (PPO or A2C) on a causal LM toward a reward."""

from __future__ import annotations

from qvlm.cli._common import add_config_args, add_model_arg, config_from_args, load, online_inputs, online_reward
from qvlm.cli.sample import add_env_arg
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
        "--prompts", help="training prompts: .txt (one per line), .jsonl (field 'prompt') or demo:train (single-turn)"
    )
    a.add_argument("--reward", help=REWARD_HELP + "; a per-token reward is summed over the response (single-turn)")
    env = a.add_argument_group(
        "environments (instead of --prompts and --reward: multi-turn episodes, GAE across turns; docs/envs.md)"
    )
    env.add_argument("--env", help="environment name, e.g. GuessTheNumber-v0 or Maze-v0 (the qvlm/ may be left out)")
    add_env_arg(env)
    env.add_argument(
        "--env-seed",
        type=int,
        default=0,
        help="first training seed: iteration i plays seeds env-seed + i * prompts-per-iter ... (default: %(default)s)",
    )
    env.add_argument(
        "--max-turns", type=int, default=1000, help="turns after which an episode is cut (default: %(default)s)"
    )
    a.add_argument("--out", required=True, help="run directory for the policy, critic, checkpoints and logs")
    a.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint (same settings)")
    add_config_args(a, PPOConfig, title="ppo settings")
    a.set_defaults(handler=run, config_cls=PPOConfig)


def run(args) -> int:
    from pathlib import Path

    from qvlm.algos.actor_critic import ActorCritic
    from qvlm.algos.ppo import train_ppo
    from qvlm.cli._limits import check_count, check_tokens, check_total, check_width
    from qvlm.errors import QVLMError
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
    if args.env is not None:
        return run_env(args, cfg)
    if args.prompts is None or args.reward is None:
        raise QVLMError("give --prompts FILE and --reward NAME (single-turn), or --env NAME (an environment)")
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


def run_env(args, cfg) -> int:
    """``qvlm train ppo --env NAME``: PPO in a multi-turn environment (:mod:`qvlm.algos.ppo_env`)."""
    from pathlib import Path

    from qvlm.algos.actor_critic import ActorCritic
    from qvlm.algos.ppo_env import train_ppo_env
    from qvlm.cli.sample import parse_env_args
    from qvlm.envs import make
    from qvlm.errors import QVLMError
    from qvlm.train.rng import set_seed

    if args.prompts is not None or args.reward is not None:
        raise QVLMError("--env plays an environment, whose rewards are its own: drop --prompts and --reward")
    if not 1 <= args.max_turns <= 1000:
        raise QVLMError(f"--max-turns is {args.max_turns}; give 1 to 1000 turns per episode")
    kwargs = parse_env_args(args.env_arg)
    make(args.env, **kwargs)  # an unknown name or argument fails before the model loads
    model, tokenizer = load(args)
    set_seed(cfg.seed)  # the V head's initialisation
    ac = ActorCritic(model, cfg.trunk, cfg.critic, cfg.head_hidden, base_model=args.model)
    if cfg.critic_init:
        ac.init_critic_from(cfg.critic_init)
    history = train_ppo_env(
        ac, tokenizer, args.env, cfg, kwargs, args.env_seed, args.max_turns, run_dir=Path(args.out), resume=args.resume
    )
    last = {k.split("/")[-1]: v[-1][1] for k, v in history.items() if k in ("charts/return", "charts/kl")}
    print(
        f"trained {cfg.algo} for {cfg.iterations} iterations in {args.env} (seeds {args.env_seed} to "
        f"{args.env_seed + cfg.iterations * cfg.prompts_per_iter - 1}); policy in {args.out}; last "
        + ", ".join(f"{k}={v:.4f}" for k, v in last.items())
    )
    return 0
