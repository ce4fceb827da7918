"""What every offline trainer shares (:mod:`qvlm.train.loop`): optimiser, batches, length, seed, checkpoints."""

from __future__ import annotations

from dataclasses import dataclass

from qvlm.configs.base import Config, option

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig(Config):
    """What every offline trainer shares (qvlm.train.loop): optimiser, batches, length, seed, checkpoints.

    ILQLConfig and ValueConfig extend it, so ``asdict`` of either stays flat. How the trunk trains (and
    whether it is sharded) is the model's :class:`~qvlm.configs.TrunkConfig`.
    """

    lr: float = option(1e-3, "AdamW learning rate of the heads", gt=0)
    trunk_lr: float = option(1e-5, "AdamW learning rate of the trunk (lora: adapters; full: all)", gt=0)
    weight_decay: float = option(0.0, "AdamW weight decay (0: off)", ge=0)
    grad_clip: float = option(1.0, "max global gradient norm (0: off)", ge=0, note="0: off")
    batch_size: int = option(8, "samples per optimiser step", ge=1)
    epochs: int = option(4, "passes over the data (ignored when steps > 0)", ge=1)
    steps: int = option(0, "total optimiser steps (0: epochs * batches per epoch)", ge=0)
    max_length: int = option(
        256,
        "prompt + response tokens; longer responses are cut (truncated)",
        ge=2,
        note="a prompt token and a response token",
    )
    seed: int = option(0, "seed of the heads' initialisation and the data order")
    checkpoint_every: int = option(100, "steps between resumable checkpoints (0: only at the end)", ge=0)
    progress: bool = option(True, "show a progress bar")
