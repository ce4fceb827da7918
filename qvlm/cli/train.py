"""``qvlm train ilql|value|ppo``: train Q/V heads (ILQL) or a prefix scorer V from samples.jsonl (or multi-turn
episodes.jsonl, ``--episodes``); ppo: online."""

from __future__ import annotations

from qvlm.cli._common import add_config_args, add_model_arg, config_from_args, load
from qvlm.configs import ILQLConfig, TrunkConfig, ValueConfig


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train Q/V heads offline (ilql), a prefix scorer V (value), a policy online (ppo), online soft Q "
        "(softq) or a reward model (rm)",
        description="Train heads on a causal LM from scored samples (samples.jsonl from `qvlm sample`), "
        "a policy online with PPO / A2C (ppo), online soft Q heads from prompts and a reward (softq), "
        "or a reward model / classifier from labelled texts or preference pairs (rm).",
    )
    algos = p.add_subparsers(
        dest="algorithm", metavar="ALGORITHM", required=True, help="what to train (qvlm train ALGORITHM --help)"
    )
    for name, cls, text in (
        ("ilql", ILQLConfig, "ILQL: twin Q heads + V head (expectile) + target Q heads, offline"),
        ("value", ValueConfig, "prefix scorer: V regressed on Monte-Carlo returns or TD targets"),
    ):
        a = algos.add_parser(
            name,
            help=text,
            description=text + ". Writes heads.safetensors, "
            "heads_config.json, training.json, metrics.jsonl, tb/ and checkpoint/ to --out.",
        )
        add_model_arg(a)
        data = a.add_mutually_exclusive_group(required=True)
        data.add_argument("--data", help="samples JSONL: {prompt, response, reward[, token_rewards, finished]}")
        data.add_argument(
            "--episodes",
            help="multi-turn episodes JSONL from `qvlm sample --env` (exact token ids and action masks; the "
            "environment's tokens are observations, masked out of every loss; docs/envs.md)",
        )
        a.add_argument("--out", required=True, help="run directory for heads, checkpoints and logs")
        a.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint (same settings)")
        a.add_argument(
            "--head-hidden", type=int, default=0, help="width of the heads' hidden layer (0: the trunk's hidden size)"
        )
        a.add_argument(
            "--q-head",
            choices=["mlp", "tied"],
            default="mlp",
            help="mlp: own vocabulary-sized output layer (trlx); tied: Q(s,a) = e_a . g(h) + b_a on "
            "the LM's frozen output embedding (learns from little data)",
        )
        if name == "value":
            a.add_argument(
                "--with-q",
                action="store_true",
                help="also train Q heads, regressed on the return or on V of the next prefix "
                "(--q-target), usable for token-level guidance with `qvlm generate --beta`",
            )
        add_config_args(a, TrunkConfig, title="trunk")
        add_config_args(a, cls, title=f"{name} settings")
        a.set_defaults(handler=run, config_cls=cls)
    _register_rm(algos)
    from qvlm.cli.train_softq import register as register_softq  # online: prompts and a reward, not --data

    register_softq(algos)
    from qvlm.cli.train_qsharp import register as register_qsharp  # online: guided roll-ins, reference roll-outs

    register_qsharp(algos)
    from qvlm.cli.train_ppo import register as register_ppo

    register_ppo(algos)  # online: qvlm train ppo (issue 9)


def _register_rm(algos) -> None:
    from qvlm.configs import DEVICES_HELP, RewardModelConfig

    a = algos.add_parser(
        "rm",
        help="a reward model (preference pairs, Bradley-Terry) or a classifier (labelled texts)",
        description="Train a sequence-classification head (and its backbone: an encoder or causal LM "
        "directory, default the packaged all-MiniLM-L6-v2) on labelled texts {text, label} (cross-entropy) "
        "or preference pairs {prompt, chosen, rejected} (Bradley-Terry). --out becomes a sequence-"
        "classification directory usable as --reward hf:OUT, with eval.json (held-out accuracy, "
        "calibration), calibration.svg, metrics.jsonl, tb/ and checkpoint/.",
    )
    a.add_argument("--data", required=True, help="JSONL: {text, label} per line, or {prompt, chosen, rejected}")
    a.add_argument("--out", required=True, help="run directory: the trained classifier, its evaluation and logs")
    a.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint (same settings and data)")
    a.add_argument("--device", default="auto", help=f"where it trains: {DEVICES_HELP} (default: %(default)s)")
    add_config_args(a, RewardModelConfig, title="reward model settings")
    a.set_defaults(handler=run_rm)


