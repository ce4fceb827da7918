"""Typed configs, one dataclass per algorithm or stage (TRL-style): each field has a default and a
one-line description in ``field(metadata={"help": ...})``, which the CLI turns into ``--flag``
help. This module imports nothing heavy, so ``qvlm --help`` starts fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from qvlm.errors import QVLMError

__all__ = [
    "DEFAULT_MODEL",
    "DEVICES_HELP",
    "DTYPE_NAMES",
    "DTYPE_CHOICES",
    "TRUNK_MODES",
    "option",
    "TrunkConfig",
    "DecodeConfig",
    "TrainConfig",
    "ILQLConfig",
    "VALUE_TARGETS",
    "Q_TARGETS",
    "ValueConfig",
    "DemoConfig",
    "RewardModelConfig",
    "ProxyConfig",
    "SoftQConfig",
    "PPOConfig",
]

DEFAULT_MODEL = "smollm2-135m-instruct"
DEVICES_HELP = "auto (cuda when a GPU is visible, else cpu), cpu, cuda or cuda:N"
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # qvlm.loading.DTYPES maps them to torch dtypes
DTYPE_CHOICES = (*DTYPE_NAMES, "auto")  # --dtype: auto is bfloat16 where it is fast (qvlm.loading.auto_dtype)

TRUNK_MODES = ("frozen", "lora", "full")
VALUE_TARGETS = ("mc", "td", "td_lambda")
Q_TARGETS = ("return", "next_v")
LR_SCHEDULES = ("constant", "linear")
POOLINGS = ("default", "mean")  # reward models: Hugging Face's pooling, or the mean over real tokens


def option(default, help: str, **metadata):
    """A config field: its default and its one-line description (the ``--flag`` help).

    Extra metadata the CLI reads: ``choices`` (allowed values) and ``type`` (the value type when
    the default is ``None``).
    """
    return field(default=default, metadata={"help": help, **metadata})


def _check(ok: bool, name: str, value, rule: str) -> None:
    """Raise ``QVLMError("name is value; it must be rule")`` unless ``ok``.

    Write ``ok`` as the positive condition (``lr > 0``), so that NaN, for which every comparison is
    False, fails it instead of silently switching something off.
    """
    if not ok:
        raise QVLMError(f"{name} is {value}; it must be {rule}")


def _finite(x: float) -> bool:
    return math.isfinite(x)


def parse_numbers(text: str) -> list[float]:
    """``"4, 8,16"`` -> ``[4.0, 8.0, 16.0]`` (empty items skipped); ValueError on an item that is not a number."""
    return [float(x) for x in text.split(",") if x.strip()]


def _number_list(text: str) -> bool:
    """Whether ``text`` is comma-separated finite numbers, at least one."""
    try:
        values = parse_numbers(text)
    except ValueError:
        return False
    return bool(values) and all(math.isfinite(v) for v in values)


def _positive_list(text: str) -> bool:
    """Whether ``text`` is empty or finite numbers > 0, comma-separated."""
    try:
        values = parse_numbers(text)
    except ValueError:
        return False
    return all(_finite(v) and v > 0 for v in values) and (bool(values) or not text.strip(", "))


def _ascending_counts(text: str) -> bool:
    """Whether ``text`` is strictly ascending whole numbers >= 1, comma-separated, at least one."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        return False
    return bool(values) and values[0] >= 1 and all(a < b for a, b in zip(values, values[1:]))


@dataclass
class TrunkConfig:
    """How the trunk is trained."""

    mode: str = option(
        "frozen", "frozen: heads only; lora: adapters train too; full: every weight", choices=TRUNK_MODES
    )
    lora_r: int = option(8, "LoRA rank (mode = lora)")
    lora_alpha: int = option(16, "LoRA scaling numerator (mode = lora)")
    lora_dropout: float = option(0.0, "LoRA dropout (mode = lora); 0 keeps runs deterministic")

    def __post_init__(self):
        if self.mode not in TRUNK_MODES:
            raise QVLMError(f"unknown trunk mode {self.mode!r}; use one of {', '.join(TRUNK_MODES)}")
        _check(self.lora_r >= 1, "lora_r", self.lora_r, ">= 1")
        _check(0 <= self.lora_dropout < 1, "lora_dropout", self.lora_dropout, "in [0, 1)")


