"""What every learner on an exact token MDP shares: the heads it hands back (:class:`TabularHeads`),
table parameters, Adam with a linear decay, and running torch on one thread.

Its own module so that the learners (:mod:`qvlm.exact.learners`, :mod:`qvlm.exact.ppo_learner`,
:mod:`qvlm.exact.qsharp_learner`) import it and not one another: ``learners`` registers the others, so an
import back into ``learners`` would be a cycle.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from qvlm.distributional import soft_q_from_categorical
from qvlm.errors import QVLMError

__all__ = [
    "CategoricalTables",
    "TabularHeads",
    "table_parameter",
    "adam_with_decay",
    "adam_step",
    "single_thread",
    "check_positive",
]


@dataclass
class CategoricalTables:
    """A distributional learner's return distributions ``Z(s, a)``: log-probabilities ``(N, V, K)`` on a
    fixed support ``(K,)``. :meth:`soft_q` reads ``Q*_alpha`` at any alpha from them."""

    support: torch.Tensor
    log_probs: torch.Tensor

    def soft_q(self, alpha: float) -> torch.Tensor:
        """``Q*_alpha(s, a) = alpha log E_Z[exp(R / alpha)]`` (:func:`qvlm.distributional.soft_q_from_categorical`).
        Shape ``(N, V)``."""
        return soft_q_from_categorical(self.log_probs, self.support, alpha)


@dataclass
class TabularHeads:
    """What a learner hands back: ``q (N, V)``, ``v (N,)`` and where its data went.

    ``visited_pairs (N, V)`` marks the (state, taken action) pairs in the learner's data;
    ``visited_states (N,)`` the states where it took at least one action.
    """

    q: torch.Tensor
    v: torch.Tensor
    visited_pairs: torch.Tensor
    visited_states: torch.Tensor = field(init=False)
    # a policy learner (ppo) hands back its own policy table (N, V), scored instead of guidance
    policy: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)  # learner-specific numbers, reported as they are
    # a distributional learner (qsharp) hands back Z(s, a) too: Q*_alpha at every alpha from one run
    distribution: CategoricalTables | None = None

    def __post_init__(self) -> None:
        self.visited_states = self.visited_pairs.any(-1)


def table_parameter(*shape: int, init: float = 0.0) -> nn.Parameter:
    """A float64 table of ``shape`` filled with ``init``, trainable."""
    return nn.Parameter(torch.full(shape, float(init), dtype=torch.float64))


def adam_with_decay(params: list[nn.Parameter], lr: float, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """Adam with the learning rate decayed linearly to 0, so the tables settle at the end."""
    opt = torch.optim.Adam(params, lr=lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda k: max(0.0, 1.0 - k / steps))


def adam_step(opt: torch.optim.Optimizer, sched: Any, loss: torch.Tensor) -> None:
    """One optimiser step on ``loss`` and one scheduler step."""
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one intra-op thread: the tables are tiny, and on a busy 2-core machine extra
    threads only add synchronisation (measured 6x slower). Restores the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_positive(name: str, **values: float) -> None:
    """Raise :class:`QVLMError` naming ``name.key`` for each value that is not > 0."""
    for key, value in values.items():
        if not value > 0:
            raise QVLMError(f"{name}.{key}={value}: must be positive; use the documented default")
