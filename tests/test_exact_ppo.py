"""Ground truth for PPO: ``qvlm exact --learners ppo`` trains a tiny causal LM with train_ppo (the
trainer users run) on the exact token MDP and is scored exactly against the soft optimum."""

from __future__ import annotations

import time

import pytest
import torch

from qvlm.exact import MDPConfig, build_mdp, build_tree, evaluate_policy
from qvlm.exact.learners import compare_learners
from qvlm.exact.ppo_learner import mdp_reward, mdp_tokenizer, reach_probabilities


@pytest.fixture(scope="module")
def tree():
    return build_tree(build_mdp(MDPConfig(seed=0)))


def test_reach_probabilities_sum_to_one_per_level(tree):
    policy = tree.ref_probs
    reach = reach_probabilities(tree, policy)
    assert reach[0] == 1.0
    # a level's states are reached with the probability that no EOS came before
    stop = 1.0
    for d, sl in enumerate(tree.level_slices):
        assert reach[sl].sum().item() == pytest.approx(stop)
        stop = float((reach[sl] * (1 - policy[sl, tree.eos_id])).sum())


def testmdp_reward_reads_tokens_and_eos_from_text(tree):
    reward = mdp_reward(tree)
    # count reward of 'a' / horizon 5: "aab" + EOS -> 2/5; "aaaaa" (no EOS, the horizon) -> 1; "" + EOS -> 0
    assert reward([None] * 3, ["aab", "aaaaa", ""]) == pytest.approx([0.4, 1.0, 0.0])
    tok = mdp_tokenizer(4)
    assert tok.decode([0, 1, 2]) == "abc" and tok.eos_token_id == 3


def test_exact_expected_reward_matches_themdp_reward(tree):
    # E_pi_ref[R] exactly vs the reward callable on enumerated complete responses: a check of mdp_reward
    reward = mdp_reward(tree)
    ev = evaluate_policy(tree, tree.ref_probs)
    total, stack = 0.0, [((), 1.0)]
    while stack:
        prefix, p = stack.pop()
        s = tree.state_id(prefix)
        for a in range(tree.vocab_size):
            q = p * float(tree.ref_probs[s, a])
            if a == tree.eos_id or len(prefix) + 1 == tree.horizon:
                text = "".join("abc"[t] for t in (*prefix, a) if t != tree.eos_id)
                total += q * reward([None], [text])[0]
            else:
                stack.append(((*prefix, a), q))
    assert total == pytest.approx(ev.reward, abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ppo_reaches_the_soft_optimum_on_the_default_mdp(seed):
    tree = build_tree(build_mdp(MDPConfig(seed=seed)))
    start = time.perf_counter()
    result = compare_learners(tree, 0.1, ["ppo"], seed=seed)
    elapsed = time.perf_counter() - start
    ppo = result["learners"]["ppo"]
    assert ppo["extra"]["distill_kl"] < 2e-3  # the LM's base is pi_ref to within this KL
    assert ppo["objective_ratio"] >= 0.97, ppo
    assert result["reference"]["objective_ratio"] < 0.7  # pi_ref itself is far from it
    assert ppo["visited_states"] > 10 and ppo["v_rmse"] < 0.2
    print(f"seed {seed}: ratio {ppo['objective_ratio']:.4f}, KL {ppo['kl']:.3f}, {elapsed:.1f} s")
    torch.testing.assert_close(torch.tensor(ppo["objective"]), torch.tensor(ppo["reward"] - 0.1 * ppo["kl"]))
