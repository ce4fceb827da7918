"""The demo's evaluation phases, under one protocol (DESIGN.md, "Evaluation protocol"):

- validation: every guided method decodes the validation prompts (training side, never trained on)
  once; the method the report shows is the validation argmax (:func:`choose_shown`);
- eval: base sampling, best-of-4 and best-of-N, and every guided method decode the held-out eval
  prompts once, for the table. Nothing is chosen on them.

Every decode seeds itself with the demo's seed, so adding or reordering decodes shifts no numbers.
Each method's responses and metrics are cached as JSON (``val/NAME.json``, ``eval/NAME.json``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from qvlm.apps.demo_context import DemoContext, save_json
from qvlm.apps.demo_train import Learners
from qvlm.configs import parse_numbers
from qvlm.decoding import GenerationResult, best_of_n_kl_estimate, blockwise_generate, generate, select_best_of_n
from qvlm.eval.frontier import build_frontier
from qvlm.eval.metrics import distinct_n, json_safe, summarize
from qvlm.fileio import read_json
from qvlm.heads import MeanView
from qvlm.model import QVModel

__all__ = [
    "GuidedMethod",
    "compute_cost",
    "guided_methods",
    "decode_method",
    "validation_phase",
    "eval_phase",
    "shown_rule",
    "rule_passed",
    "choose_shown",
    "frontier_phase",
]


@dataclass
class GuidedMethod:
    """One guided decoding method: how it decodes a list of prompts, its cost, and whose heads it uses."""

    name: str  # e.g. ilql_beta_16, mcq_beta_8, cd_blockwise_k4
    decode: Callable[[list[str]], GenerationResult]
    cost: float  # compute per generated token relative to plain sampling
    kl_kind: str  # exact (token-level guidance) or estimate (blockwise: best-of-K per block, from the K values)
    learner: QVModel  # the heads it decodes with (value maps of the method shown use them)


def compute_cost(trunk, heads_macs: int = 0) -> float:
    """Compute per generated token relative to the trunk alone: ``1 + heads / trunk`` multiply-adds.

    A token costs one multiply-add per weight it touches; the input embedding is a lookup (free)
    but the LM head is a matmul, so a tied embedding counts once, as the LM head.
    """
    total = sum(p.numel() for p in trunk.parameters())
    embed = trunk.get_input_embeddings().weight.numel()
    lm_head = trunk.get_output_embeddings().weight
    tied = lm_head.data_ptr() == trunk.get_input_embeddings().weight.data_ptr()
    trunk_compute = total - embed + (lm_head.numel() if tied else 0)
    return 1.0 + heads_macs / trunk_compute


def guided_methods(ctx: DemoContext, learners: Learners) -> list[GuidedMethod]:
    """ILQL-guided and Monte-Carlo-Q-guided decoding at each beta, then V-guided blockwise decoding."""
    cfg, model, tokenizer = ctx.cfg, ctx.model, ctx.tokenizer
    ilql, scorer = learners.ilql, learners.scorer

    def token_guided(heads, beta: float) -> Callable[[list[str]], GenerationResult]:
        guided = dataclasses.replace(ctx.decode, beta=beta)
        return lambda prompts: generate(model, tokenizer, prompts, heads, guided, track_kl=True, progress=ctx.progress)

    def blockwise(prompts: list[str]) -> GenerationResult:
        return blockwise_generate(
            model, tokenizer, prompts, scorer.heads, cfg.candidates, cfg.block_size, ctx.decode, ctx.progress
        )

    ilql_cost = compute_cost(model, ilql.heads.decode_macs_per_token(cfg.guidance_top_k))
    mc_cost = compute_cost(model, scorer.heads.decode_macs_per_token(cfg.guidance_top_k))
    v_cost = compute_cost(model, sum(p.numel() for p in scorer.heads.v_head.parameters()))
    methods = [
        GuidedMethod(f"ilql_beta_{b:g}", token_guided(ilql.heads, b), ilql_cost, "exact", ilql)
        for b in parse_numbers(cfg.betas)
    ]
    methods += [
        GuidedMethod(f"mcq_beta_{b:g}", token_guided(scorer.heads, b), mc_cost, "exact", scorer)
        for b in parse_numbers(cfg.mc_betas)
    ]
    methods.append(
        GuidedMethod(f"cd_blockwise_k{cfg.candidates}", blockwise, cfg.candidates * v_cost, "estimate", scorer)
    )
    if learners.qsharp is not None:  # one set of heads at every beta: Q*_alpha, and its mean (the ablation)
        qsharp = learners.qsharp
        q_cost = compute_cost(model, qsharp.heads.decode_macs_per_token(cfg.guidance_top_k))
        mean = MeanView(qsharp.heads)
        for b in parse_numbers(cfg.qsharp_betas):
            methods.append(GuidedMethod(f"qsharp_beta_{b:g}", token_guided(qsharp.heads, b), q_cost, "exact", qsharp))
        for b in parse_numbers(cfg.qsharp_betas):
            methods.append(GuidedMethod(f"qsharp_mean_beta_{b:g}", token_guided(mean, b), q_cost, "exact", qsharp))
    return methods


def method_metrics(texts, rewards, kl, base_logprobs, cost, seconds, tokens, topk_mass=None, kl_kind="exact") -> dict:
    """One metrics.json row: :func:`qvlm.eval.metrics.summarize` plus wall time, non-finite values as None."""
    metrics = summarize(texts, rewards, kl, base_logprobs, cost, topk_mass, kl_kind).as_dict()
    return json_safe({**metrics, "seconds": seconds, "seconds_per_token": seconds / max(tokens, 1)})


def decode_method(ctx: DemoContext, split: str, prompts: list[str], method: GuidedMethod) -> dict:
    """Decode ``prompts`` with ``method`` once and score them; cached in ``OUT/SPLIT/NAME.json``.

    Returns ``{"texts", "rewards", "finished", "metrics"}``.
    """
    file = ctx.out / split / f"{method.name}.json"
    if file.is_file():
        saved = read_json(file, "delete it to compute that phase again", (dict, list))
        ctx.log(f"[{split} {method.name}] cached")
    else:
        ctx.log(f"[{split} {method.name}] {time.strftime('%H:%M:%S')}")
        start = time.perf_counter()
        res = method.decode(prompts)
        seconds = time.perf_counter() - start
        rewards = ctx.score(prompts, res.texts)
        tokens = sum(len(r) for r in res.response_ids)
        topk_mass = getattr(res, "topk_mass", [])  # GenerationResult.topk_mass is being added
        saved = {
            "texts": res.texts,
            "rewards": rewards,
            "finished": res.finished,
            "metrics": method_metrics(
                res.texts, rewards, res.kl, res.base_logprobs, method.cost, seconds, tokens, topk_mass, method.kl_kind
            ),
        }
        save_json(file, saved)
    m = saved["metrics"]
    ctx.log(
        f"  reward {_fmt(m['reward_mean'])} +- {_fmt(m['reward_ci95'])}, KL {_fmt(m['kl_to_base'])}, cost {m['cost']:.2f}"
    )
    return saved


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def validation_phase(ctx: DemoContext, methods: list[GuidedMethod]) -> dict[str, dict]:
    """Every guided method on the validation prompts, once: ``{NAME: metrics row}``."""
    (ctx.out / "val").mkdir(exist_ok=True)
    return {m.name: decode_method(ctx, "val", ctx.val_prompts, m)["metrics"] for m in methods}


# the rule the shown method must pass on validation (issue 22): a gamed method cannot
RULE_DISTINCT = 0.9  # distinct-2 at least this fraction of the base model's


def shown_rule(ctx: DemoContext) -> dict:
    """The rule that picks the method shown, from base draws on the validation prompts (``--best-of``
    each, cached in ``OUT/val/draws.json``): a validation KL at most best-of-N's estimated KL there and a
    distinct-2 at least :data:`RULE_DISTINCT` of the base model's. ``{"kl_max", "distinct_2_min", "n",
    "text"}``."""
    N, prompts = ctx.cfg.best_of, ctx.val_prompts
    draws = _base_draws(ctx, ctx.out / "val" / "draws.json", prompts)
    kl = [best_of_n_kl_estimate(draws["rewards"][i * N : (i + 1) * N], N) for i in range(len(prompts))]
    first = [draws["texts"][i * N] for i in range(len(prompts))]  # one base response per prompt
    kl_max, d_min = sum(kl) / len(kl), RULE_DISTINCT * distinct_n(first, 2)
    text = (
        f"the highest validation reward among the guided methods whose validation KL is at most best-of-{N}'s "
        f"estimated KL there ({kl_max:.2f} nats) and whose distinct-2 is at least {RULE_DISTINCT:g} times the "
        f"base model's ({d_min:.3f}); a method that games the reward by drifting far or repeating itself cannot pass"
    )
    return {"kl_max": kl_max, "distinct_2_min": d_min, "n": N, "text": text}


def rule_passed(m: Mapping, rule: Mapping) -> bool:
    """Whether a validation row passes the shown method's rule (:func:`shown_rule`)."""
    kl, d2 = m.get("kl_to_base"), m.get("distinct_2")
    return kl is not None and kl <= rule["kl_max"] and d2 is not None and d2 >= rule["distinct_2_min"]