@dataclass
class DecodeConfig:
    """Decoding settings. ``beta = 0`` is plain sampling from the base model."""

    max_new_tokens: int = option(48, "response length limit (a cut response is truncated, not done)")
    do_sample: bool = option(True, "sample (False: greedy, the argmax of the guided scores)")
    temperature: float = option(1.0, "softmax temperature applied after guidance (> 0)")
    top_k: int = option(0, "keep the k best tokens (0: off)")
    top_p: float = option(1.0, "nucleus sampling mass (1: off)")
    beta: float = option(0.0, "guidance strength on Q - V (0: the base model; 1/alpha recovers the soft optimum)")
    guidance_top_k: int = option(
        0, "guide only the base model's k likeliest tokens, as FUDGE rescores its top k (0: all)"
    )
    centre_candidates: bool = option(
        True, "top-k guidance: centre the candidates' advantages on their base-weighted mean"
    )
    seed: int | None = option(None, "seeds torch's global RNG before decoding (as HF generate uses it)", type=int)
    num_return_sequences: int = option(
        1, "responses per prompt (each prompt is prefilled once and its KV cache shared)"
    )
    batch_size: int = option(16, "responses decoded together")
    chat: bool | None = option(None, "wrap prompts in the chat template (None: when the tokenizer has one)", type=bool)
    # issue 12: a static KV cache and a hand-written Llama step (qvlm.decoding.fast); off until it
    # is the default everywhere, since its logits equal the standard step's to rounding, not bit for bit
    fast: bool = option(False, "fast decoding path: static KV cache, fused Llama step (Llama-style models only)")
    # measured on this CPU (SmolLM2-135M, batch 8, one thread): 55 s to compile, then 303 ms a step
    # against 70 ms eager (inductor's matmuls at 8 rows, attention over the whole capacity)
    fast_compile: bool = option(
        False, "with fast: torch.compile the one-token step (slower on CPU; compiles per shape)"
    )

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise QVLMError(f"max_new_tokens is {self.max_new_tokens}; it must be at least 1")
        if not (_finite(self.temperature) and self.temperature > 0):
            raise QVLMError(
                f"temperature is {self.temperature}; it must be a finite number > 0 (use do_sample=False for greedy)"
            )
        if not 0 < self.top_p <= 1:
            raise QVLMError(f"top_p is {self.top_p}; it must be in (0, 1]")
        if self.num_return_sequences < 1:
            raise QVLMError(f"num_return_sequences is {self.num_return_sequences}; it must be at least 1")
        if self.top_k < 0 or self.guidance_top_k < 0:
            raise QVLMError("top_k and guidance_top_k must be >= 0 (0 turns them off)")
        _check(_finite(self.beta), "beta", self.beta, "a finite number (0: no guidance)")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "at least 1")


@dataclass
class TrainConfig:
    """What every offline trainer shares (qvlm.train.loop): optimiser, batches, length, seed, checkpoints.

    ILQLConfig and ValueConfig extend it, so ``asdict`` of either stays flat.
    """

    lr: float = option(1e-3, "AdamW learning rate of the heads")
    trunk_lr: float = option(1e-5, "AdamW learning rate of the trunk (lora: adapters; full: all)")
    weight_decay: float = option(0.0, "AdamW weight decay (0: off)")
    grad_clip: float = option(1.0, "max global gradient norm (0: off)")
    batch_size: int = option(8, "samples per optimiser step")
    epochs: int = option(4, "passes over the data (ignored when steps > 0)")
    steps: int = option(0, "total optimiser steps (0: epochs * batches per epoch)")
    max_length: int = option(256, "prompt + response tokens; longer responses are cut (truncated)")
    seed: int = option(0, "seed of the heads' initialisation and the data order")
    checkpoint_every: int = option(100, "steps between resumable checkpoints (0: only at the end)")
    progress: bool = option(True, "show a progress bar")
    fsdp: bool = option(False, "shard the trunk over the processes with FSDP2 (--trunk full, several processes)")

    def __post_init__(self):
        _check(_finite(self.lr) and self.lr > 0, "lr", self.lr, "a finite number > 0")
        _check(_finite(self.trunk_lr) and self.trunk_lr > 0, "trunk_lr", self.trunk_lr, "a finite number > 0")
        _check(_finite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", self.weight_decay, "finite, >= 0")
        _check(_finite(self.grad_clip) and self.grad_clip >= 0, "grad_clip", self.grad_clip, "finite, >= 0 (0: off)")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "at least 1")
        _check(self.epochs >= 1, "epochs", self.epochs, "at least 1")
        _check(self.steps >= 0, "steps", self.steps, ">= 0 (0: epochs * batches per epoch)")
        _check(self.max_length >= 2, "max_length", self.max_length, "at least 2 (a prompt token and a response token)")
        _check(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, ">= 0 (0: only at the end)")


