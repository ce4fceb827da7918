"""Reward-model settings (:mod:`qvlm.algos.reward_model`)."""

from __future__ import annotations

from dataclasses import dataclass

from qvlm.configs.base import Config, option

__all__ = ["LR_SCHEDULES", "POOLINGS", "RewardModelConfig"]

LR_SCHEDULES = ("constant", "linear")
POOLINGS = ("default", "mean")  # Hugging Face's pooling, or the mean over real tokens


@dataclass
class RewardModelConfig(Config):
    """`qvlm train rm`: a reward model (or classifier) on a local encoder or causal LM backbone."""

    backbone: str = option("", "encoder or causal LM directory (empty: the packaged all-MiniLM-L6-v2)")
    lr: float = option(5e-5, "AdamW learning rate of every weight", gt=0)
    schedule: str = option(
        "constant",
        "learning rate over the steps: constant, or linear (warm up linearly over the first --warmup "
        "fraction of the steps, then decay linearly to 0, as BERT fine-tuning does)",
        choices=LR_SCHEDULES,
    )
    warmup: float = option(0.1, "linear schedule: the fraction of the steps that warm the learning rate up", ge=0, lt=1)
    weight_decay: float = option(0.0, "AdamW weight decay (0: off)", ge=0)
    grad_clip: float = option(1.0, "max global gradient norm (0: off)", ge=0, note="0: off")
    batch_size: int = option(16, "examples (texts or preference pairs) per optimiser step", ge=1)
    epochs: int = option(3, "passes over the training part (ignored when steps > 0)", ge=1)
    steps: int = option(0, "total optimiser steps (0: epochs * batches per epoch)", ge=0)
    max_length: int = option(256, "tokens per input (prompt + response); longer ones are cut", ge=2)
    pooling: str = option(
        "default",
        "one vector per input: default (Hugging Face's: an encoder's CLS through its pooler, a causal LM's "
        "last non-pad token) or mean (the mean of the last hidden states over the real tokens, as sentence "
        "encoders such as all-MiniLM-L6-v2 were trained)",
        choices=POOLINGS,
    )
    held_out: float = option(0.1, "fraction of the examples held out for accuracy and calibration", ge=0, lt=1)
    seed: int = option(0, "seed of the head's initialisation, the held-out split and the data order")
    checkpoint_every: int = option(
        100, "steps between resumable checkpoints (0: only at the end)", ge=0, note="0: only at the end"
    )
    progress: bool = option(True, "show a progress bar")
    fsdp: bool = option(False, "shard the classifier's weights over the processes with FSDP2 (several processes)")