def choose_shown(val_metrics: Mapping[str, Mapping], rule: Mapping | None = None) -> str:
    """The method with the highest mean validation reward (the first of equals, in order); with ``rule``
    (:func:`shown_rule`), among the rows whose KL is at most ``rule["kl_max"]`` and whose distinct-2 is at
    least ``rule["distinct_2_min"]``; none passes: the row of least KL.

    Rows whose reward is missing or not finite are skipped. ``{"a": {"reward_mean": 0.2},
    "b": {"reward_mean": 0.5}}`` -> ``"b"``.
    """
    rows = dict(val_metrics)
    if rule is not None:
        passing = {k: m for k, m in rows.items() if rule_passed(m, rule)}
        if not passing:
            return min(rows, key=lambda k: math.inf if rows[k].get("kl_to_base") is None else rows[k]["kl_to_base"])
        rows = passing
    best, best_reward = None, -math.inf
    for name, m in rows.items():
        r = m.get("reward_mean")
        if r is not None and math.isfinite(r) and r > best_reward:
            best, best_reward = name, r
    if best is None:
        raise ValueError(f"no validation reward to choose from among {list(val_metrics)}")
    return best


def eval_phase(ctx: DemoContext, methods: list[GuidedMethod]) -> tuple[dict[str, dict], dict[str, dict]]:
    """Every method on the eval prompts, once, for the table: ``(metrics by name, responses by name)``.

    Base sampling, best-of-4 and best-of-N come from one set of base draws; then each guided method.
    ``time_ratio`` is each method's seconds per token over plain sampling's.
    """
    (ctx.out / "eval").mkdir(exist_ok=True)
    metrics, responses = _best_of_phase(ctx)
    for method in methods:
        saved = decode_method(ctx, "eval", ctx.eval_prompts, method)
        metrics[method.name], responses[method.name] = saved["metrics"], saved
    base_time = metrics["base"]["seconds_per_token"]
    for m in metrics.values():
        m["time_ratio"] = m["seconds_per_token"] / base_time if base_time else None
    return metrics, responses