@dataclass
class ILQLConfig(TrainConfig):
    """ILQL settings. Defaults follow trlx's ILQLConfig except where noted."""

    gamma: float = option(0.99, "discount per token (trlx: 0.99)")
    tau: float = option(0.7, "expectile of V over Q (trlx: 0.7); 0.5 is the mean, ->1 the max")
    cql_scale: float = option(0.1, "weight of the CQL term (trlx: 0.1; 0: off)")
    awac_scale: float = option(1.0, "weight of the AWAC term when the trunk trains (trlx: 1; 0: off)")
    awac_beta: float = option(1.0, "inverse temperature of the AWAC weight exp(beta * A)")
    # trlx syncs with 0.001 every 5 steps: a 5000-step time constant, tuned for long GPU runs.
    # Offline runs here are hundreds of steps, so the targets follow faster (about 100 steps).
    polyak: float = option(0.01, "target Q <- (1 - polyak) target Q + polyak Q (trlx: 0.001)")
    target_sync_every: int = option(1, "steps between Polyak updates (trlx: 5)")

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.tau < 1:
            raise QVLMError(f"tau is {self.tau}; the expectile must be in (0, 1)")
        if not 0 <= self.gamma <= 1:
            raise QVLMError(f"gamma is {self.gamma}; it must be in [0, 1]")
        if not 0 < self.polyak <= 1:
            raise QVLMError(f"polyak is {self.polyak}; it must be in (0, 1]")
        _check(_finite(self.cql_scale) and self.cql_scale >= 0, "cql_scale", self.cql_scale, "finite, >= 0 (0: off)")
        _check(_finite(self.awac_scale) and self.awac_scale >= 0, "awac_scale", self.awac_scale, "finite, >= 0")
        _check(_finite(self.awac_beta), "awac_beta", self.awac_beta, "a finite number")
        _check(self.target_sync_every >= 1, "target_sync_every", self.target_sync_every, "at least 1")


@dataclass
class ValueConfig(TrainConfig):
    """Prefix-scorer settings."""

    target: str = option(
        "mc", "mc: Monte-Carlo returns; td: r + gamma V(s'); td_lambda: lambda-returns", choices=VALUE_TARGETS
    )
    # Q heads (when the model has them): regressed on the same return as V, or on r + gamma V(s_{t+1}),
    # which is Q(s_t, a_t) exactly in a token MDP (the next state is the prefix plus a_t) and pools
    # what V learned over many prefixes instead of one sampled return
    q_target: str = option(
        "return", "Q heads' target: return (the same as V's) or next_v (r + gamma V(s_{t+1}))", choices=Q_TARGETS
    )
    gamma: float = option(1.0, "discount (1: V predicts the undiscounted final score)")
    lam: float = option(0.95, "lambda of td_lambda")

    def __post_init__(self):
        super().__post_init__()
        if self.target not in VALUE_TARGETS:
            raise QVLMError(f"unknown value target {self.target!r}; use one of {', '.join(VALUE_TARGETS)}")
        if self.q_target not in Q_TARGETS:
            raise QVLMError(f"unknown q_target {self.q_target!r}; use one of {', '.join(Q_TARGETS)}")
        _check(0 <= self.gamma <= 1, "gamma", self.gamma, "in [0, 1]")
        _check(0 <= self.lam <= 1, "lam", self.lam, "in [0, 1]")


