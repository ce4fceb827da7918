"""A self-contained HTML report for a qvlm run: page assembly (metrics tables, samples, value maps,
the validation note) around the plots of :mod:`qvlm.report.plots` and the SVG of :mod:`qvlm.report.svg`.

Pure rendering from plain Python data (lists, dicts, floats); no model code. The page inlines its CSS
(``report.css``, package data) and embeds its images as base64 PNG data URIs, and loads nothing from
the network, so the one file can be mailed or archived.

`methods` everywhere is the metrics.json format:
    {NAME: {"reward_mean", "reward_ci95" (95% CI half-width), "kl_to_base", "kl_kind" ("exact" or
            "bound"), "distinct_2", "perplexity", "topk_mass", "cost"}}; missing or None fields render
    as a dash and are left out of plots.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os
from typing import Any, Mapping, Sequence

from qvlm.fileio import atomic_write_text
from qvlm.report.fmt import esc, finite, fmt, max_abs, signed
from qvlm.report.plots import plot_losses, plot_reward_vs_cost, plot_reward_vs_kl
from qvlm.report.ppo_plot import ppo_curves_svg
from qvlm.report.svg import value_map_html, value_map_legend_html

__all__ = [
    "report_css",
    "metrics_table_html",
    "validation_html",
    "ppo_html",
    "render_report",
    "render_value_map_page",
]


@functools.cache
def report_css() -> str:
    """The report's stylesheet, ``qvlm/report/report.css`` (package data), inlined into every page."""
    return importlib.resources.files("qvlm.report").joinpath("report.css").read_text(encoding="utf-8")


_COLUMNS = (
    ("distinct_2", "Distinct-2", "share of distinct bigrams (diversity)"),
    ("perplexity", "Perplexity", "under the base model (fluency)"),
    (
        "topk_mass",
        "Top-k mass",
        "mean over steps of the sampling distribution's mass on the base model's top-k tokens "
        "(guidance concentrates mass on them)",
    ),
    ("cost", "Cost", "compute per generated token relative to plain sampling"),
)
_KL_TIP = (
    "KL to the base model summed over a response: exact (per-token KL of the sampling distribution, summed), "
    "≈ an estimate (best-of-N selection, from the base samples' reward CDF, ties included), "
    "or ≤ an upper bound (best-of-N selection: log N − (N−1)/N per selection)"
)


def _kl_cell(m: Mapping[str, Any]) -> str:
    """KL to base, with ≤ where it is an upper bound (``kl_kind == "bound"``), ≈ where an estimate."""
    if m.get("kl_kind") == "bound" and finite(m.get("kl_to_base")) is not None:
        return f'<span title="upper bound (best-of-N selection)">≤ {fmt(m.get("kl_to_base"))}</span>'
    if m.get("kl_kind") == "estimate" and finite(m.get("kl_to_base")) is not None:
        return f'<span title="estimate (best-of-N selection, base reward CDF)">≈ {fmt(m.get("kl_to_base"))}</span>'
    return fmt(m.get("kl_to_base"))


def metrics_table_html(methods: Mapping[str, Mapping[str, Any]], shown: str | None = None, split: str = "eval") -> str:
    """HTML table, one row per method: reward mean ± 95% CI, KL to base (exact, or ≤ a bound),
    distinct-2, perplexity, top-k mass, cost.

    The best reward mean is highlighted; the method named ``shown`` (the one the page's samples show)
    is tagged. Missing fields, and a CI of one response, show as a dash. ``split`` names the prompts
    the numbers come from (tooltips).
    """
    if not methods:
        return '<p class="muted">No metrics recorded.</p>'
    rewards = {name: finite(m.get("reward_mean")) for name, m in methods.items()}
    best = max((r for r in rewards.values() if r is not None), default=None)
    head = "".join(f'<th class="num" title="{esc(tip)}">{esc(label)}</th>' for _, label, tip in _COLUMNS)
    rows = []
    for name, m in methods.items():
        r = rewards[name]
        reward = fmt(r) + (f' <span class="ci">± {fmt(m.get("reward_ci95"))}</span>' if r is not None else "")
        cls = ' class="best"' if r is not None and r == best else ""
        tag = ' <span class="tag" title="chosen on validation prompts">shown</span>' if name == shown else ""
        cells = "".join(f'<td class="num">{fmt(m.get(key))}</td>' for key, _, _ in _COLUMNS)
        rows.append(
            f'<tr{cls}><th scope="row">{esc(name)}{tag}</th><td class="num">{reward}</td>'
            f'<td class="num">{_kl_cell(m)}</td>{cells}</tr>'
        )
    return (
        '<table class="metrics"><thead><tr><th>Method</th>'
        f'<th class="num" title="mean reward on {esc(split)} prompts, ± 95% CI half-width (Student\'s t)">'
        "Reward ± 95% CI</th>"
        f'<th class="num" title="{esc(_KL_TIP)}">KL to base</th>{head}'
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        '<p class="muted">★ the highest mean reward in this table, at whatever KL and distinct-2 it paid'
        + (" (not a choice: the method shown is tagged <em>shown</em>)" if shown else "")
        + ".</p>"
    )


