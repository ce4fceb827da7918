"""Exact ground truth on small token MDPs: soft-optimal Q*, V*, pi* and exact policy evaluation.

The token MDP is DESIGN.md's ("The product in one page") with the prompt left empty:

- tokens ``0 .. V-2`` are ordinary tokens named ``a, b, c, ...``; **EOS is the last id, ``V - 1``**;
- a state is the tuple of tokens written so far; the root is ``()``; the action is the next token;
- the episode ends when EOS is written or when the response reaches ``horizon`` tokens. At the
  horizon the episode **terminates** (``done = 1``, nothing is bootstrapped): the state (a token
  tuple) knows its own length, so this finite-horizon MDP has nothing beyond the horizon and
  ``V = 0`` there is exact. (In the LM pipeline a cut by the length limit is truncation and
  bootstraps from ``V(s_{T+1})``; there the state does not carry the step budget.)
- the reference policy ``pi_ref(.|prefix)`` is a table, a callable, a seeded Dirichlet table, or a
  causal LM reading ``[EOS] + prefix`` (EOS doubles as the start token, as GPT-2's
  ``<|endoftext|>`` does; EOS never occurs inside a live prefix, so the start is unambiguous);
- the reward of a step is ``per_token(prefix, a) + done * terminal(prefix + (a,))``.

Decision states (prefixes without EOS, shorter than the horizon) get integer ids level by level:
level ``d`` holds the ``(V-1)^d`` prefixes of length ``d`` in lexicographic order, so the child of
prefix ``i`` by token ``a < V-1`` is prefix ``i * (V-1) + a`` of level ``d + 1``. Every quantity is
a float64 tensor ``(N, V)`` over (state, action) or ``(N,)`` over states, and dynamic programming
runs level by level from the deepest, vectorised within a level.

Size: ``N = sum_{d<H} (V-1)^d`` decision states and ``1 + N*V`` tree nodes (terminal ones
included): vocab 4, horizon 5 -> 121 states, 485 nodes; vocab 8, horizon 7 -> 137,257 states,
1.1 M nodes (seconds); vocab 8, horizon 8 -> 7.7 M nodes, over the default budget of 2 M nodes,
which raises :class:`QVLMError` before anything is allocated.

Formulas (DESIGN.md, "KL-regularised (soft) optimum"): ``Q*(s,a) = r + gamma (1 - done) V*(s')``,
``V*(s) = alpha log sum_a pi_ref(a|s) exp(Q*(s,a) / alpha)``,
``pi*(a|s) = pi_ref(a|s) exp((Q*(s,a) - V*(s)) / alpha)``. ``V*(root)`` is the optimum of the
objective ``J(pi) = E_pi[sum_t gamma^t r_t] - alpha E_pi[sum_t gamma^t KL(pi(.|s_t) || pi_ref(.|s_t))]``
(with gamma = 1 the KL term is the KL between the two distributions over whole responses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
import torch

from qvlm.errors import QVLMError
from qvlm.losses import soft_value
from qvlm.returns import td_targets

__all__ = [
    "DEFAULT_MAX_STATES",
    "MDPConfig",
    "Reward",
    "ReferencePolicy",
    "TokenMDP",
    "TokenTree",
    "SoftOptimum",
    "HardOptimum",
    "PolicyEvaluation",
    "DirichletPolicy",
    "CallablePolicy",
    "CausalLMPolicy",
    "table_policy",
    "tiny_llama",
    "count_reward",
    "pattern_reward",
    "eos_reward",
    "terminal_reward",
    "token_reward",
    "token_names",
    "count_tree_nodes",
    "build_tree",
    "build_mdp",
    "solve",
    "solve_hard",
    "evaluate_policy",
    "policy_table",
    "guided_policy",
    "soft_bellman_residual",
]

DEFAULT_MAX_STATES = 2_000_000


def token_names(vocab_size: int) -> list[str]:
    """``['a', 'b', ..., '<eos>']``: ordinary tokens by letter, EOS last (id ``vocab_size - 1``)."""
    return [chr(ord("a") + i) for i in range(vocab_size - 1)] + ["<eos>"]


# ---------------------------------------------------------------- reference policies


class ReferencePolicy(Protocol):
    """``pi_ref`` on a batch of equal-length prefixes (no EOS inside).

    Shape: ``prefixes (n, d)`` int64 -> ``(n, V)`` float64 rows summing to 1.
    """

    vocab_size: int

    def probs(self, prefixes: np.ndarray) -> np.ndarray: ...


@dataclass
class DirichletPolicy:
    """A seeded random table: ``pi_ref(.|prefix) ~ Dirichlet(concentration)``, i.i.d. per prefix.

    Rows of level ``d`` are drawn by ``numpy.random.default_rng([seed, d])``, so a prefix's row does
    not depend on the order of queries. Concentration 1 spreads rows uniformly over the simplex.
    """

    vocab_size: int
    seed: int = 0
    concentration: float = 1.0
    _levels: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def probs(self, prefixes: np.ndarray) -> np.ndarray:
        d = prefixes.shape[1]
        if d not in self._levels:
            rng = np.random.default_rng([self.seed, d])
            n = (self.vocab_size - 1) ** d
            self._levels[d] = rng.dirichlet(np.full(self.vocab_size, self.concentration), size=n)
        return self._levels[d][_level_index(prefixes, self.vocab_size)]


@dataclass
class CallablePolicy:
    """``pi_ref`` from a Python callable ``prefix tuple -> probabilities`` (one call per prefix)."""

    vocab_size: int
    fn: Callable[[tuple[int, ...]], Sequence[float]]

    def probs(self, prefixes: np.ndarray) -> np.ndarray:
        return np.array([np.asarray(self.fn(tuple(int(t) for t in p)), dtype=np.float64) for p in prefixes]).reshape(
            len(prefixes), self.vocab_size
        )


def table_policy(vocab_size: int, table: Mapping[tuple[int, ...], Sequence[float]]) -> CallablePolicy:
    """``pi_ref`` from an explicit table ``{prefix tuple: probabilities}`` covering every live prefix."""

    def lookup(prefix: tuple[int, ...]) -> Sequence[float]:
        if prefix not in table:
            raise QVLMError(
                f"the pi_ref table has no row for prefix {prefix} (table_policy): give a row for every "
                "prefix without EOS shorter than the horizon, or pass a callable policy"
            )
        return table[prefix]

    return CallablePolicy(vocab_size, lookup)


@dataclass
class CausalLMPolicy:
    """``pi_ref(.|prefix) = softmax(logits at the last position of [EOS] + prefix)`` of a causal LM.

    EOS (id ``V - 1``) is the start token, so the LM's vocabulary is exactly the MDP's. Prefixes of
    one level have equal length, so batches need no padding or attention mask.
    """

    model: Any  # a transformers causal LM with config.vocab_size == vocab_size
    vocab_size: int
    batch_size: int = 4096

    @torch.no_grad()
    def probs(self, prefixes: np.ndarray) -> np.ndarray:
        n, d = prefixes.shape
        ids = torch.cat([torch.full((n, 1), self.vocab_size - 1), torch.as_tensor(prefixes)], dim=1)
        out = []
        for start in range(0, n, self.batch_size):
            logits = self.model(input_ids=ids[start : start + self.batch_size]).logits[:, -1]  # (b, V)
            out.append(torch.softmax(logits.double(), dim=-1))
        return torch.cat(out).numpy()


def tiny_llama(
    vocab_size: int, seed: int, hidden_size: int = 16, num_layers: int = 1, initializer_range: float = 0.5
) -> Any:
    """A randomly initialised Llama (``torch.manual_seed(seed)``) whose vocabulary is the MDP's.

    ``initializer_range`` 0.5 (the Llama default 0.02 gives nearly uniform next-token rows) makes
    the rows differ from prefix to prefix. Imports transformers lazily (it takes seconds).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
        initializer_range=initializer_range,
        bos_token_id=vocab_size - 1,
        eos_token_id=vocab_size - 1,
        pad_token_id=None,
        tie_word_embeddings=False,  # no pad id: Llama zeroes the pad row of the embedding
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


