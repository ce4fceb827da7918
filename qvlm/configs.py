"""Typed configs, one dataclass per algorithm or stage; each field has a default and a one-line
description (the comment after it), which the CLI turns into ``--flag`` help. This module
imports nothing heavy, so ``qvlm --help`` starts fast.
"""

from __future__ import annotations

from dataclasses import dataclass

from qvlm.errors import QVLMError

__all__ = [
    "DEFAULT_MODEL",
    "TRUNK_MODES",
    "TrunkConfig",
    "DecodeConfig",
    "ILQLConfig",
    "VALUE_TARGETS",
    "Q_TARGETS",
    "ValueConfig",
]

DEFAULT_MODEL = "smollm2-135m-instruct"

TRUNK_MODES = ("frozen", "lora", "full")


@dataclass
class TrunkConfig:
    """How the trunk is trained."""

    mode: str = "frozen"  # frozen | lora | full
    lora_r: int = 8  # LoRA rank (mode = lora)
    lora_alpha: int = 16  # LoRA scaling numerator (mode = lora)
    lora_dropout: float = 0.0  # LoRA dropout (mode = lora); 0 keeps runs deterministic

    def __post_init__(self):
        if self.mode not in TRUNK_MODES:
            raise QVLMError(f"unknown trunk mode {self.mode!r}; use one of {', '.join(TRUNK_MODES)}")


@dataclass
class DecodeConfig:
    """Decoding settings. ``beta = 0`` is plain sampling from the base model."""

    max_new_tokens: int = 48  # response length limit (a cut response is truncated, not done)
    do_sample: bool = True  # False: greedy (argmax of the guided scores)
    temperature: float = 1.0  # softmax temperature applied after guidance
    top_k: int = 0  # keep the k best tokens (0: off)
    top_p: float = 1.0  # nucleus sampling mass (1: off)
    beta: float = 0.0  # guidance strength on Q - V (1/alpha recovers the soft optimum)
    guidance_top_k: int = 0  # guide only the base model's k likeliest tokens, as FUDGE rescores its top k (0: all)
    centre_candidates: bool = True  # top-k guidance: centre the candidates' advantages on their base-weighted mean
    seed: int | None = None  # seeds torch's global RNG before decoding (as HF generate uses it)
    num_return_sequences: int = 1  # responses per prompt (each prompt is prefilled once and its KV cache shared)
    batch_size: int = 16  # responses decoded together
    chat: bool | None = None  # wrap prompts in the chat template (None: when the tokenizer has one)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise QVLMError(f"max_new_tokens is {self.max_new_tokens}; it must be at least 1")
        if self.temperature <= 0:
            raise QVLMError(f"temperature is {self.temperature}; it must be > 0 (use do_sample=False for greedy)")
        if not 0 < self.top_p <= 1:
            raise QVLMError(f"top_p is {self.top_p}; it must be in (0, 1]")
        if self.num_return_sequences < 1:
            raise QVLMError(f"num_return_sequences is {self.num_return_sequences}; it must be at least 1")
        if self.top_k < 0 or self.guidance_top_k < 0:
            raise QVLMError("top_k and guidance_top_k must be >= 0 (0 turns them off)")


@dataclass
class ILQLConfig:
    """ILQL settings. Defaults follow trlx's ILQLConfig except where noted."""

    gamma: float = 0.99  # discount per token (trlx: 0.99)
    tau: float = 0.7  # expectile of V over Q (trlx: 0.7); 0.5 is the mean, ->1 the max
    cql_scale: float = 0.1  # weight of the CQL term (trlx: 0.1)
    awac_scale: float = 1.0  # weight of the AWAC term when the trunk trains (trlx: 1)
    awac_beta: float = 1.0  # inverse temperature of the AWAC weight exp(beta * A)
    # trlx syncs with 0.001 every 5 steps: a 5000-step time constant, tuned for long GPU runs.
    # Offline runs here are hundreds of steps, so the targets follow faster (about 100 steps).
    polyak: float = 0.01  # target Q <- (1 - polyak) target Q + polyak Q
    target_sync_every: int = 1  # steps between Polyak updates (trlx: 5)
    lr: float = 1e-3  # Adam learning rate of the heads
    trunk_lr: float = 1e-5  # Adam learning rate of the trunk (lora: adapters; full: all)
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm (0: off)
    batch_size: int = 8  # samples per step
    epochs: int = 4  # passes over the data (ignored when steps > 0)
    steps: int = 0  # total optimiser steps (0: epochs * batches per epoch)
    max_length: int = 256  # prompt + response tokens; longer responses are cut (truncated)
    seed: int = 0  # data order and initialisation
    checkpoint_every: int = 100  # steps between resumable checkpoints (0: only at the end)
    progress: bool = True  # show a progress bar

    def __post_init__(self):
        if not 0 < self.tau < 1:
            raise QVLMError(f"tau is {self.tau}; the expectile must be in (0, 1)")
        if not 0 <= self.gamma <= 1:
            raise QVLMError(f"gamma is {self.gamma}; it must be in [0, 1]")
        if not 0 < self.polyak <= 1:
            raise QVLMError(f"polyak is {self.polyak}; it must be in (0, 1]")
        if self.batch_size < 1 or self.epochs < 1 or self.steps < 0:
            raise QVLMError("batch_size and epochs must be >= 1 and steps >= 0")


