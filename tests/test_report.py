"""Fast tests of the HTML report (fake data, no model), the demo's introduction text, and the
packaged demo prompts."""

from __future__ import annotations

import base64
import re

import pytest

from qvlm.apps.demo_prompts import load_demo_prompts, load_demo_records
from qvlm.errors import QVLMError
from qvlm.report import (
    advantage_color,
    demo_intro_html,
    metrics_table_html,
    report_css,
    validation_html,
    value_map_html,
)

METHODS = {
    "base": {
        "reward_mean": 0.1,
        "reward_ci95": 0.05,
        "kl_to_base": 0.0,
        "distinct_2": 0.7,
        "perplexity": 6.5,
        "topk_mass": 0.79,
        "cost": 1.0,
    },
    "best_of_4": {
        "reward_mean": 0.3,
        "reward_ci95": 0.05,
        "kl_to_base": 0.6362944,
        "kl_kind": "bound",
        "distinct_2": 0.7,
        "perplexity": 6.6,
        "cost": 4.0,
    },
    "guided-beta-4": {
        "reward_mean": 0.5,
        "reward_ci95": 0.04,
        "kl_to_base": 1.2,
        "distinct_2": 0.6,
        "perplexity": 8.0,
        "topk_mass": 0.9,
        "kl_kind": "exact",
        "cost": 1.2,
    },
    "ilql-policy": {
        "reward_mean": 0.4,
        "reward_ci95": None,
        "kl_to_base": None,
        "distinct_2": 0.65,
        "perplexity": 7.1,
        "cost": 1.0,
    },
}


@pytest.fixture(scope="module")
def report_path(tmp_path_factory):
    """The report rendered once from fake data (matplotlib is the slow part)."""
    pytest.importorskip("matplotlib")
    from qvlm.report import render_report

    path = tmp_path_factory.mktemp("report") / "out" / "report.html"
    render_report(
        path,
        title="Fake <run>",
        intro_html="<p>Fake data for a test.</p>",
        methods=METHODS,
        loss_history={"losses/q": [(0, 1.0), (10, 0.5), (20, 0.25)], "losses/v": [(0, 0.3), (20, 0.1)]},
        samples=[
            {
                "prompt": "Describe a park.",
                "base": "It is a park & <grey>.",
                "guided": "A lovely park.",
                "base_reward": -0.1,
                "guided_reward": 0.7,
                "method": "guided-beta-4",
            }
        ],
        value_maps=[
            {
                "prompt": "Describe a park.",
                "tokens": ["The", " <b>", " park", "\n", " is", " nice"],
                "values": [0.1, 0.1, 0.2, 0.2, 0.3, 0.6],
                "advantages": [0.0, -0.05, 0.1, 0.0, 0.1, 0.3],
                "reward": 0.6,
            }
        ],
        config={"beta": 4, "model": "tiny"},
        validation={"guided-beta-4": {**METHODS["guided-beta-4"], "reward_mean": 0.45}},
        shown={"method": "guided-beta-4", "chosen_on": "validation", "validation_prompts": 12},
    )
    return path


def test_report_is_self_contained(report_path):
    path = report_path
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    # Nothing is fetched from the network: no remote src/href, no external scripts or stylesheets.
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.IGNORECASE)
    assert "<script" not in page.lower() and "<link" not in page.lower() and "@import" not in page
    images = re.findall(r"""<img[^>]*\ssrc="([^"]*)\"""", page)
    assert len(images) == 3
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # Written atomically: no temp file left beside the report.
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]


def test_report_names_every_method_and_escapes_text(report_path):
    page = report_path.read_text(encoding="utf-8")
    for name in METHODS:
        assert name in page
    assert "&lt;b&gt;" in page and "<b>" not in page  # the token "<b>" is text, not markup
    assert "&lt;grey&gt;" in page and "<grey>" not in page
    assert "Fake &lt;run&gt;" in page
    assert "<p>Fake data for a test.</p>" in page  # intro_html is trusted HTML
    assert "<details>" in page and "&quot;beta&quot;: 4" in page


