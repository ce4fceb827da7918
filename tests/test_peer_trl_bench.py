"""The pure parts of benchmarks/peer_trl.py (issue 23's fair peer benchmark): linear interpolation along a
reward-KL curve, the matched-KL targets and the setting chosen on validation, and the budget checks of
its arguments. The benchmark itself runs for hours (its --smoke in minutes): not a test."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "peer_trl.py"
_spec = importlib.util.spec_from_file_location("peer_trl", _PATH)
peer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer)


def _run(method, kl_coef, val, eval_):
    return {"method": method, "kl_coef": kl_coef, "val": {"kl_to_base": val[0], "reward_mean": val[1]},
            "eval": {"kl_to_base": eval_[0], "reward_mean": eval_[1]}}  # fmt: skip


def test_interpolate_along_a_curve():
    points = [(2.0, 0.6), (0.0, 0.3), (1.0, 0.5)]  # any order: sorted by KL
    assert peer.interpolate(points, 1.5) == pytest.approx(0.55)
    assert peer.interpolate(points, 0.25) == pytest.approx(0.35)
    assert peer.interpolate(points, 1.0) == pytest.approx(0.5)
    assert peer.interpolate(points, 2.0) == pytest.approx(0.6)
    assert peer.interpolate(points, 2.5) is None and peer.interpolate(points, -0.1) is None  # no extrapolation
    assert peer.interpolate([], 0.0) is None


def test_targets_and_the_setting_chosen_on_validation():
    base = {"val": {"reward_mean": 0.3}, "eval": {"reward_mean": 0.29}}
    by_method = {
        "a": [_run("a", 0.2, (0.3, 0.35), (0.4, 0.36)), _run("a", 0.05, (0.9, 0.45), (1.0, 0.44))],
        "b": [_run("b", 0.2, (0.6, 0.40), (0.5, 0.41)), _run("b", 0.05, (1.5, 0.50), (1.4, 0.52))],
    }
    # the largest validation KL every curve reaches is a's 0.9: 3 targets up to it
    assert peer.kl_targets(base, by_method, "") == pytest.approx([0.3, 0.6, 0.9])
    assert peer.kl_targets(base, by_method, "0.5, 1") == [0.5, 1.0]
    assert peer.curve(base, by_method["a"], "eval") == [(0.0, 0.29), (0.4, 0.36), (1.0, 0.44)]
    # b's best validation reward within KL 0.9 is its kl_coef 0.2 run, not its 0.05 one (KL 1.5)
    assert peer.selected_run(by_method["b"], 0.9)["kl_coef"] == 0.2
    assert peer.selected_run(by_method["a"], 0.9)["kl_coef"] == 0.05
    assert peer.selected_run(by_method["b"], 0.1)["kl_coef"] == 0.2  # none inside: the lowest-KL run


def test_arguments_keep_the_budget_equal(capsys):
    args = peer.parse_args([])
    assert (args.reward_calls, args.steps, args.prompts_per_step, args.generations) == (720, 18, 10, 4)
    assert args.grids == {m: [0.01, 0.05, 0.2] for m in peer.METHODS}
    args = peer.parse_args(["--methods", "qvlm-ppo,trl-grpo", "--kl-coefs-trl-grpo", "0.02,0.1,0.4"])
    assert args.grids == {"qvlm-ppo": [0.01, 0.05, 0.2], "trl-grpo": [0.02, 0.1, 0.4]}
    smoke = peer.parse_args(["--smoke"])
    assert smoke.steps == 2 and smoke.json.endswith("peer_trl_smoke.json") and smoke.threads == 1
    for bad, needle in [
        (["--reward-calls", "700"], "not a multiple of --prompts-per-step x --generations (40)"),
        (["--kl-coefs-qvlm-ppo", "0.1,0.2"], "the same tuning budget"),
        (["--methods", "ppo"], "--methods: choose from"),
        (["--generations", "1", "--reward-calls", "10"], "--generations must be at least 2"),
    ]:
        with pytest.raises(SystemExit):
            peer.parse_args(bad)
        assert needle in capsys.readouterr().err