@dataclass
class DemoConfig:
    """`qvlm demo`: steer the embedded model toward a reward; compare with best-of-N. Zeros take
    the full or --quick preset (see qvlm.apps.demo.PRESETS)."""

    target: str = option("positive", "sentiment to steer toward: positive or negative (VADER compound)")
    reward: str = option(
        "",
        "reward overriding --target: any --reward of qvlm.rewards that needs no reference text (vader, count:TEXT, "
        "length, hf:PATH[:LABEL], FILE.py:FUNCTION, MODULE:FUNCTION, weighted sums; docs/rewards.md)",
    )
    model: str = option(DEFAULT_MODEL, "base model")
    quick: bool = option(False, "smaller preset: fewer prompts and shorter responses")
    train_prompts: int = option(0, "training prompts to sample from (0: preset)")
    val_prompts: int = option(
        0, "validation prompts from the training side, never trained on: choose settings (0: preset)"
    )
    eval_prompts: int = option(0, "held-out prompts to evaluate on (0: preset)")
    samples_per_prompt: int = option(0, "base responses per training prompt (0: preset)")
    max_new_tokens: int = option(0, "response length limit (0: preset)")
    betas: str = option("16,32,64", "ILQL guidance strengths, comma-separated")
    # ILQL's CQL weight. 0 skips the vocabulary-sized Q (about 4x cheaper per step). On held-out
    # training prompts, 8 epochs without CQL beat 1 epoch with it (trlx: 0.1) in the same time.
    ilql_cql_scale: float = option(0.0, "ILQL's CQL weight (0: off, about 4x cheaper per step)")
    mc_betas: str = option("4,8,16,32", "guidance strengths with the Monte-Carlo Q/V heads (CD-FUDGE style)")
    mc_q_target: str = option(
        "next_v",
        "Monte-Carlo Q heads' target: return (sampled) or next_v (V of the next prefix)",
        choices=Q_TARGETS,
    )
    guidance_top_k: int = option(20, "guide only the base model's k likeliest tokens (0: all)")
    best_of: int = option(16, "draws per held-out prompt for best-of-4 and best-of-16")
    candidates: int = option(4, "V-guided blockwise: candidate blocks per step")
    block_size: int = option(4, "V-guided blockwise: tokens per block")
    ilql_epochs: int = option(0, "ILQL epochs over the samples (0: preset)")
    value_epochs: int = option(0, "prefix-scorer epochs (0: preset)")
    ppo_iterations: str = option(
        "",
        "the ppo method: PPO iteration counts to choose from on validation, ascending, comma-separated (one run "
        "with a policy snapshot at each); 0: no ppo method ('': preset: the full demo trains it, --quick does not)",
    )
    ppo_kl_coef: float = option(0.05, "the ppo method: KL coefficient of the per-token penalty to the base model")
    ppo_lr: float = option(1e-4, "the ppo method: AdamW learning rate of the LoRA adapters (the V head: 1e-3)")
    ppo_prompts_per_iter: int = option(4, "the ppo method: training prompts per iteration (4 responses each)")
    ppo_epochs: int = option(2, "the ppo method: passes over each iteration's responses (minibatches of 8)")
    head_hidden: int = option(128, "width of the Q/V heads' hidden layer (narrow: cheap to train and to decode with)")
    q_head: str = option(
        "tied", "Q head design: tied (to the LM's output embedding) or mlp (trlx's)", choices=("tied", "mlp")
    )
    batch_size: int = option(64, "prompts decoded together")
    seed: int = option(0, "sampling and training seed")
    device: str = option("auto", f"where the model runs: {DEVICES_HELP}")
    dtype: str = option(
        "float32", "the model's weights and the heads' (auto: bfloat16 where fast)", choices=DTYPE_CHOICES
    )

    def __post_init__(self):
        if self.target not in ("positive", "negative"):
            raise QVLMError(f"--target is {self.target!r}; use positive or negative")
        if self.best_of < 4:
            raise QVLMError(f"--best-of is {self.best_of}; it must be at least 4 (best-of-4 is a baseline)")
        if self.dtype not in DTYPE_CHOICES:
            raise QVLMError(f"--dtype is {self.dtype!r}; use one of {', '.join(DTYPE_CHOICES)}")
        _check(
            _finite(self.ilql_cql_scale) and self.ilql_cql_scale >= 0,
            "--ilql-cql-scale",
            self.ilql_cql_scale,
            "finite, >= 0 (0: off)",
        )
        for name in ("train_prompts", "val_prompts", "eval_prompts", "samples_per_prompt", "max_new_tokens"):
            _check(getattr(self, name) >= 0, "--" + name.replace("_", "-"), getattr(self, name), ">= 0 (0: preset)")
        for name in ("ilql_epochs", "value_epochs", "head_hidden", "guidance_top_k"):
            _check(getattr(self, name) >= 0, "--" + name.replace("_", "-"), getattr(self, name), ">= 0")
        for name in ("candidates", "block_size", "batch_size"):
            _check(getattr(self, name) >= 1, "--" + name.replace("_", "-"), getattr(self, name), "at least 1")
        _check(_finite(self.ppo_kl_coef) and self.ppo_kl_coef >= 0, "--ppo-kl-coef", self.ppo_kl_coef, "finite, >= 0")
        _check(_finite(self.ppo_lr) and self.ppo_lr > 0, "--ppo-lr", self.ppo_lr, "a finite number > 0")
        _check(self.ppo_prompts_per_iter >= 1, "--ppo-prompts-per-iter", self.ppo_prompts_per_iter, "at least 1")
        _check(self.ppo_epochs >= 1, "--ppo-epochs", self.ppo_epochs, "at least 1")
        _check(
            self.ppo_iterations in ("", "0") or _ascending_counts(self.ppo_iterations),
            "--ppo-iterations",
            repr(self.ppo_iterations),
            "0 (no ppo method) or ascending whole numbers >= 1, comma-separated (e.g. 10,20)",
        )
        for name in ("betas", "mc_betas"):
            _check(_number_list(getattr(self, name)), "--" + name.replace("_", "-"), repr(getattr(self, name)),
                   "comma-separated finite numbers, at least one (e.g. 4,8,16)")  # fmt: skip


