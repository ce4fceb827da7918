"""The PPO section of the demo report: the reward and KL curves (inline SVG) rendered from a tiny PPO
run's own metrics.jsonl, the tick rule, and the section's HTML."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
import torch

from qvlm.algos.actor_critic import ActorCritic
from qvlm.algos.ppo import PPOConfig, train_ppo
from qvlm.report import nice_ticks, ppo_curves_svg, ppo_html
from qvlm.train.metrics import read_history
from tests.helpers import tiny_model

SVG = "{http://www.w3.org/2000/svg}"


def test_nice_ticks_by_hand():
    assert nice_ticks(0, 1) == [0, 0.25, 0.5, 0.75, 1]  # span 1 / 4 ticks: step 0.25
    assert nice_ticks(0.13, 0.92) == [0, 0.2, 0.4, 0.6, 0.8, 1]  # 0.79 / 4 = 0.1975 -> step 0.2
    assert nice_ticks(-0.3, 0.05) == [-0.3, -0.2, -0.1, 0, 0.1]  # 0.35 / 4 = 0.0875 -> step 0.1
    assert nice_ticks(1, 20, 5, min_step=1) == [0, 5, 10, 15, 20]  # 19 / 5 = 3.8 -> step 5
    assert nice_ticks(1, 2, 5, min_step=1) == [1, 2]  # 0.2 -> 0.2, raised to whole iterations
    assert nice_ticks(3, 3) == [2, 2.5, 3, 3.5, 4]  # a flat series: one unit either side


@pytest.fixture(scope="module")
def tiny_history(tmp_path_factory):
    """metrics.jsonl of a 3-iteration PPO run on a tiny model (one thread: several times faster here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = tiny_model("llama", seed=0)
    torch.manual_seed(0)
    ac = ActorCritic(model)
    run = tmp_path_factory.mktemp("ppo") / "run"
    cfg = PPOConfig(iterations=3, prompts_per_iter=2, responses_per_prompt=2, max_new_tokens=5, lr=1e-2,
                    chat=False, progress=False)  # fmt: skip
    train_ppo(ac, tok, ["hello", "abc", "the cat"], "count:e", cfg, run_dir=run)
    torch.set_num_threads(threads)
    return read_history(run / "metrics.jsonl")


def _points(polyline) -> list[tuple[float, float]]:
    return [tuple(map(float, p.split(","))) for p in polyline.get("points").split()]


def test_curves_render_from_a_tiny_runs_history(tiny_history):
    reward, kl = tiny_history["charts/reward"], tiny_history["charts/kl"]
    assert [step for step, _ in reward] == [0, 1, 2]
    svg = ET.fromstring(ppo_curves_svg(reward, kl, snapshots=[2, 3], chosen=2))  # well-formed XML
    lines = [e for e in svg.iter(SVG + "polyline") if e.get("class") == "ppo-line"]
    assert len(lines) == 2  # one line per panel: reward, KL
    for line, series in zip(lines, (reward, kl)):
        pts = _points(line)
        assert len(pts) == 3
        assert pts[0][0] < pts[1][0] < pts[2][0]  # iterations left to right
        # SVG y grows downward: the larger value sits higher
        for (_, ya), (_, yb), (_, va), (_, vb) in zip(pts, pts[1:], series, series[1:]):
            assert (ya > yb) == (vb > va) or va == vb
    tips = [e.find(SVG + "title").text for e in svg.iter(SVG + "circle")]
    assert tips[:3] == [f"iteration {s + 1}: reward {v:.4f}" for s, v in reward]
    assert tips[3:] == [f"iteration {s + 1}: KL {v:.4f}" for s, v in kl]
    snaps = [e for e in svg.iter(SVG + "line") if "ppo-snapshot" in (e.get("class") or "")]
    assert len(snaps) == 4 and sum("chosen" in e.get("class") for e in snaps) == 2  # per panel: 2 marks, 1 chosen


def test_a_missing_value_breaks_the_line_and_no_history_says_so():
    reward = [(0, 0.1), (1, float("nan")), (2, 0.3), (3, 0.4)]
    svg = ET.fromstring(ppo_curves_svg(reward, [(s, 0.0) for s in range(4)]))
    reward_lines = [e for e in svg.iter(SVG + "polyline") if e.get("stroke") == "#1a9850"]
    assert [len(_points(e)) for e in reward_lines] == [2]  # iterations 3-4; iteration 1 alone draws no segment
    assert sum(1 for e in svg.iter(SVG + "circle") if e.get("fill") == "#1a9850") == 3
    assert "no PPO iterations recorded" in ppo_curves_svg([], [])


def test_ppo_section_html(tiny_history):
    block = {
        "history": {"reward": tiny_history["charts/reward"], "kl": tiny_history["charts/kl"]},
        "stages": [2, 3],
        "chosen": "ppo_it_3",
        "iterations": 3,
        "validation_prompts": 4,
        "validation": {"ppo_it_2": {"reward_mean": 0.1, "reward_ci95": 0.2}, "ppo_it_3": {"reward_mean": 0.3}},
        "settings": {"prompts_per_iter": 2, "responses_per_prompt": 4, "lora_r": 8, "kl_coef": 0.05},
    }
    html = ppo_html(block, {"train_seconds": 12.4, "reward_calls": 24})
    assert '<svg class="ppo-curves"' in html and "after 2, 3 iterations" in html
    assert "(8 reward calls)" in html and "took 12 s and 24 reward calls" in html
    assert html.count("<tr") == 3 and '<span class="tag" title="chosen on validation prompts">shown' in html