def run_rm(args) -> int:
    from pathlib import Path

    from transformers.utils import logging as hf_logging

    from qvlm.algos.reward_model import read_rm_data, train_reward_model
    from qvlm.configs import RewardModelConfig
    from qvlm.errors import QVLMError
    from qvlm.fileio import check_output_dir
    from qvlm.train.checkpoint import has_checkpoint
    from qvlm.train.distributed import accelerate_fsdp, check_fsdp

    hf_logging.disable_progress_bar()  # transformers' per-file bars; qvlm shows its own
    # `accelerate launch` with an FSDP config (examples/accelerate/fsdp.yaml) asks for --fsdp
    args.fsdp = args.fsdp or accelerate_fsdp()
    cfg = config_from_args(RewardModelConfig, args)
    check_fsdp(cfg.fsdp)  # one process: refused before the data and the backbone load
    check_output_dir(args.out, "--out", inputs=(args.backbone,))
    data = read_rm_data(args.data)
    out = Path(args.out)
    if (out / "eval.json").exists() and not args.resume:
        raise QVLMError(f"{out} already holds a reward model; pass --resume to continue it or choose a new --out")
    if args.resume and not has_checkpoint(out):
        raise QVLMError(f"{out}: no checkpoint to resume; run without --resume to start fresh")
    train_reward_model(data, cfg, out, resume=args.resume, device=args.device)
    return 0


def run(args) -> int:
    import os
    from pathlib import Path

    from qvlm.algos.ilql import train_ilql
    from qvlm.algos.value import train_value
    from qvlm.cli._limits import check_width
    from qvlm.errors import QVLMError
    from qvlm.fileio import check_output_dir
    from qvlm.jsonl import read_samples
    from qvlm.model import QVModel
    from qvlm.train.distributed import accelerate_fsdp, check_batch_size, check_fsdp
    from qvlm.train.rng import set_seed

    # `accelerate launch` with an FSDP config (examples/accelerate/fsdp.yaml) asks for --fsdp
    args.fsdp = args.fsdp or accelerate_fsdp()
    cfg = config_from_args(args.config_cls, args)
    trunk = config_from_args(TrunkConfig, args)
    check_batch_size(cfg.batch_size)  # under a launcher: before the model loads
    check_fsdp(trunk.fsdp)
    check_width(args.head_hidden, "--head-hidden", "0: the trunk's hidden size")
    check_output_dir(args.out, "--out", inputs=(args.model,))
    if args.episodes is not None:
        from qvlm.envs.episodes import read_episodes

        samples = read_episodes(args.episodes)  # multi-turn: the loop reads them as token sequences
    else:
        samples = read_samples(args.data)
    out = Path(args.out)
    if out.exists() and (out / "heads.safetensors").exists() and not args.resume:
        if (out / "checkpoint").exists():
            raise QVLMError(f"{out} already holds a run; pass --resume to continue it or choose a new --out")
    model, tokenizer = load(args)
    set_seed(cfg.seed)  # the heads' random initialisation: same seed, same heads
    qv = QVModel.from_trunk(
        model,
        trunk,
        with_q=args.algorithm == "ilql" or getattr(args, "with_q", False),
        head_hidden=args.head_hidden,
        base_model=args.model,
        q_head=getattr(args, "q_head", "mlp"),
    )
    train = train_ilql if args.algorithm == "ilql" else train_value
    history = train(qv, tokenizer, samples, cfg, run_dir=out, resume=args.resume)
    last = {k: v[-1][1] for k, v in history.items() if k.startswith("losses/")}
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return 0  # rank 0 reports for the run
    print(
        f"trained {args.algorithm} on {len(samples)} {'episodes' if args.episodes else 'samples'}; heads in {out}; "
        "final " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(last.items()))
    )
    return 0