@dataclass
class RewardModelConfig:
    """`qvlm train rm`: a reward model (or classifier) on a local encoder or causal LM backbone."""

    backbone: str = option("", "encoder or causal LM directory (empty: the packaged all-MiniLM-L6-v2)")
    lr: float = option(5e-5, "AdamW learning rate of every weight")
    schedule: str = option(
        "constant",
        "learning rate over the steps: constant, or linear (warm up linearly over the first --warmup "
        "fraction of the steps, then decay linearly to 0, as BERT fine-tuning does)",
        choices=LR_SCHEDULES,
    )
    warmup: float = option(0.1, "linear schedule: the fraction of the steps that warm the learning rate up")
    weight_decay: float = option(0.0, "AdamW weight decay (0: off)")
    grad_clip: float = option(1.0, "max global gradient norm (0: off)")
    batch_size: int = option(16, "examples (texts or preference pairs) per optimiser step")
    epochs: int = option(3, "passes over the training part (ignored when steps > 0)")
    steps: int = option(0, "total optimiser steps (0: epochs * batches per epoch)")
    max_length: int = option(256, "tokens per input (prompt + response); longer ones are cut")
    pooling: str = option(
        "default",
        "one vector per input: default (Hugging Face's: an encoder's CLS through its pooler, a causal LM's "
        "last non-pad token) or mean (the mean of the last hidden states over the real tokens, as sentence "
        "encoders such as all-MiniLM-L6-v2 were trained)",
        choices=POOLINGS,
    )
    held_out: float = option(0.1, "fraction of the examples held out for accuracy and calibration")
    seed: int = option(0, "seed of the head's initialisation, the held-out split and the data order")
    checkpoint_every: int = option(100, "steps between resumable checkpoints (0: only at the end)")
    progress: bool = option(True, "show a progress bar")
    fsdp: bool = option(False, "shard the classifier's weights over the processes with FSDP2 (several processes)")

    def __post_init__(self):
        _check(_finite(self.lr) and self.lr > 0, "lr", self.lr, "a finite number > 0")
        _check(self.schedule in LR_SCHEDULES, "schedule", self.schedule, f"one of {', '.join(LR_SCHEDULES)}")
        _check(0 <= self.warmup < 1, "warmup", self.warmup, "in [0, 1)")
        _check(_finite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", self.weight_decay, "finite, >= 0")
        _check(_finite(self.grad_clip) and self.grad_clip >= 0, "grad_clip", self.grad_clip, "finite, >= 0 (0: off)")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "at least 1")
        _check(self.epochs >= 1, "epochs", self.epochs, "at least 1")
        _check(self.steps >= 0, "steps", self.steps, ">= 0 (0: epochs * batches per epoch)")
        _check(self.max_length >= 2, "max_length", self.max_length, "at least 2")
        _check(self.pooling in POOLINGS, "pooling", self.pooling, f"one of {', '.join(POOLINGS)}")
        _check(0 <= self.held_out < 1, "held_out", self.held_out, "in [0, 1)")
        _check(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, ">= 0 (0: only at the end)")