# ---------------------------------------------------------------- rewards


@dataclass
class Reward:
    """Step reward ``per_token(prefix, a) + done * terminal(prefix + (a,))``; either part may be None.

    ``terminal``: ``tokens (n, L)`` int64 complete responses (EOS included when written) -> ``(n,)``.
    ``per_token``: ``prefixes (n, d)``, ``actions (n,)`` -> ``(n,)``. Keep rewards in [0, 1] per
    episode so that ``J* > 0`` and objective ratios ``J(pi) / J*`` are meaningful.
    """

    name: str
    terminal: Callable[[np.ndarray], np.ndarray] | None = None
    per_token: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None


def count_reward(token: int, horizon: int, label: str | None = None) -> Reward:
    """Terminal reward: how often ``token`` occurs in the response, divided by the horizon (in [0, 1]).

    ``label`` names the token in the reward's name (default: its id).
    """
    return Reward(
        f"count({label or token})/{horizon}", terminal=lambda tokens: (tokens == token).sum(axis=1) / float(horizon)
    )


def pattern_reward(pattern: Sequence[int]) -> Reward:
    """Terminal reward 1 when ``pattern`` occurs as a contiguous run of the response, else 0."""
    pat = np.asarray(pattern, dtype=np.int64)

    def terminal(tokens: np.ndarray) -> np.ndarray:
        if tokens.shape[1] < len(pat):
            return np.zeros(len(tokens))
        windows = np.lib.stride_tricks.sliding_window_view(tokens, len(pat), axis=1)  # (n, L-k+1, k)
        return (windows == pat).all(axis=-1).any(axis=-1).astype(np.float64)

    return Reward(f"pattern{tuple(int(t) for t in pat)}", terminal=terminal)


