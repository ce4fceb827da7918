"""Prefix-scorer settings (:mod:`qvlm.algos.value`)."""

from __future__ import annotations

from dataclasses import dataclass

from qvlm.configs.base import option
from qvlm.configs.offline import TrainConfig

__all__ = ["VALUE_TARGETS", "Q_TARGETS", "ValueConfig", "SCORER"]

VALUE_TARGETS = ("mc", "td", "td_lambda")
Q_TARGETS = ("return", "next_v")


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
    gamma: float = option(1.0, "discount (1: V predicts the undiscounted final score)", ge=0, le=1)
    lam: float = option(0.95, "lambda of td_lambda", ge=0, le=1)


# The Monte-Carlo prefix scorer of the demo and of `qvlm proxy`'s guidance: regression on the taken
# actions only is cheap, so it affords more epochs; lr and epochs were chosen on held-out training
# prompts, never on the evaluation split.
SCORER = dict(epochs=6, lr=3e-3, batch_size=8, max_length=512, q_target="next_v")
