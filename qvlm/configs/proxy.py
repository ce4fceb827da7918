"""`qvlm proxy` settings (:mod:`qvlm.apps.proxy`): the experiment's own choices, and the configs of what it
trains (the proxy reward model, PPO against it, the guidance heads), nested with the flags it exposes."""

from __future__ import annotations

from dataclasses import dataclass

from qvlm.configs.base import DEFAULT_MODEL, Config, ascending_counts, nested, option, positive_list
from qvlm.configs.ppo import PPOConfig
from qvlm.configs.reward_model import RewardModelConfig
from qvlm.configs.value import SCORER, ValueConfig

__all__ = ["ProxyConfig"]


@dataclass
class ProxyConfig(Config):
    """`qvlm proxy`: reward-model over-optimisation made visible. A gold reward labels pairs of base
    samples; a proxy reward model learns from them; best-of-N by the proxy is scored by both."""

    model: str = option(DEFAULT_MODEL, "base model")
    gold: str = option("vader", "the gold reward (any --reward form without a reference)")
    train_prompts: int = option(120, "training prompts (demo:train) whose base samples the gold reward labels", ge=2)
    held_out: float = option(0.2, "fraction of those prompts whose pairs only measure the proxy's accuracy", gt=0, lt=1)
    samples_per_prompt: int = option(8, "base samples per training prompt (pairs among them)", ge=2, note="pairs")
    pairs: int = option(2000, "at most this many gold-labelled pairs to train the proxy on", ge=2)
    label_noise: float = option(0.0, "probability that a training pair's label is flipped", ge=0, lt=0.5)
    eval_prompts: int = option(32, "held-out prompts (demo:eval) for best-of-N", ge=1)
    max_n: int = option(32, "base draws per eval prompt; best-of-N for N = 1, 2, 4, ... up to it", ge=1)
    max_new_tokens: int = option(20, "response length limit", ge=1)
    batch_size: int = option(64, "prompts decoded together", ge=1)
    # the proxy: a reward model on the gold-labelled pairs; its accuracy is measured on held-out prompts'
    # pairs instead of a held-out fraction of its own
    rm: RewardModelConfig = nested(
        RewardModelConfig,
        {
            "backbone": "backbone",
            "epochs": "rm_epochs",
            "lr": "rm_lr",
            "batch_size": "rm_batch_size",
            "pooling": "rm_pooling",
            "schedule": "rm_schedule",
        },
        "the proxy",
        epochs=2,
        held_out=0.0,
    )
    rm_prompt: bool = option(
        True, "the proxy reads each response with its prompt (off: the response alone, as VADER reads it)"
    )
    ppo_iterations: str = option(
        "",
        "PPO against the proxy (LoRA, shared V critic): iteration counts, ascending, comma-separated, each a policy "
        "snapshot scored by gold and proxy on the eval prompts ('' or 0: no PPO)",
        check=lambda v: v in ("", "0") or ascending_counts(v),
        rule="ascending whole numbers >= 1, comma-separated (e.g. 4,8,16), or 0 for none",
    )
    ppo: PPOConfig = nested(
        PPOConfig,
        {"prompts_per_iter": "ppo_prompts_per_iter", "lr": "ppo_lr", "kl_coef": "ppo_kl_coef"},
        "PPO against the proxy",
        prompts_per_iter=8,
        lr=2e-4,
        kl_coef=0.02,
        fixed_horizon=True,
    )
    ppo_eval_samples: int = option(4, "PPO against the proxy: responses per eval prompt for each snapshot", ge=1)
    guide_betas: str = option(
        "",
        "guidance against the proxy: Monte-Carlo Q/V heads fitted to the proxy's scores of the training samples "
        "steer decoding at each of these strengths, comma-separated, in 1/proxy-logit units (on SmolLM2's base "
        "samples the proxy's logits have a standard deviation of 4.6, VADER's 0.35: beta 1 here pushes about as "
        "hard as the demo's 13; '': no guidance)",
        check=positive_list,
        rule="finite numbers > 0, comma-separated (e.g. 1,2,4), or '' for none",
    )
    guide: ValueConfig = nested(
        ValueConfig, {"epochs": "guide_epochs"}, "guidance against the proxy: the heads", **SCORER
    )
    guide_top_k: int = option(
        20, "guidance against the proxy: guide only the base model's k likeliest tokens (0: all)", ge=0
    )
    guide_eval_samples: int = option(4, "guidance against the proxy: responses per eval prompt at each beta", ge=1)
    seed: int = option(0, "seed of sampling, pairs and the proxy")
