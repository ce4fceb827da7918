"""The demo report's introduction and headline, as HTML, from metrics.json and the run's config.

Pure text from plain data: what was run, on which prompts, how the method shown was chosen (on
validation prompts, never on the eval table), and how each number is to be read (exact KL or a bound).
"""

from __future__ import annotations

from typing import Any, Mapping

from qvlm.report.fmt import esc, finite, fmt

__all__ = ["demo_intro_html"]


def _kl_phrase(m: Mapping[str, Any]) -> str:
    """'a KL of 1.2 nats' (exact), 'a KL of at most 1.2 nats' (a bound), 'about 1.2' (an estimate)."""
    bound = {"bound": "at most ", "estimate": "about "}.get(m.get("kl_kind"), "")
    return f"a KL of {bound}{fmt(m.get('kl_to_base'), 2)} nats per response"


def _reward_phrase(m: Mapping[str, Any]) -> str:
    return f"{fmt(m.get('reward_mean'))} ± {fmt(m.get('reward_ci95'))}"


def demo_intro_html(metrics: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """The "What was done and why" paragraphs and the headline of the demo report.

    Args:
        metrics: metrics.json: {"methods": {NAME: row}, "validation": {NAME: row}, "shown": {"method",
            "chosen_on", ...}, "reward": name}; rows as in :mod:`qvlm.report.page`.
        config: the demo's resolved config (``dataclasses.asdict(DemoConfig)``).
    """
    c = config
    methods = metrics["methods"]
    shown_rule = (metrics.get("shown") or {}).get("rule")
    qsharp = (
        "<p><code>qsharp_*</code> (Q#, Zhou et al. 2025) learns the <i>distribution</i> of the base model's "
        "return, Z(s, a), from the base samples and from rounds of guided roll-ins (the current guided policy "
        "writes a random prefix) and base roll-outs (the base model finishes, the reward scores it): the states "
        "guidance visits are covered, and the labels stay the base model's. One set of heads then guides at "
        "every beta with the soft-optimal Q*_alpha = alpha log E[exp(R/alpha)], alpha = 1/beta, its candidates "
        "centred on their soft value (their total mass stays the base model's); <code>qsharp_mean_*</code> "
        "guides with the same heads' mean instead (the ablation).</p>"
    )
    html = (
        f"<p>The base model <b>{esc(c['model'])}</b> wrote {c['samples_per_prompt']} responses of at most "
        f"{c['max_new_tokens']} tokens to each of {c['train_prompts']} training prompts; the reward "
        f"<b>{esc(metrics['reward'])}</b> scored them. The task has a fixed horizon: the reward scores exactly "
        "those tokens, so the last one ends the episode. On that offline data we trained ILQL Q and V heads "
        f"(<code>ilql_*</code>, CQL weight {c['ilql_cql_scale']:g}) and Monte-Carlo heads (<code>mcq_*</code>): "
        "V regressed on the final reward, Q(s, a) on V of the next prefix s + a (exact in a token MDP, where "
        "the next state is the prefix plus the token). V alone drives <code>cd_blockwise</code>, which keeps "
        "the best of several sampled blocks by V. All heads sit on the frozen trunk, whose features were kept "
        "while sampling.</p>"
        + (qsharp if any(k.startswith("qsharp_") for k in methods) else "")
        + f"<p>Token-level guidance shifts only the base model's {c['guidance_top_k']} likeliest tokens at each "
        "step: Q is computed for those candidates only. Their advantages are centred so that the candidates' "
        "mean advantage, weighted by the base model's probabilities, is zero: a Q head that runs below V then "
        "does not push mass to the other tokens wholesale. Guidance still concentrates mass on the "
        "candidates (with centred advantages their total mass can only rise, by Jensen's inequality); the "
        "<i>top-k mass</i> column shows how much of the sampling distribution sits on them, against the base "
        "model's own.</p>"
        f"<p>The method shown (headline, samples, value maps) was chosen on {c.get('val_prompts', '?')} validation "
        "prompts from the training side that no learner trained on, "
        + (f"by the rule: {esc(shown_rule)}. " if shown_rule else "by its reward. ")
        + f"Every method then answered the same {c['eval_prompts']} held-out eval prompts once, for the table. "
        "Best-of-N samples N responses from the base model and keeps the one the true reward likes best: the "
        "strong baseline, at N times the cost. Cost is compute per generated token relative to plain sampling "
        "(heads and candidate blocks included). KL to the base model is summed per response and labelled: "
        "exact for token-level guidance (the per-token KL of the sampling distribution, summed), an upper "
        "bound (≤) for best-of-N (log N − (N−1)/N) and for blockwise selection (that bound per block).</p>"
    )
    ppo, ppo_row = metrics.get("ppo"), methods.get("ppo")
    if ppo and ppo_row:
        html += (
            "<p>Unlike the heads above, which steer a frozen model, <code>ppo</code> changes the model: LoRA "
            "adapters trained online by PPO with a V critic on the same training prompts and reward, "
            f"{esc(ppo_row.get('reward_calls'))} reward calls up to the iteration count chosen on validation "
            f"({esc(ppo.get('iterations'))}). It scores "
            f"{_reward_phrase(ppo_row)} on the eval prompts at {_kl_phrase(ppo_row)} (exact) and plain "
            "sampling's cost per token; its training curves are in the PPO section.</p>"
        )
    shown = metrics.get("shown")
    if not shown or shown.get("method") not in methods or "best_of_4" not in methods or "base" not in methods:
        return html
    name = shown["method"]
    m, bo4, base = methods[name], methods["best_of_4"], methods["base"]
    val = (metrics.get("validation") or {}).get(name, {})
    r, r4 = finite(m.get("reward_mean")), finite(bo4.get("reward_mean"))
    verdict = "reaches" if r is not None and r4 is not None and r >= r4 else "falls short of"
    topk = ""
    if finite(m.get("topk_mass")) is not None:
        topk = f", puts {fmt(m['topk_mass'], 2)} of its mass on the top-{c['guidance_top_k']} tokens"
        if finite(base.get("topk_mass")) is not None:
            topk += f" (base: {fmt(base['topk_mass'], 2)})"
    html += (
        f"<p><b>Headline.</b> Chosen on validation (reward {_reward_phrase(val)}), <code>{esc(name)}</code> "
        f"scores {_reward_phrase(m)} on the eval prompts at {fmt(m.get('cost'), 2)}x the cost of plain "
        f"sampling; it {verdict} best-of-4 ({_reward_phrase(bo4)} at 4x). Base sampling scores "
        f"{_reward_phrase(base)}. Its price is {_kl_phrase(m)} to the base model (best-of-4: "
        f"{_kl_phrase(bo4)}){topk}, and a perplexity of {fmt(m.get('perplexity'), 1)} under the base model "
        f"(base: {fmt(base.get('perplexity'), 1)}){_repetition(m, base)}: read the samples below.</p>"
    )
    return html


def _repetition(m: dict, base: dict) -> str:
    """``", and a distinct-2 of X (base: Y): it repeats itself"`` when the shown method's distinct-2 is
    below 0.9 times the base model's (text that games a reward by repeating what it scores well);
    otherwise its distinct-2 and the base model's."""
    d, d0 = finite(m.get("distinct_2")), finite(base.get("distinct_2"))
    if d is None or d0 is None:
        return ""
    warn = ": it repeats itself, and a higher reward here is partly the reward gamed" if d < 0.9 * d0 else ""
    return f", and a distinct-2 of {fmt(d, 2)} (base: {fmt(d0, 2)}){warn}"
