"""The pure parts of benchmarks/ppo_sweep.py (issue 23: the sweep that chose PPO's defaults): the rule
that picks the defaults and the checks of its points. The sweep itself runs for an hour or more."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(_DIR))
_spec = importlib.util.spec_from_file_location("ppo_sweep", _DIR / "ppo_sweep.py")
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def _run(reward, kl, seconds):
    return {"val": {"reward_mean": reward, "kl_to_base": kl}, "seconds_per_call": seconds}


def test_the_rule_bounds_kl_and_cost_then_takes_the_best_reward():
    runs = [_run(0.70, 2.5, 1.0), _run(0.50, 1.0, 1.0), _run(0.60, 1.2, 1.6), _run(0.55, 1.8, 1.4)]
    # 0.70 is over the KL bound, 0.60 costs 1.6x the cheapest: 0.55 (KL 1.8 <= 1.83, 1.4x) wins
    assert sweep.choose(runs, math.log(16) - 15 / 16, 1.5) is runs[3]
    assert sweep.choose(runs, 1.0, 1.5) is runs[1]
    assert sweep.choose(runs, 0.5, 1.5) is None
    assert sweep.choose([], 1.0, 1.5) is None


def test_each_trunk_mode_gets_its_own_choice_and_cost_bound():
    points = [{"lr": "3e-4"}, {"lr": "1e-3"}, {"trunk": "full", "lr": "1e-5"}, {"trunk": "full", "lr": "3e-6"}]
    runs = [_run(0.30, 0.7, 0.6), _run(0.80, 9.0, 0.6), _run(0.29, 0.6, 1.1), _run(0.21, 0.2, 1.1)]
    # against all four points the full trunk's 1.1 s would be 1.8x the cheapest; within its mode it is 1x
    assert sweep.choose(runs, 1.83, 1.5) is runs[0]
    assert sweep.choose_by_trunk(points, runs, 1.83, 1.5) == {"lora": runs[0], "full": runs[2]}
    assert sweep.choose_by_trunk(points[:2], runs[:2], 0.5, 1.5) == {"lora": None}


def test_points_and_arguments():
    args = sweep.parse_args([])
    assert args.points == list(sweep.POINTS) and args.reward_calls == 720 and args.steps == 18
    assert args.kl_budget == pytest.approx(1.8351, abs=1e-4)
    assert sweep.parse_point("lr=1e-3,ppo_epochs=2,kl_coef=0.2") == {"lr": "1e-3", "ppo_epochs": "2", "kl_coef": "0.2"}
    with pytest.raises(SystemExit):
        sweep.parse_point("epochs=2")  # not a PPOConfig field
    with pytest.raises(SystemExit):
        sweep.parse_args(["--point", "lr"])
    assert sweep.parse_args(["--smoke"]).steps == 2
    assert sweep.parse_point("advantage=rloo,lr=3e-4") == {"advantage": "rloo", "lr": "3e-4"}
    with pytest.raises(SystemExit, match="advantage must be one of"):
        sweep.parse_point("advantage=ppo")


def test_a_point_picks_its_method_and_kl_coefficient():
    common = {"model": "m"}
    base, gae, rloo, grpo = (
        sweep.point_specs(
            [{"lr": "1e-4"}, {"advantage": "rloo", "kl_coef": "0.2", "lr": "3e-4"}, {}], common, "gae", 0.05
        )[:3]
        + sweep.point_specs([{}], common, "grpo", 0.1)[1:]
    )
    assert (base["method"], base["kl_coef"], base["ppo"]) == ("base", 0.0, {})
    assert (gae["method"], gae["kl_coef"], gae["ppo"], gae["name"]) == (
        "qvlm-ppo",
        0.05,
        {"lr": "1e-4"},
        "qvlm-ppo_lr-1e-4_kl0.05",
    )
    assert (rloo["method"], rloo["kl_coef"], rloo["ppo"]) == ("qvlm-rloo", 0.2, {"lr": "3e-4"})
    assert (grpo["method"], grpo["kl_coef"], grpo["name"]) == ("qvlm-grpo", 0.1, "qvlm-grpo_defaults_kl0.1")
    assert all(s["model"] == "m" for s in (base, gae, rloo, grpo))
