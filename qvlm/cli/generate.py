"""``qvlm generate``: value-guided generation with trained heads (``--beta 0``: the base model)."""

from __future__ import annotations

import argparse

from qvlm.cli._common import add_config_args, add_model_arg, check_count, config_from_args, load
from qvlm.cli._limits import check_tokens
from qvlm.configs import DecodeConfig


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text steered by Q/V heads: log pi + beta (Q - V)",
        description="Generate responses, sampling from log pi_ref + beta * (Q - V) with the heads in "
        "--heads. beta = 0 (or no --heads) is plain decoding from the base model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arg(p)
    p.add_argument("--heads", help="run directory of `qvlm train ilql` (heads.safetensors)")
    p.add_argument(
        "--policy", help="run directory of `qvlm train ppo`: decode with the trained policy (guided too with --heads)"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    src.add_argument("--prompts", help="prompt file: .txt (one per line) or .jsonl (field 'prompt')")
    p.add_argument("--out", help="write {prompt, response, finished} JSON lines here (atomically) instead of printing")
    add_config_args(p, DecodeConfig, title="decoding")
    p.set_defaults(handler=run)


def run(args) -> int:
    import json

    from qvlm.decoding import generate
    from qvlm.errors import QVLMError
    from qvlm.fileio import atomic_write_text, check_output_file
    from qvlm.jsonl import read_prompts
    from qvlm.model import load_qv_model

    cfg = config_from_args(DecodeConfig, args)
    if args.out:
        check_output_file(args.out, "--out", inputs=(args.prompts, args.heads, args.policy, args.model))
    check_count(cfg.num_return_sequences, "--num-return-sequences")
    check_tokens(cfg.max_new_tokens)
    prompts = args.prompt if args.prompt else read_prompts(args.prompts)
    check_count(cfg.num_return_sequences, "--num-return-sequences", len(prompts))
    for i, text in enumerate(prompts):
        if not text.strip():
            raise QVLMError(f"prompt {i + 1} is empty; give every --prompt some text")
    if cfg.beta != 0 and not args.heads:
        raise QVLMError(f"--beta {cfg.beta} needs --heads DIR (trained with `qvlm train ilql`)")
    model, tokenizer = load(args)
    if args.policy:
        from qvlm.algos.actor_critic import load_policy

        model = load_policy(model, args.policy)
    heads = None
    if args.heads:
        qv = load_qv_model(model, args.heads)
        model, heads = qv.trunk, qv.heads
    result = generate(model, tokenizer, prompts, heads=heads, cfg=cfg, progress=len(prompts) > cfg.batch_size)
    repeated = [p for p in prompts for _ in range(cfg.num_return_sequences)]
    rows = [{"prompt": p, "response": t, "finished": f} for p, t, f in zip(repeated, result.texts, result.finished)]
    if args.out:
        atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"wrote {len(rows)} responses to {args.out}")
    else:
        for r in rows:
            print(f"### {r['prompt']}\n{r['response']}\n")
    return 0
