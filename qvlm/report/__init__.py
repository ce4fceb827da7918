"""The self-contained HTML report: page assembly (:mod:`qvlm.report.page`), matplotlib plots
(:mod:`qvlm.report.plots`), the PPO curves' SVG (:mod:`qvlm.report.ppo_plot`), value-map SVG and colours (:mod:`qvlm.report.svg`), the demo's introduction
and headline (:mod:`qvlm.report.intro`), and the stylesheet ``report.css`` inlined into every page."""

from qvlm.report.intro import demo_intro_html
from qvlm.report.page import (
    metrics_table_html,
    ppo_html,
    render_report,
    render_value_map_page,
    report_css,
    validation_html,
)
from qvlm.report.plots import plot_losses, plot_reward_vs_cost, plot_reward_vs_kl, running_median
from qvlm.report.ppo_plot import nice_ticks, ppo_curves_svg
from qvlm.report.svg import advantage_color, value_map_html, value_map_legend_html, value_sparkline_svg

__all__ = [
    "running_median",
    "advantage_color",
    "value_sparkline_svg",
    "value_map_html",
    "value_map_legend_html",
    "plot_losses",
    "plot_reward_vs_kl",
    "plot_reward_vs_cost",
    "metrics_table_html",
    "validation_html",
    "ppo_html",
    "ppo_curves_svg",
    "nice_ticks",
    "render_report",
    "render_value_map_page",
    "report_css",
    "demo_intro_html",
]
