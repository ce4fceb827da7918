"""Online soft Q-learning settings (:mod:`qvlm.algos.softq`)."""

from __future__ import annotations

from dataclasses import dataclass

from qvlm.configs.base import Config, option

__all__ = ["SoftQConfig"]


@dataclass
class SoftQConfig(Config):
    """Online soft Q-learning for a language model (``qvlm train softq``, issue 10): rounds of
    sampling with the current guided policy, scoring, a replay set that keeps every round, and
    soft Bellman regression of the heads on all of it."""

    alpha: float = option(0.1, "KL temperature: the guided policy is pi_ref exp((Q - V) / alpha), beta = 1/alpha", gt=0)
    gamma: float = option(1.0, "discount per token (1: Q predicts the undiscounted final score)", ge=0, le=1)
    rounds: int = option(8, "rounds of (sample with the guided policy, score, fit)", ge=1)
    prompts_per_round: int = option(16, "prompts decoded per round (taken in turn from the prompt file)", ge=1)
    samples_per_prompt: int = option(4, "responses per prompt per round", ge=1)
    max_new_tokens: int = option(32, "response length limit when sampling (a cut response is truncated)", ge=1)
    guidance_top_k: int = option(
        0,
        "guide only the base model's k likeliest tokens when sampling (0: the full vocabulary, the exact tilt)",
        ge=0,
        note="0: the full vocabulary",
    )
    steps_per_round: int = option(
        32, "gradient steps per round, each on a minibatch drawn from the whole replay set", ge=1
    )
    batch_size: int = option(16, "samples per gradient step", ge=1)
    lr: float = option(1e-3, "AdamW learning rate of the heads", gt=0)
    trunk_lr: float = option(1e-5, "AdamW learning rate of the trunk (lora: adapters)", gt=0)
    weight_decay: float = option(0.0, "AdamW weight decay (0: off)", ge=0)
    grad_clip: float = option(1.0, "max global gradient norm (0: off)", ge=0, note="0: off")
    polyak: float = option(0.1, "target heads <- (1 - polyak) target + polyak online, after every step", gt=0, le=1)
    v_scale: float = option(1.0, "weight of V's regression onto the soft value of the target Q at s_t", ge=0)
    decode_batch_size: int = option(64, "responses decoded together", ge=1)
    max_length: int = option(256, "prompt + response tokens when training (longer responses are cut)", ge=2)
    seed: int = option(0, "seed of the heads' initialisation, the sampling and the minibatches")
    checkpoint_every: int = option(
        1, "rounds between resumable checkpoints (0: only at the end)", ge=0, note="0: only at the end"
    )
    progress: bool = option(True, "show progress")