def eos_reward(eos_id: int) -> Reward:
    """Terminal reward 1 when the response ends with EOS (written within the horizon), 0 when cut."""
    return Reward("ends_with_eos", terminal=lambda tokens: (tokens[:, -1] == eos_id).astype(np.float64))


def terminal_reward(fn: Callable[[tuple[int, ...]], float], name: str = "callable") -> Reward:
    """Terminal reward from any callable on the complete token tuple (one call per response)."""
    return Reward(name, terminal=lambda tokens: np.array([float(fn(tuple(int(t) for t in row))) for row in tokens]))


def token_reward(fn: Callable[[tuple[int, ...], int], float], name: str = "per_token") -> Reward:
    """Per-token reward from a callable ``(prefix tuple, action) -> float`` (one call per step)."""
    return Reward(
        name,
        per_token=lambda prefixes, actions: np.array(
            [float(fn(tuple(int(t) for t in p), int(a))) for p, a in zip(prefixes, actions)]
        ),
    )


# ---------------------------------------------------------------- the MDP and its tree


@dataclass
class TokenMDP:
    """A token MDP: vocabulary size (EOS = last id), horizon, reference policy, reward, discount."""

    vocab_size: int
    horizon: int
    reference: ReferencePolicy
    reward: Reward
    gamma: float = 1.0

    @property
    def eos_id(self) -> int:
        return self.vocab_size - 1


