"""``qvlm inspect``: a per-token value map of any text under trained heads."""

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
    p.add_argument("--text", required=True, action="append", help="the response text to score (repeatable)")
    p.add_argument("--prompt", default="Write one sentence.", help="the prompt the text answers")
    p.add_argument("--out", help="write a self-contained HTML value map here")
    p.set_defaults(handler=run)


def run(args) -> int:
    from qvlm.errors import QVLMError
    from qvlm.eval.valuemap import value_maps
    from qvlm.fileio import check_output_file
    from qvlm.loading import context_length
    from qvlm.mdp import check_fits, encode_prompt
    from qvlm.model import load_qv_model

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
