"""Render a qvlm report from fake data: a quick way to see (and screenshot) the report layout.

    python examples/render_fake_report.py /tmp/r/report.html

No model is loaded; every number below is invented. Headless screenshot:

    chromium --headless --no-sandbox --disable-gpu --window-size=1200,3000 \
        --screenshot=/tmp/report.png file:///tmp/r/report.html
"""

from __future__ import annotations

import argparse
import math
import random

from qvlm.report import demo_intro_html, render_report


def _row(reward, ci, kl, distinct_2, ppl, cost, topk=None, kl_kind="exact"):
    return {
        "reward_mean": reward,
        "reward_ci95": ci,
        "kl_to_base": kl,
        "kl_kind": kl_kind,
        "distinct_2": distinct_2,
        "perplexity": ppl,
        "topk_mass": topk,
        "cost": cost,
    }


# The demo's method names; eval numbers. Validation chose mcq_beta_8, the eval table's best is
# mcq_beta_16: the page says which was chosen where.
METHODS = {
    "base": _row(0.12, 0.06, 0.0, 0.71, 6.8, 1.0, topk=0.79),
    "best_of_4": _row(0.41, 0.05, 0.6363, 0.69, 7.0, 4.0, kl_kind="bound"),
    "best_of_16": _row(0.58, 0.04, 1.8351, 0.68, 7.1, 16.0, kl_kind="bound"),
    "ilql_beta_16": _row(0.38, 0.06, 0.62, 0.68, 7.4, 1.02, topk=0.84),
    "mcq_beta_8": _row(0.55, 0.07, 1.70, 0.64, 8.1, 1.02, topk=0.88),
    "mcq_beta_16": _row(0.61, 0.05, 2.31, 0.61, 9.2, 1.02, topk=0.90),
    "cd_blockwise_k4": _row(0.47, 0.06, 3.18, 0.66, 7.6, 4.01, kl_kind="bound"),
    "ppo_policy": _row(0.58, None, None, 0.52, 10.3, None),
}
VALIDATION = {
    "ilql_beta_16": _row(0.36, 0.09, 0.60, 0.69, 7.3, 1.02, topk=0.84),
    "mcq_beta_8": _row(0.60, 0.08, 1.66, 0.65, 8.0, 1.02, topk=0.88),
    "mcq_beta_16": _row(0.57, 0.08, 2.25, 0.62, 9.0, 1.02, topk=0.90),
    "cd_blockwise_k4": _row(0.44, 0.09, 3.18, 0.66, 7.5, 4.01, kl_kind="bound"),
}
SHOWN = {"method": "mcq_beta_8", "chosen_on": "validation", "validation_prompts": 12}
CONFIG = {
    "model": "smollm2-135m-instruct",
    "reward": "",
    "samples_per_prompt": 8,
    "max_new_tokens": 16,
    "train_prompts": 32,
    "val_prompts": 12,
    "eval_prompts": 20,
    "ilql_cql_scale": 0.0,
    "guidance_top_k": 20,
    "betas": "16",
    "mc_betas": "8,16",
    "seed": 0,
}

SAMPLES = [
    {
        "prompt": "Write a one-sentence review of a pizza place you visited last night.",
        "base": "The pizza was okay, but the crust was a bit soggy and the service was slow.",
        "guided": "The pizza was wonderful, with a crisp crust and friendly, attentive service.",
        "base_reward": -0.21,
        "guided_reward": 0.83,
        "method": "mcq_beta_8",
    },
    {
        "prompt": "Reply to a friend who asked how the move went.",
        "base": "It was exhausting, boxes everywhere, and the van showed up two hours late.",
        "guided": "It went really well! The new place feels like home already, thanks for asking.",
        "base_reward": -0.44,
        "guided_reward": 0.76,
        "method": "mcq_beta_8",
    },
    {
        "prompt": "Describe your neighbour's garden in one sentence.",
        "base": "My neighbour's garden is a small patch of grass with a <fence> & a shed.",
        "guided": "My neighbour's garden is a lovely little oasis of roses, herbs and birdsong.",
        "base_reward": 0.0,
        "guided_reward": 0.69,
        "method": "mcq_beta_8",
    },
]

