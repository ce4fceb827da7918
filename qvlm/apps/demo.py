"""`qvlm demo`: steer the embedded SmolLM2-135M-Instruct toward a reward with learned Q/V heads,
against best-of-N, and write metrics.json and a report a person wants to read.

Phases, each a function of one :class:`~qvlm.apps.demo_context.DemoContext` and each cached in the
output directory, so a rerun after an interruption resumes:

1. sample: base responses to training prompts, scored (:func:`~qvlm.apps.demo_train.sample_phase`);
2. train: ILQL heads and a Monte-Carlo prefix scorer on the frozen trunk, sharing one feature cache
   (:func:`~qvlm.apps.demo_train.train_phase`);
3. validation: every guided method on validation prompts from the training side that no learner
   trained on; the method shown is the validation argmax (:mod:`qvlm.apps.demo_eval`);
4. eval: base, best-of-4/N, every guided method on the held-out eval prompts, once, for the table;
   then, in the full preset, the ``ppo`` method: a PPO policy trained online, its iteration count
   chosen on the validation prompts, evaluated once (:mod:`qvlm.apps.demo_ppo`);
5. report: value maps of the method shown, and the HTML page (:mod:`qvlm.report`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from qvlm.apps.demo_context import DemoContext, save_json
from qvlm.apps.demo_eval import (
    choose_shown,
    compute_cost,
    eval_phase,
    frontier_phase,
    guided_methods,
    rule_passed,
    shown_rule,
    validation_phase,
)
from qvlm.apps.demo_ppo import ppo_phase
from qvlm.apps.demo_prompts import load_demo_prompts
from qvlm.apps.demo_train import Learners, sample_phase, train_phase
from qvlm.configs import DecodeConfig, DemoConfig, flat
from qvlm.errors import QVLMError
from qvlm.eval.valuemap import value_maps
from qvlm.fileio import read_json
from qvlm.loading import load_model
from qvlm.rewards import as_sequence_reward, get_reward

__all__ = ["PRESETS", "VAL_START", "run_demo", "resolve", "check_splits", "compute_cost", "choose_shown"]

PRESETS = {
    "full": dict(
        train_prompts=128,
        val_prompts=32,
        eval_prompts=48,
        samples_per_prompt=8,
        max_new_tokens=20,
        # PPO is the costliest phase: 720 reward calls (18 iterations of 10 prompts x 4 responses, the
        # budget of benchmarks/peer_trl.py) took about 11 min at one torch thread on the Intel Xeon with AMX;
        # 9 or 18 iterations, chosen on validation
        ppo_iterations="9,18",
    ),
    "quick": dict(
        train_prompts=32,
        val_prompts=12,
        eval_prompts=20,
        samples_per_prompt=8,
        max_new_tokens=16,
        ppo_iterations="0",  # no ppo method: PPO is the most expensive phase
    ),
}

# Validation prompts are training-split prompts VAL_START, VAL_START + 1, ...: never among the first
# train_prompts (sampled and trained on) as long as train_prompts <= VAL_START.
VAL_START = 160


def resolve(cfg: DemoConfig) -> DemoConfig:
    """Fill the zero fields from the full or quick preset."""
    preset = PRESETS["quick" if cfg.quick else "full"]
    return dataclasses.replace(cfg, **{k: v for k, v in preset.items() if not getattr(cfg, k)})


def check_splits(cfg: DemoConfig, n_train_split: int) -> None:
    """Refuse prompt counts that would make validation overlap training or run past the training split
    (``n_train_split`` prompts); ``cfg`` is resolved."""
    if cfg.train_prompts > VAL_START:
        raise QVLMError(
            f"--train-prompts is {cfg.train_prompts}; validation prompts start at training prompt {VAL_START}, "
            f"so at most {VAL_START} can be trained on without training on validation: use --train-prompts "
            f"{VAL_START} or fewer"
        )
    if VAL_START + cfg.val_prompts > n_train_split:
        raise QVLMError(
            f"--val-prompts is {cfg.val_prompts}; the training split has {n_train_split} prompts and validation "
            f"starts at {VAL_START}: use --val-prompts {n_train_split - VAL_START} or fewer"
        )


def run_demo(cfg: DemoConfig, out: str | Path, log=print, progress: bool = True) -> dict:
    """Run (or resume) the demo into ``out``; returns the metrics dict written to metrics.json."""
    cfg = resolve(cfg)
    train_split = load_demo_prompts("train")
    check_splits(cfg, len(train_split))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_config(out, cfg)
    torch.manual_seed(cfg.seed)
    reward_name = cfg.reward or ("vader" if cfg.target == "positive" else "vader-negative")
    train_prompts = train_split[: cfg.train_prompts]
    val_prompts = train_split[VAL_START : VAL_START + cfg.val_prompts]
    eval_prompts = load_demo_prompts("eval")[: cfg.eval_prompts]
    log(
        f"qvlm demo: {cfg.model}, reward {reward_name}, {len(train_prompts)} training, {len(val_prompts)} "
        f"validation and {len(eval_prompts)} held-out prompts, output in {out}"
    )
    model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    decode = DecodeConfig(
        max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=cfg.seed, guidance_top_k=cfg.guidance_top_k
    )
    ctx = DemoContext(
        cfg=cfg,
        out=out,
        model=model,
        tokenizer=tokenizer,
        reward=as_sequence_reward(get_reward(reward_name), tokenizer),  # a per-token reward: its sum
        reward_name=reward_name,
        train_prompts=train_prompts,
        val_prompts=val_prompts,
        eval_prompts=eval_prompts,
        decode=decode,
        log=log,
        progress=progress,
    )

    samples, features = sample_phase(ctx)
    learners = train_phase(ctx, samples, features)
    methods = guided_methods(ctx, learners)
    validation = validation_phase(ctx, methods)
    rule = shown_rule(ctx)
    shown = choose_shown(validation, rule)
    metrics, responses = eval_phase(ctx, methods)
    ppo = ppo_phase(ctx, metrics["base"]["seconds_per_token"])
    if ppo is not None:
        metrics["ppo"] = ppo.pop("row")
    guided_eval = {m.name: metrics[m.name]["reward_mean"] for m in methods}
    summary = {
        "methods": metrics,
        "validation": validation,
        "shown": {
            "method": shown,
            "chosen_on": "validation",
            "rule": rule["text"],
            "rule_kl_max": rule["kl_max"],
            "rule_distinct_2_min": rule["distinct_2_min"],
            "passed_rule": rule_passed(validation[shown], rule),
            "validation_prompts": len(ctx.val_prompts),
            "validation_reward": validation[shown]["reward_mean"],
            "eval_reward": metrics[shown]["reward_mean"],
            "eval_argmax": choose_shown({k: {"reward_mean": r} for k, r in guided_eval.items()}),
        },
        "frontier": frontier_phase(ctx, metrics),
        **({"ppo": ppo} if ppo is not None else {}),
        "reward": reward_name,
        "config": flat(cfg),
    }
    save_json(out / "metrics.json", summary)
    report_phase(ctx, summary, responses, learners, next(m.learner for m in methods if m.name == shown))
    return summary


def report_phase(
    ctx: DemoContext, summary: dict, responses: dict[str, dict], learners: Learners, heads_of_shown
) -> None:
    """Sample cards and value maps of the method shown (chosen on validation), and the HTML report."""
    from qvlm.report import demo_intro_html, render_report

    ctx.phase("report")
    shown, prompts = summary["shown"]["method"], ctx.eval_prompts
    base, guided = responses["base"], responses[shown]
    samples = [
        {
            "prompt": prompts[i],
            "base": base["texts"][i],
            "guided": guided["texts"][i],
            "base_reward": base["rewards"][i],
            "guided_reward": guided["rewards"][i],
            "method": shown,
        }
        for i in range(min(8, len(prompts)))
    ]
    maps_file = ctx.out / "value_maps.json"
    if maps_file.is_file():
        maps = read_json(maps_file, "delete it to compute that phase again", (dict, list))
    else:
        idx = list(range(min(4, len(prompts))))
        pairs = [(base, "base", i) for i in idx] + [(guided, shown, i) for i in idx]
        texts = [r["texts"][i] for r, _, i in pairs]
        # responses cut at the horizon get no EOS step (none was written)
        maps = value_maps(
            heads_of_shown,
            ctx.tokenizer,
            [prompts[i] for _, _, i in pairs],
            [t if t.strip() else "." for t in texts],
            finished=[r["finished"][i] for r, _, i in pairs],
        )
        for m, (r, label, i) in zip(maps, pairs):
            m["reward"], m["method"] = r["rewards"][i], label
        save_json(maps_file, maps)
    config = flat(ctx.cfg)
    render_report(
        ctx.out / "report.html",
        title=f"qvlm demo: steering {ctx.cfg.model} toward {ctx.reward_name}",
        intro_html=demo_intro_html(summary, config),
        methods=summary["methods"],
        loss_history=learners.history,
        samples=samples,
        value_maps=maps,
        config=config,
        validation=summary["validation"],
        shown=summary["shown"],
        frontier=summary.get("frontier"),
        ppo=summary.get("ppo"),
    )


def _check_config(out: Path, cfg: DemoConfig) -> None:
    """Refuse to resume a directory made with other settings (its cached phases would not match)."""
    file = out / "demo_config.json"
    current = flat(cfg)
    if file.is_file():
        # a run made before an option existed ran with its default (Q#'s: a new phase, trained on resume)
        saved = {**flat(resolve(DemoConfig(quick=cfg.quick))), **read_json(file, "delete it to start the demo afresh")}
        diff = sorted(k for k in current if saved.get(k) != current[k])
        if diff:
            raise QVLMError(
                f"{out} holds a demo run with other settings ({', '.join(diff)} differ); "
                "use another --out or the same settings to resume"
            )
    else:
        save_json(file, current)
