"""Q# on an exact token MDP: learn pi_ref's return distribution, guide at every alpha from one run.

Q# (Zhou et al., NeurIPS 2025) learns ``Z(s, a)``, the distribution of the reference policy's return,
by supervised regression on a fixed target: in a deterministic MDP the soft optimum at any temperature
is a functional of it, ``Q*_alpha(s, a) = alpha log E[exp(R / alpha)], R ~ Z(s, a)`` (DESIGN.md,
"Distributional values"). Labels are returns of pi_ref roll-outs, so they never move with the learner
(no bootstrapping); states come from roll-ins with the learner's own guided policy, so the data covers
the states guidance visits. Each round (:func:`train_qsharp`):

1. **roll in** with the current guided policy ``pi ~ pi_ref exp(Q*_alpha / alpha)`` (round 0: pi_ref)
   to a cut step ``h`` drawn uniformly from ``0 .. H-1`` (if the roll-in ends the episode before ``h``,
   the cut moves to that step's state);
2. **at the cut** take an action ``a_h`` (``cut_action``: uniform over the actions pi_ref can write by
   default, so that every action of a visited state is labelled), then **roll out** with pi_ref to the
   end, and score the episode (one reward call);
3. **label** ``(s_h, a_h)`` with the return from the cut on, as a two-hot target on a fixed support
   (:func:`qvlm.distributional.two_hot`); ``label="rollout"`` labels every later pair of the pi_ref
   roll-out too (each is a pi_ref continuation of its own pair);
4. **aggregate** every round's labels and **fit** tabular categorical logits ``(N, V, K)`` by
   cross-entropy (:func:`qvlm.distributional.categorical_loss`): ``fit="histogram"`` takes the exact
   minimiser of the aggregated loss (per pair, the mean of its two-hot targets, with ``prior``
   pseudo-labels of the uniform distribution); ``fit="adam"`` runs Adam steps on the same loss (each
   labelled pair weighted equally), logits starting at 0 (the uniform distribution), warm-started
   from round to round.

One run serves every temperature: the roll-in policy of round ``r`` cycles its episodes over a fixed
schedule of alphas (``alphas``, and the alpha asked for), each guided by ``Q*_alpha`` from the current
distributions, so the data covers what ``pi*_alpha`` visits at each of them. ``Q*_alpha`` of an
unlabelled pair is that of the uniform prior: at small alpha near the top of the support, an optimism
that steers the roll-ins toward actions not yet tried.

With ``gamma < 1`` the learner still learns the discounted return's distribution, but
``alpha log E[exp(R / alpha)]`` of it is not the soft optimum of the discounted-KL objective (the solver's
``Q*``): the KL is discounted too. On the default MDP with gamma 0.9 the two differ by up to 0.044 at alpha
0.05 and 0.002 at alpha 1 (:mod:`qvlm.exact.distribution`); ``qvlm exact`` says so under its table.

The learner sees what it could really have: its episodes (tokens, rewards at the end) and pi_ref's
probabilities at the states it visits; it never reads the solver's tables. Its cost is counted:
``extra["episodes"]`` (reward calls) and ``extra["tokens"]`` (every token sampled: roll-in, cut and
roll-out, a roll-in token that ended the episode before the cut included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qvlm.distributional import categorical_loss, make_support, two_hot
from qvlm.errors import QVLMError
from qvlm.exact.solver import TokenTree, guided_policy
from qvlm.exact.tabular import CategoricalTables, TabularHeads, adam_step, adam_with_decay, check_positive
from qvlm.losses import soft_value
from qvlm.progress import progress
from qvlm.returns import monte_carlo_returns

__all__ = ["QSharpConfig", "QSharpData", "rollin_rollout", "soft_heads", "train_qsharp", "QSHARP_ALPHAS"]

QSHARP_ALPHAS = (0.05, 0.1, 0.2, 0.5, 1.0)  # issue 22's temperatures: one run must serve all of them
CUT_ACTIONS = ("uniform", "ref", "guided")
LABELS = ("cut", "rollout")
FITS = ("histogram", "adam")


@dataclass
class QSharpConfig:
    """Q# on the exact MDP: rounds of roll-in / roll-out / label, a categorical table fitted each round.

    The defaults were chosen by ``benchmarks/qsharp_exact.py`` (docs/exact.md, "Q#"): they meet issue 22's bar
    on the default MDP for seeds 0, 1, 2 and for 60 of 60 (MDP, learner) seed pairs."""

    rounds: int = 40  # rounds of (roll in, roll out, label, refit)
    episodes_per_round: int = 4000  # episodes per round (each one reward call), split evenly over the alphas
    alphas: tuple[float, ...] = QSHARP_ALPHAS  # roll-in schedule: episode i of a round is guided at alphas[i % A]
    support_low: float = 0.0  # lowest atom of the fixed support (the lowest return)
    support_high: float = 1.0  # highest atom (the highest return); returns outside are clamped
    bins: int = 11  # atoms of the support (11: a step of 0.1 on [0, 1])
    cut_action: str = "uniform"  # action at the cut: "uniform" over what pi_ref can write, "ref", "guided"
    label: str = "rollout"  # "cut": the cut pair only (Q#); "rollout": every pair from the cut to the end
    fit: str = "histogram"  # "histogram": exact minimiser of the aggregated cross-entropy; "adam"
    prior: float = 0.0  # pseudo-labels of the uniform distribution per pair (histogram)
    steps: int = 100  # Adam steps per round, each on every pair labelled so far (fit "adam")
    lr: float = 0.1  # Adam learning rate, decayed linearly to 0 within each round (fit "adam")
    seed: int = 0  # seed of the episode sampling
    progress: bool = False  # show progress (a bar on a terminal, plain lines in a log)


def _check(config: QSharpConfig) -> None:
    check_positive(
        "QSharpConfig",
        rounds=config.rounds,
        episodes_per_round=config.episodes_per_round,
        steps=config.steps,
        lr=config.lr,
    )
    for name, value, choices in (
        ("cut_action", config.cut_action, CUT_ACTIONS),
        ("label", config.label, LABELS),
        ("fit", config.fit, FITS),
    ):
        if value not in choices:
            raise QVLMError(f"QSharpConfig.{name}={value!r}: choose one of {', '.join(choices)}")
    if not config.alphas or any(not (a > 0 and math.isfinite(a)) for a in config.alphas):
        raise QVLMError(f"QSharpConfig.alphas={config.alphas}: give one or more positive, finite temperatures")
    if not config.prior >= 0:
        raise QVLMError(f"QSharpConfig.prior={config.prior}: the pseudo-count must be >= 0")


@dataclass
class QSharpData:
    """Labels of one batch of episodes: ``states, actions (L,)``, ``returns (L,)`` (the return from that
    pair on, pi_ref after the cut), and the batch's cost."""

    states: torch.Tensor
    actions: torch.Tensor
    returns: torch.Tensor
    episodes: int
    tokens: int