def _base_draws(ctx: DemoContext, file: Path, prompts: list[str] | None = None) -> dict:
    """``best_of`` base responses per prompt (the eval prompts by default), scored; cached in ``file``."""
    split = file.parent.name
    if file.is_file():
        ctx.log(f"[{split} base draws] cached")
        return read_json(file, "delete it to compute that phase again", (dict, list))
    cfg, prompts = ctx.cfg, prompts if prompts is not None else ctx.eval_prompts
    ctx.log(f"[{split} base draws] {time.strftime('%H:%M:%S')} {cfg.best_of} per prompt")
    start = time.perf_counter()
    repeated = [p for p in prompts for _ in range(cfg.best_of)]
    draw_cfg = dataclasses.replace(ctx.decode, num_return_sequences=cfg.best_of)
    res = generate(ctx.model, ctx.tokenizer, prompts, cfg=draw_cfg, track_kl=True, progress=ctx.progress)
    seconds = time.perf_counter() - start
    draws = {
        "texts": res.texts,
        "rewards": ctx.score(repeated, res.texts),
        "finished": res.finished,
        "base_logprobs": res.base_logprobs,
        "topk_mass": res.topk_mass,  # the base model's own mass on its top guidance_top_k tokens
        "tokens": [len(r) for r in res.response_ids],
        "seconds": seconds,
    }
    save_json(file, draws)
    return draws