@dataclass
class TokenTree:
    """The enumerated MDP. ``N`` decision states, ``V`` actions; ids are level by level.

    ``child[s, a]`` is the id of ``s + (a,)`` or -1 where that step ends the episode (``done``).
    ``level_tokens[d]`` is ``(n_d, d)``: the prefixes of level d; ``offsets[d]`` the id of the first.
    """

    vocab_size: int
    horizon: int
    gamma: float
    level_tokens: list[np.ndarray]
    offsets: list[int]
    ref_probs: torch.Tensor  # (N, V) float64
    rewards: torch.Tensor  # (N, V) float64
    done: torch.Tensor  # (N, V) float64, 1 where s + (a,) is terminal
    child: torch.Tensor  # (N, V) int64, -1 where done

    @property
    def num_states(self) -> int:
        return self.offsets[-1]

    @property
    def eos_id(self) -> int:
        return self.vocab_size - 1

    @property
    def level_slices(self) -> list[slice]:
        return [slice(self.offsets[d], self.offsets[d + 1]) for d in range(self.horizon)]

    def state_id(self, prefix: Sequence[int]) -> int:
        """Id of a live prefix (no EOS, shorter than the horizon)."""
        prefix = tuple(prefix)
        if len(prefix) >= self.horizon or any(not 0 <= t < self.eos_id for t in prefix):
            raise QVLMError(
                f"prefix {prefix} is not a decision state of this MDP (TokenTree.state_id): "
                f"use tokens 0..{self.eos_id - 1} and length < {self.horizon}"
            )
        return self.offsets[len(prefix)] + int(_level_index(np.array([prefix], dtype=np.int64), self.vocab_size)[0])

    def prefix(self, state_id: int) -> tuple[int, ...]:
        """The token tuple of a state id."""
        d = int(np.searchsorted(self.offsets, state_id, side="right")) - 1
        return tuple(int(t) for t in self.level_tokens[d][state_id - self.offsets[d]])


def _level_index(prefixes: np.ndarray, vocab_size: int) -> np.ndarray:
    """Lexicographic index of each prefix in its level: the prefix read as a base-(V-1) number."""
    base = vocab_size - 1
    weights = base ** np.arange(prefixes.shape[1] - 1, -1, -1, dtype=np.int64)
    return prefixes.astype(np.int64) @ weights if prefixes.shape[1] else np.zeros(len(prefixes), np.int64)


def count_tree_nodes(vocab_size: int, horizon: int) -> int:
    """``1 + N * V`` tree nodes (root plus every prefix reachable in one more token)."""
    n_states = sum((vocab_size - 1) ** d for d in range(horizon))
    return 1 + n_states * vocab_size


def _check_probs(probs: np.ndarray, prefixes: np.ndarray, vocab_size: int) -> np.ndarray:
    if probs.shape != (len(prefixes), vocab_size) or not np.all(np.isfinite(probs)) or np.any(probs < 0):
        raise QVLMError(
            f"reference policy returned shape {probs.shape} or invalid entries for prefixes of "
            f"length {prefixes.shape[1]}: return non-negative (n, {vocab_size}) probabilities"
        )
    sums = probs.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > 1e-6)
    if len(bad):
        raise QVLMError(
            f"pi_ref(.|{tuple(prefixes[bad[0]])}) sums to {sums[bad[0]]:.6g}, not 1 "
            "(reference policy): normalise each row"
        )
    return probs / sums[:, None]


