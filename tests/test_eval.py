"""Evaluation maths by hand: Student's t quantiles for every df, the regularised incomplete beta,
95% CIs, JSON without Infinity, and the metrics summary with top-k mass and labelled KL."""

import json
import math

import pytest

from qvlm.eval.metrics import betainc, grouped_mean_ci95, json_safe, mean_ci95, student_t_quantile, summarize


@pytest.mark.parametrize(
    "df, expected",
    [(1, 12.7062), (2, 4.3027), (10, 2.2281), (30, 2.0423), (31, 2.0395), (47, 2.0117), (100, 1.9840), (1000, 1.9623)],
)
def test_t_quantile_975_matches_tables(df, expected):
    assert student_t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)


def test_t_quantile_closed_forms_and_symmetry():
    # df 1 is Cauchy: tan(pi (p - 1/2)); df 2: (2p - 1) / sqrt(2 p (1 - p))
    assert student_t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-10)
    assert student_t_quantile(0.9, 2) == pytest.approx(0.8 / math.sqrt(2 * 0.9 * 0.1), rel=1e-10)
    assert student_t_quantile(0.025, 5) == pytest.approx(-student_t_quantile(0.975, 5), rel=1e-12)
    assert student_t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-9)
    assert student_t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)  # the normal quantile
    with pytest.raises(ValueError):
        student_t_quantile(1.0, 3)
    with pytest.raises(ValueError):
        student_t_quantile(0.9, 0)


def test_betainc_by_hand():
    assert betainc(1, 1, 0.37) == pytest.approx(0.37, rel=1e-12)  # uniform CDF
    assert betainc(2.5, 1, 0.3) == pytest.approx(0.3**2.5, rel=1e-12)  # I_x(a, 1) = x^a
    assert betainc(3.3, 3.3, 0.5) == pytest.approx(0.5, rel=1e-12)  # symmetry
    assert betainc(2, 3, 0.4) == pytest.approx(0.5248, rel=1e-12)  # 1 - sum_{j<2} C(4,j) .4^j .6^(4-j)
    assert betainc(2, 3, 0.0) == 0.0 and betainc(2, 3, 1.0) == 1.0


def test_mean_ci95_uses_t_for_every_n():
    assert mean_ci95([1.0, 2.0, 3.0]) == pytest.approx((2.0, 4.302653 / math.sqrt(3)), rel=1e-6)
    # n = 48: t(47) = 2.0117, not 1.96 (the old table stopped at df 30)
    values = [float(i % 2) for i in range(48)]  # mean 0.5, sample std sqrt(48 * 0.25 / 47)
    mean, half = mean_ci95(values)
    assert mean == 0.5
    assert half == pytest.approx(2.011741 * math.sqrt(12 / 47) / math.sqrt(48), rel=1e-6)
    assert mean_ci95([4.0]) == (4.0, math.inf)
    assert all(math.isnan(x) for x in mean_ci95([]))


def test_json_safe_writes_null_for_non_finite():
    row = summarize(["a b"], [0.5], [0.0], [[-1.0, -1.0]]).as_dict()  # one response: CI half-width inf
    assert row["reward_ci95"] == math.inf
    text = json.dumps(json_safe({"methods": {"base": row}, "list": [math.nan, 1.0, (math.inf,)]}), allow_nan=False)
    assert "Infinity" not in text and "NaN" not in text
    back = json.loads(text)
    assert back["methods"]["base"]["reward_ci95"] is None and back["list"] == [None, 1.0, [None]]
    assert back["methods"]["base"]["reward_mean"] == 0.5


def test_summarize_reports_topk_mass_and_kl_kind():
    m = summarize(
        ["x y z", "x y"],
        [1.0, 0.0],
        [0.2, 0.4],
        [[math.log(0.5)] * 2, [math.log(0.5)] * 2],
        cost=1.5,
        topk_mass=[0.9, 0.7],
    )
    assert m.topk_mass == pytest.approx(0.8)
    assert m.kl_to_base == pytest.approx(0.3) and m.kl_kind == "exact"
    assert m.perplexity == pytest.approx(2.0) and m.n == 2 and m.cost == 1.5
    assert m.distinct_2 == pytest.approx(2 / 3)  # bigrams (x y), (y z), (x y)
    assert math.isnan(summarize(["a"], [1.0], [0.0], [[-1.0]]).topk_mass)  # not tracked
    assert math.isnan(summarize(["a"], [1.0], [0.0], [[-1.0]], topk_mass=[]).topk_mass)
    bound = summarize(["a"], [1.0], [0.636], [[-1.0]], kl_kind="bound")
    assert bound.as_dict()["kl_kind"] == "bound"
    assert summarize(["a"], [1.0], [0.5], [[-1.0]], kl_kind="estimate").kl_kind == "estimate"
    with pytest.raises(ValueError, match="exact, estimate or bound"):
        summarize(["a"], [1.0], [0.0], [[-1.0]], kl_kind="guess")


def test_grouped_ci_is_over_prompt_means():
    # two draws per prompt: prompt means 2, 3, 4 -> mean 3, half-width t(0.975, 2) * 1 / sqrt(3)
    mean, half = grouped_mean_ci95([1.0, 3.0, 2.0, 4.0, 3.0, 5.0], 2)
    assert mean == pytest.approx(3.0) and half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert grouped_mean_ci95([1.0, 2.0, 3.0], 1) == mean_ci95([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="groups of 2"):
        grouped_mean_ci95([1.0, 2.0, 3.0], 2)
    row = summarize(["a b", "c d", "e f", "g h"], [0.0, 1.0, 1.0, 2.0], [0.0] * 4, [[-1.0]] * 4, group_size=2)
    assert row.n == 4 and row.reward_mean == pytest.approx(1.0)
    assert row.reward_ci95 == pytest.approx(12.7062047 * math.sqrt(0.5) / math.sqrt(2), rel=1e-6)
