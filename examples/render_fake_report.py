"""Render a qvlm report from fake data: a quick way to see (and screenshot) the report layout.

    python examples/render_fake_report.py /tmp/r/report.html

No model is loaded; every number below is invented. Headless screenshot:

    chromium --headless --no-sandbox --disable-gpu --window-size=1200,2400 \
        --screenshot=/tmp/report.png file:///tmp/r/report.html
"""

from __future__ import annotations

import argparse
import math
import random

from qvlm.report import render_report

METHODS = {
    "base": {
        "reward_mean": 0.12,
        "reward_ci95": 0.06,
        "kl_to_base": 0.0,
        "distinct_2": 0.71,
        "perplexity": 6.8,
        "cost": 1.0,
    },
    "best-of-4": {
        "reward_mean": 0.41,
        "reward_ci95": 0.05,
        "kl_to_base": 1.05,
        "distinct_2": 0.69,
        "perplexity": 7.0,
        "cost": 4.0,
    },
    "guided β=2": {
        "reward_mean": 0.38,
        "reward_ci95": 0.06,
        "kl_to_base": 0.62,
        "distinct_2": 0.68,
        "perplexity": 7.4,
        "cost": 1.15,
    },
    "guided β=8": {
        "reward_mean": 0.63,
        "reward_ci95": 0.05,
        "kl_to_base": 2.31,
        "distinct_2": 0.61,
        "perplexity": 9.2,
        "cost": 1.15,
    },
    "ILQL": {
        "reward_mean": 0.55,
        "reward_ci95": 0.07,
        "kl_to_base": 1.70,
        "distinct_2": 0.64,
        "perplexity": 8.1,
        "cost": 1.1,
    },
    "PPO": {
        "reward_mean": 0.58,
        "reward_ci95": 0.06,
        "kl_to_base": 3.20,
        "distinct_2": 0.52,
        "perplexity": 10.3,
        "cost": None,
    },
}

SAMPLES = [
    {
        "prompt": "Write a one-sentence review of a pizza place you visited last night.",
        "base": "The pizza was okay, but the crust was a bit soggy and the service was slow.",
        "guided": "The pizza was wonderful, with a crisp crust and friendly, attentive service.",
        "base_reward": -0.21,
        "guided_reward": 0.83,
        "method": "guided β=8",
    },
    {
        "prompt": "Reply to a friend who asked how the move went.",
        "base": "It was exhausting, boxes everywhere, and the van showed up two hours late.",
        "guided": "It went really well! The new place feels like home already, thanks for asking.",
        "base_reward": -0.44,
        "guided_reward": 0.76,
        "method": "ILQL",
    },
    {
        "prompt": "Describe your neighbour's garden in one sentence.",
        "base": "My neighbour's garden is a small patch of grass with a <fence> & a shed.",
        "guided": "My neighbour's garden is a lovely little oasis of roses, herbs and birdsong.",
        "base_reward": 0.0,
        "guided_reward": 0.69,
        "method": "guided β=2",
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
    return {"prompt": prompt, "tokens": tokens, "values": values, "advantages": advantages, "reward": round(v, 3)}


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
    render_report(
        args.out,
        title="qvlm demo: steering SmolLM2-135M-Instruct toward positive sentiment (fake data)",
        intro_html=(
            "<p>We sampled 8 responses per train prompt from <code>SmolLM2-135M-Instruct</code>, scored them "
            "with VADER, trained Q/V heads on the frozen model, and compared decoding methods on held-out "
            "prompts. <strong>All numbers on this page are invented</strong>: it shows the layout.</p>"
        ),
        methods=METHODS,
        loss_history=fake_loss_history(rng),
        samples=SAMPLES,
        value_maps=[fake_value_map(p, toks, rng) for p, toks in RESPONSES],
        config={
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "reward": "vader",
            "gamma": 1.0,
            "beta": [2, 8],
            "max_new_tokens": 48,
            "seed": 0,
            "heads": {"hidden": 576, "twin_q": True},
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