def build_tree(mdp: TokenMDP, max_states: int = DEFAULT_MAX_STATES) -> TokenTree:
    """Enumerate the prefix tree: pi_ref, rewards, done and child ids for every (state, action)."""
    V, H = mdp.vocab_size, mdp.horizon
    if V < 2 or H < 1:
        raise QVLMError(
            f"vocab_size={V}, horizon={H} (TokenMDP): need vocab_size >= 2 (EOS + one token) and horizon >= 1"
        )
    if not 0.0 < mdp.gamma <= 1.0:
        raise QVLMError(f"gamma={mdp.gamma} (TokenMDP.gamma): use a discount in (0, 1]")
    nodes = count_tree_nodes(V, H)
    if nodes > max_states:
        raise QVLMError(
            f"vocab {V}, horizon {H} has {nodes:,} tree nodes, over the budget of "
            f"{max_states:,} (max_states, --max-states): lower the vocabulary or the horizon, or raise "
            "max_states if you have the memory (about 100 bytes per node)"
        )
    level_tokens = [np.zeros((1, 0), dtype=np.int64)]
    for _ in range(1, H):
        prev = level_tokens[-1]
        level_tokens.append(
            np.concatenate([np.repeat(prev, V - 1, axis=0), np.tile(np.arange(V - 1), len(prev))[:, None]], axis=1)
        )
    offsets = list(np.cumsum([0] + [len(t) for t in level_tokens]))
    ref, rew, done, child = [], [], [], []
    for d, prefixes in enumerate(level_tokens):
        n = len(prefixes)
        ref.append(_check_probs(np.asarray(mdp.reference.probs(prefixes), np.float64), prefixes, V))
        actions = np.tile(np.arange(V), n)  # (n*V,) row-major over (state, action)
        done_d = (actions == V - 1) | (d + 1 == H)
        r = np.zeros(n * V)
        if mdp.reward.per_token is not None:
            r += np.asarray(mdp.reward.per_token(np.repeat(prefixes, V, axis=0), actions), np.float64)
        if mdp.reward.terminal is not None:
            full = np.concatenate([np.repeat(prefixes, V, axis=0), actions[:, None]], axis=1)  # (n*V, d+1)
            r[done_d] += np.asarray(mdp.reward.terminal(full[done_d]), np.float64)
        kid = np.where(done_d, -1, offsets[min(d + 1, H)] + np.repeat(np.arange(n), V) * (V - 1) + actions)
        rew.append(r.reshape(n, V))
        done.append(done_d.reshape(n, V))
        child.append(kid.reshape(n, V))
    return TokenTree(
        vocab_size=V,
        horizon=H,
        gamma=float(mdp.gamma),
        level_tokens=level_tokens,
        offsets=[int(o) for o in offsets],
        ref_probs=torch.from_numpy(np.concatenate(ref)),
        rewards=torch.from_numpy(np.concatenate(rew)),
        done=torch.from_numpy(np.concatenate(done).astype(np.float64)),
        child=torch.from_numpy(np.concatenate(child).astype(np.int64)),
    )


# ---------------------------------------------------------------- solvers


@dataclass
class SoftOptimum:
    """``Q* (N, V)``, ``V* (N,)``, ``pi* (N, V)`` at temperature ``alpha``."""

    alpha: float
    q: torch.Tensor
    v: torch.Tensor
    pi: torch.Tensor

    @property
    def objective(self) -> float:
        """``J* = V*(root)``, the optimal reward minus alpha times KL."""
        return float(self.v[0])


@dataclass
class HardOptimum:
    """Unregularised optimum (alpha -> 0): ``V0(s) = max over a with pi_ref(a|s) > 0 of Q0(s, a)``."""

    q: torch.Tensor
    v: torch.Tensor


def _next_values(tree: TokenTree, values: torch.Tensor, sl: slice) -> torch.Tensor:
    """``values[child]`` for the rows of a level; 0 where the step is done. Shape ``(n_d, V)``."""
    kid = tree.child[sl]
    return torch.where(kid >= 0, values[kid.clamp(min=0)], torch.zeros((), dtype=values.dtype))


def _check_alpha(alpha: float) -> None:
    if not alpha > 0 or not math.isfinite(alpha):
        raise QVLMError(
            f"alpha={alpha}: the KL temperature must be a positive number; for the "
            "unregularised (alpha -> 0) optimum call solve_hard"
        )


def solve(tree: TokenTree, alpha: float) -> SoftOptimum:
    """Soft-optimal ``Q*, V*, pi*`` by backward induction over the levels (DESIGN.md formulas)."""
    _check_alpha(alpha)
    log_ref = torch.log(tree.ref_probs)
    q = torch.zeros_like(tree.rewards)
    v = torch.zeros(tree.num_states, dtype=torch.float64)
    for sl in reversed(tree.level_slices):
        q[sl] = td_targets(tree.rewards[sl], _next_values(tree, v, sl), tree.done[sl], tree.gamma)
        v[sl] = soft_value(q[sl], log_ref[sl], alpha)
    return SoftOptimum(alpha, q, v, guided_policy(tree.ref_probs, q, v, 1.0 / alpha))


