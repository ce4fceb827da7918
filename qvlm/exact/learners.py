"""Tabular Q/V learners on an exact token MDP, each measured against the exact soft optimum.

Each learner sees only the data it could really have: episodes it samples (tokens, observed
rewards, done flags) and the reference policy's probabilities at the states it visits (the frozen
LM is available to every learner). None reads the solver's tables. Q and V are tables: one entry
per (state, action) or state of :class:`qvlm.exact.TokenTree`, an ``nn.Parameter`` indexed by
state id, trained with Adam and the pure losses of :mod:`qvlm.losses`. Entries the data never
reaches keep their initial value (guided decoding there falls back to ``pi_ref``: a constant Q row
leaves ``pi_ref`` unchanged).

- :func:`train_tabular_ilql`: ILQL (Snell et al. 2023) from offline samples of pi_ref: twin Q, target Q by
  Polyak averaging, V by expectile regression on the min target Q, Q on ``r + gamma (1-done) V(s')``,
  optional CQL term.
- :func:`train_tabular_mc`: Monte-Carlo value regression from offline samples of pi_ref: a prefix scorer
  V(s) and Q(s, a) on the taken action, both regressed on the Monte-Carlo return.
- :func:`train_tabular_softq`: soft Q-learning (Haarnoja et al. 2017, with a pi_ref prior) from online
  interaction: it samples episodes from its own guided policy ``pi ~ pi_ref exp((Q - V) / alpha)``
  (plain Boltzmann exploration: learner ``softq``; with systematic exploration of every pair it has
  not tried: learner ``softq_sweep``), keeps a replay buffer of observed transitions, and regresses
  Q on ``r + gamma (1-done) soft_value(Q_target(s'), log pi_ref(s'), alpha)``.
- ``ppo`` (:mod:`qvlm.exact.ppo_learner`): not tabular; the LM trainer ``train_ppo`` on a tiny causal
  LM distilled to pi_ref, scored on its own policy table (it has no Q).

ILQL and MC train on the episodes of their dataset (full batch: a masked mean over every real
step). Soft Q-learning keeps a replay buffer of distinct observed transitions
(:class:`TransitionTable`: the environment is deterministic, so a repeat adds nothing) and
regresses on all of them at each update.

:func:`measure` scores a learner: RMSE of V and Q against ``V*, Q*`` over the states (and taken
(state, action) pairs) its data visited, each weighted uniformly, RMSE of V over the states the
optimal policy ``pi*`` reaches with probability >= 1% (the states that matter for acting well; an
on-policy learner need not know the rest), and the exact objective and KL of
the guided policy ``pi(a|s) ~ pi_ref(a|s) exp(beta (Q(s,a) - V(s)))``, ``beta = 1/alpha``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch

from qvlm.distributional import wasserstein1
from qvlm.errors import QVLMError
from qvlm.exact import PolicyEvaluation, SoftOptimum, TokenTree, evaluate_policy, guided_policy, solve
from qvlm.exact.distribution import ReturnDistribution, return_distribution
from qvlm.exact.frontier import DEFAULT_BETAS, exact_frontier, reach_probs
from qvlm.exact.qsharp_learner import QSHARP_ALPHAS, QSharpConfig, soft_heads, train_qsharp
from qvlm.exact.tabular import (
    TabularHeads,
    adam_step,
    adam_with_decay,
    check_positive,
    single_thread,
    table_parameter,
)
from qvlm.heads import polyak_update
from qvlm.losses import cql_loss, expectile_loss, ilql_q_loss, soft_value, value_regression_loss
from qvlm.progress import progress
from qvlm.returns import monte_carlo_returns, td_targets

__all__ = [
    "Episodes",
    "TransitionTable",
    "TabularHeads",
    "LearnerReport",
    "TabularILQLConfig",
    "TabularMCConfig",
    "TabularSoftQConfig",
    "LEARNERS",
    "sample_episodes",
    "train_tabular_ilql",
    "train_tabular_mc",
    "train_tabular_softq",
    "measure",
    "measure_alphas",
    "objective_ratio",
    "train_learner",
    "compare_learners",
    "single_thread",
]


# ---------------------------------------------------------------- data


@dataclass
class Episodes:
    """A batch of episodes, right-padded to the horizon. All ``(B, H)``.

    ``states``/``next_states`` are state ids (``next_states`` is 0 where ``done``: never read there);
    ``done[b, t] = 1`` means ``s_{t+1}`` is terminal; ``mask`` is 1 on real steps.
    """

    states: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    done: torch.Tensor
    next_states: torch.Tensor
    mask: torch.Tensor


def sample_episodes(tree: TokenTree, policy: torch.Tensor, num_episodes: int, generator: torch.Generator) -> Episodes:
    """Roll out ``num_episodes`` episodes of ``policy`` (``(N, V)`` probabilities) in the MDP.

    The environment step reads ``tree.child``, ``tree.rewards`` and ``tree.done``: what a learner
    observes when it writes a token and gets scored.
    """
    B, H = num_episodes, tree.horizon
    states, actions, next_states = (torch.zeros(B, H, dtype=torch.long) for _ in range(3))
    rewards, done, mask = (torch.zeros(B, H, dtype=torch.float64) for _ in range(3))
    s = torch.zeros(B, dtype=torch.long)  # every episode starts at the root, id 0
    alive = torch.ones(B, dtype=torch.bool)
    for t in range(H):
        a = torch.multinomial(policy[s], 1, generator=generator).squeeze(1)  # (B,)
        nxt = tree.child[s, a].clamp(min=0)
        states[:, t], actions[:, t], next_states[:, t] = s * alive, a * alive, nxt * alive
        rewards[:, t] = tree.rewards[s, a] * alive
        done[:, t] = tree.done[s, a] * alive
        mask[:, t] = alive.to(torch.float64)
        alive = alive & (tree.done[s, a] == 0)
        s = nxt
    return Episodes(states, actions, rewards, done, next_states, mask)


@dataclass
class TransitionTable:
    """Observed transitions keyed by (state, action): visit counts and what was observed.

    ``counts``, ``rewards``, ``done``, ``next_states`` are ``(N, V)``; entries with count 0 were
    never observed and hold zeros. A replay buffer for a deterministic environment.
    """

    counts: torch.Tensor
    rewards: torch.Tensor
    done: torch.Tensor
    next_states: torch.Tensor

    @classmethod
    def empty(cls, num_states: int, vocab_size: int) -> "TransitionTable":
        zeros = partial(torch.zeros, num_states, vocab_size)
        return cls(
            zeros(dtype=torch.float64), zeros(dtype=torch.float64), zeros(dtype=torch.float64), zeros(dtype=torch.long)
        )

    def add(self, episodes: Episodes) -> None:
        real = episodes.mask.bool()
        s, a = episodes.states[real], episodes.actions[real]
        self.counts.index_put_((s, a), torch.ones_like(s, dtype=torch.float64), accumulate=True)
        self.rewards[s, a] = episodes.rewards[real]
        self.done[s, a] = episodes.done[real]
        self.next_states[s, a] = episodes.next_states[real]

    @property
    def seen(self) -> torch.Tensor:
        """``(N, V)`` bool: observed (state, action) pairs."""
        return self.counts > 0


# ---------------------------------------------------------------- ILQL


@dataclass
class TabularILQLConfig:
    """ILQL on offline episodes of pi_ref (tabular heads, full-batch steps)."""

    num_episodes: int = 2000  # offline episodes sampled from pi_ref: the whole dataset
    steps: int = 300  # gradient steps, each on the whole dataset (it is small)
    lr: float = 0.05  # Adam learning rate, decayed linearly to 0
    tau: float = 0.7  # expectile of V (ILQL's default): V -> upper expectile of Q over data actions
    polyak: float = 0.1  # target-Q Polyak rate per step: theta' <- (1 - p) theta' + p theta
    cql_coef: float = 0.0  # weight of the CQL term; 0 = off (tables do not extrapolate to unseen actions)
    seed: int = 0  # seed of the dataset sampling
    progress: bool = False  # show progress (a bar on a terminal, plain lines in a log)


def train_tabular_ilql(tree: TokenTree, config: TabularILQLConfig) -> TabularHeads:
    """Twin Q + target Q + expectile V, trained offline on episodes of pi_ref (ILQL, eqs. 2-4)."""
    check_positive("TabularILQLConfig", num_episodes=config.num_episodes, steps=config.steps, lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    data = sample_episodes(tree, tree.ref_probs, config.num_episodes, gen)
    s, a, nxt = data.states, data.actions, data.next_states  # (B, H)
    N, V = tree.num_states, tree.vocab_size
    # twin tables start equal and see the same data, so they stay equal: the min over twins is
    # kept to mirror ILQL's structure, it has no effect here (with networks, inits differ)
    q1, q2, v = table_parameter(N, V), table_parameter(N, V), table_parameter(N)
    q1_target, q2_target = q1.detach().clone(), q2.detach().clone()
    opt, sched = adam_with_decay([q1, q2, v], config.lr, config.steps)
    for _ in progress(range(config.steps), desc="ilql", enabled=config.progress, leave=False):
        # targets: Q on r + gamma (1 - done) V(s'), V on the min of the twin target Qs
        td_target = td_targets(data.rewards, v[nxt].detach(), data.done, tree.gamma)
        target_q = torch.minimum(q1_target[s, a], q2_target[s, a])  # (B, H)
        # losses: masked means over the real steps of the dataset
        q_loss, _ = ilql_q_loss([q1[s, a], q2[s, a]], td_target, data.mask)
        v_loss, _ = expectile_loss(target_q, v[s], data.mask, config.tau)
        loss = q_loss + v_loss
        if config.cql_coef > 0:
            cql = (cql_loss(q1[s], a, data.mask)[0] + cql_loss(q2[s], a, data.mask)[0]) / 2  # q1[s]: (B, H, V)
            loss = loss + config.cql_coef * cql
        adam_step(opt, sched, loss)
        polyak_update([q1, q2], [q1_target, q2_target], config.polyak)
    seen = TransitionTable.empty(tree.num_states, tree.vocab_size)
    seen.add(data)
    # guidance reads the min of the target heads, as trlx's ILQL does
    return TabularHeads(torch.minimum(q1_target, q2_target), v.detach().clone(), seen.seen)


# ---------------------------------------------------------------- Monte-Carlo regression


@dataclass
class TabularMCConfig:
    """Monte-Carlo value regression on offline episodes of pi_ref (tabular V and Q)."""

    num_episodes: int = 2000  # offline episodes sampled from pi_ref: the whole dataset
    steps: int = 300  # gradient steps, each on the whole dataset
    lr: float = 0.05  # Adam learning rate, decayed linearly to 0
    seed: int = 0  # seed of the dataset sampling
    progress: bool = False  # show progress (a bar on a terminal, plain lines in a log)


def train_tabular_mc(tree: TokenTree, config: TabularMCConfig) -> TabularHeads:
    """V(s_t) and Q(s_t, a_t) regressed on the Monte-Carlo return G_t: they learn V^pi_ref, Q^pi_ref."""
    check_positive("TabularMCConfig", num_episodes=config.num_episodes, steps=config.steps, lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    data = sample_episodes(tree, tree.ref_probs, config.num_episodes, gen)
    returns = monte_carlo_returns(data.rewards, data.done, tree.gamma, data.mask)  # (B, H)
    q, v = table_parameter(tree.num_states, tree.vocab_size), table_parameter(tree.num_states)
    opt, sched = adam_with_decay([q, v], config.lr, config.steps)
    for _ in progress(range(config.steps), desc="mc", enabled=config.progress, leave=False):
        v_loss, _ = value_regression_loss(v[data.states], returns, data.mask)
        q_loss, _ = value_regression_loss(q[data.states, data.actions], returns, data.mask)
        adam_step(opt, sched, v_loss + q_loss)
    seen = TransitionTable.empty(tree.num_states, tree.vocab_size)
    seen.add(data)
    return TabularHeads(q.detach().clone(), v.detach().clone(), seen.seen)


# ---------------------------------------------------------------- soft Q-learning


@dataclass
class TabularSoftQConfig:
    """Online soft Q-learning with a target table and a replay buffer of observed transitions."""

    iterations: int = 100  # rounds of (sample episodes with the current policy, then update)
    episodes_per_iter: int = 32  # episodes sampled per round
    updates_per_iter: int = 4  # gradient steps per round, each on every stored transition
    lr: float = 0.05  # Adam learning rate, decayed linearly to 0
    polyak: float = 0.2  # target-Q Polyak rate per step
    q_init: float = 1.0  # initial Q: an upper bound on returns (rewards in [0, 1]); optimism pulls
    #                      the Boltzmann policy toward what it has not tried
    explore: str = "boltzmann"  # "boltzmann": always sample the guided policy pi ~ pi_ref exp((Q - V) / alpha)
    #                             (on-policy; learner softq); "open_first": in a state with open actions
    #                             (untried, or leading to a state that still holds untried ones) take one
    #                             of them uniformly, else sample pi (systematic sweep; learner softq_sweep)
    seed: int = 0  # seed of the episode sampling
    progress: bool = False  # show progress (a bar on a terminal, plain lines in a log)


def open_pairs(
    seen: torch.Tensor, ref_probs: torch.Tensor, done: torch.Tensor, next_states: torch.Tensor, horizon: int
) -> torch.Tensor:
    """(state, action) pairs still worth exploring: untried, or leading to a state with open pairs.

    Uses only the learner's own observations (``done``/``next_states`` are valid where ``seen``);
    ``horizon`` sweeps carry openness from the deepest states to the root. Shape ``(N, V)`` bool.
    """
    possible = ref_probs > 0
    pairs = ~seen & possible
    for _ in range(horizon):
        open_state = pairs.any(-1)  # (N,)
        pairs = (~seen | ((done == 0) & open_state[next_states])) & possible
    return pairs


def explore_open_first(policy: torch.Tensor, open_: torch.Tensor) -> torch.Tensor:
    """Uniform over the open actions of a state where any remain, else ``policy``. Shape ``(N, V)``."""
    counts = open_.sum(-1, keepdim=True)
    return torch.where(counts > 0, open_ / counts.clamp(min=1), policy)


def train_tabular_softq(tree: TokenTree, config: TabularSoftQConfig, alpha: float) -> TabularHeads:
    """Soft Q-learning with a pi_ref prior: on-policy sampling, soft TD targets from a target table.

    The replay buffer is a :class:`TransitionTable`; each update regresses Q on every distinct
    stored transition once (a tabular Q's fixed point does not depend on how transitions are
    weighted, and equal weights let rarely visited pairs converge as fast as frequent ones).
    """
    check_positive(
        "TabularSoftQConfig",
        iterations=config.iterations,
        episodes_per_iter=config.episodes_per_iter,
        updates_per_iter=config.updates_per_iter,
        lr=config.lr,
    )
    if not alpha > 0:
        raise QVLMError(f"alpha={alpha} (train_tabular_softq): the KL temperature must be positive")
    if config.explore not in ("open_first", "boltzmann"):
        raise QVLMError(f"TabularSoftQConfig.explore={config.explore!r}: choose 'open_first' or 'boltzmann'")
    gen = torch.Generator().manual_seed(config.seed)
    log_ref = torch.log(tree.ref_probs)  # the frozen reference model, queried at visited states
    q = table_parameter(tree.num_states, tree.vocab_size, init=config.q_init)
    q_target = q.detach().clone()
    opt, sched = adam_with_decay([q], config.lr, config.iterations * config.updates_per_iter)
    buffer = TransitionTable.empty(tree.num_states, tree.vocab_size)
    for _ in progress(range(config.iterations), desc="softq", enabled=config.progress, leave=False):
        # rollout: guided decoding with the learner's own Q (beta = 1/alpha), plus exploration
        with torch.no_grad():
            policy = guided_policy(tree.ref_probs, q, soft_value(q, log_ref, alpha), 1.0 / alpha)
        if config.explore == "open_first":
            policy = explore_open_first(
                policy, open_pairs(buffer.seen, tree.ref_probs, buffer.done, buffer.next_states, tree.horizon)
            )
        buffer.add(sample_episodes(tree, policy, config.episodes_per_iter, gen))
        # optimise on every stored transition
        s, a = buffer.seen.nonzero(as_tuple=True)
        rewards, done, nxt = buffer.rewards[s, a], buffer.done[s, a], buffer.next_states[s, a]
        for _ in range(config.updates_per_iter):
            next_v = soft_value(q_target[nxt], log_ref[nxt], alpha)
            td_target = td_targets(rewards, next_v, done, tree.gamma)
            loss, _ = ilql_q_loss([q[s, a]], td_target, torch.ones_like(td_target))  # soft TD error
            adam_step(opt, sched, loss)
            polyak_update([q], [q_target], config.polyak)
    q = q.detach().clone()
    return TabularHeads(q, soft_value(q, log_ref, alpha), buffer.seen)


# ---------------------------------------------------------------- measurement


@dataclass
class LearnerReport:
    """A learner against the exact optimum. RMSEs weight each visited state (pair) equally."""

    v_rmse: float  # RMSE of V against V* over visited states
    q_rmse: float  # RMSE of Q against Q* over visited (state, taken action) pairs
    v_rmse_ref: float  # RMSE of V against V^pi_ref (reward only) over visited states
    v_rmse_reach: float  # RMSE of V against V* over the states pi* reaches with probability >= 1%
    objective: float  # exact J(pi) = reward - alpha * KL of the guided policy
    objective_ratio: float  # J(pi) / J*; NaN when J* <= 0
    reward: float  # exact expected reward of the guided policy
    kl: float  # exact KL of the guided policy to pi_ref (sum over the trajectory)
    visited_states: int
    visited_pairs: int
    extra: dict = field(default_factory=dict)  # learner-specific numbers (ppo: distill_kl)


def _rmse(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> float:
    return math.sqrt(float(((x - y)[mask] ** 2).mean())) if mask.any() else math.nan


def objective_ratio(objective: float, optimum: float) -> float:
    """``J(pi) / J*``: 1 at the optimum, ``J(pi_ref)/J*`` for pi_ref. Defined for ``J* > 0`` (true
    whenever rewards are >= 0 and some reachable reward is positive, since ``J* >= J(pi_ref)``)."""
    return objective / optimum if optimum > 0 else math.nan


REACH_MIN = 0.01  # v_rmse_reach: states the optimal policy reaches with at least this probability


def measure(tree: TokenTree, optimum: SoftOptimum, reference: PolicyEvaluation, heads: TabularHeads) -> LearnerReport:
    """Score learned tables against the exact soft optimum (and V^pi_ref) and evaluate guidance."""
    if heads.policy is not None:  # a policy learner: its own policy
        policy = heads.policy
    else:
        policy = guided_policy(tree.ref_probs, heads.q, heads.v, 1.0 / optimum.alpha)
    reached = reach_probs(tree, optimum.pi) >= REACH_MIN  # (N,)
    ev = evaluate_policy(tree, policy)
    obj = ev.objective(optimum.alpha)
    return LearnerReport(
        v_rmse=_rmse(heads.v, optimum.v, heads.visited_states),
        q_rmse=_rmse(heads.q, optimum.q, heads.visited_pairs),
        v_rmse_ref=_rmse(heads.v, reference.reward_v, heads.visited_states),
        v_rmse_reach=_rmse(heads.v, optimum.v, reached),
        objective=obj,
        objective_ratio=objective_ratio(obj, optimum.objective),
        reward=ev.reward,
        kl=ev.kl,
        visited_states=int(heads.visited_states.sum()),
        visited_pairs=int(heads.visited_pairs.sum()),
        extra=dict(heads.extra),
    )


def measure_alphas(
    tree: TokenTree, heads: TabularHeads, alphas: list[float], exact: ReturnDistribution | None = None
) -> dict[str, dict[str, float]]:
    """Score a distributional learner's ``Z(s, a)`` at each alpha, all from one set of distributions.

    Per alpha, over the (state, action) pairs of the states ``pi*_alpha`` reaches with probability >=
    ``REACH_MIN`` (every action pi_ref can write there): ``q_rmse_reach`` (``Q*_alpha`` read from the
    distributions against the solver's), ``q_err_max_reach``, ``v_rmse_reach`` (``V*_alpha = alpha log sum_a
    pi_ref exp(Q / alpha)``), ``w1_reach`` (mean 1-Wasserstein distance between the learned categorical and
    pi_ref's exact return distribution, unprojected: :func:`qvlm.exact.distribution.return_distribution`);
    and the exact ``objective``, ``objective_ratio``, ``reward`` and ``kl`` of guidance with ``Q*_alpha`` at
    beta = 1/alpha. Keys are ``format(alpha, "g")``.
    """
    if heads.distribution is None:
        raise QVLMError("measure_alphas: these heads carry no return distribution (a distributional learner's do)")
    exact = exact or return_distribution(tree)
    dist = heads.distribution
    w1 = wasserstein1(dist.support.to(torch.float64), dist.log_probs.exp(), exact.values, exact.pair_probs)  # (N, V)
    out = {}
    for alpha in alphas:
        optimum = solve(tree, alpha)
        reached = reach_probs(tree, optimum.pi) >= REACH_MIN  # (N,)
        pairs = reached[:, None] & (tree.ref_probs > 0)  # (N, V)
        q, v = soft_heads(tree, dist, alpha)
        ev = evaluate_policy(tree, guided_policy(tree.ref_probs, q, v, 1.0 / alpha))
        obj = ev.objective(alpha)
        out[format(alpha, "g")] = {
            "objective_ratio": objective_ratio(obj, optimum.objective),
            "q_rmse_reach": _rmse(q, optimum.q, pairs),
            "q_err_max_reach": float((q - optimum.q)[pairs].abs().max()),
            "v_rmse_reach": _rmse(v, optimum.v, reached),
            "w1_reach": float(w1[pairs].mean()),
            "objective": obj,
            "reward": ev.reward,
            "kl": ev.kl,
            "reached_states": int(reached.sum()),
        }
    return out


# name -> (default config factory taking seed= and progress=, trainer(tree, config, alpha))
LEARNERS: dict[str, tuple[Callable[..., Any], Callable[[TokenTree, Any, float], TabularHeads]]] = {
    "ilql": (TabularILQLConfig, lambda tree, config, alpha: train_tabular_ilql(tree, config)),
    "mc": (TabularMCConfig, lambda tree, config, alpha: train_tabular_mc(tree, config)),
    "softq": (TabularSoftQConfig, train_tabular_softq),
    "softq_sweep": (partial(TabularSoftQConfig, explore="open_first"), train_tabular_softq),
    # Q#: pi_ref's return distribution from guided roll-ins and pi_ref roll-outs; every alpha from one run
    "qsharp": (QSharpConfig, train_qsharp),
    # PPO with the LM trainer itself on a tiny causal LM (qvlm.exact.ppo_learner; imports transformers)
    "ppo": (
        lambda **kw: _ppo_module().ExactPPOConfig(**kw),
        lambda tree, config, alpha: _ppo_module().train_exact_ppo(tree, config, alpha),
    ),
}


def _ppo_module():
    from qvlm.exact import ppo_learner

    return ppo_learner


def train_learner(name: str, tree: TokenTree, config: Any, alpha: float) -> TabularHeads:
    """Train a learner by name (a key of :data:`LEARNERS`) on one torch thread."""
    if name not in LEARNERS:
        raise QVLMError(f"unknown learner {name!r}: choose from {', '.join(LEARNERS)}")
    with single_thread():
        return LEARNERS[name][1](tree, config, alpha)


def _heads_at_beta(tree: TokenTree, heads: TabularHeads, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A distributional learner's heads for guidance at ``beta``: ``Q*_alpha, V*_alpha`` at alpha = 1/beta
    (beta = 0 is pi_ref whatever the heads)."""
    if beta <= 0:
        return torch.zeros_like(heads.q), torch.zeros_like(heads.v)
    return soft_heads(tree, heads.distribution, 1.0 / beta)


def compare_learners(
    tree: TokenTree,
    alpha: float,
    learners: list[str],
    seed: int = 0,
    progress: bool = False,
    configs: dict[str, Any] | None = None,
    frontier: bool = False,
) -> dict[str, Any]:
    """Solve exactly, train each learner, and report ``{"optimal", "reference", "learners"}``.

    ``configs`` maps a learner name to its config; missing ones use the defaults with ``seed``.
    ``frontier``: also report the exact reward-KL frontier (:func:`qvlm.exact.frontier.exact_frontier`,
    each learner's heads guiding over beta, 1/alpha included) as ``"frontier"``.
    """
    unknown = [n for n in learners if n not in LEARNERS]
    if unknown:
        raise QVLMError(f"unknown learner(s) {', '.join(unknown)}: choose from {', '.join(LEARNERS)}")
    optimum = solve(tree, alpha)
    star = evaluate_policy(tree, optimum.pi)
    reference = evaluate_policy(tree, tree.ref_probs)
    ref_objective = reference.objective(alpha)
    out: dict[str, Any] = {
        "optimal": {"objective": optimum.objective, "reward": star.reward, "kl": star.kl},
        "reference": {
            "objective": ref_objective,
            "reward": reference.reward,
            "kl": reference.kl,
            "objective_ratio": objective_ratio(ref_objective, optimum.objective),
        },
        "learners": {},
    }
    trained = {}
    for name in learners:
        config = (configs or {}).get(name) or LEARNERS[name][0](seed=seed, progress=progress)
        heads = train_learner(name, tree, config, alpha)
        out["learners"][name] = vars(measure(tree, optimum, reference, heads))
        trained[name] = (heads.q, heads.v)
        if heads.distribution is not None:  # one run, every alpha: score each, guide each beta with its own Q
            alphas = sorted({*QSHARP_ALPHAS, *getattr(config, "alphas", ()), alpha})
            out["learners"][name]["per_alpha"] = measure_alphas(tree, heads, alphas)
            trained[name] = partial(_heads_at_beta, tree, heads)
    if frontier:
        with single_thread():
            out["frontier"] = exact_frontier(tree, betas=sorted({*DEFAULT_BETAS, 1.0 / alpha}), heads=trained)
    return out
