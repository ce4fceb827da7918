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
    kls = lambda *xs: [{"kl_coef": x} for x in xs]  # noqa: E731
    assert args.grids == {m: kls(0.01, 0.05, 0.2) for m in peer.METHODS}
    args = peer.parse_args(["--methods", "qvlm-ppo,trl-grpo", "--kl-coefs-trl-grpo", "0.02,0.1@lr=3e-5,0.4"])
    assert args.grids == {
        "qvlm-ppo": kls(0.01, 0.05, 0.2),
        "trl-grpo": kls(0.02) + [{"kl_coef": 0.1, "lr": 3e-5}] + kls(0.4),
    }
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


def test_qvlm_settings_are_typed_and_checked():
    sets = peer.parse_sets(["lr=3e-4", "ppo-epochs=1", "fast=true", "trunk=full"])
    assert sets == {"lr": "3e-4", "ppo_epochs": "1", "fast": "true", "trunk": "full"}
    kw = peer.ppo_overrides(sets)
    assert kw["lr"] == 3e-4 and kw["ppo_epochs"] == 1 and isinstance(kw["ppo_epochs"], int)
    assert kw["fast"] is True and kw["trunk"].mode == "full"
    for bad in (["lr"], ["=1"], ["lr="]):
        with pytest.raises(SystemExit, match="KEY=VALUE"):
            peer.parse_sets(bad)
    for fixed in ({"kl_coef": "0.1"}, {"iterations": "3"}, {"no_such_field": "1"}):  # the budget stays the benchmark's
        with pytest.raises(SystemExit, match="not a PPOConfig field"):
            peer.ppo_overrides(fixed)
    assert peer.parse_args(["--qvlm-set", "lr=1e-3"]).ppo == {"lr": "1e-3"}


class _Proc:
    """A stand-in for a worker process that finishes after ``ticks`` polls."""

    def __init__(self, ticks):
        self.ticks = ticks

    def poll(self):
        self.ticks -= 1
        return 0 if self.ticks <= 0 else None


def test_run_many_never_runs_two_trl_fine_tunes_at_once(monkeypatch, tmp_path):
    running, peak_trl, order = [], [0], []

    def start(spec, workdir):
        running.append(spec["method"])
        peak_trl[0] = max(peak_trl[0], sum(m.startswith("trl-") for m in running))
        order.append(spec["name"])
        return _Proc(3 if spec["method"].startswith("trl-") else 1), spec, tmp_path / "log"

    def finish(proc, spec, log):
        running.remove(spec["method"])
        return {"name": spec["name"]}

    monkeypatch.setattr(peer, "start_one", start)
    monkeypatch.setattr(peer, "finish_one", finish)
    monkeypatch.setattr(peer.time, "sleep", lambda s: None)
    specs = [{"method": m, "name": f"{m}{i}"} for i, m in enumerate(["trl-grpo", "trl-rloo", "qvlm-ppo", "trl-grpo"])]
    results = peer.run_many(specs, tmp_path, jobs=2)
    assert [r["name"] for r in results] == [s["name"] for s in specs]  # in the specs' order
    assert peak_trl[0] == 1 and order[:2] == ["trl-grpo0", "qvlm-ppo2"]  # the qvlm run went beside the first


def test_a_finished_run_of_the_same_spec_is_kept(tmp_path):
    import json

    spec = {"method": "qvlm-ppo", "kl_coef": 0.05, "name": "r"}
    assert peer.kept(spec, tmp_path) is None
    (tmp_path / "r.spec.json").write_text(json.dumps({**spec, "out": "x", "workdir": "y"}))
    (tmp_path / "r.json").write_text('{"val": 1}')
    assert peer.kept(spec, tmp_path) == {"val": 1}
    assert peer.kept({**spec, "kl_coef": 0.2}, tmp_path) is None  # another spec under the same name: rerun


def test_a_grid_point_with_its_own_learning_rate():
    common = {"trl_lr": 1e-5, "ppo": {"ppo_epochs": "1"}}
    trl = peer.run_spec(common, "trl-grpo", peer.parse_setting("0.05@lr=1e-4"))
    assert trl["trl_lr"] == 1e-4 and trl["kl_coef"] == 0.05 and peer.run_name(trl) == "trl-grpo_kl0.05_lr0.0001"
    ppo = peer.run_spec(common, "qvlm-ppo", peer.parse_setting(" 0.2@lr=3e-4"))
    assert ppo["ppo"] == {"ppo_epochs": "1", "lr": "0.0003"} and ppo["trl_lr"] == 1e-5
    assert peer.ppo_overrides(ppo["ppo"])["lr"] == 3e-4
    plain = peer.run_spec(common, "trl-grpo", peer.parse_setting("0.05"))
    assert (
        "lr" not in plain and peer.run_name(plain) == "trl-grpo_kl0.05"
    )  # the name of runs made before points had lrs
    assert peer.setting_label({"kl_coef": 0.05, "lr": 3e-5}) == "0.05@lr=3e-05" and peer.setting_label(plain) == "0.05"
    for bad in ("0.05@lr", "0.05@epochs=2"):
        with pytest.raises(SystemExit, match="KL@lr=LR"):
            peer.parse_setting(bad)