def solve_hard(tree: TokenTree) -> HardOptimum:
    """Unregularised optimal values: hard max over the actions that pi_ref can write."""
    q = torch.zeros_like(tree.rewards)
    v = torch.zeros(tree.num_states, dtype=torch.float64)
    for sl in reversed(tree.level_slices):
        q[sl] = td_targets(tree.rewards[sl], _next_values(tree, v, sl), tree.done[sl], tree.gamma)
        v[sl] = q[sl].masked_fill(tree.ref_probs[sl] <= 0, -math.inf).max(dim=-1).values
    return HardOptimum(q, v)


def guided_policy(ref_probs: torch.Tensor, q: torch.Tensor, v: torch.Tensor, beta: float) -> torch.Tensor:
    """Value-guided decoding: ``softmax(log pi_ref + beta (Q - V))`` (DESIGN.md).

    With the exact soft ``Q*`` and ``beta = 1/alpha`` this is ``pi*``. Shape: ``ref_probs, q (N, V)``,
    ``v (N,)`` -> ``(N, V)``.
    """
    return torch.softmax(torch.log(ref_probs) + beta * (q - v[:, None]), dim=-1)


def soft_bellman_residual(tree: TokenTree, q: torch.Tensor, v: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-state ``max(|Q - (r + gamma (1-done) V(s'))|, |V - soft_value(Q)|)``. Shape ``(N,)``."""
    log_ref = torch.log(tree.ref_probs)
    out = torch.zeros(tree.num_states, dtype=torch.float64)
    for sl in tree.level_slices:
        target = td_targets(tree.rewards[sl], _next_values(tree, v, sl), tree.done[sl], tree.gamma)
        q_err = (q[sl] - target).abs().max(dim=-1).values
        out[sl] = torch.maximum(q_err, (v[sl] - soft_value(q[sl], log_ref[sl], alpha)).abs())
    return out


# ---------------------------------------------------------------- policy evaluation


@dataclass
class PolicyEvaluation:
    """Exact values of a policy: per-state discounted reward ``(N,)``, KL to pi_ref ``(N,)``, and the
    reward Q-function ``(N, V)``. Root numbers: :attr:`reward`, :attr:`kl`, :meth:`objective`."""

    reward_v: torch.Tensor
    kl_v: torch.Tensor
    reward_q: torch.Tensor

    @property
    def reward(self) -> float:
        return float(self.reward_v[0])

    @property
    def kl(self) -> float:
        return float(self.kl_v[0])

    def objective(self, alpha: float) -> float:
        """``J(pi) = reward - alpha * KL`` at the root."""
        return self.reward - alpha * self.kl


def policy_table(tree: TokenTree, policy: Any) -> torch.Tensor:
    """Any policy as an ``(N, V)`` float64 table: a tensor/array, a ``{prefix: probs}`` dict, a
    callable ``prefix -> probs``, or an object with ``probs(prefixes)`` (a ReferencePolicy)."""
    if isinstance(policy, (torch.Tensor, np.ndarray)):
        table = torch.as_tensor(policy, dtype=torch.float64)
        if table.shape != tree.ref_probs.shape:
            raise QVLMError(
                f"policy table has shape {tuple(table.shape)}, expected "
                f"{tuple(tree.ref_probs.shape)} (states x vocab) for this tree"
            )
        return table
    if isinstance(policy, Mapping):
        policy = table_policy(tree.vocab_size, policy)
    elif callable(policy) and not hasattr(policy, "probs"):
        policy = CallablePolicy(tree.vocab_size, policy)
    rows = [_check_probs(np.asarray(policy.probs(p), np.float64), p, tree.vocab_size) for p in tree.level_tokens]
    return torch.from_numpy(np.concatenate(rows))


def evaluate_policy(tree: TokenTree, policy: Any) -> PolicyEvaluation:
    """Exact expected (discounted) reward and KL to pi_ref of ``policy``, by backward induction.

    ``KL(s) = KL(pi(.|s) || pi_ref(.|s)) + gamma sum_a pi(a|s) (1 - done) KL(s')``; infinite where
    the policy writes a token pi_ref cannot. ``policy``: anything :func:`policy_table` accepts.
    """
    pi = policy_table(tree, policy)
    log_ratio = torch.log(pi) - torch.log(tree.ref_probs)
    step_kl = torch.where(pi > 0, pi * log_ratio, torch.zeros((), dtype=torch.float64)).sum(-1)  # (N,)
    reward_v = torch.zeros(tree.num_states, dtype=torch.float64)
    kl_v = torch.zeros_like(reward_v)
    reward_q = torch.zeros_like(tree.rewards)
    zero = torch.zeros((), dtype=torch.float64)
    for sl in reversed(tree.level_slices):
        reward_q[sl] = td_targets(tree.rewards[sl], _next_values(tree, reward_v, sl), tree.done[sl], tree.gamma)
        reward_v[sl] = (pi[sl] * reward_q[sl]).sum(-1)
        future_kl = td_targets(torch.zeros_like(pi[sl]), _next_values(tree, kl_v, sl), tree.done[sl], tree.gamma)
        kl_v[sl] = step_kl[sl] + torch.where(pi[sl] > 0, pi[sl] * future_kl, zero).sum(-1)
    return PolicyEvaluation(reward_v, kl_v, reward_q)


# ---------------------------------------------------------------- configured MDPs


@dataclass
class MDPConfig:
    """A built-in token MDP, as the ``qvlm exact`` command builds it."""

    vocab_size: int = 4  # tokens including EOS (the last id), 3..8
    horizon: int = 5  # maximum response length in tokens, 1..8; the episode terminates there
    gamma: float = 1.0  # discount in (0, 1]
    seed: int = 0  # seed of the reference policy (Dirichlet table or tiny LM)
    reference: str = "dirichlet"  # "dirichlet": seeded random table; "lm": a tiny random Llama
    concentration: float = 1.0  # Dirichlet concentration of the random table
    reward: str = "count"  # "count": count of `token` / horizon; "pattern"; "eos": ends with EOS
    token: int = 0  # the counted token of reward "count" (0 = 'a'); must not be EOS
    pattern: tuple[int, ...] = (0, 1)  # the run of tokens reward "pattern" looks for ('a', 'b')
    max_states: int = DEFAULT_MAX_STATES  # tree-node budget; beyond it build_tree raises


REFERENCES = ("dirichlet", "lm")
REWARDS = ("count", "pattern", "eos")


def build_mdp(config: MDPConfig) -> TokenMDP:
    """The token MDP a :class:`MDPConfig` describes; invalid values raise :class:`QVLMError`."""
    V, H = config.vocab_size, config.horizon
    if not 3 <= V <= 8:
        raise QVLMError(
            f"vocab_size={V} (--vocab): the exact MDP needs 3..8 tokens including EOS; pass a value in 3..8"
        )
    if not 1 <= H <= 8:
        raise QVLMError(f"horizon={H} (--horizon): exact enumeration supports horizons 1..8; pass one")
    if config.reference not in REFERENCES:
        raise QVLMError(f"reference={config.reference!r} (--ref): choose one of {', '.join(REFERENCES)}")
    if config.reward == "count":
        if not 0 <= config.token < V - 1:
            raise QVLMError(
                f"token={config.token} (--token): the counted token must be an ordinary "
                f"token id in 0..{V - 2} (EOS is {V - 1})"
            )
        reward = count_reward(config.token, H, label=token_names(V)[config.token])
    elif config.reward == "pattern":
        if not config.pattern or any(not 0 <= t < V for t in config.pattern):
            raise QVLMError(f"pattern={config.pattern} (--pattern): give token ids in 0..{V - 1}")
        reward = pattern_reward(config.pattern)
    elif config.reward == "eos":
        reward = eos_reward(V - 1)
    else:
        raise QVLMError(f"reward={config.reward!r} (--reward): choose one of {', '.join(REWARDS)}")
    if config.reference == "lm":
        reference: ReferencePolicy = CausalLMPolicy(tiny_llama(V, config.seed), V)
    else:
        reference = DirichletPolicy(V, config.seed, config.concentration)
    return TokenMDP(V, H, reference, reward, config.gamma)
