"""ILQL settings (:mod:`qvlm.algos.ilql`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from qvlm.configs.base import option
from qvlm.configs.offline import TrainConfig

__all__ = ["ILQLConfig"]


@dataclass
class ILQLConfig(TrainConfig):
    """ILQL settings. Defaults follow trlx's ILQLConfig except where noted."""

    gamma: float = option(0.99, "discount per token (trlx: 0.99)", ge=0, le=1)
    tau: float = option(0.7, "expectile of V over Q (trlx: 0.7); 0.5 is the mean, ->1 the max", gt=0, lt=1)
    cql_scale: float = option(0.1, "weight of the CQL term (trlx: 0.1; 0: off)", ge=0)
    awac_scale: float = option(1.0, "weight of the AWAC term when the trunk trains (trlx: 1; 0: off)", ge=0)
    awac_beta: float = option(
        1.0, "inverse temperature of the AWAC weight exp(beta * A)", check=math.isfinite, rule="a finite number"
    )
    # trlx syncs with 0.001 every 5 steps: a 5000-step time constant, tuned for long GPU runs.
    # Offline runs here are hundreds of steps, so the targets follow faster (about 100 steps).
    polyak: float = option(0.01, "target Q <- (1 - polyak) target Q + polyak Q (trlx: 0.001)", gt=0, le=1)
    target_sync_every: int = option(1, "steps between Polyak updates (trlx: 5)", ge=1)
