"""pi_ref's exact return distribution (qvlm.exact.distribution) by hand, and Q*_alpha read from it.

Ground truth for the distributional learner: in a deterministic token MDP with gamma = 1,
``alpha log E[exp(R / alpha)]`` over pi_ref's exact return distribution is the solver's ``Q*_alpha``.
"""

from __future__ import annotations

import math

import pytest
import torch

from qvlm.distributional import categorical_mean, make_support, project_categorical, soft_q_from_categorical
from qvlm.errors import QVLMError
from qvlm.exact import (
    MDPConfig,
    TokenMDP,
    build_mdp,
    build_tree,
    count_reward,
    evaluate_policy,
    solve,
    table_policy,
    token_reward,
)
from qvlm.exact.distribution import return_distribution
from qvlm.exact.frontier import response_distribution


def doc_tree(gamma: float = 1.0):
    # docs/exact.md's walk-through: vocab {a, b, EOS}, horizon 2, reward (number of a) / 2
    pi_ref = table_policy(3, {(): [0.5, 0.25, 0.25], (0,): [0.25, 0.5, 0.25], (1,): [0.5, 0.25, 0.25]})
    return build_tree(TokenMDP(3, 2, pi_ref, count_reward(0, 2), gamma))


def rows(x: torch.Tensor) -> list:
    return [round(v, 12) for v in x.flatten().tolist()]


def test_doc_tree_by_hand():
    tree = doc_tree()
    d = return_distribution(tree)
    assert d.values.tolist() == [0.0, 0.5, 1.0]
    a, b = tree.state_id((0,)), tree.state_id((1,))
    # leaves: (a) writes a -> "aa" (1), b -> "ab" (0.5), EOS -> 0.5; (b): "ba" 0.5, "bb" 0, "b<eos>" 0
    assert rows(d.pair_probs[a]) == [0, 0, 1, 0, 1, 0, 0, 1, 0]
    assert rows(d.pair_probs[b]) == [0, 1, 0, 1, 0, 0, 1, 0, 0]
    # Z((a)) = 0.25 at 1, 0.75 at 0.5; Z((b)) = 0.5 at 0.5, 0.5 at 0
    assert rows(d.state_probs[a]) == [0, 0.75, 0.25] and rows(d.state_probs[b]) == [0.5, 0.5, 0]
    # the root: Z((), a) = Z((a)), Z((), b) = Z((b)), EOS -> 0;
    # Z(()) = 0.5 (0, 0.75, 0.25) + 0.25 (0.5, 0.5, 0) + 0.25 (1, 0, 0) = (0.375, 0.5, 0.125), mean 0.375 = V^pi_ref
    assert rows(d.pair_probs[0]) == [0, 0.75, 0.25, 0.5, 0.5, 0, 1, 0, 0]
    assert rows(d.state_probs[0]) == [0.375, 0.5, 0.125]
    assert categorical_mean(d.state_probs[0].log(), d.values).item() == pytest.approx(0.375, abs=1e-15)


def test_gamma_scales_the_continuation():
    # gamma 0.5: a step that does not end the episode returns r + 0.5 R'; at the root "a" then "a" -> 0.5 * 1
    d = return_distribution(doc_tree(gamma=0.5))
    assert d.values.tolist() == [0.0, 0.25, 0.5, 1.0]
    assert rows(d.pair_probs[0, 0]) == [0, 0.75, 0.25, 0]


@pytest.mark.parametrize(
    "config",
    [MDPConfig(seed=0), MDPConfig(seed=1), MDPConfig(seed=2, reward="pattern"), MDPConfig(vocab_size=5, horizon=4)],
    ids=["count-0", "count-1", "pattern-2", "count-v5h4"],
)
def test_soft_q_of_the_exact_distribution_is_the_solvers(config):
    # unprojected: the exact atoms and probabilities straight into soft_q_from_categorical
    tree = build_tree(build_mdp(config))
    d = return_distribution(tree)
    assert torch.allclose(d.pair_probs.sum(-1), torch.ones(()).double()) and (d.pair_probs >= 0).all()
    log_p = d.pair_probs.log()
    for alpha in (0.05, 0.1, 0.2, 0.5, 1.0):
        assert (soft_q_from_categorical(log_p, d.values, alpha) - solve(tree, alpha).q).abs().max() < 1e-10
    # alpha -> infinity: the mean, pi_ref's own Q and V
    reference = evaluate_policy(tree, tree.ref_probs)
    assert (categorical_mean(log_p, d.values) - reference.reward_q).abs().max() < 1e-12
    assert (categorical_mean(d.state_probs.log(), d.values) - reference.reward_v).abs().max() < 1e-12
    # the root's distribution is that of the enumerated responses
    probs, returns = response_distribution(tree)
    by_value = torch.zeros(len(d.values), dtype=torch.float64)
    by_value.index_add_(0, torch.searchsorted(d.values, torch.round(returns, decimals=12)), probs)
    assert torch.allclose(by_value, d.state_probs[0], atol=1e-14)


def test_per_token_rewards_with_gamma_1_match_and_gamma_below_1_does_not():
    def reward(prefix, a):  # 0.3 for each 'a', 0.1 for 'b'
        return {0: 0.3, 1: 0.1}.get(a, 0.0)

    pi_ref = table_policy(3, {(): [0.5, 0.25, 0.25], (0,): [0.25, 0.5, 0.25], (1,): [0.5, 0.25, 0.25]})
    for gamma, matches in ((1.0, True), (0.8, False)):
        tree = build_tree(TokenMDP(3, 2, pi_ref, token_reward(reward), gamma))
        d = return_distribution(tree)
        q = soft_q_from_categorical(d.pair_probs.log(), d.values, 0.1)
        # with gamma < 1 the KL is discounted too: Q* is not alpha log E exp(G / alpha) of the discounted return
        assert bool((q - solve(tree, 0.1).q).abs().max() < 1e-10) is matches


def test_projection_onto_a_support():
    tree = build_tree(build_mdp(MDPConfig(seed=0)))  # returns 0, 0.2, ..., 1
    d = return_distribution(tree)
    exact_q = solve(tree, 0.1).q
    # on a grid that holds every return the projection changes nothing
    fine = make_support(0, 1, 11, dtype=torch.float64)
    on_grid = project_categorical(d.values, d.pair_probs, fine)
    assert (soft_q_from_categorical(on_grid.log(), fine, 0.1) - exact_q).abs().max() < 1e-12
    # a coarser grid (0, 0.5, 1) keeps the mean but spreads the mass: exp(R / alpha) is convex, so Q*_alpha rises
    coarse = make_support(0, 1, 3, dtype=torch.float64)
    projected = project_categorical(d.values, d.pair_probs, coarse)
    q = soft_q_from_categorical(projected.log(), coarse, 0.1)
    assert (q - exact_q).min() >= -1e-12 and (q - exact_q).max() > 0.05
    assert (
        categorical_mean(projected.log(), coarse) - categorical_mean(d.pair_probs.log(), d.values)
    ).abs().max() < 1e-12


def test_budget_is_checked_before_allocating():
    tree = doc_tree()
    with pytest.raises(QVLMError, match="max_entries"):
        return_distribution(tree, max_entries=10)
    assert math.isfinite(return_distribution(tree, max_entries=27).values.sum().item())  # 3 states x 3 actions x 3