def rollin_rollout(
    tree: TokenTree,
    rollin: torch.Tensor,
    cut_policy: torch.Tensor,
    which: torch.Tensor,
    label: str,
    generator: torch.Generator,
) -> QSharpData:
    """Roll in with ``rollin[which[b]]`` to a uniform cut, take the cut action from ``cut_policy[which[b]]``,
    roll out with pi_ref to the end; label the cut pair (``label="cut"``) or every pair from the cut on
    (``"rollout"``). One episode per entry of ``which``.

    Shape: ``rollin, cut_policy (A, N, V)`` (A policies; expanded views are fine), ``which (B,)`` long.
    """
    B, H = len(which), tree.horizon
    cut = torch.randint(0, H, (B,), generator=generator)  # (B,) the cut step, uniform over the horizon
    states, actions = (torch.zeros(B, H, dtype=torch.long) for _ in range(2))
    rewards, done, out = (torch.zeros(B, H, dtype=torch.float64) for _ in range(3))
    s = torch.zeros(B, dtype=torch.long)  # every episode starts at the root, id 0
    alive = torch.ones(B, dtype=torch.bool)
    tokens = 0
    for t in range(H):
        # roll in: the guided policy; a token that would end the episode before the cut moves the cut here
        rolling_in = alive & (t < cut)
        a_in = torch.multinomial(rollin[which, s], 1, generator=generator).squeeze(1)  # (B,)
        ends_early = rolling_in & (tree.done[s, a_in] > 0)
        cut = torch.where(ends_early, t, cut)
        tokens += int(rolling_in.sum())
        # the cut action, then pi_ref to the end
        a_cut = torch.multinomial(cut_policy[which, s], 1, generator=generator).squeeze(1)
        a_out = torch.multinomial(tree.ref_probs[s], 1, generator=generator).squeeze(1)
        a = torch.where(t < cut, a_in, torch.where(t == cut, a_cut, a_out))
        after = alive & (t >= cut)
        tokens += int(after.sum())
        states[:, t], actions[:, t] = s, a
        rewards[:, t] = tree.rewards[s, a] * alive
        done[:, t] = tree.done[s, a] * alive
        out[:, t] = after.to(torch.float64)
        alive = alive & (tree.done[s, a] == 0)
        s = tree.child[s, a].clamp(min=0)
    returns = monte_carlo_returns(rewards, done, tree.gamma, out)  # (B, H) return from each step on
    keep = out.bool() if label == "rollout" else torch.nn.functional.one_hot(cut, H).bool()  # (B, H)
    return QSharpData(states[keep], actions[keep], returns[keep], B, tokens)


