"""Ground truth: the exact soft-optimal solver on small token MDPs (qvlm.exact).

Hand-computed cases first (DESIGN.md's one-step case and the docs/exact.md walk-through), then
identities that must hold in every state of larger trees (soft Bellman residual, pi* sums to 1,
guided decoding with Q* reproduces pi*, J(pi*) = V*(root), alpha -> 0 gives the hard max).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from qvlm.errors import QVLMError
from qvlm.exact import (
    CausalLMPolicy,
    DirichletPolicy,
    MDPConfig,
    TokenMDP,
    build_mdp,
    build_tree,
    count_reward,
    count_tree_nodes,
    eos_reward,
    evaluate_policy,
    guided_policy,
    pattern_reward,
    soft_bellman_residual,
    solve,
    solve_hard,
    table_policy,
    terminal_reward,
    tiny_llama,
    token_reward,
)

A, B, EOS = 0, 1, 2


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def doc_tree():
    """docs/exact.md: vocab {a, b, EOS}, horizon 2, reward = count of a / 2, gamma 1."""
    pi_ref = table_policy(3, {(): [0.5, 0.25, 0.25], (A,): [0.25, 0.5, 0.25], (B,): [0.5, 0.25, 0.25]})
    return build_tree(TokenMDP(3, 2, pi_ref, count_reward(A, 2)))


# ---------------------------------------------------------------- hand-computed


def test_design_one_step_two_actions():
    # DESIGN.md: pi_ref (0.5, 0.5), rewards (1, 0), alpha 1, done -> V* = log(0.5 e + 0.5)
    mdp = TokenMDP(2, 1, table_policy(2, {(): [0.5, 0.5]}), terminal_reward(lambda toks: float(toks == (0,))))
    opt = solve(build_tree(mdp), alpha=1.0)
    assert_close(opt.q, t([1.0, 0.0]))
    assert opt.objective == pytest.approx(0.6201145, abs=1e-7)
    assert opt.objective == pytest.approx(math.log(0.5 * math.e + 0.5), abs=1e-15)
    assert_close(opt.pi, t([0.7310586, 0.2689414]), atol=1e-7, rtol=0)


def test_doc_tree_layout():
    tree = doc_tree()
    assert tree.num_states == 3 and count_tree_nodes(3, 2) == 10
    assert [tree.prefix(i) for i in range(3)] == [(), (A,), (B,)]
    assert tree.state_id((B,)) == 2
    # rewards: count of a / horizon on the finished response; (EOS,) ends at once with no a
    assert_close(tree.rewards, t([0, 0, 0], [1, 0.5, 0.5], [0.5, 0, 0]))
    assert_close(tree.done, t([0, 0, 1], [1, 1, 1], [1, 1, 1]))
    assert tree.child.tolist() == [[1, 2, -1], [-1, -1, -1], [-1, -1, -1]]


def test_doc_tree_soft_optimum_alpha_1():
    tree = doc_tree()
    opt = solve(tree, alpha=1.0)
    # leaves: V*((a,)) = log(0.25 e + 0.75 e^0.5), V*((b,)) = log(0.5 e^0.5 + 0.5)
    v_a = math.log(0.25 * math.e + 0.75 * math.exp(0.5))
    v_b = math.log(0.5 * math.exp(0.5) + 0.5)
    assert v_a == pytest.approx(0.6502978, abs=1e-7) and v_b == pytest.approx(0.2809298, abs=1e-7)
    # Bellman backup at the root: Q*((), a) = 0 + V*((a,)), Q*((), b) = V*((b,)), Q*((), EOS) = 0
    assert_close(opt.q[0], t(v_a, v_b, 0.0))
    # V*(()) = log(0.5 e^{V*(a)} + 0.25 e^{V*(b)} + 0.25 e^0) = log(1.539145)
    assert opt.objective == pytest.approx(0.4312276, abs=1e-7)
    assert_close(opt.pi[0], t(0.6224593, 0.2151129, 0.1624278), atol=1e-7, rtol=0)
    assert_close(opt.pi[1], t(0.3546612, 0.4302258, 0.2151129), atol=1e-7, rtol=0)
    # pi* as a policy: reward 0.4885603, KL 0.0573327, reward - KL = V*(())
    ev = evaluate_policy(tree, opt.pi)
    assert ev.reward == pytest.approx(0.4885603, abs=1e-7)
    assert ev.kl == pytest.approx(0.0573327, abs=1e-7)
    assert ev.objective(1.0) == pytest.approx(opt.objective, abs=1e-12)


def test_doc_tree_hard_and_reference_values():
    tree = doc_tree()
    hard = solve_hard(tree)
    assert_close(hard.v, t(1.0, 1.0, 0.5))  # write a, a
    ref = evaluate_policy(tree, tree.ref_probs)
    assert_close(ref.reward_v, t(0.375, 0.625, 0.25))  # V^pi_ref
    assert ref.kl == 0.0
    # alpha -> 0: the doc's table of V*(()) by alpha
    for alpha, v_root in [(0.5, 0.4887443), (0.1, 0.7947286), (0.01, 0.9792056), (0.001, 0.9979206)]:
        assert solve(tree, alpha).objective == pytest.approx(v_root, abs=1e-7)


def test_doc_tree_guided_decoding_root_logits():
    tree = doc_tree()
    opt = solve(tree, alpha=1.0)
    logits = torch.log(tree.ref_probs[0]) + 1.0 * (opt.q[0] - opt.v[0])  # beta = 1/alpha = 1
    assert_close(logits, t(-0.4740770, -1.5365922, -1.8175220), atol=1e-7, rtol=0)
    assert_close(torch.softmax(logits, -1), opt.pi[0], atol=1e-12, rtol=0)


def test_deterministic_policy_reward_and_kl():
    # always write a (horizon 2): reward 1; KL = log(1/0.5) + log(1/0.25) = log 8
    tree = doc_tree()
    ev = evaluate_policy(tree, lambda prefix: [1.0, 0.0, 0.0])
    assert ev.reward == pytest.approx(1.0)
    assert ev.kl == pytest.approx(math.log(8.0), abs=1e-12)
    # a policy that writes a token pi_ref cannot has infinite KL
    zero_tree = build_tree(TokenMDP(3, 1, table_policy(3, {(): [0.5, 0.5, 0.0]}), count_reward(A, 1)))
    assert math.isinf(evaluate_policy(zero_tree, {(): [0.0, 0.0, 1.0]}).kl)


def test_builtin_rewards_by_hand():
    pi = DirichletPolicy(3, seed=0)
    eos = build_tree(TokenMDP(3, 2, pi, eos_reward(EOS)))
    assert_close(eos.rewards, t([0, 0, 1], [0, 0, 1], [0, 0, 1]))  # cut at the horizon: 0
    pat = build_tree(TokenMDP(3, 2, pi, pattern_reward((A, B))))
    assert_close(pat.rewards, t([0, 0, 0], [0, 1, 0], [0, 0, 0]))  # only "a b"
    step = build_tree(TokenMDP(3, 2, pi, token_reward(lambda prefix, a: 0.25 * (a == B))))
    assert_close(step.rewards, t([0, 0.25, 0], [0, 0.25, 0], [0, 0.25, 0]))


# ---------------------------------------------------------------- identities on larger trees


def _trees():
    yield "default", build_tree(build_mdp(MDPConfig()))
    yield (
        "gamma0.9-pattern",
        build_tree(build_mdp(MDPConfig(vocab_size=5, horizon=4, gamma=0.9, reward="pattern", seed=3))),
    )
    yield "eos-v3h8", build_tree(build_mdp(MDPConfig(vocab_size=3, horizon=8, reward="eos", seed=1)))
    yield (
        "per-token-v8h5",
        build_tree(
            TokenMDP(8, 5, DirichletPolicy(8, seed=2, concentration=0.5), token_reward(lambda p, a: 0.2 * (a == 1)))
        ),
    )


@pytest.mark.parametrize("alpha", [1.0, 0.1, 0.02])
def test_soft_optimum_identities_in_every_state(alpha):
    for name, tree in _trees():
        opt = solve(tree, alpha)
        assert soft_bellman_residual(tree, opt.q, opt.v, alpha).max() <= 1e-9, name
        assert_close(opt.pi.sum(-1), torch.ones(tree.num_states, dtype=torch.float64), atol=1e-12, rtol=0)
        # value-guided decoding with the exact Q* and beta = 1/alpha is pi*
        guided = guided_policy(tree.ref_probs, opt.q, opt.v, 1.0 / alpha)
        assert (guided - opt.pi).abs().max() <= 1e-6, name
        # the exact objective of pi* is V*(root), in every state (J from s = V*(s))
        ev = evaluate_policy(tree, opt.pi)
        assert ev.objective(alpha) == pytest.approx(opt.objective, abs=1e-9), name
        assert_close(ev.reward_v - alpha * ev.kl_v, opt.v, atol=1e-9, rtol=0)
        # and no other policy does better: pi_ref, or pi* sharpened
        assert evaluate_policy(tree, tree.ref_probs).objective(alpha) <= opt.objective + 1e-12
        sharp = torch.softmax(2 * torch.log(opt.pi), -1)
        assert evaluate_policy(tree, sharp).objective(alpha) <= opt.objective + 1e-12


def test_alpha_to_zero_approaches_hard_max():
    for name, tree in _trees():
        hard = solve_hard(tree)
        log_min = -math.log(float(tree.ref_probs.min()))
        gaps = []
        for alpha in [0.1, 0.01, 1e-3, 1e-4]:
            v = solve(tree, alpha).v
            gap = (hard.v - v).max().item()
            # V* <= V0 (a soft max is below the max) and V0 - V* <= alpha * H * log(1 / min pi_ref)
            assert (v <= hard.v + 1e-12).all(), name
            assert gap <= alpha * tree.horizon * log_min + 1e-12, name
            gaps.append(gap)
        assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 2e-2, name


def test_policy_inputs_agree():
    tree = doc_tree()
    table = {(): [0.2, 0.3, 0.5], (A,): [1.0, 0.0, 0.0], (B,): [0.0, 0.5, 0.5]}
    by_dict = evaluate_policy(tree, table)
    by_fn = evaluate_policy(tree, lambda p: table[p])
    by_tensor = evaluate_policy(tree, t(*table.values()))
    for ev in (by_fn, by_tensor):
        assert ev.reward == pytest.approx(by_dict.reward) and ev.kl == pytest.approx(by_dict.kl)
    # reward by hand: 0.2 * 1 (a a) + 0.3 * (0.5 * 0 + 0.5 * 0) + 0.5 * 0 = 0.2
    assert by_dict.reward == pytest.approx(0.2)


def test_dirichlet_rows_do_not_depend_on_query_order():
    pi = DirichletPolicy(5, seed=7)
    rows = np.array([[3, 1], [0, 0], [2, 3]])
    once = pi.probs(rows)
    again = DirichletPolicy(5, seed=7).probs(rows[::-1])[::-1]
    np.testing.assert_array_equal(once, again)
    assert np.allclose(once.sum(1), 1.0)


# ---------------------------------------------------------------- limits and errors


def test_state_budget_and_config_errors():
    with pytest.raises(QVLMError, match="over the budget"):
        build_tree(build_mdp(MDPConfig(vocab_size=8, horizon=8)))
    assert count_tree_nodes(8, 7) < 2_000_000 < count_tree_nodes(8, 8)
    for bad, where in [
        (dict(vocab_size=2), "--vocab"),
        (dict(horizon=9), "--horizon"),
        (dict(token=3), "--token"),
        (dict(reward="bleu"), "--reward"),
        (dict(reference="gpt"), "--ref"),
    ]:
        with pytest.raises(QVLMError, match=where):
            build_mdp(MDPConfig(**bad))
    with pytest.raises(QVLMError, match="alpha"):
        solve(doc_tree(), 0.0)
    with pytest.raises(QVLMError, match="sums to"):
        build_tree(TokenMDP(3, 1, table_policy(3, {(): [0.5, 0.2, 0.2]}), count_reward(A, 1)))
    with pytest.raises(QVLMError, match="no row for prefix"):
        build_tree(TokenMDP(3, 2, table_policy(3, {(): [0.5, 0.25, 0.25]}), count_reward(A, 2)))


def test_large_tree_is_vectorised():
    # vocab 8, horizon 6: 19,608 states, solved and checked in well under a second
    tree = build_tree(build_mdp(MDPConfig(vocab_size=8, horizon=6, seed=5)))
    assert tree.num_states == sum(7**d for d in range(6))
    opt = solve(tree, 0.1)
    assert soft_bellman_residual(tree, opt.q, opt.v, 0.1).max() <= 1e-9


# ---------------------------------------------------------------- tiny LM reference


def test_tiny_llama_reference_reads_eos_as_start_token():
    model = tiny_llama(4, seed=0)
    assert model.config.vocab_size == 4
    tree = build_tree(TokenMDP(4, 3, CausalLMPolicy(model, 4), count_reward(A, 3)))
    with torch.no_grad():
        root = torch.softmax(model(input_ids=torch.tensor([[3]])).logits[0, -1].double(), -1)
        deep = torch.softmax(model(input_ids=torch.tensor([[3, 2, 0]])).logits[0, -1].double(), -1)
    assert_close(tree.ref_probs[0], root)
    assert_close(tree.ref_probs[tree.state_id((2, 0))], deep)
    assert tree.ref_probs.std(0).max() > 0.01  # rows differ from prefix to prefix
    opt = solve(tree, 0.1)
    assert soft_bellman_residual(tree, opt.q, opt.v, 0.1).max() <= 1e-9


def test_default_mdp_optimum_matches_the_docs_table():
    # docs/exact.md, "Results on the default MDP": the optimal and reference rows
    tree = build_tree(build_mdp(MDPConfig()))
    opt = solve(tree, 0.1)
    star, ref = evaluate_policy(tree, opt.pi), evaluate_policy(tree, tree.ref_probs)
    assert tree.num_states == 121
    assert (round(opt.objective, 4), round(star.reward, 4), round(star.kl, 4)) == (0.4804, 0.6690, 1.8854)
    assert round(ref.reward, 4) == 0.3139