def _base_timing(ctx: DemoContext, file: Path) -> dict:
    """Plain sampling timed as every guided method runs: one response per prompt, each prefilled (the
    draws share each prompt's prefill over N responses, so their per-token time is lower); cached."""
    if file.is_file():
        return read_json(file, "delete it to compute that phase again", (dict, list))
    ctx.log(f"[eval base timing] {time.strftime('%H:%M:%S')}")
    start = time.perf_counter()
    res = generate(ctx.model, ctx.tokenizer, ctx.eval_prompts, cfg=ctx.decode, progress=ctx.progress)
    timing = {"seconds": time.perf_counter() - start, "tokens": sum(len(r) for r in res.response_ids)}
    save_json(file, timing)
    return timing


def _best_of_phase(ctx: DemoContext) -> tuple[dict[str, dict], dict[str, dict]]:
    """Base sampling (draw 0 of each prompt), best-of-4 and best-of-N by the true reward (the strong
    baseline; costs N samples), all from one set of ``best_of`` base draws per eval prompt."""
    draws = _base_draws(ctx, ctx.out / "eval" / "draws.json")
    timing = _base_timing(ctx, ctx.out / "eval" / "base_timing.json")
    n, N = len(ctx.eval_prompts), ctx.cfg.best_of
    per_token = draws["seconds"] / max(sum(draws["tokens"]), 1)
    metrics, responses = {}, {}
    for name, k in (("base", 1), ("best_of_4", 4), (f"best_of_{N}", N)):
        metrics[name], responses[name] = _best_of_row(draws, n, N, k, per_token, timing)
        ctx.log(f"  {name}: reward {_fmt(metrics[name]['reward_mean'])} +- {_fmt(metrics[name]['reward_ci95'])}")
    return metrics, responses


def _best_of_row(draws: dict, n: int, N: int, k: int, per_token: float, timing: dict) -> tuple[dict, dict]:
    """Best-of-``k`` among the first ``k`` of each prompt's ``N`` draws: its metrics row and responses."""
    picks = select_best_of_n(draws["rewards"], N, k)  # (n,) indices into the draws
    sel_texts = [draws["texts"][j] for j in picks]
    sel_rewards = [draws["rewards"][j] for j in picks]
    # best-of-k's KL per prompt, estimated from all N draws of that prompt (its reward CDF, ties included)
    kl = [best_of_n_kl_estimate(draws["rewards"][i * N : (i + 1) * N], k) for i in range(n)]
    tokens = sum(draws["tokens"][j] for j in picks)
    # best-of-k decodes k responses for each one it returns
    seconds = per_token * sum(draws["tokens"][j] for i in range(n) for j in range(i * N, i * N + k))
    if k == 1:
        seconds, tokens = timing["seconds"], timing["tokens"]
    # a draw's top-k mass is the base model's; a selection among draws has no per-step distribution
    topk = [draws["topk_mass"][j] for j in picks] if k == 1 and draws.get("topk_mass") else None
    base_logprobs = [draws["base_logprobs"][j] for j in picks]
    kind = "estimate" if k > 1 else "exact"
    m = method_metrics(sel_texts, sel_rewards, kl, base_logprobs, float(k), seconds, tokens, topk, kind)
    return m, {"texts": sel_texts, "rewards": sel_rewards, "finished": [draws["finished"][j] for j in picks]}


FRONTIER_NS = (1, 2, 4, 8, 16, 32)  # best-of-N points of the frontier (those <= --best-of)


def frontier_phase(ctx: DemoContext, metrics: Mapping[str, dict]) -> dict[str, list[dict]]:
    """metrics.json's ``"frontier"``: every guided family over its betas, blockwise, and best-of-N for
    N in 1, 2, 4, 8, 16, 32 up to ``--best-of``, all from decodes already made (the eval draws)."""
    draws = _base_draws(ctx, ctx.out / "eval" / "draws.json")
    timing = _base_timing(ctx, ctx.out / "eval" / "base_timing.json")
    n, N = len(ctx.eval_prompts), ctx.cfg.best_of
    per_token = draws["seconds"] / max(sum(draws["tokens"]), 1)
    extra = {k: _best_of_row(draws, n, N, k, per_token, timing)[0] for k in FRONTIER_NS if k <= N}
    return build_frontier(metrics, best_of=extra)
