"""`qvlm demo --seeds`: the spread over seeds and the frontier checks by hand, and the whole demo over two
seeds on a tiny model (each seed a complete run; seeds.json and seeds.html; the CLI's table)."""

import json
import math

import pytest

from qvlm.apps.demo_seeds import aggregate_seeds, frontier_checks, parse_seeds, run_demo_seeds, spread
from qvlm.cli import main
from qvlm.errors import QVLMError
from tests.helpers import TINY_DEMO, tiny_demo_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _row(reward, ci=0.05, kl=0.0, cost=1.0, kind="exact"):
    return {"reward_mean": reward, "reward_ci95": ci, "kl_to_base": kl, "kl_kind": kind, "cost": cost}


def _metrics(shown="mcq_beta_8", **rows):
    methods = {
        "base": _row(0.3),
        "best_of_4": _row(0.65, kl=0.6, cost=4.0, kind="estimate"),
        "best_of_16": _row(0.84, ci=0.02, kl=1.8, cost=16.0, kind="estimate"),
        "mcq_beta_8": _row(0.50, kl=0.7, cost=1.003),
        "mcq_beta_16": _row(0.83, kl=12.9, cost=1.003),
        "cd_blockwise_k4": _row(0.9, kl=0.5, cost=4.0, kind="estimate"),
        "ppo": _row(0.70, kl=0.1),
    }
    methods.update(rows)
    rule = f"the rule of a run shown {shown}"
    return {"methods": methods, "shown": {"method": shown, "eval_reward": methods[shown]["reward_mean"], "rule": rule}}


def test_spread_by_hand():
    s = spread([0.2, 0.4, 0.6])
    assert s["mean"] == pytest.approx(0.4) and s["sd"] == pytest.approx(0.2)  # sqrt((0.04 + 0 + 0.04) / 2)
    assert (s["min"], s["max"], s["n"]) == (0.2, 0.6, 3)
    assert spread([1.0])["sd"] == 0.0
    assert spread([None, float("nan")])["mean"] is None
    assert spread([1.0, None, 3.0])["mean"] == 2.0


def test_frontier_checks_by_hand():
    c = frontier_checks(_metrics())
    a = c["cheap_vs_best_of_16"]
    assert a["bar"] == pytest.approx(0.82)  # 0.84 - 0.02
    assert a["shown"] == "mcq_beta_8" and not a["shown_passes"]  # 0.50 < 0.82
    # blockwise (cost 4) and ppo (not guided) are out; mcq_beta_16 at 0.83 >= 0.82 passes on eval
    assert a["eval_best"] == "mcq_beta_16" and a["eval_best_passes"]
    b = c["matched_kl_vs_best_of_4"]
    assert b["kl_limit"] == pytest.approx(0.75)  # 1.25 * 0.6
    # mcq_beta_8 (KL 0.7) is the only guided method at KL <= 0.75 (blockwise is guided too: 0.5, 0.9)
    assert b["best"] == "cd_blockwise_k4" and b["passes"]
    c = frontier_checks(_metrics(cd_blockwise_k4=_row(0.1, kl=3.0, cost=4.0)))["matched_kl_vs_best_of_4"]
    assert c["best"] == "mcq_beta_8" and c["bar"] == pytest.approx(0.63) and not c["passes"]
    c = frontier_checks(_metrics(shown="mcq_beta_16"))["cheap_vs_best_of_16"]
    assert c["shown_passes"]


def test_aggregate_seeds_by_hand():
    runs = {0: _metrics(), 1: _metrics(mcq_beta_8=_row(0.7, kl=0.9, cost=1.003)), 2: _metrics(shown="mcq_beta_16")}
    del runs[2]["methods"]["ppo"]  # a method missing in one seed is left out
    summary = aggregate_seeds(runs)
    assert summary["seeds"] == [0, 1, 2] and "ppo" not in summary["methods"]
    m = summary["methods"]["mcq_beta_8"]
    assert m["reward"]["mean"] == pytest.approx((0.5 + 0.7 + 0.5) / 3)
    assert m["reward"]["sd"] == pytest.approx(math.sqrt(((0.5 - 0.5667) ** 2 * 2 + (0.7 - 0.5667) ** 2) / 2), abs=1e-3)
    assert m["kl_to_base"]["values"] == [0.7, 0.9, 0.7] and m["kl_kind"] == ["exact"]
    assert summary["shown"]["per_seed"] == ["mcq_beta_8", "mcq_beta_8", "mcq_beta_16"]
    assert summary["shown"]["eval_reward"]["mean"] == pytest.approx((0.5 + 0.7 + 0.83) / 3)
    assert set(summary["checks"]) == {0, 1, 2}
    assert summary["shown"]["rule"][2] == "the rule of a run shown mcq_beta_16"  # each seed's own rule
    assert not summary["ppo"]  # seed 2 has no ppo row


def test_parse_seeds():
    assert parse_seeds("0,1,2") == [0, 1, 2]
    for bad in ("0", "a,b", "1,1", "-1,2", ""):
        with pytest.raises(QVLMError, match="--seeds"):
            parse_seeds(bad)


def test_demo_over_two_seeds_on_a_tiny_model(tmp_path, tiny_dir, capsys):
    out = tmp_path / "demo"
    summary = run_demo_seeds(tiny_demo_config(tiny_dir), out, [0, 1], log=lambda *_: None, progress=False)
    runs = [json.loads((out / f"seed-{s}" / "metrics.json").read_text()) for s in (0, 1)]
    assert runs[0]["config"]["seed"] == 0 and runs[1]["config"]["seed"] == 1
    assert (out / "seed-0" / "samples.jsonl").read_text() != (out / "seed-1" / "samples.jsonl").read_text()
    for name, m in summary["methods"].items():
        values = [r["methods"][name]["reward_mean"] for r in runs]
        assert m["reward"]["values"] == values
        assert m["reward"]["mean"] == pytest.approx(sum(values) / 2)
    saved = json.loads((out / "seeds.json").read_text())
    assert saved["seeds"] == [0, 1] and set(saved["checks"]) == {"0", "1"}
    assert saved["config"]["seeds"] == [0, 1]
    page = (out / "seeds.html").read_text()
    assert 'href="seed-1/report.html"' in page and "best_of_4" in page
    assert "The rule (seed 0's numbers): the highest validation reward" in page
    assert ("PPO run" in page) == summary["ppo"]
    # the CLI resumes from the cached runs and prints the table
    args = ["demo", "--out", str(out), "--seeds", "0,1", "--model", str(tiny_dir), "--quick"]
    for k, v in TINY_DEMO.items():
        args += [] if v is True else [f"--{k.replace('_', '-')}", str(v)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "means ± standard deviations over seeds 0,1" in printed and "best_of_4" in printed
    assert main(["demo", "--out", str(tmp_path / "x"), "--seeds", "3"]) == 2