@dataclass
class ProxyConfig:
    """`qvlm proxy`: reward-model over-optimisation made visible. A gold reward labels pairs of base
    samples; a proxy reward model learns from them; best-of-N by the proxy is scored by both."""

    model: str = option(DEFAULT_MODEL, "base model")
    gold: str = option("vader", "the gold reward (any --reward form without a reference)")
    backbone: str = option("", "the proxy's backbone directory (empty: the packaged all-MiniLM-L6-v2)")
    train_prompts: int = option(120, "training prompts (demo:train) whose base samples the gold reward labels")
    held_out: float = option(0.2, "fraction of those prompts whose pairs only measure the proxy's accuracy")
    samples_per_prompt: int = option(8, "base samples per training prompt (pairs among them)")
    pairs: int = option(2000, "at most this many gold-labelled pairs to train the proxy on")
    label_noise: float = option(0.0, "probability that a training pair's label is flipped")
    eval_prompts: int = option(32, "held-out prompts (demo:eval) for best-of-N")
    max_n: int = option(32, "base draws per eval prompt; best-of-N for N = 1, 2, 4, ... up to it")
    max_new_tokens: int = option(20, "response length limit")
    batch_size: int = option(64, "prompts decoded together")
    rm_epochs: int = option(2, "the proxy's epochs over its pairs")
    rm_lr: float = option(5e-5, "the proxy's learning rate")
    rm_batch_size: int = option(16, "pairs per optimiser step of the proxy")
    rm_prompt: bool = option(
        True, "the proxy reads each response with its prompt (off: the response alone, as VADER reads it)"
    )
    rm_pooling: str = option("default", "the proxy's pooling (see qvlm train rm --pooling)", choices=POOLINGS)
    rm_schedule: str = option(
        "constant", "the proxy's learning-rate schedule (see qvlm train rm --schedule)", choices=LR_SCHEDULES
    )
    ppo_iterations: str = option(
        "",
        "PPO against the proxy (LoRA, shared V critic): iteration counts, ascending, comma-separated, each a policy "
        "snapshot scored by gold and proxy on the eval prompts ('' or 0: no PPO)",
    )
    ppo_prompts_per_iter: int = option(8, "PPO against the proxy: training prompts per iteration (4 responses each)")
    ppo_lr: float = option(2e-4, "PPO against the proxy: AdamW learning rate of the LoRA adapters")
    ppo_kl_coef: float = option(0.02, "PPO against the proxy: KL coefficient of the per-token penalty to the base")
    ppo_eval_samples: int = option(4, "PPO against the proxy: responses per eval prompt for each snapshot")
    guide_betas: str = option(
        "",
        "guidance against the proxy: Monte-Carlo Q/V heads fitted to the proxy's scores of the training samples "
        "steer decoding at each of these strengths, comma-separated, in 1/proxy-logit units (on SmolLM2's base samples the proxy's "
        "logits have a standard deviation of 4.6, VADER's 0.35: beta 1 here pushes about as hard as the demo's 13; "
        "'': no guidance)",
    )
    guide_epochs: int = option(6, "guidance against the proxy: the heads' epochs over the training samples")
    guide_top_k: int = option(20, "guidance against the proxy: guide only the base model's k likeliest tokens (0: all)")
    guide_eval_samples: int = option(4, "guidance against the proxy: responses per eval prompt at each beta")
    seed: int = option(0, "seed of sampling, pairs and the proxy")

    def __post_init__(self):
        _check(self.train_prompts >= 2, "train_prompts", self.train_prompts, "at least 2")
        _check(0 < self.held_out < 1, "held_out", self.held_out, "in (0, 1)")
        _check(self.samples_per_prompt >= 2, "samples_per_prompt", self.samples_per_prompt, "at least 2 (pairs)")
        _check(self.pairs >= 2, "pairs", self.pairs, "at least 2")
        _check(0 <= self.label_noise < 0.5, "label_noise", self.label_noise, "in [0, 0.5)")
        _check(self.eval_prompts >= 1, "eval_prompts", self.eval_prompts, "at least 1")
        _check(self.max_n >= 1, "max_n", self.max_n, "at least 1")
        _check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "at least 1")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "at least 1")
        _check(self.rm_epochs >= 1, "rm_epochs", self.rm_epochs, "at least 1")
        _check(_finite(self.rm_lr) and self.rm_lr > 0, "rm_lr", self.rm_lr, "a finite number > 0")
        _check(self.rm_batch_size >= 1, "rm_batch_size", self.rm_batch_size, "at least 1")
        _check(
            self.ppo_iterations in ("", "0") or _ascending_counts(self.ppo_iterations),
            "ppo_iterations",
            repr(self.ppo_iterations),
            "ascending whole numbers >= 1, comma-separated (e.g. 4,8,16), or 0 for none",
        )
        _check(self.ppo_prompts_per_iter >= 1, "ppo_prompts_per_iter", self.ppo_prompts_per_iter, "at least 1")
        _check(
            _positive_list(self.guide_betas),
            "guide_betas",
            repr(self.guide_betas),
            "finite numbers > 0, comma-separated (e.g. 1,2,4), or '' for none",
        )
        _check(self.guide_epochs >= 1, "guide_epochs", self.guide_epochs, "at least 1")
        _check(self.guide_top_k >= 0, "guide_top_k", self.guide_top_k, ">= 0 (0: the full vocabulary)")
        _check(self.guide_eval_samples >= 1, "guide_eval_samples", self.guide_eval_samples, "at least 1")
        _check(_finite(self.ppo_lr) and self.ppo_lr > 0, "ppo_lr", self.ppo_lr, "a finite number > 0")
        _check(_finite(self.ppo_kl_coef) and self.ppo_kl_coef >= 0, "ppo_kl_coef", self.ppo_kl_coef, "finite, >= 0")
        _check(self.ppo_eval_samples >= 1, "ppo_eval_samples", self.ppo_eval_samples, "at least 1")
        _check(self.rm_schedule in LR_SCHEDULES, "rm_schedule", self.rm_schedule, f"one of {', '.join(LR_SCHEDULES)}")
        _check(self.rm_pooling in POOLINGS, "rm_pooling", self.rm_pooling, f"one of {', '.join(POOLINGS)}")


