"""Best-of-N's KL to the base policy: exact over enumerable outcomes, estimated from samples, bounded."""

import math
import random

import pytest
import torch

from qvlm.decoding.best_of_n import (
    best_of_n_kl_bound,
    best_of_n_kl_estimate,
    best_of_n_kl_exact,
    best_of_n_policy,
)
from qvlm.errors import QVLMError

REWARDS, PROBS = [0.0, 0.5, 1.0], [0.5, 0.3, 0.2]  # DESIGN.md's worked example


def test_best_of_4_policy_and_exact_kl_match_the_worked_example():
    # F = (0.5, 0.8, 1): pi_4 = (0.5^4, 0.8^4 - 0.5^4, 1 - 0.8^4)
    assert best_of_n_policy(REWARDS, PROBS, 4).tolist() == pytest.approx([0.0625, 0.3471, 0.5904])
    assert best_of_n_kl_exact(REWARDS, PROBS, 4) == pytest.approx(0.5597506, abs=1e-7)
    assert best_of_n_kl_bound(4) == pytest.approx(0.6362944, abs=1e-7)
    assert best_of_n_kl_exact(REWARDS, PROBS, 1) == pytest.approx(0.0)


def test_ties_split_the_level_in_the_base_proportions():
    # two outcomes share reward 1 (mass 0.5): the level gets 1 - 0.5^2 = 0.75, split 3:2
    pi = best_of_n_policy([0.0, 1.0, 1.0], [0.5, 0.3, 0.2], 2)
    assert pi.tolist() == pytest.approx([0.25, 0.45, 0.30])
    # so the KL is the KL over levels: 0.25 log 0.5 + 0.75 log 1.5
    assert best_of_n_kl_exact([0.0, 1.0, 1.0], [0.5, 0.3, 0.2], 2) == pytest.approx(
        0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    )


def test_best_of_n_policy_matches_simulated_selection():
    gen = torch.Generator().manual_seed(0)
    draws = torch.multinomial(torch.tensor(PROBS), 200_000 * 4, replacement=True, generator=gen).view(-1, 4)
    best = torch.tensor(REWARDS)[draws].max(1).values
    freq = [float((best == r).double().mean()) for r in REWARDS]
    assert freq == pytest.approx(best_of_n_policy(REWARDS, PROBS, 4).tolist(), abs=0.005)


def test_exact_kl_never_exceeds_the_bound_and_meets_it_without_ties():
    rng = random.Random(0)
    for n in (2, 4, 16):
        for _ in range(20):
            m = rng.randint(1, 6)
            probs = torch.tensor([rng.random() + 1e-3 for _ in range(m)], dtype=torch.float64)
            rewards = [float(rng.randint(0, 3)) for _ in range(m)]
            assert best_of_n_kl_exact(rewards, probs / probs.sum(), n) <= best_of_n_kl_bound(n) + 1e-12
    # many equally likely distinct outcomes approach the continuous case
    m = 4000
    assert best_of_n_kl_exact(list(range(m)), [1 / m] * m, 4) == pytest.approx(best_of_n_kl_bound(4), abs=2e-3)


def test_estimate_by_hand_with_a_tie():
    # samples (0, 0, 1, 2), n = 2: the atom 0 (mass 1/2) is picked with prob 1/4 -> 0.25 log 0.5;
    # 1 and 2 are continuous on [1/2, 3/4] and [3/4, 1] with f(u) = 2u:
    # int f log f = (b^2 - a^2) log 2 + b^2 log b - a^2 log a - (b^2 - a^2) / 2
    def stretch(a, b):
        return (b * b - a * a) * math.log(2) + b * b * math.log(b) - a * a * math.log(a) - (b * b - a * a) / 2

    expected = 0.25 * math.log(0.5) + stretch(0.5, 0.75) + stretch(0.75, 1.0)
    assert expected == pytest.approx(0.1448604, abs=1e-7)
    assert best_of_n_kl_estimate([0.0, 2.0, 0.0, 1.0], 2) == pytest.approx(expected)


