"""`qvlm demo` settings (:mod:`qvlm.apps.demo`): the app's own choices, and the configs of the learners it
trains (ILQL, the Monte-Carlo prefix scorer, PPO), nested with the flags it exposes."""

from __future__ import annotations

from dataclasses import dataclass

from qvlm.configs.base import (
    DEFAULT_MODEL,
    DEVICES_HELP,
    DTYPE_CHOICES,
    Config,
    ascending_counts,
    nested,
    number_list,
    option,
)
from qvlm.configs.ilql import ILQLConfig
from qvlm.configs.ppo import PPOConfig
from qvlm.configs.qsharp import QSharpConfig
from qvlm.configs.value import SCORER, ValueConfig

__all__ = ["DemoConfig"]

_BETAS = "comma-separated finite numbers, at least one (e.g. 4,8,16)"


@dataclass
class DemoConfig(Config):
    """`qvlm demo`: steer the embedded model toward a reward; compare with best-of-N. Zeros take
    the full or --quick preset (see qvlm.apps.demo.PRESETS)."""

    target: str = option(
        "positive",
        "sentiment to steer toward: positive or negative (VADER compound)",
        check=lambda v: v in ("positive", "negative"),
        rule="positive or negative",
    )
    reward: str = option(
        "",
        "reward overriding --target: any --reward of qvlm.rewards that needs no reference text (vader, count:TEXT, "
        "length, hf:PATH[:LABEL], FILE.py:FUNCTION, MODULE:FUNCTION, weighted sums; docs/rewards.md)",
    )
    model: str = option(DEFAULT_MODEL, "base model")
    quick: bool = option(False, "smaller preset: fewer prompts and shorter responses")
    train_prompts: int = option(0, "training prompts to sample from (0: preset)", ge=0, note="0: preset")
    val_prompts: int = option(
        0, "validation prompts from the training side, never trained on: choose settings (0: preset)", ge=0
    )
    eval_prompts: int = option(0, "held-out prompts to evaluate on (0: preset)", ge=0, note="0: preset")
    samples_per_prompt: int = option(0, "base responses per training prompt (0: preset)", ge=0, note="0: preset")
    max_new_tokens: int = option(0, "response length limit (0: preset)", ge=0, note="0: preset")
    betas: str = option("16,32,64", "ILQL guidance strengths, comma-separated", check=number_list, rule=_BETAS)
    mc_betas: str = option(
        "4,8,16,32",
        "guidance strengths with the Monte-Carlo Q/V heads (CD-FUDGE style)",
        check=number_list,
        rule=_BETAS,
    )
    guidance_top_k: int = option(20, "guide only the base model's k likeliest tokens (0: all)", ge=0)
    best_of: int = option(
        16, "draws per held-out prompt for best-of-4 and best-of-16", ge=4, note="best-of-4 is a baseline"
    )
    candidates: int = option(4, "V-guided blockwise: candidate blocks per step", ge=1)
    block_size: int = option(4, "V-guided blockwise: tokens per block", ge=1)
    # ILQL's CQL weight is off: 0 skips the vocabulary-sized Q (about 4x cheaper per step). On held-out
    # training prompts, 8 epochs without CQL beat 1 epoch with it (trlx: 0.1) in the same time.
    ilql: ILQLConfig = nested(
        ILQLConfig,
        {"cql_scale": "ilql_cql_scale", "epochs": "ilql_epochs"},
        "ILQL heads",
        epochs=8,
        batch_size=8,
        max_length=512,
        cql_scale=0.0,
    )
    value: ValueConfig = nested(
        ValueConfig, {"q_target": "mc_q_target", "epochs": "value_epochs"}, "the Monte-Carlo prefix scorer", **SCORER
    )
    # Q# (issue 22): the return distribution of the reference policy, learned from its own samples (round 0,
    # the demo's) and from guided roll-ins / reference roll-outs on the training prompts; one set of heads
    # decodes at every beta
    qsharp_betas: str = option(
        "1,2,4,8,16", "Q# guidance strengths (one set of heads decodes at each)", check=number_list, rule=_BETAS
    )
    qsharp: QSharpConfig = nested(
        QSharpConfig,
        {
            "rounds": "qsharp_rounds",
            "prompts_per_round": "qsharp_prompts_per_round",
            "steps_per_round": "qsharp_steps",
            "betas": "qsharp_rollin_betas",
        },
        "Q#",
    )
    ppo_iterations: str = option(
        "",
        "the ppo method: PPO iteration counts to choose from on validation, ascending, comma-separated (one run "
        "with a policy snapshot at each); 0: no ppo method ('': preset: the full demo trains it, --quick does not)",
        check=lambda v: v in ("", "0") or ascending_counts(v),
        rule="0 (no ppo method) or ascending whole numbers >= 1, comma-separated (e.g. 10,20)",
    )
    # the demo's PPO: PPOConfig's defaults (LoRA policy, shared V critic, k1 KL penalty in the reward,
    # lr, KL coefficient and epochs chosen by benchmarks/ppo_sweep.py), 10 prompts x 4 responses per
    # iteration as in benchmarks/peer_trl.py, the demo's fixed horizon; its length, seed, head width and
    # decode batch are the demo's
    ppo: PPOConfig = nested(
        PPOConfig,
        {
            "kl_coef": "ppo_kl_coef",
            "lr": "ppo_lr",
            "prompts_per_iter": "ppo_prompts_per_iter",
            "ppo_epochs": "ppo_epochs",
        },
        "the ppo method",
        prompts_per_iter=10,
        responses_per_prompt=4,
        fixed_horizon=True,
    )
    head_hidden: int = option(
        128, "width of the Q/V heads' hidden layer (narrow: cheap to train and to decode with)", ge=0
    )
    q_head: str = option(
        "tied", "Q head design: tied (to the LM's output embedding) or mlp (trlx's)", choices=("tied", "mlp")
    )
    batch_size: int = option(64, "prompts decoded together", ge=1)
    seed: int = option(0, "sampling and training seed")
    device: str = option("auto", f"where the model runs: {DEVICES_HELP}")
    dtype: str = option(
        "float32", "the model's weights and the heads' (auto: bfloat16 where it is fast)", choices=DTYPE_CHOICES
    )