def validation_html(
    validation: Mapping[str, Mapping[str, Any]], shown: Mapping[str, Any], methods: Mapping[str, Mapping[str, Any]]
) -> str:
    """The validation-vs-eval note and the validation table.

    Args:
        validation: metrics.json format, the guided methods on validation prompts.
        shown: {"method", "chosen_on", "validation_prompts"}: the method the samples and value maps show.
        methods: the eval table, to say which method scored highest there (it chose nothing).
    """
    name = shown.get("method", "")
    n_val = shown.get("validation_prompts")
    eval_rewards = {k: finite(m.get("reward_mean")) for k, m in methods.items() if k in validation}
    eval_rewards = {k: r for k, r in eval_rewards.items() if r is not None}
    eval_best = max(eval_rewards, key=eval_rewards.get) if eval_rewards else None
    rule = (
        f"by the rule: {esc(shown['rule'])}"
        + ("" if shown.get("passed_rule", True) else " (no method passed: the one of least KL is shown)")  # fmt: skip
        if shown.get("rule")
        else "by its mean reward"
    )
    note = (
        f"<p>The method shown in the headline, the samples and the value maps, <code>{esc(name)}</code>, was "
        f"chosen on {esc(n_val if n_val is not None else 'the')} validation prompts, {rule}. The validation "
        "prompts come from the training side and no learner trained on them. The eval prompts were decoded "
        "once, for the table above, and chose nothing. Picking the best row of the eval table would overstate "
        "it: the largest of several noisy means is biased upward (selection bias).</p>"
    )
    if eval_best is not None and eval_best != name:
        note += (
            f"<p>Among the methods below, <code>{esc(eval_best)}</code> scored highest on the eval prompts "
            f"({fmt(eval_rewards[eval_best])}, against {fmt(eval_rewards.get(name))} for the method shown); "
            "the method shown stays the one chosen on validation.</p>"
        )
    return f'<div class="note">{note}</div>{metrics_table_html(validation, shown=name, split="validation")}'


def ppo_html(ppo: Mapping[str, Any], row: Mapping[str, Any] | None = None) -> str:
    """The PPO section: what was trained, the reward and KL curves over iterations (inline SVG), and the
    validation table from which the iteration count was chosen.

    Args:
        ppo: metrics.json's "ppo" block: {"history": {"reward", "kl": [(step, value)]}, "stages",
            "chosen", "iterations", "validation": {NAME: row}, "validation_prompts", "settings"}.
        row: the ``ppo`` row of the eval table (reward calls and training seconds), if any.
    """
    s = ppo.get("settings", {})
    per_iter = (s.get("prompts_per_iter") or 0) * (s.get("responses_per_prompt") or 0)
    stages = ", ".join(str(n) for n in ppo.get("stages", []))
    cost = ""
    if row and finite(row.get("train_seconds")) is not None:
        cost = (
            f" Training to the chosen count took {finite(row['train_seconds']):.0f} s and "
            f"{esc(row.get('reward_calls'))} reward calls."
        )
    note = (
        f"<p>The <code>ppo</code> row is the language model itself trained online: PPO with LoRA adapters "
        f"(rank {esc(s.get('lora_r'))}) on the base model and a V head on its trunk as the critic. Each iteration "
        f"samples {esc(s.get('responses_per_prompt'))} responses to each of {esc(s.get('prompts_per_iter'))} "
        f"training prompts ({per_iter} reward calls), scores them with the reward, subtracts a per-token KL "
        f"penalty to the base model (coefficient {esc(s.get('kl_coef'))}), and takes "
        f"{esc(s.get('ppo_epochs'))} epochs of clipped policy and value updates (learning rate "
        f"{esc(s.get('lr'))}). One run kept the policy after {esc(stages)} iterations; the count with the best "
        f"mean reward on {esc(ppo.get('validation_prompts', 'the'))} validation prompts, "
        f"<b>{esc(ppo.get('iterations'))}</b>, decoded the eval prompts once for the table, where its KL to the "
        f"base model is exact (the policy's per-token KL, summed over each response).{cost}</p>"
        "<p>The curves are the run's own log (metrics.jsonl): each point is one iteration's rollout, sampled "
        "before that iteration's update; the KL there is the sampled estimate to the reference (the base "
        "model), not the exact eval KL. Dashed lines: the snapshots; dark: the one chosen.</p>"
    )
    history = ppo.get("history", {})
    svg = ppo_curves_svg(history.get("reward", []), history.get("kl", []), ppo.get("stages", []), ppo.get("iterations"))
    table = metrics_table_html(ppo.get("validation", {}), shown=ppo.get("chosen"), split="validation")
    return f'<div class="note">{note}</div><figure class="wide">{svg}</figure>{table}'


