"""The demo's learning phases: sample and score the offline data, then train ILQL heads and a
Monte-Carlo prefix scorer on the frozen trunk (one shared feature cache). Both phases are cached in
the output directory and resume after an interruption."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from qvlm.algos.ilql import train_ilql
from qvlm.algos.qsharp import train_qsharp
from qvlm.algos.value import train_value
from qvlm.apps.demo_context import DemoContext
from qvlm.apps.runs import train_or_load
from qvlm.configs import TrunkConfig
from qvlm.decoding import generate
from qvlm.features import FeatureCache, load_features, save_features
from qvlm.fileio import read_json
from qvlm.jsonl import read_samples, write_samples
from qvlm.mdp import Sample
from qvlm.model import QVModel
from qvlm.rollout import rollout_to_samples

__all__ = ["Learners", "sample_phase", "train_phase", "support_of", "qsharp_phase", "loss_curves"]

Features = tuple[list[list[int]], list[torch.Tensor]]  # (token ids, trunk hidden states) per sample


# Q#'s heads: a 51-atom support (C51's count) over the round-0 returns' range widened by a quarter on each
# side (guided roll-ins reach past the base model's best), and a rank-64 state-token interaction
QSHARP_BINS, QSHARP_RANK, QSHARP_MARGIN = 51, 64, 0.25


@dataclass
class Learners:
    """The trained heads: ILQL's, the Monte-Carlo prefix scorer's and Q#'s, and their loss curves."""

    ilql: QVModel
    scorer: QVModel
    history: dict[str, list[tuple[int, float]]]  # {"ILQL q": [(step, loss), ...], "Monte-Carlo v": ...}
    qsharp: QVModel | None = None
    qsharp_cost: dict | None = None  # {"reward_calls", "decoded_tokens"} its rounds spent


def sample_phase(ctx: DemoContext) -> tuple[list[Sample], Features | None]:
    """Sample and score the offline data: ``samples_per_prompt`` base responses to each training prompt.

    Each prompt is prefilled once for its responses, and the trunk's hidden states are kept while
    decoding: the frozen-trunk learners need no second pass. The task has a fixed horizon: the reward
    scores exactly the first max_new_tokens tokens (as in evaluation), so a response cut there is a
    terminal state, not a truncation to bootstrap past.
    """
    cfg, log = ctx.cfg, ctx.log
    samples_file = ctx.phase("samples.jsonl")
    features_file = ctx.out / "features.safetensors"  # kept until both learners are trained (for resume)
    features = None
    if samples_file.is_file():
        samples = read_samples(samples_file)
        log(f"  cached: {len(samples)} samples")
        if features_file.is_file():
            features = load_features(features_file)
        return samples, features
    sample_cfg = dataclasses.replace(ctx.decode, num_return_sequences=cfg.samples_per_prompt)
    res = generate(
        ctx.model, ctx.tokenizer, ctx.train_prompts, cfg=sample_cfg, progress=ctx.progress, return_hidden=True
    )
    rewards = ctx.score([p for p in ctx.train_prompts for _ in range(cfg.samples_per_prompt)], res.texts)
    samples = rollout_to_samples(res, ctx.tokenizer, ctx.train_prompts, rewards, fixed_horizon=True)
    features = ([p + r for p, r in zip(res.prompt_ids, res.response_ids)], res.hidden)
    save_features(features_file, *features)
    write_samples(samples_file, samples)
    log(f"  {len(samples)} samples, mean reward {sum(rewards) / len(rewards):.3f}")
    return samples, features