def test_value_map_colours_tooltips_and_whitespace():
    out = value_map_html([" good", " bad", "\n", "<eos>"], [0.0, 0.5, 0.2, 0.2], [0.5, -0.5, 0.0, 0.0])
    spans = re.findall(r'<span class="tok" style="background:([^;]+);[^"]*" title="([^"]*)">', out)
    assert [bg for bg, _ in spans] == ["rgb(26,152,80)", "rgb(215,48,39)", "rgb(255,255,255)", "rgb(255,255,255)"]
    assert "V=0.5000, Q-V=-0.5000" in spans[1][1]
    assert "↵" in out and "&lt;eos&gt;" in out and "<svg" in out


def test_advantage_color_scale_clips_and_centres_white():
    assert advantage_color(0.0, 1.0)[0] == "rgb(255,255,255)"
    assert advantage_color(5.0, 1.0) == advantage_color(1.0, 1.0)  # clipped at +scale
    assert advantage_color(float("nan"), 1.0)[0] == "rgb(255,255,255)"
    assert advantage_color(-0.5, 1.0)[0] == "rgb(235,152,147)"  # halfway from white to red


def test_value_map_rejects_mismatched_lengths():
    with pytest.raises(QVLMError, match="differ in length"):
        value_map_html(["a", "b"], [0.0], [0.0, 0.0])


def test_metrics_table_marks_best_and_dashes_missing():
    table = metrics_table_html(METHODS)
    assert '<tr class="best"><th scope="row">guided-beta-4</th>' in table
    assert "★ the highest mean reward in this table, at whatever KL" in table  # the star's legend
    rows = dict(re.findall(r'<th scope="row">([^<]+)</th>(.*?)</tr>', table))
    # ilql-policy has no CI, no KL and no top-k mass: dashes
    assert '<span class="ci">± —</span>' in rows["ilql-policy"]
    assert rows["ilql-policy"].count('<td class="num">—</td>') == 2


def test_metrics_table_topk_mass_beside_perplexity_and_kl_labelled():
    table = metrics_table_html(METHODS, shown="guided-beta-4")
    heads = re.findall(r"<th[^>]*>([^<]+)</th>", table.split("</thead>")[0])
    assert heads.index("Top-k mass") == heads.index("Perplexity") + 1
    cells = re.findall(r'<td class="num">(.*?)</td>', table.split("guided-beta-4", 1)[1].split("</tr>")[0])
    assert cells[1:6] == ["1.200", "0.600", "8.000", "0.900", "1.200"]  # KL (exact), dist-2, ppl, top-k, cost
    assert "≤ 0.636" in table  # best-of-4's KL is the bound log 4 - 3/4
    assert "≤ 1.200" not in table
    assert table.count('class="tag"') == 1 and 'guided-beta-4 <span class="tag"' in table  # the row shown


def test_validation_note_names_the_choice_and_the_eval_argmax():
    val = {"a": {"reward_mean": 0.5}, "b": {"reward_mean": 0.3}}
    shown = {"method": "a", "chosen_on": "validation", "validation_prompts": 12}
    note = validation_html(val, shown, {"a": {"reward_mean": 0.2}, "b": {"reward_mean": 0.4}, "base": {}})
    assert "<code>a</code>, was chosen on 12 validation prompts, by its mean reward" in note
    ruled = validation_html(val, {**shown, "rule": "the best reward within KL 2", "passed_rule": False}, {})
    assert "by the rule: the best reward within KL 2 (no method passed: the one of least KL is shown)" in ruled
    assert "Among the methods below, <code>b</code> scored highest on the eval prompts (0.400, against 0.200" in note
    same = validation_html(val, shown, {"a": {"reward_mean": 0.4}, "b": {"reward_mean": 0.2}})
    assert "scored highest" not in same


DEMO_CONFIG = {
    "model": "tiny",
    "samples_per_prompt": 8,
    "max_new_tokens": 16,
    "train_prompts": 32,
    "val_prompts": 12,
    "eval_prompts": 20,
    "ilql_cql_scale": 0.0,
    "guidance_top_k": 20,
}