def soft_heads(tree: TokenTree, dist: CategoricalTables, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q*_alpha (N, V)`` from the distributions and ``V*_alpha = alpha log sum_a pi_ref exp(Q*_alpha / alpha)``
    ``(N,)`` (DESIGN.md)."""
    q = dist.soft_q(alpha).to(torch.float64)
    return q, soft_value(q, torch.log(tree.ref_probs), alpha)


class _Fit:
    """The aggregated labels and the categorical table fitted to them (:class:`QSharpConfig.fit`)."""

    def __init__(self, tree: TokenTree, support: torch.Tensor, config: QSharpConfig):
        N, V, K = tree.num_states, tree.vocab_size, len(support)
        self.support, self.config = support, config
        self.counts = torch.zeros(N, V, dtype=torch.float64)
        self.sums = torch.zeros(N, V, K, dtype=torch.float64)  # sum of two-hot targets per pair
        self.logits = torch.zeros(N, V, K, dtype=torch.float64, requires_grad=True)

    def add(self, data: QSharpData) -> None:
        self.counts.index_put_((data.states, data.actions), torch.ones_like(data.returns), accumulate=True)
        self.sums.index_put_((data.states, data.actions), two_hot(data.returns, self.support), accumulate=True)

    def refit(self) -> None:
        if self.config.fit == "adam":
            self._adam()

    def _adam(self) -> None:
        # the aggregated cross-entropy, each labelled pair weighted equally: a tabular pair's logits are its
        # own, so the minimiser (the mean of its two-hot targets) does not depend on the weights, and equal
        # weights let rare pairs converge as fast as frequent ones (as the soft Q learner's replay does)
        seen = self.counts > 0  # (N, V)
        target = self.sums[seen] / self.counts[seen][:, None]  # (P, K) mean two-hot target per pair
        opt, sched = adam_with_decay([self.logits], self.config.lr, self.config.steps)
        for _ in range(self.config.steps):
            loss, _ = categorical_loss(self.logits[seen], target, torch.ones(len(target), dtype=torch.float64))
            adam_step(opt, sched, loss)

    def log_probs(self) -> torch.Tensor:
        """``(N, V, K)``: log of the fitted distributions."""
        if self.config.fit == "adam":
            return torch.log_softmax(self.logits.detach(), -1)
        K, c = len(self.support), self.config.prior
        total = (self.counts + c)[..., None]
        probs = torch.where(total > 0, (self.sums + c / K) / total.clamp(min=1e-300), 1.0 / K)
        return torch.log(probs)


def train_qsharp(tree: TokenTree, config: QSharpConfig, alpha: float) -> TabularHeads:
    """Rounds of roll-in / roll-out / label / refit (module docstring); heads at ``alpha`` and the
    distributions (``distribution``), from which any alpha's ``Q*_alpha`` follows."""
    _check(config)
    if not (alpha > 0 and math.isfinite(alpha)):
        raise QVLMError(f"alpha={alpha} (train_qsharp): the KL temperature must be positive and finite")
    gen = torch.Generator().manual_seed(config.seed)
    support = make_support(config.support_low, config.support_high, config.bins, dtype=torch.float64)
    alphas = tuple(dict.fromkeys([*config.alphas, alpha]))  # the schedule, and the alpha asked for
    B = config.episodes_per_round
    fit = _Fit(tree, support, config)
    can_write = (tree.ref_probs > 0).to(torch.float64)
    uniform = can_write / can_write.sum(-1, keepdim=True)
    episode_alpha = torch.arange(B) % len(alphas)  # (B,) which alpha guides each episode's roll-in
    episodes = tokens = 0
    for r in progress(range(config.rounds), desc="qsharp", enabled=config.progress, leave=False):
        # rollout: roll in with the guided policy at each episode's alpha (round 0: pi_ref), roll out with pi_ref
        with torch.no_grad():
            dist = CategoricalTables(support, fit.log_probs())
            guided = torch.stack(
                [
                    guided_policy(tree.ref_probs, *soft_heads(tree, dist, a), 1 / a) if r else tree.ref_probs
                    for a in alphas
                ]
            )  # (A, N, V)
        A = len(alphas)
        cut_policy = {"uniform": uniform.expand(A, -1, -1), "ref": tree.ref_probs.expand(A, -1, -1), "guided": guided}
        data = rollin_rollout(tree, guided, cut_policy[config.cut_action], episode_alpha, config.label, gen)
        episodes, tokens = episodes + data.episodes, tokens + data.tokens
        # optimise: aggregate every round's labels, refit
        fit.add(data)
        fit.refit()
    dist = CategoricalTables(support, fit.log_probs())
    q, v = soft_heads(tree, dist, alpha)
    labels = int(fit.counts.sum())
    extra = {"episodes": episodes, "tokens": tokens, "labels": labels}
    return TabularHeads(q, v, fit.counts > 0, extra=extra, distribution=dist)