def train_phase(ctx: DemoContext, samples: list[Sample], features: Features | None) -> Learners:
    """ILQL heads and a Monte-Carlo prefix scorer, on the frozen trunk with one shared feature cache."""
    cfg, model, tokenizer, log = ctx.cfg, ctx.model, ctx.tokenizer, ctx.log
    cache = FeatureCache()  # same trunk, same tokens: both learners read one cache of trunk features

    def frozen_heads() -> QVModel:  # fresh heads (drawn from the global RNG where they are built) on the trunk
        return QVModel.from_trunk(
            model,
            TrunkConfig("frozen"),
            head_hidden=cfg.head_hidden,
            base_model=cfg.model,
            q_head=cfg.q_head,
            feature_cache=cache,
        )

    ilql = frozen_heads()
    ilql_cfg = dataclasses.replace(cfg.ilql, seed=cfg.seed, progress=ctx.progress)
    if features is not None:
        primed = cache.prime(tokenizer, samples, features[1], features[0], ilql_cfg.max_length)
        log(
            f"  trunk features kept from sampling for {primed} of {len(samples)} samples "
            "(the rest re-tokenise differently and are recomputed)"
        )
    history = train_or_load(
        ctx.out / "ilql", ilql, lambda d, r: train_ilql(ilql, tokenizer, samples, ilql_cfg, d, r), log
    )
    scorer = frozen_heads()
    value_cfg = dataclasses.replace(cfg.value, seed=cfg.seed, progress=ctx.progress)
    v_history = train_or_load(
        ctx.out / "value", scorer, lambda d, r: train_value(scorer, tokenizer, samples, value_cfg, d, r), log
    )
    qsharp, q_history, cost = qsharp_phase(ctx, samples, cache)
    (ctx.out / "features.safetensors").unlink(missing_ok=True)  # every learner is trained: features done
    cache.clear()
    curves = loss_curves(history, v_history)
    curves.update({"Q# " + k[len("losses/") :]: v for k, v in q_history.items() if k.startswith("losses/")})
    return Learners(ilql, scorer, curves, qsharp, cost)


def support_of(samples: list[Sample]) -> tuple[float, float]:
    """Q#'s support: the samples' reward range widened by :data:`QSHARP_MARGIN` of it on each side (a
    range of 0: 1 on each side). Rewards (-0.5, 0.5) -> (-0.75, 0.75)."""
    lo, hi = min(s.reward for s in samples), max(s.reward for s in samples)
    pad = QSHARP_MARGIN * (hi - lo) if hi > lo else 1.0
    return lo - pad, hi + pad


def qsharp_phase(ctx: DemoContext, samples: list[Sample], cache: FeatureCache):
    """Q# heads (:mod:`qvlm.algos.qsharp`): round 0 the demo's own base samples (their features from the
    shared cache), then ``--qsharp-rounds`` of guided roll-ins and reference roll-outs on the training
    prompts. Returns the model, its loss history and the reward calls and tokens its rounds spent."""
    cfg = ctx.cfg
    torch.manual_seed(cfg.seed)  # the heads' initialisation
    qsharp = QVModel.from_trunk(
        ctx.model,
        TrunkConfig("frozen"),
        head_hidden=cfg.head_hidden,
        base_model=cfg.model,
        feature_cache=cache,
        bins=QSHARP_BINS,
        support=support_of(samples),
        dist_rank=QSHARP_RANK,
    )
    qcfg = dataclasses.replace(cfg.qsharp, max_new_tokens=cfg.max_new_tokens, guidance_top_k=cfg.guidance_top_k,
                               decode_batch_size=cfg.batch_size, seed=cfg.seed, progress=ctx.progress)  # fmt: skip
    run_dir = ctx.out / "qsharp"
    history = train_or_load(
        run_dir,
        qsharp,
        lambda d, r: train_qsharp(qsharp, ctx.tokenizer, ctx.train_prompts, ctx.reward, qcfg, d, r, initial=samples),
        ctx.log,
    )
    info = read_json(run_dir / "training.json", "delete OUT/qsharp to train Q# again")
    return qsharp, history, {k: info.get(k, 0) for k in ("reward_calls", "decoded_tokens")}


def loss_curves(ilql_history: dict, value_history: dict) -> dict[str, list[tuple[int, float]]]:
    """The loss terms worth plotting: ILQL's (not its total) and the Monte-Carlo heads', named by
    learner; a term switched off logs zeros and is left out."""
    curves = {
        "ILQL " + k[len("losses/") :]: v
        for k, v in ilql_history.items()
        if k.startswith("losses/") and k != "losses/total"
    }
    curves.update(
        {"Monte-Carlo " + k[len("losses/") :]: v for k, v in value_history.items() if k.startswith("losses/")}
    )
    return {k: v for k, v in curves.items() if any(x != 0 for _, x in v)}