def test_demo_intro_fills_every_field_and_headlines_the_validation_choice():
    methods = {
        "base": {**METHODS["base"], "kl_kind": "exact"},
        "best_of_4": METHODS["best_of_4"],
        "mcq_beta_8": {**METHODS["guided-beta-4"], "reward_mean": 0.2},
        "ilql_beta_16": METHODS["guided-beta-4"],
    }
    metrics = {
        "methods": methods,
        "validation": {"mcq_beta_8": {"reward_mean": 0.6, "reward_ci95": 0.1}},
        "shown": {"method": "mcq_beta_8", "chosen_on": "validation"},
        "reward": "vader",
    }
    intro = demo_intro_html(metrics, DEMO_CONFIG)
    assert "{" not in intro and "}" not in intro  # no unformatted f-string fields
    assert "same 20 held-out eval prompts" in intro and "on 12 validation prompts" in intro
    assert "to or from the other tokens" not in intro  # centring does move mass onto the candidates
    assert "top-k mass" in intro
    assert "Chosen on validation (reward 0.600 ± 0.100), <code>mcq_beta_8</code> scores 0.200 ± 0.040" in intro
    assert "falls short of best-of-4" in intro
    assert "a KL of 1.20 nats per response to the base model (best-of-4: a KL of at most 0.64 nats" in intro
    assert "puts 0.90 of its mass on the top-20 tokens (base: 0.79)" in intro
    no_shown = demo_intro_html({**metrics, "shown": None}, DEMO_CONFIG)
    assert "Headline" not in no_shown and "{" not in no_shown
    # repetition is named when the shown method's distinct-2 falls below 0.9 x base's
    base_d2 = methods["base"]["distinct_2"]
    methods["mcq_beta_8"] = {**methods["mcq_beta_8"], "distinct_2": 0.95 * base_d2}
    assert "it repeats itself" not in demo_intro_html(metrics, DEMO_CONFIG)
    methods["mcq_beta_8"]["distinct_2"] = 0.85 * base_d2
    assert f"(base: {base_d2:.2f}): it repeats itself" in demo_intro_html(metrics, DEMO_CONFIG)


def test_report_css_is_package_data_inlined_in_the_page(report_path):
    css = report_css()
    assert "table.metrics" in css and ".tag" in css
    page = report_path.read_text(encoding="utf-8")
    assert f"<style>{css}</style>" in page
    assert 'id="validation"' in page and "Validation: how the method shown was chosen" in page


def test_demo_prompts_splits():
    train, eval_ = load_demo_prompts("train"), load_demo_prompts("eval")
    assert len(train) >= 180 and len(eval_) >= 50
    assert all(p.strip() for p in train + eval_)
    assert len(set(train)) == len(train) and len(set(eval_)) == len(eval_)
    assert not set(train) & set(eval_)
    assert load_demo_prompts() == [r["prompt"] for r in load_demo_records()]
    assert len(load_demo_prompts()) == len(train) + len(eval_)


def test_demo_prompts_are_short_balanced_and_not_near_duplicates():
    records = load_demo_records()
    assert all(len(r["prompt"].split()) < 20 for r in records)
    kinds = {r["kind"] for r in records}
    assert {"review", "description", "message", "story"} <= kinds
    for kind in kinds:  # every kind appears in both splits, about 1 in 4 in eval
        n_eval = sum(r["kind"] == kind and r["split"] == "eval" for r in records)
        n_all = sum(r["kind"] == kind for r in records)
        assert 0.15 <= n_eval / n_all <= 0.35, kind

    def words(p: str) -> set[str]:
        return set(re.findall(r"[a-z']+", p.lower()))

    train = [words(r["prompt"]) for r in records if r["split"] == "train"]
    for r in records:
        if r["split"] == "eval":
            e = words(r["prompt"])
            assert max(len(e & t) / len(e | t) for t in train) < 0.75, r["prompt"]


def test_demo_prompts_bad_split():
    with pytest.raises(QVLMError, match="unknown prompt split"):
        load_demo_prompts("test")


def test_running_median_by_hand():
    from qvlm.report import running_median

    assert running_median([1.0, 9.0, 2.0, 3.0, 100.0, 4.0], 3) == [1.0, 5.0, 2.0, 3.0, 3.0, 4.0]
    assert running_median([2.0, 4.0], 1) == [2.0, 4.0]