def _reward_badge(reward: Any) -> str:
    f = finite(reward)
    cls = "pos" if f is not None and f > 0 else "neg" if f is not None and f < 0 else "zero"
    return f'<span class="badge {cls}">reward {signed(f)}</span>'


def _samples_html(samples: Sequence[Mapping[str, Any]]) -> str:
    if not samples:
        return '<p class="muted">No samples recorded.</p>'
    cards = []
    for s in samples:
        base_r, guided_r = finite(s.get("base_reward")), finite(s.get("guided_reward"))
        delta = (
            f'<span class="delta">Δ {signed(guided_r - base_r)}</span>'
            if base_r is not None and guided_r is not None
            else ""
        )
        cards.append(
            '<article class="card sample">'
            f'<header><span class="method">{esc(s.get("method", ""))}</span>{delta}</header>'
            f'<p class="prompt"><span class="label">Prompt</span>{esc(s.get("prompt", ""))}</p>'
            '<div class="pair">'
            f'<div class="side base"><div class="side-head">Base model {_reward_badge(base_r)}</div>'
            f'<p class="text">{esc(s.get("base", ""))}</p></div>'
            f'<div class="side guided"><div class="side-head">Guided {_reward_badge(guided_r)}</div>'
            f'<p class="text">{esc(s.get("guided", ""))}</p></div>'
            "</div></article>"
        )
    return "".join(cards)


def _value_maps_html(value_maps: Sequence[Mapping[str, Any]]) -> str:
    if not value_maps:
        return '<p class="muted">No value maps recorded.</p>'
    # One colour scale for all maps, so the same colour means the same advantage everywhere.
    scale = max((max_abs(vm.get("advantages", [])) for vm in value_maps), default=0.0) or 1.0
    parts = [value_map_legend_html(scale)]
    for vm in value_maps:
        method = f'<span class="method">{esc(vm["method"])}</span> ' if vm.get("method") else ""
        parts.append(
            '<article class="card">'
            f'<header><p class="prompt"><span class="label">Prompt</span>{esc(vm.get("prompt", ""))}</p>'
            f"<span>{method}{_reward_badge(vm.get('reward'))}</span></header>"
            f"{value_map_html(list(vm['tokens']), list(vm['values']), list(vm['advantages']), scale)}"
            "</article>"
        )
    return "".join(parts)


_EXPLANATION = """
<div class="explain">
  <p>A language model writing a response is an agent: the <em>state</em> s<sub>t</sub> is the prompt plus
  the tokens written so far, the <em>action</em> is the next token y<sub>t</sub>, and the reward (here a
  score of the finished text) arrives at the end.</p>
  <dl>
    <dt>V(s<sub>t</sub>)</dt><dd>value of a state: the reward we expect if the model carries on from this
    prefix.</dd>
    <dt>Q(s<sub>t</sub>, a)</dt><dd>value of an action: the reward we expect after writing token
    <em>a</em> next and then carrying on.</dd>
    <dt>Advantage Q − V</dt><dd>how much one token choice moves the expected reward compared with the
    model's typical continuation; positive tokens steer toward higher reward.</dd>
    <dt>Value-guided decoding</dt><dd>the base model stays frozen; at each step its log-probabilities are
    shifted by the advantage, <code>logits′ = log π<sub>ref</sub>(·|s) + β (Q(s,·) − V(s))</code>, so tokens
    that raise the expected reward become likelier. β = 0 gives back the base model.</dd>
  </dl>
</div>
"""


