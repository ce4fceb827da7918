"""`qvlm proxy`: reward-model over-optimisation, visible (Gao, Schulman and Hilton 2022).

A gold reward (VADER by default) stands for what the user wants. A proxy reward model learns it from
at most ``pairs`` gold-labelled preference pairs of base samples (optionally with label noise), as a
learned reward learns from human labels. Best-of-N by the proxy then pushes on the proxy harder and
harder (KL to the base grows as ``log N - (N - 1) / N``); the report plots the gold and the proxy reward
of the responses it keeps against that KL, and marks where the gold reward peaks.

Phases, each cached in the output directory so a rerun resumes:

1. ``train_samples.jsonl``: base responses to the training prompts, scored by the gold reward;
2. ``pairs.jsonl`` / ``heldout_pairs.jsonl``: gold-labelled pairs; the held-out pairs come from
   prompts the proxy never sees and measure its pair accuracy against the gold reward;
3. ``proxy/``: the proxy (``qvlm train rm``), used through ``hf:OUT/proxy`` like any classifier reward;
4. ``eval_samples.jsonl``: ``max_n`` base draws per eval prompt, with gold and proxy scores;
5. ``ppo/`` and ``ppo_curve.json`` (with ``--ppo-iterations``): a LoRA policy trained online by PPO
   against the proxy on the proxy's training prompts, a snapshot after each iteration count, each
   decoding ``ppo_eval_samples`` responses per eval prompt once, scored by gold and proxy, with the exact
   KL of its sampling distribution to the base model's (summed per response): a harder push than
   best-of-N, and the curve on which gold turns down first;
6. ``guide/`` and ``guidance_curve.json`` (with ``--guide-betas``): Monte-Carlo Q/V heads (the demo's
   prefix scorer on the frozen trunk) fitted to the proxy's scores of the training samples, steering
   decoding at each beta; ``guide_eval_samples`` responses per eval prompt at beta 0 (the base) and at
   each beta, once, scored by gold and proxy, with the exact KL of the guided sampling distribution;
7. ``proxy.json`` and ``overoptimisation.svg``: best-of-N for N = 1, 2, 4, ..., ``max_n`` (and PPO, and
   guidance).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
from pathlib import Path
from typing import Callable

import torch

from qvlm.algos.actor_critic import load_policy
from qvlm.algos.reward_model import RMData, train_reward_model
from qvlm.algos.value import train_value
from qvlm.apps.demo_prompts import load_demo_prompts
from qvlm.apps.runs import parse_iterations, snapshot_dir, train_or_load, train_with_snapshots
from qvlm.configs import DecodeConfig, ProxyConfig, TrunkConfig, flat, parse_numbers
from qvlm.decoding import generate
from qvlm.decoding.best_of_n import best_of_n_kl_bound
from qvlm.decoding.sampling import sample_rollout
from qvlm.errors import QVLMError
from qvlm.eval.metrics import json_safe, summarize
from qvlm.eval.overoptimisation import best_of_n_expectation, gold_pairs, peak
from qvlm.eval.policy import rollout_metrics
from qvlm.features import FeatureCache
from qvlm.fileio import atomic_write_text, read_json
from qvlm.jsonl import read_samples, write_jsonl, write_samples
from qvlm.loading import load_model, resolve_device
from qvlm.mdp import Sample
from qvlm.model import QVModel
from qvlm.report.overoptimisation import write_overoptimisation_svg
from qvlm.rewards import as_sequence_reward, get_reward, score
from qvlm.rollout import rollout_to_samples
from qvlm.train.checkpoint import has_checkpoint

__all__ = ["run_proxy", "pair_accuracy", "best_of_n_curve", "n_values"]


def n_values(max_n: int) -> list[int]:
    """1, 2, 4, ... up to ``max_n`` (``max_n`` itself included)."""
    ns = [1]
    while ns[-1] * 2 <= max_n:
        ns.append(ns[-1] * 2)
    return ns if ns[-1] == max_n else ns + [max_n]


def pair_accuracy(reward, pairs: list[dict]) -> float:
    """Fraction of pairs whose chosen response ``reward`` scores above the rejected one."""
    prompts = [p["prompt"] for p in pairs]
    chosen = score(reward, prompts, [p["chosen"] for p in pairs], name="proxy")
    rejected = score(reward, prompts, [p["rejected"] for p in pairs], name="proxy")
    return sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)


def best_of_n_curve(gold: list[list[float]], proxy: list[list[float]], ns: list[int]) -> list[dict]:
    """Per N: the mean over prompts of the expected gold and proxy reward of best-of-N by the proxy
    (every N-subset of each prompt's pool, :func:`best_of_n_expectation`) and the KL bound."""

    rows = []
    for n in ns:
        g = [best_of_n_expectation(p, v, n) for p, v in zip(proxy, gold)]
        q = [best_of_n_expectation(p, p, n) for p in proxy]
        rows.append({"n": n, "kl_bound": best_of_n_kl_bound(n), "gold": sum(g) / len(g), "proxy": sum(q) / len(q)})
    return rows


# the last phases' settings, and what they leave: a run may add such a phase (or change its settings)
# while the phase has left nothing behind
LATER_PHASES = {"ppo_": ("ppo", "ppo_curve.json"), "guide_": ("guide", "guidance_curve.json")}


def _check_config(out: Path, cfg: ProxyConfig) -> None:
    """Refuse to resume ``out`` with other settings, naming them; settings of a later phase that has
    left nothing in ``out`` yet (PPO, guidance) may change, so a finished run can add that phase."""
    path = out / "config.json"
    current = flat(cfg)
    # a run made before an option existed ran with its default
    saved = (
        {**flat(ProxyConfig()), **read_json(path, "delete it to start the experiment afresh")}
        if path.is_file()
        else current
    )
    changed = [k for k in current if saved.get(k) != current[k]]

    def may_change(key: str) -> bool:
        return any(key.startswith(p) and not any((out / f).exists() for f in left) for p, left in LATER_PHASES.items())

    fixed = [k for k in changed if not may_change(k)]
    if fixed:
        was = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} (now {current[k]!r})" for k in fixed)
        raise QVLMError(f"{out} holds a proxy run with other settings: {was}; use them again or choose a new --out")
    atomic_write_text(path, json.dumps(current, indent=2) + "\n")