RESPONSES = [
    (
        "Describe the weather in your town this morning.",
        [
            "The",
            " morning",
            " started",
            " grey",
            ",",
            " but",
            " the",
            " sun",
            " soon",
            " broke",
            " through",
            " and",
            " it",
            " turned",
            " into",
            " a",
            " lovely",
            ",",
            " warm",
            " day",
            ".",
            "<|im_end|>",
        ],
    ),
    (
        "Write a short email to your landlord about the heating.",
        [
            "Hi",
            " Mark",
            ",\n",
            "The",
            " heating",
            " has",
            " stopped",
            " working",
            " again",
            " and",
            " the",
            " flat",
            " is",
            " freezing",
            ".",
            " Could",
            " you",
            " please",
            " send",
            " someone",
            "?",
            "\n\n",
            "Thanks",
            ",",
            " Ana",
        ],
    ),
    (
        "Write the opening line of a story that takes place on a night train.",
        [
            "The",
            " <b>",
            "night",
            " train",
            " hummed",
            " softly",
            " as",
            " Mira",
            " watched",
            " the",
            " lights",
            " of",
            " the",
            " city",
            "\t",
            "fade",
            " into",
            " a",
            " calm",
            ",",
            " starry",
            " dark",
            ".",
        ],
    ),
]

# Words the fake "critic" likes or dislikes, to make the colours look plausible.
_GOOD = {"lovely", "warm", "sun", "softly", "calm", "starry", "broke", "through", "please", "Thanks"}
_BAD = {"grey", "stopped", "freezing", "again", "fade", "but"}


def fake_value_map(prompt: str, tokens: list[str], rng: random.Random) -> dict:
    """Invented V and Q - V for one response: V drifts toward the final reward as good/bad words appear."""
    v, values, advantages = 0.1, [], []
    for tok in tokens:
        word = tok.strip(" ,.\n")
        adv = 0.35 if word in _GOOD else -0.3 if word in _BAD else rng.gauss(0.0, 0.04)
        values.append(round(v, 4))
        advantages.append(round(adv, 4))
        v = max(-1.0, min(1.0, v + adv))
    return {
        "prompt": prompt,
        "tokens": tokens,
        "values": values,
        "advantages": advantages,
        "reward": round(v, 3),
        "method": "mcq_beta_8",
    }


def fake_loss_history(rng: random.Random, steps: int = 300) -> dict[str, list[tuple[int, float]]]:
    """Three decaying, noisy loss curves logged every 10 steps."""
    curves = {"losses/q": (0.8, 0.012), "losses/v": (0.3, 0.015), "losses/cql": (2.5, 0.006)}
    return {
        name: [(s, start * math.exp(-rate * s) + 0.02 + abs(rng.gauss(0, 0.01))) for s in range(0, steps + 1, 10)]
        for name, (start, rate) in curves.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="/tmp/r/report.html", help="where to write the HTML")
    args = parser.parse_args()
    rng = random.Random(0)
    metrics = {"methods": METHODS, "validation": VALIDATION, "shown": SHOWN, "reward": "vader"}
    intro = (
        demo_intro_html(metrics, CONFIG)
        + "<p><strong>All numbers on this page are invented</strong>: it shows the layout.</p>"
    )
    render_report(
        args.out,
        title="qvlm demo: steering smollm2-135m-instruct toward vader (fake data)",
        intro_html=intro,
        methods=METHODS,
        loss_history=fake_loss_history(rng),
        samples=SAMPLES,
        value_maps=[fake_value_map(p, toks, rng) for p, toks in RESPONSES],
        config=CONFIG,
        validation=VALIDATION,
        shown=SHOWN,
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