@dataclass
class SoftQConfig:
    """Online soft Q-learning for a language model (``qvlm train softq``, issue 10): rounds of
    sampling with the current guided policy, scoring, a replay set that keeps every round, and
    soft Bellman regression of the heads on all of it."""

    alpha: float = option(0.1, "KL temperature: the guided policy is pi_ref exp((Q - V) / alpha), beta = 1/alpha")
    gamma: float = option(1.0, "discount per token (1: Q predicts the undiscounted final score)")
    rounds: int = option(8, "rounds of (sample with the guided policy, score, fit)")
    prompts_per_round: int = option(16, "prompts decoded per round (taken in turn from the prompt file)")
    samples_per_prompt: int = option(4, "responses per prompt per round")
    max_new_tokens: int = option(32, "response length limit when sampling (a cut response is truncated)")
    guidance_top_k: int = option(
        0, "guide only the base model's k likeliest tokens when sampling (0: the full vocabulary, the exact tilt)"
    )
    steps_per_round: int = option(32, "gradient steps per round, each on a minibatch drawn from the whole replay set")
    batch_size: int = option(16, "samples per gradient step")
    lr: float = option(1e-3, "AdamW learning rate of the heads")
    trunk_lr: float = option(1e-5, "AdamW learning rate of the trunk (lora: adapters)")
    weight_decay: float = option(0.0, "AdamW weight decay (0: off)")
    grad_clip: float = option(1.0, "max global gradient norm (0: off)")
    polyak: float = option(0.1, "target heads <- (1 - polyak) target + polyak online, after every step")
    v_scale: float = option(1.0, "weight of V's regression onto the soft value of the target Q at s_t")
    decode_batch_size: int = option(64, "responses decoded together")
    max_length: int = option(256, "prompt + response tokens when training (longer responses are cut)")
    seed: int = option(0, "seed of the heads' initialisation, the sampling and the minibatches")
    checkpoint_every: int = option(1, "rounds between resumable checkpoints (0: only at the end)")
    progress: bool = option(True, "show progress")

    def __post_init__(self):
        _check(_finite(self.alpha) and self.alpha > 0, "alpha", self.alpha, "a finite number > 0")
        _check(0 <= self.gamma <= 1, "gamma", self.gamma, "in [0, 1]")
        for name in ("rounds", "prompts_per_round", "samples_per_prompt", "max_new_tokens", "steps_per_round"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "at least 1")
        for name in ("batch_size", "decode_batch_size"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "at least 1")
        _check(_finite(self.lr) and self.lr > 0, "lr", self.lr, "a finite number > 0")
        _check(_finite(self.trunk_lr) and self.trunk_lr > 0, "trunk_lr", self.trunk_lr, "a finite number > 0")
        _check(_finite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", self.weight_decay, "finite, >= 0")
        _check(_finite(self.grad_clip) and self.grad_clip >= 0, "grad_clip", self.grad_clip, "finite, >= 0 (0: off)")
        _check(0 < self.polyak <= 1, "polyak", self.polyak, "in (0, 1]")
        _check(_finite(self.v_scale) and self.v_scale >= 0, "v_scale", self.v_scale, "finite, >= 0")
        _check(self.max_length >= 2, "max_length", self.max_length, "at least 2")
        _check(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, ">= 0 (0: only at the end)")
        _check(self.guidance_top_k >= 0, "guidance_top_k", self.guidance_top_k, ">= 0 (0: the full vocabulary)")


# ---------------------------------------------------------------- online actor-critic (issue 9)

PPO_ALGOS = ("ppo", "a2c")
PPO_TRUNKS = ("lora", "full")
PPO_CRITICS = ("shared", "separate")
KL_MODES = ("reward", "loss")


@dataclass
class PPOConfig:
    """PPO with a V critic on a causal LM (``qvlm train ppo``). Defaults follow Ziegler et al. 2019 /
    TRL's PPO where one applies; ``algo = a2c`` is plain actor-critic (one epoch, one minibatch,
    no clipping: it overrides ppo_epochs, minibatch_size, clip_eps and value_clip)."""

    algo: str = option(
        "ppo", "ppo: clipped surrogate, several epochs; a2c: plain actor-critic preset", choices=PPO_ALGOS
    )
    iterations: int = option(20, "rollout + update rounds")
    prompts_per_iter: int = option(8, "prompts per rollout (drawn in a seeded order, epoch by epoch)")
    responses_per_prompt: int = option(4, "responses sampled per prompt")
    max_new_tokens: int = option(24, "response length limit (a cut response bootstraps from V unless fixed_horizon)")
    fixed_horizon: bool = option(False, "the length limit ends the episode (done) instead of cutting it")
    ppo_epochs: int = option(4, "passes over each rollout")
    minibatch_size: int = option(8, "responses per optimiser step")
    lr: float = option(1e-5, "AdamW learning rate of the policy (LoRA adapters, or every weight with --trunk full)")
    critic_lr: float = option(1e-3, "AdamW learning rate of the V head (and a separate critic's trunk)")
    anneal_lr: bool = option(False, "decay both learning rates linearly to 0 over the iterations (CleanRL)")
    weight_decay: float = option(0.0, "AdamW weight decay (0: off)")
    grad_clip: float = option(1.0, "max global gradient norm (0: off)")
    trunk: str = option(
        "lora", "policy weights that train: lora adapters (reference = adapters off) or full", choices=PPO_TRUNKS
    )
    lora_r: int = option(8, "LoRA rank (trunk = lora)")
    lora_alpha: int = option(16, "LoRA scaling numerator (trunk = lora)")
    critic: str = option(
        "shared", "V head on the policy's trunk (shared) or on its own copy of the base (separate)", choices=PPO_CRITICS
    )
    fsdp: bool = option(
        False, "shard the policy's weights over the processes with FSDP2 (--trunk full, several processes)"
    )
    deepspeed: str = option(
        "",
        "DeepSpeed ZeRO for the optimiser: zero1 (AdamW moments partitioned over the processes), zero2 (and "
        "the gradients), or a DeepSpeed JSON config of stage 1 or 2 (--trunk full, several processes; '': off)",
    )
    critic_init: str = option("", "a `qvlm train value` run directory whose V head starts the critic ('': fresh)")
    critic_warmup: int = option(0, "first iterations that train the critic only")
    head_hidden: int = option(0, "width of the V head's hidden layer (0: the trunk's hidden size)")
    gamma: float = option(1.0, "discount per token")
    lam: float = option(0.95, "GAE lambda")
    clip_eps: float = option(0.2, "PPO ratio clip epsilon")
    value_clip: float = option(0.2, "value clip around V_old (0: off)")
    vf_coef: float = option(1.0, "weight of the value loss")
    ent_coef: float = option(0.0, "weight of the entropy bonus (0: off)")
    kl_coef: float = option(0.05, "KL coefficient beta_kl to the reference (initial value when adaptive)")
    kl_mode: str = option(
        "reward", "reward: k1 penalty in the per-token reward; loss: k3 KL loss term", choices=KL_MODES
    )
    kl_target: float = option(0.0, "adaptive KL controller's target KL per response in nats (0: fixed coefficient)")
    kl_horizon: float = option(10000.0, "adaptive KL controller's horizon (Ziegler et al. 2019)")
    whiten: bool = option(True, "whiten advantages over the batch's real tokens")
    decode_batch_size: int = option(64, "responses decoded together")
    chat: bool | None = option(None, "wrap prompts in the chat template (None: when the tokenizer has one)", type=bool)
    seed: int = option(0, "seed of the V head, the prompt order, the sampling and the minibatches")
    checkpoint_every: int = option(5, "iterations between resumable checkpoints (0: only at the end)")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self):
        if self.algo not in PPO_ALGOS:
            raise QVLMError(f"unknown algo {self.algo!r}; use one of {', '.join(PPO_ALGOS)}")
        if self.trunk not in PPO_TRUNKS:
            raise QVLMError(f"--trunk is {self.trunk!r}; use one of {', '.join(PPO_TRUNKS)}")
        if self.critic not in PPO_CRITICS:
            raise QVLMError(f"--critic is {self.critic!r}; use one of {', '.join(PPO_CRITICS)}")
        if self.kl_mode not in KL_MODES:
            raise QVLMError(f"--kl-mode is {self.kl_mode!r}; use one of {', '.join(KL_MODES)}")
        if self.fsdp and self.trunk != "full":
            raise QVLMError(
                f"--fsdp shards a policy that trains every weight, not --trunk {self.trunk}: use --trunk full with "
                "--fsdp, or plain data parallel (no --fsdp) for LoRA adapters"
            )
        if self.fsdp and self.critic != "shared":
            raise QVLMError("--fsdp supports --critic shared only (a separate critic's trunk is not sharded)")
        if self.deepspeed and (self.trunk != "full" or self.critic != "shared" or self.fsdp):
            raise QVLMError(
                "--deepspeed partitions the optimiser of --trunk full --critic shared without --fsdp (LoRA "
                "adapters are small: use plain data parallel; --fsdp shards the weights too)"
            )
        for name in ("iterations", "prompts_per_iter", "responses_per_prompt", "max_new_tokens", "ppo_epochs"):
            _check(getattr(self, name) >= 1, "--" + name.replace("_", "-"), getattr(self, name), "at least 1")
        for name in ("minibatch_size", "lora_r", "decode_batch_size"):
            _check(getattr(self, name) >= 1, "--" + name.replace("_", "-"), getattr(self, name), "at least 1")
        for name in ("lr", "critic_lr", "kl_horizon"):
            v = getattr(self, name)
            _check(_finite(v) and v > 0, "--" + name.replace("_", "-"), v, "a finite number > 0")
        for name in ("weight_decay", "grad_clip", "value_clip", "vf_coef", "ent_coef", "kl_coef", "kl_target"):
            v = getattr(self, name)
            _check(_finite(v) and v >= 0, "--" + name.replace("_", "-"), v, "a finite number >= 0")
        _check(_finite(self.clip_eps) and self.clip_eps > 0, "--clip-eps", self.clip_eps, "a finite number > 0")
        _check(0 <= self.gamma <= 1, "--gamma", self.gamma, "in [0, 1]")
        _check(0 <= self.lam <= 1, "--lam", self.lam, "in [0, 1]")
        _check(self.critic_warmup >= 0, "--critic-warmup", self.critic_warmup, ">= 0")
        _check(self.head_hidden >= 0, "--head-hidden", self.head_hidden, ">= 0 (0: the trunk's hidden size)")
        _check(self.checkpoint_every >= 0, "--checkpoint-every", self.checkpoint_every, ">= 0 (0: only at the end)")
        if self.algo == "a2c":  # the plain actor-critic of the source documents, as a preset
            self.ppo_epochs = 1
            self.minibatch_size = self.prompts_per_iter * self.responses_per_prompt
            self.clip_eps = 1e9
            self.value_clip = 0.0
