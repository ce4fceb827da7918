"""The reference policy's exact return distribution at every (state, action) and state of a token tree.

``Z(s, a)`` is the law of the (discounted) return collected from the step ``(s, a)`` on when ``pi_ref``
writes every later token; ``Z(s) = sum_a pi_ref(a|s) Z(s, a)``. On a tree it follows by backward induction,
level by level: a step that ends the episode returns its reward ``r``; any other step returns
``r + gamma R'`` with ``R' ~ Z(s')``.

With ``gamma = 1`` and any rewards, the soft optimum is a functional of it (DESIGN.md, "Distributional
values"; Q#, Zhou et al. 2025): ``Q*_alpha(s, a) = alpha log E[exp(R / alpha)], R ~ Z(s, a)``, which
:func:`qvlm.distributional.soft_q_from_categorical` reads off ``(values, log pair_probs)`` exactly.
(With ``gamma < 1`` the KL is discounted too and that identity does not hold; the distribution is still
the discounted return's.)

Every return is rounded to ``decimals`` places so that float noise (0.2 + 0.4 against 0.6) does not split
an atom. The atoms are shared by all states: the default MDP (count reward, horizon 5) has 6
(0, 0.2, ..., 1); per-token rewards or ``gamma < 1`` can make many, and ``max_entries`` bounds the
``(N, V, M)`` table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qvlm.errors import QVLMError
from qvlm.exact.solver import TokenTree

__all__ = ["ReturnDistribution", "return_distribution"]

DEFAULT_MAX_ENTRIES = 50_000_000  # float64 entries of pair_probs: 400 MB


@dataclass
class ReturnDistribution:
    """``values (M,)``: the distinct returns, increasing; ``pair_probs (N, V, M)``: ``P(R = values[m] | s, a)``
    under pi_ref; ``state_probs (N, M)``: ``P(R = values[m] | s)``. Rows sum to 1."""

    values: torch.Tensor
    pair_probs: torch.Tensor
    state_probs: torch.Tensor


def _round(x: torch.Tensor, decimals: int) -> torch.Tensor:
    return torch.round(x, decimals=decimals) + 0.0  # + 0.0: -0.0 -> 0.0, one atom


def _atoms(tree: TokenTree, decimals: int) -> torch.Tensor:
    """Every return any (state, action) can have, rounded and sorted: a superset built level by level."""
    below = torch.zeros(0, dtype=torch.float64)  # returns from the level below
    every = []
    for sl in reversed(tree.level_slices):
        done = tree.done[sl] > 0
        r = tree.rewards[sl]
        parts = [r[done]]
        if (~done).any():
            steps = torch.unique(r[~done])
            parts.append((steps[:, None] + tree.gamma * below[None, :]).flatten())
        below = torch.unique(_round(torch.cat(parts), decimals))
        every.append(below)
    return torch.unique(torch.cat(every))


def return_distribution(
    tree: TokenTree, decimals: int = 12, max_entries: int = DEFAULT_MAX_ENTRIES
) -> ReturnDistribution:
    """pi_ref's exact return distribution for every (state, action) and state of ``tree``.

    Shapes: ``values (M,)``, ``pair_probs (N, V, M)``, ``state_probs (N, M)``, float64.
    """
    values = _atoms(tree, decimals)
    N, V, M = tree.num_states, tree.vocab_size, len(values)
    if N * V * M > max_entries:
        raise QVLMError(
            f"the return distribution has {M} distinct returns over {N * V} (state, action) pairs: "
            f"{N * V * M:,} entries, over the budget of {max_entries:,} (return_distribution(max_entries=...)): "
            "use a smaller tree, or a reward with fewer distinct values"
        )
    pair_probs = torch.zeros(N, V, M, dtype=torch.float64)
    state_probs = torch.zeros(N, M, dtype=torch.float64)
    for sl in reversed(tree.level_slices):
        r, done, kid = tree.rewards[sl], tree.done[sl] > 0, tree.child[sl]  # (n, V)
        probs = torch.zeros(len(r), V, M, dtype=torch.float64)
        # a step that ends the episode: a point mass at its reward
        ends = torch.searchsorted(values, _round(r, decimals)).clamp(max=M - 1)  # (n, V)
        probs.scatter_(-1, ends[..., None], done[..., None].to(torch.float64))
        # any other step: the child's distribution, each atom z moved to r + gamma z
        shifted = _round(r[..., None] + tree.gamma * values, decimals)  # (n, V, M)
        moved = torch.searchsorted(values, shifted).clamp(max=M - 1)
        child = torch.where(done[..., None], 0.0, state_probs[kid.clamp(min=0)])  # (n, V, M)
        probs.scatter_add_(-1, moved, child)
        pair_probs[sl] = probs
        state_probs[sl] = (tree.ref_probs[sl, :, None] * probs).sum(1)
    return ReturnDistribution(values, pair_probs, state_probs)