def render_report(
    path: str | os.PathLike,
    *,
    title: str,
    intro_html: str,
    methods: Mapping[str, Mapping[str, Any]],
    loss_history: Mapping[str, Sequence[tuple[int, float]]],
    samples: Sequence[Mapping[str, Any]],
    value_maps: Sequence[Mapping[str, Any]],
    config: Mapping[str, Any],
    validation: Mapping[str, Mapping[str, Any]] | None = None,
    shown: Mapping[str, Any] | None = None,
    frontier: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    ppo: Mapping[str, Any] | None = None,
) -> None:
    """Write the full self-contained HTML report to `path` (atomically).

    Args:
        title: page title (plain text, escaped).
        intro_html: trusted HTML from the caller saying what was run and why; shown first, followed
            by a fixed explanation of Q, V, advantage and value-guided decoding.
        methods: metrics.json format, {NAME: {"reward_mean", "reward_ci95", "kl_to_base",
            "distinct_2", "perplexity", "cost"}}.
        loss_history: {series: [(step, loss), ...]} for the training-loss plot.
        samples: [{"prompt", "base", "guided", "base_reward", "guided_reward", "method"}].
        value_maps: [{"prompt", "tokens", "values", "advantages", "reward"}]; all maps share one
            colour scale (max |advantage| over all of them).
        config: shown as JSON in a collapsible block (non-JSON values via str()).
        validation: optional, the guided methods' metrics on validation prompts (metrics.json format).
        shown: optional, {"method", "chosen_on", "validation_prompts"}: the method chosen on validation;
            its eval row is tagged, and with ``validation`` a section explains the choice.
        frontier: optional, metrics.json's "frontier" block ({FAMILY: [points]}): reward against KL
            and against cost as one curve per method family, with 95% CIs.
        ppo: optional, metrics.json's "ppo" block (:func:`ppo_html`): a section with the PPO run's reward
            and KL over iterations (inline SVG) and the validation table of its iteration counts.
    """
    config_json = json.dumps(config, indent=2, sort_keys=True, default=str, ensure_ascii=False)
    sections = [
        ("about", "What was done and why", f'<div class="intro">{intro_html}{_EXPLANATION}</div>'),
        ("metrics", "Metrics on eval prompts", metrics_table_html(methods, shown=(shown or {}).get("method"))),
        (
            "plots",
            "Plots",
            '<div class="plots">'
            f'<figure><img alt="reward vs KL to base" src="{plot_reward_vs_kl(methods)}"></figure>'
            f'<figure><img alt="reward vs cost" src="{plot_reward_vs_cost(methods)}"></figure>'
            f'<figure class="wide"><img alt="training losses" src="{plot_losses(loss_history)}"></figure>'
            "</div>",
        ),
        ("samples", "Samples: base model vs. guided", _samples_html(samples)),
        ("value-maps", "Per-token value maps", _value_maps_html(value_maps)),
        (
            "config",
            "Configuration",
            f"<details><summary>Run configuration ({len(config)} keys)</summary>"
            f'<pre class="config">{esc(config_json)}</pre></details>',
        ),
    ]
    if frontier:
        from qvlm.report.frontier_plot import plot_frontier

        sections.insert(  # the first plot (issue 22): reward against KL, every method over its setting
            1,
            (
                "frontier",
                "Frontier: each method over its setting",
                '<p class="note">One curve per method: guided decoding over beta (beta 0 is the base model), '
                "best-of-N over N, blockwise over its candidates; error bars are 95% CIs of the mean reward. "
                "Open markers: the KL is an estimate (best-of-N selection from the base draws' reward CDF).</p>"
                '<div class="plots">'
                f'<figure><img alt="frontier: reward vs KL" src="{plot_frontier(frontier, "kl_to_base")}"></figure>'
                f'<figure><img alt="frontier: reward vs cost" src="{plot_frontier(frontier, "cost")}"></figure>'
                "</div>",
            ),
        )
    if ppo:
        index = next(i for i, (sid, _, _) in enumerate(sections) if sid == "samples")
        sections.insert(index, ("ppo", "PPO: the policy trained online", ppo_html(ppo, methods.get("ppo"))))
    if validation and shown:
        index = next(i for i, (sid, _, _) in enumerate(sections) if sid == "metrics")
        sections.insert(
            index,
            ("validation", "Validation: how the method shown was chosen", validation_html(validation, shown, methods)),
        )
    nav = "".join(f'<a href="#{sid}">{esc(name)}</a>' for sid, name, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{esc(name)}</h2>{content}</section>' for sid, name, content in sections)
    page = (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{report_css()}</style></head>"
        f"<body><main><h1>{esc(title)}</h1><nav>{nav}</nav>{body}"
        "<footer>Generated by qvlm.report. Self-contained: every image is embedded; nothing is "
        "loaded from the network.</footer></main></body></html>\n"
    )
    atomic_write_text(path, page)


def render_value_map_page(path: str | os.PathLike, *, title: str, value_maps: Sequence[Mapping[str, Any]]) -> None:
    """A small self-contained page of value maps only (``qvlm inspect``), written atomically."""
    page = (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{report_css()}</style></head>"
        f"<body><main><h1>{esc(title)}</h1>{_EXPLANATION}"
        f'<section id="value-maps"><h2>Per-token value map</h2>{_value_maps_html(value_maps)}</section>'
        "</main></body></html>\n"
    )
    atomic_write_text(path, page)