def _sample(model, tokenizer, prompts, n, cfg: ProxyConfig, seed: int, gold, path: Path, progress: bool):
    """``n`` base responses per prompt, scored by the gold reward; cached in ``path``."""

    if path.is_file():
        return read_samples(path)
    decode = DecodeConfig(
        max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=seed, num_return_sequences=n
    )
    res = generate(model, tokenizer, prompts, cfg=decode, progress=progress)
    rewards = score(gold, [p for p in prompts for _ in range(n)], res.texts, name=f"gold reward {cfg.gold}")
    samples = rollout_to_samples(res, tokenizer, prompts, rewards, fixed_horizon=True)
    write_samples(path, samples)
    return samples


def _groups(samples: list[Sample], n: int) -> list[list[Sample]]:
    return [samples[i : i + n] for i in range(0, len(samples), n)]


def run_proxy(
    cfg: ProxyConfig,
    out: str | Path,
    *,
    device: str = "auto",
    dtype: str = "float32",
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict:
    """Run (or resume) the over-optimisation experiment into ``out``; returns what ``proxy.json`` holds."""

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_config(out, cfg)
    train_prompts = load_demo_prompts("train")[: cfg.train_prompts]
    eval_prompts = load_demo_prompts("eval")[: cfg.eval_prompts]
    gold = get_reward(cfg.gold)
    model, tokenizer = load_model(cfg.model, device=device, dtype=dtype)
    log(f"qvlm proxy: {cfg.model}, gold reward {cfg.gold}, output in {out}")

    # sample: base responses to the training prompts, gold-labelled
    log(f"[train samples] {len(train_prompts)} prompts x {cfg.samples_per_prompt}")
    samples = _sample(
        model,
        tokenizer,
        train_prompts,
        cfg.samples_per_prompt,
        cfg,
        cfg.seed,
        gold,
        out / "train_samples.jsonl",
        progress,
    )
    groups = [[(s.response, s.reward) for s in g] for g in _groups(samples, cfg.samples_per_prompt)]

    # pairs: the proxy's training pairs, and held-out pairs from prompts it never sees (no label noise)
    n_fit = max(1, round(len(train_prompts) * (1 - cfg.held_out)))
    rng = random.Random(cfg.seed)
    fit = gold_pairs(groups[:n_fit], train_prompts[:n_fit], cfg.label_noise, rng)[: cfg.pairs]
    test = gold_pairs(groups[n_fit:], train_prompts[n_fit:], 0.0, rng)
    if len(fit) < 2 or not test:
        raise QVLMError(
            f"the gold reward {cfg.gold} separates too few samples ({len(fit)} training and {len(test)} held-out "
            "pairs); raise --train-prompts or --samples-per-prompt"
        )
    write_jsonl(out / "pairs.jsonl", fit)
    write_jsonl(out / "heldout_pairs.jsonl", test)

    # proxy: a reward model on the gold-labelled pairs, used as the reward hf:OUT/proxy
    proxy_dir = out / "proxy"
    if not (proxy_dir / "eval.json").is_file():
        log(f"[proxy] {len(fit)} pairs from {n_fit} prompts")
        rm_cfg = dataclasses.replace(cfg.rm, seed=cfg.seed, progress=progress)
        data = RMData(
            "preference",
            prompts=[p["prompt"] for p in fit],
            chosen=[p["chosen"] for p in fit],
            rejected=[p["rejected"] for p in fit],
            with_prompt=cfg.rm_prompt,
        )

        train_reward_model(data, rm_cfg, proxy_dir, resume=has_checkpoint(proxy_dir), device=device, log=log)
    proxy = get_reward(f"hf:{proxy_dir}", device=resolve_device(device))
    accuracy = pair_accuracy(proxy, test)
    log(f"  proxy pair accuracy against the gold reward on {len(test)} held-out pairs: {accuracy:.3f}")

    # best-of-N pool: max_n base draws per eval prompt, scored by gold and proxy
    log(f"[eval samples] {len(eval_prompts)} prompts x {cfg.max_n}")
    pool_path = out / "eval_samples.jsonl"
    pool = _sample(model, tokenizer, eval_prompts, cfg.max_n, cfg, cfg.seed + 1, gold, pool_path, progress)
    if "proxy" not in pool[0].meta:
        for s, v in zip(pool, score(proxy, [s.prompt for s in pool], [s.response for s in pool], name="proxy")):
            s.meta["proxy"] = v
        write_samples(pool_path, pool)
    gold_pool = [[s.reward for s in g] for g in _groups(pool, cfg.max_n)]
    proxy_pool = [[float(s.meta["proxy"]) for s in g] for g in _groups(pool, cfg.max_n)]

    # PPO against the proxy: snapshots scored by gold and proxy
    ppo_curve = []
    if parse_iterations(cfg.ppo_iterations):
        ppo_curve = _ppo_curve(
            model, tokenizer, train_prompts[:n_fit], eval_prompts, proxy, gold, cfg, out, log, progress
        )

    # guidance against the proxy: Monte-Carlo heads fitted to the proxy's scores steer decoding
    guide_curve = []
    if parse_numbers(cfg.guide_betas):
        guide_curve = _guidance_curve(model, tokenizer, samples, eval_prompts, proxy, gold, cfg, out, log, progress)

    # curve and report
    curve = best_of_n_curve(gold_pool, proxy_pool, n_values(cfg.max_n))
    kl, gold_best, k = peak([r["kl_bound"] for r in curve], [r["gold"] for r in curve])
    result = {
        "gold": cfg.gold,
        "proxy_pairs": len(fit),
        "proxy_heldout_pairs": len(test),
        "proxy_pair_accuracy": accuracy,
        "kl": "best-of-N's analytic KL, log N - (N-1)/N: exact without reward ties, an upper bound otherwise",
        "curve": curve,
        "gold_peak": {"n": curve[k]["n"], "kl_bound": kl, "gold": gold_best, "at_largest_n": k == len(curve) - 1},
        "config": flat(cfg),
    }
    exact = "exact: the {} sampling distribution against the base model's, summed per response"
    if ppo_curve:
        result["ppo_kl"] = exact.format("PPO policy's")
        result["ppo_curve"] = ppo_curve
        result["ppo_gold_peak"] = _curve_peak(ppo_curve, "iterations")
    if guide_curve:
        result["guidance_kl"] = exact.format("guided")
        result["guidance_curve"] = guide_curve
        result["guidance_gold_peak"] = _curve_peak(guide_curve, "beta")
    atomic_write_text(out / "proxy.json", json.dumps(result, indent=2) + "\n")
    write_overoptimisation_svg(curve, result, out / "overoptimisation.svg")
    log(
        f"gold reward peaks at N = {curve[k]['n']} (KL <= {kl:.2f} nats): {gold_best:.3f}; at N = {curve[-1]['n']}: "
        f"{curve[-1]['gold']:.3f} gold, {curve[-1]['proxy']:.3f} proxy. Chart: {out / 'overoptimisation.svg'}"
    )
    if ppo_curve:
        log(_peak_line("PPO against the proxy", result["ppo_gold_peak"], ppo_curve[-1],
                       lambda r: f"after {r['iterations']} iterations"))  # fmt: skip
    if guide_curve:
        log(_peak_line("guidance against the proxy", result["guidance_gold_peak"], guide_curve[-1],
                       lambda r: f"at beta {r['beta']:g}"))  # fmt: skip
    return result


def _curve_peak(rows: list[dict], by: str) -> dict:
    """Where a PPO or guidance curve's gold reward peaks: ``{by: rows[j][by], kl, gold, at_last}``."""
    kl, gold, j = peak([r["kl"] for r in rows], [r["gold"] for r in rows])
    return {by: rows[j][by], "kl": kl, "gold": gold, "at_last": j == len(rows) - 1}


def _peak_line(what: str, top: dict, last: dict, where: Callable[[dict], str]) -> str:
    return (
        f"{what}: gold peaks {where(top)} (exact KL {top['kl']:.2f} nats): {top['gold']:.3f}; {where(last)}: "
        f"{last['gold']:.3f} gold, {last['proxy']:.3f} proxy (KL {last['kl']:.2f})"
    )


def _guidance_curve(model, tokenizer, samples, eval_prompts, proxy, gold, cfg: ProxyConfig, out: Path, log, progress):
    """Fit Monte-Carlo Q/V heads (the demo's prefix scorer, frozen trunk) to the proxy's scores of the
    training samples, then decode ``guide_eval_samples`` responses per eval prompt at beta 0 (the base
    model) and at each ``guide_betas``, once, scored by gold and proxy with the exact KL: rows ``{beta, kl,
    gold, gold_ci95, proxy, distinct_2, example}``, cached in ``guidance_curve.json`` (heads in ``guide/``)."""

    file = out / "guidance_curve.json"
    if file.is_file():
        return read_json(file, "delete it to compute that phase again", (dict, list))
    torch.manual_seed(cfg.seed)  # the heads' initialisation
    cache = FeatureCache()  # frozen trunk: its features are computed in the first epoch and reused
    scorer = QVModel.from_trunk(
        model, TrunkConfig("frozen"), head_hidden=128, base_model=cfg.model, q_head="tied", feature_cache=cache
    )
    value_cfg = dataclasses.replace(cfg.guide, seed=cfg.seed, progress=progress)

    def fit(run_dir: Path, resume: bool) -> dict:  # the heads learn the proxy's scores, never gold's
        log(f"  proxy scores of {len(samples)} training samples")
        proxy_scores = score(proxy, [s.prompt for s in samples], [s.response for s in samples], name="proxy")
        scored = [dataclasses.replace(s, reward=v, token_rewards=None) for s, v in zip(samples, proxy_scores)]
        return train_value(scorer, tokenizer, scored, value_cfg, run_dir, resume)

    train_or_load(out / "guide", scorer, fit, log)
    cache.clear()
    n = cfg.guide_eval_samples
    repeated = [p for p in eval_prompts for _ in range(n)]
    rows = []
    for beta in [0.0, *parse_numbers(cfg.guide_betas)]:
        log(f"[guide eval] beta {beta:g}: {len(eval_prompts)} prompts x {n}")
        decode = DecodeConfig(
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size,
            seed=cfg.seed + 3,
            num_return_sequences=n,
            beta=beta,
            guidance_top_k=cfg.guide_top_k,
        )
        res = generate(model, tokenizer, eval_prompts, scorer.heads if beta else None, decode, track_kl=True,
                       progress=progress)  # fmt: skip
        gold_scores = score(gold, repeated, res.texts, name=f"gold reward {cfg.gold}")
        proxy_scores = score(proxy, repeated, res.texts, name="proxy")
        metrics = summarize(res.texts, gold_scores, res.kl, res.base_logprobs, group_size=n)
        rows.append(
            {
                "beta": beta,
                "kl": metrics.kl_to_base,
                "gold": metrics.reward_mean,
                "gold_ci95": metrics.reward_ci95,
                "proxy": sum(proxy_scores) / len(proxy_scores),
                "distinct_2": metrics.distinct_2,
                "example": res.texts[0],
            }
        )
        log(f"  gold {rows[-1]['gold']:.3f}, proxy {rows[-1]['proxy']:.3f}, exact KL {rows[-1]['kl']:.2f}")
    atomic_write_text(file, json.dumps(json_safe(rows), indent=2) + "\n")
    return rows


def _ppo_curve(model, tokenizer, prompts, eval_prompts, proxy, gold, cfg: ProxyConfig, out: Path, log, progress):
    """Train PPO against the proxy with snapshots (:func:`qvlm.apps.runs.train_with_snapshots`), then
    score every snapshot's eval decodes by gold and proxy: rows ``{iterations, kl, gold, gold_ci95, proxy,
    distinct_2}`` (iteration 0: the base model), cached in ``ppo_curve.json``."""

    file = out / "ppo_curve.json"
    if file.is_file():
        return read_json(file, "delete it to compute that phase again", (dict, list))
    stages = parse_iterations(cfg.ppo_iterations)
    pcfg = dataclasses.replace(cfg.ppo, max_new_tokens=cfg.max_new_tokens, decode_batch_size=cfg.batch_size,
                               seed=cfg.seed, progress=progress)  # fmt: skip
    run_dir = out / "ppo"
    reward = as_sequence_reward(proxy, tokenizer)
    train_with_snapshots(run_dir, model, tokenizer, prompts, reward, pcfg, stages, cfg.model, log)
    decode = DecodeConfig(
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        seed=cfg.seed + 2,
        num_return_sequences=cfg.ppo_eval_samples,
    )
    repeated = [p for p in eval_prompts for _ in range(cfg.ppo_eval_samples)]
    rows = []
    for n in [0, *stages]:
        log(f"[ppo eval] after {n} iterations: {len(eval_prompts)} prompts x {cfg.ppo_eval_samples}")
        policy = model if n == 0 else load_policy(copy.deepcopy(model), snapshot_dir(run_dir, n, stages[-1]))
        rollout = sample_rollout(policy, tokenizer, eval_prompts, cfg=decode, progress=progress,
                                 logprobs=False, ref_logprobs=False)  # fmt: skip
        metrics, texts, _ = rollout_metrics(policy, model, tokenizer, eval_prompts, rollout, gold, cfg=decode)
        proxy_scores = score(proxy, repeated, texts, name="proxy")
        rows.append(
            {
                "iterations": n,
                "kl": metrics.kl_to_base,
                "gold": metrics.reward_mean,
                "gold_ci95": metrics.reward_ci95,
                "proxy": sum(proxy_scores) / len(proxy_scores),
                "distinct_2": metrics.distinct_2,
                "example": texts[0],
            }
        )
        log(f"  gold {rows[-1]['gold']:.3f}, proxy {rows[-1]['proxy']:.3f}, exact KL {rows[-1]['kl']:.2f}")
    atomic_write_text(file, json.dumps(json_safe(rows), indent=2) + "\n")
    return rows
