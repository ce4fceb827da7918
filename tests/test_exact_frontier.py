"""The exact reward-KL frontier: best-of-N, controlled decoding and the soft optimum on token MDPs."""

import math

import pytest
import torch

from qvlm.decoding.best_of_n import best_of_n_kl_exact
from qvlm.exact import MDPConfig, build_mdp, build_tree, evaluate_policy, solve
from qvlm.exact.frontier import (
    FrontierPoint,
    best_of_n_frontier,
    exact_frontier,
    frontier_violation,
    guidance_frontier,
    reach_probs,
    response_distribution,
    soft_optimum_at_kl,
    soft_optimum_frontier,
)
from qvlm.exact.learners import single_thread
from tests.test_exact import doc_tree


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():  # tiny tables: extra threads only add synchronisation on a busy machine
        yield


def test_responses_of_the_documented_tree_by_hand():
    # docs/exact.md's tree: responses <eos> (0.25, R 0), aa (0.125, 1), ab (0.25, 0.5), a<eos> (0.125, 0.5),
    # ba (0.125, 0.5), bb (0.0625, 0), b<eos> (0.0625, 0)
    tree = doc_tree()
    probs, returns = response_distribution(tree)
    assert float(probs.sum()) == pytest.approx(1.0)
    by_return = {r: float(probs[returns == r].sum()) for r in (0.0, 0.5, 1.0)}
    assert by_return == pytest.approx({0.0: 0.375, 0.5: 0.5, 1.0: 0.125})
    assert float((probs * returns).sum()) == pytest.approx(evaluate_policy(tree, tree.ref_probs).reward)
    # best-of-2: F = (0.375, 0.875, 1) -> level probs (0.140625, 0.625, 0.234375)
    bon = best_of_n_frontier(tree, [1, 2])
    assert bon[0].reward == pytest.approx(0.5 * 0.5 + 0.125) and bon[0].kl_to_base == pytest.approx(0.0)
    assert bon[1].reward == pytest.approx(0.625 * 0.5 + 0.234375)
    expected_kl = 0.140625 * math.log(0.375) + 0.625 * math.log(1.25) + 0.234375 * math.log(1.875)
    assert bon[1].kl_to_base == pytest.approx(expected_kl)
    assert expected_kl == pytest.approx(best_of_n_kl_exact([0.0, 0.5, 1.0], [0.375, 0.5, 0.125], 2))
    assert bon[1].cost == 2.0


def test_reach_probs_flow_from_the_root():
    tree = doc_tree()
    reach = reach_probs(tree, tree.ref_probs)
    assert reach.tolist() == pytest.approx([1.0, 0.5, 0.25])  # (), (a), (b)


def default_tree(seed):
    return build_tree(build_mdp(MDPConfig(seed=seed)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_soft_optimum_lies_on_or_above_best_of_n_and_controlled_decoding(seed):
    # exponential tilting pi_ref exp(Q*/alpha) is the exact reward-KL Pareto frontier: a point above
    # it is a bug (issue 10's acceptance)
    tree = default_tree(seed)
    soft = soft_optimum_frontier(tree)
    reference = evaluate_policy(tree, tree.ref_probs)
    others = best_of_n_frontier(tree, [1, 2, 4, 16, 32]) + guidance_frontier(
        tree, reference.reward_q, reference.reward_v, [2, 8, 32]
    )
    for point in others:
        # the dual check over the alpha grid: reward - alpha KL <= V*_alpha(root)
        assert frontier_violation(point, soft) <= 1e-9, point
        # and directly: the soft optimum with the same KL earns at least as much reward
        assert point.reward <= soft_optimum_at_kl(tree, point.kl_to_base).reward + 1e-6, point
    # the check can fail: a point a little above the soft frontier is caught
    star = soft_optimum_at_kl(tree, others[2].kl_to_base)
    above = FrontierPoint("n", 0, star.reward + 1e-3, star.kl_to_base)
    assert frontier_violation(above, soft + [star]) > 0 and above.reward > star.reward


def test_soft_optimum_curve_matches_the_solver_and_rises_with_kl():
    tree = default_tree(0)
    soft = soft_optimum_frontier(tree, [0.05, 0.1, 0.2, 1.0])
    star = evaluate_policy(tree, solve(tree, 0.1).pi)
    assert soft[1].reward == pytest.approx(star.reward) and soft[1].kl_to_base == pytest.approx(star.kl)
    assert soft[1].reward - 0.1 * soft[1].kl_to_base == pytest.approx(solve(tree, 0.1).objective)
    kls, rewards = [p.kl_to_base for p in soft], [p.reward for p in soft]
    assert kls == sorted(kls, reverse=True) and rewards == sorted(rewards, reverse=True)
    point = soft_optimum_at_kl(tree, soft[2].kl_to_base)
    assert point.value == pytest.approx(0.2, rel=1e-6)


def test_exact_frontier_reports_every_method_with_learned_heads():
    tree = default_tree(0)
    opt = solve(tree, 0.1)
    out = exact_frontier(tree, ns=[1, 4], betas=[0.0, 10.0], alphas=[0.1, 1.0], heads={"exact_q": (opt.q, opt.v)})
    assert set(out) == {"soft_optimum", "best_of_n", "controlled_decoding", "exact_q"}
    assert [p["n"] for p in out["best_of_n"]] == [1, 4] and out["best_of_n"][1]["cost"] == 4.0
    assert all(p["kl_kind"] == "exact" for points in out.values() for p in points)
    # guidance with the exact Q* at beta = 1/alpha is the soft optimum itself
    assert out["exact_q"][1]["reward"] == pytest.approx(out["soft_optimum"][0]["reward"])
    assert out["exact_q"][1]["kl_to_base"] == pytest.approx(out["soft_optimum"][0]["kl_to_base"])
    assert out["exact_q"][0]["kl_to_base"] == pytest.approx(0.0) and torch.isfinite(opt.q).all()


def test_cli_reports_the_frontier_and_writes_the_plot(tmp_path, capsys):
    import json

    from qvlm.cli import main

    out, plot = tmp_path / "exact.json", tmp_path / "frontier.svg"
    argv = ["exact", "--reward", "pattern", "--learners", "none", "--plot", str(plot), "--json", str(out)]
    assert main(argv + ["--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "exact reward-KL frontier" in printed and "best_of_n" in printed and "controlled_decoding" in printed
    frontier = json.loads(out.read_text())["frontier"]
    assert set(frontier) == {"soft_optimum", "best_of_n", "controlled_decoding"}
    assert [p["n"] for p in frontier["best_of_n"]] == list(range(1, 33))
    assert 10.0 in [p["beta"] for p in frontier["controlled_decoding"]]  # beta = 1/alpha is always swept
    # a 0/1 reward: best-of-N is itself an exponential tilt of pi_ref, so it lies on the soft frontier
    assert all(abs(p["soft_optimum_reward"] - p["reward"]) < 1e-6 for p in frontier["best_of_n"])
    assert plot.read_text().lstrip().startswith("<?xml") and "<svg" in plot.read_text()
    assert main(["exact", "--learners", "none", "--plot", str(tmp_path / "f.jpg")]) == 2
    assert "--plot" in capsys.readouterr().err