VALUE_TARGETS = ("mc", "td", "td_lambda")
Q_TARGETS = ("return", "next_v")


@dataclass
class ValueConfig:
    """Prefix-scorer settings."""

    target: str = "mc"  # mc: Monte-Carlo returns; td: r + gamma V(s'); td_lambda: lambda-returns
    # Q heads (when the model has them): regressed on the same return as V, or on r + gamma V(s_{t+1}),
    # which is Q(s_t, a_t) exactly in a token MDP (the next state is the prefix plus a_t) and pools
    # what V learned over many prefixes instead of one sampled return
    q_target: str = "return"  # return | next_v
    gamma: float = 1.0  # discount (1: V predicts the undiscounted final score)
    lam: float = 0.95  # lambda of td_lambda
    lr: float = 1e-3  # Adam learning rate of the V head
    trunk_lr: float = 1e-5  # learning rate of the trunk when it trains
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 8
    epochs: int = 4
    steps: int = 0  # total steps (0: epochs * batches per epoch)
    max_length: int = 256
    seed: int = 0
    checkpoint_every: int = 100
    progress: bool = True

    def __post_init__(self):
        if self.target not in VALUE_TARGETS:
            raise QVLMError(f"unknown value target {self.target!r}; use one of {', '.join(VALUE_TARGETS)}")
        if self.q_target not in Q_TARGETS:
            raise QVLMError(f"unknown q_target {self.q_target!r}; use one of {', '.join(Q_TARGETS)}")


@dataclass
class DemoConfig:
    """`qvlm demo`: steer the embedded model toward a reward; compare with best-of-N. Zeros take
    the full or --quick preset (see qvlm.apps.demo.PRESETS)."""

    target: str = "positive"  # sentiment to steer toward: positive | negative (VADER compound)
    reward: str = ""  # reward name overriding --target (e.g. count:e for tests)
    model: str = DEFAULT_MODEL  # base model
    quick: bool = False  # smaller preset: fewer prompts and shorter responses
    train_prompts: int = 0  # training prompts to sample from (0: preset)
    val_prompts: int = 0  # validation prompts from the training side, never trained on: choose settings (0: preset)
    eval_prompts: int = 0  # held-out prompts to evaluate on (0: preset)
    samples_per_prompt: int = 0  # base responses per training prompt (0: preset)
    max_new_tokens: int = 0  # response length limit (0: preset)
    betas: str = "16,32,64"  # ILQL guidance strengths, comma-separated
    # ILQL's CQL weight. 0 skips the vocabulary-sized Q (about 4x cheaper per step). On held-out
    # training prompts, 8 epochs without CQL beat 1 epoch with it (trlx: 0.1) in the same time.
    ilql_cql_scale: float = 0.0
    mc_betas: str = "4,8,16"  # guidance strengths with the Monte-Carlo Q/V heads (CD-FUDGE style)
    mc_q_target: str = "next_v"  # Monte-Carlo Q heads' target: return (sampled) or next_v (V of the next prefix)
    guidance_top_k: int = 20  # guide only the base model's k likeliest tokens (0: all)
    best_of: int = 16  # draws per held-out prompt for best-of-4 and best-of-16
    candidates: int = 4  # V-guided blockwise: candidate blocks per step
    block_size: int = 4  # V-guided blockwise: tokens per block
    ilql_epochs: int = 0  # ILQL epochs over the samples (0: preset)
    value_epochs: int = 0  # prefix-scorer epochs (0: preset)
    head_hidden: int = 128  # width of the Q/V heads' hidden layer (narrow: cheap to train and to decode with)
    q_head: str = "tied"  # Q head design: tied (to the LM's output embedding) or mlp (trlx's)
    batch_size: int = 64  # prompts decoded together
    seed: int = 0  # sampling and training seed
    device: str = "auto"  # auto (cuda when a GPU is visible, else cpu), cpu, cuda or cuda:N
    dtype: str = "float32"  # model weights: float32, bfloat16 or float16

    def __post_init__(self):
        if self.target not in ("positive", "negative"):
            raise QVLMError(f"--target is {self.target!r}; use positive or negative")
        if self.best_of < 4:
            raise QVLMError(f"--best-of is {self.best_of}; it must be at least 4 (best-of-4 is a baseline)")