def test_estimate_limits_no_ties_all_ties_and_atoms():
    assert best_of_n_kl_estimate([0.3, 0.1, 0.7, 0.2, 0.9], 4) == pytest.approx(best_of_n_kl_bound(4))
    assert best_of_n_kl_estimate([0.5] * 8, 16) == 0.0
    assert best_of_n_kl_estimate([0.3, 0.1], 1) == 0.0
    # samples in the exact proportions of a discrete distribution (every level tied): the exact KL
    samples = [0.0] * 50 + [0.5] * 30 + [1.0] * 20
    assert best_of_n_kl_estimate(samples, 4) == pytest.approx(best_of_n_kl_exact(REWARDS, PROBS, 4))


def test_estimate_lies_between_zero_and_the_bound():
    rng = random.Random(1)
    for _ in range(50):
        samples = [float(rng.randint(0, 5)) for _ in range(rng.randint(1, 12))]
        for n in (2, 4, 16):
            assert -1e-12 <= best_of_n_kl_estimate(samples, n) <= best_of_n_kl_bound(n) + 1e-12


def test_bad_input_is_a_clear_error():
    with pytest.raises(QVLMError, match="n is 0"):
        best_of_n_kl_estimate([1.0], 0)
    with pytest.raises(QVLMError, match="no base samples"):
        best_of_n_kl_estimate([], 4)
    with pytest.raises(QVLMError, match="must be equal 1-d"):
        best_of_n_policy([0.0, 1.0], [1.0], 2)


def test_estimate_tolerance_groups_nearly_equal_values():
    assert best_of_n_kl_estimate([1.0, 1.0 + 1e-9, 2.0], 2) == pytest.approx(best_of_n_kl_bound(2))
    assert best_of_n_kl_estimate([1.0, 1.0 + 1e-9, 2.0], 2, tol=1e-6) == pytest.approx(
        best_of_n_kl_estimate([1.0, 1.0, 2.0], 2)
    )


def test_frontier_block_groups_rows_into_curves():
    from qvlm.eval.frontier import build_frontier

    def row(reward, kl, cost=1.0, kind="exact"):
        return {"reward_mean": reward, "reward_ci95": 0.1, "kl_to_base": kl, "kl_kind": kind, "cost": cost, "n": 8}

    methods = {
        "base": row(0.2, 0.0),
        "best_of_4": row(0.5, 0.6, 4.0, "estimate"),
        "ilql_beta_16": row(0.3, 5.0, 1.4),
        "ilql_beta_4": row(0.25, 1.0, 1.4),
        "mcq_beta_8": row(0.4, 3.0, 1.4),
        "cd_blockwise_k4": row(0.45, 2.0, 4.1, "estimate"),
        "shown_elsewhere": row(9.0, 9.0),
    }
    frontier = build_frontier(methods, best_of={2: row(0.35, 0.19, 2.0, "estimate"), 4: row(0.0, 0.0)})
    assert set(frontier) == {"best_of_n", "ilql", "mcq", "cd_blockwise"}
    assert [p["n"] for p in frontier["best_of_n"]] == [1, 2, 4]
    assert frontier["best_of_n"][2]["reward_mean"] == 0.5  # the table's row wins over the extra one
    assert [p["beta"] for p in frontier["ilql"]] == [0.0, 4.0, 16.0]  # base starts every guided curve
    assert frontier["ilql"][0]["kl_to_base"] == 0.0 and frontier["mcq"][1]["kl_to_base"] == 3.0
    assert frontier["cd_blockwise"] == [
        {"n": 4, **{k: methods["cd_blockwise_k4"][k] for k in frontier["cd_blockwise"][0] if k != "n"}}
    ]
    assert set(frontier["ilql"][1]) == {"beta", "reward_mean", "reward_ci95", "kl_to_base", "kl_kind", "cost"}
