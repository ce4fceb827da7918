"""Q# settings (:mod:`qvlm.algos.qsharp`)."""

from __future__ import annotations

from dataclasses import dataclass

from qvlm.configs.base import Config, option, parse_numbers, positive_list

__all__ = ["QSharpConfig"]


@dataclass
class QSharpConfig(Config):
    """Q# for a language model (``qvlm train qsharp``, issue 22): learn the distribution of the reference
    policy's return by rounds of (roll in with the current guided policy to a cut point, roll out with
    the reference policy, score, label every reference step with the return, refit on all rounds), then
    guide at any beta = 1/alpha with Q*_alpha from one set of heads."""

    rounds: int = option(4, "rounds of roll-in / roll-out after round 0 (the reference policy's own samples)", ge=0)
    prompts_per_round: int = option(32, "prompts decoded per round (taken in turn from the prompt file)", ge=1)
    samples_per_prompt: int = option(4, "responses per prompt per round (round 0 and every later one)", ge=1)
    betas: str = option(
        "4,8,16",
        "guidance strengths of the roll-ins, one per round in turn (the states each strength visits are covered)",
        check=lambda v: positive_list(v) and bool(parse_numbers(v)),
        rule="finite numbers > 0, comma-separated, at least one (e.g. 4,8,16)",
    )
    max_new_tokens: int = option(20, "response length: the episode ends there (the reward scores these tokens)", ge=1)
    guidance_top_k: int = option(20, "roll-ins guide only the base model's k likeliest tokens (0: all)", ge=0)
    steps_per_round: int = option(
        200, "gradient steps after each round, on minibatches drawn from every round's samples", ge=1
    )
    batch_size: int = option(16, "samples per gradient step", ge=1)
    lr: float = option(1e-3, "AdamW learning rate of the heads", gt=0)
    weight_decay: float = option(0.0, "AdamW weight decay (0: off)", ge=0)
    grad_clip: float = option(1.0, "max global gradient norm (0: off)", ge=0)
    v_scale: float = option(1.0, "weight of Z(s)'s cross-entropy beside Z(s, a)'s", ge=0)
    gamma: float = option(1.0, "discount per token (1: the return is the final score)", ge=0, le=1)
    decode_batch_size: int = option(64, "responses decoded together", ge=1)
    max_length: int = option(512, "prompt + response tokens when training", ge=2)
    seed: int = option(0, "seed of the heads' initialisation, the cut points, the sampling and the minibatches")
    checkpoint_every: int = option(1, "rounds between resumable checkpoints (0: only at the end)", ge=0)
    progress: bool = option(True, "show progress")
