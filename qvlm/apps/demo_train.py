"""The demo's learning phases: sample and score the offline data, then train ILQL heads and a
Monte-Carlo prefix scorer on the frozen trunk (one shared feature cache). Both phases are cached in
the output directory and resume after an interruption."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from qvlm.algos.ilql import train_ilql
from qvlm.algos.value import train_value
from qvlm.apps.demo_context import DemoContext
from qvlm.apps.runs import train_or_load
from qvlm.configs import TrunkConfig
from qvlm.decoding import generate
from qvlm.features import FeatureCache, load_features, save_features
from qvlm.jsonl import read_samples, write_samples
from qvlm.mdp import Sample
from qvlm.model import QVModel
from qvlm.rollout import rollout_to_samples

__all__ = ["Learners", "sample_phase", "train_phase", "loss_curves"]

Features = tuple[list[list[int]], list[torch.Tensor]]  # (token ids, trunk hidden states) per sample


@dataclass
class Learners:
    """The trained heads: ILQL's and the Monte-Carlo prefix scorer's, and their loss curves."""

    ilql: QVModel
    scorer: QVModel
    history: dict[str, list[tuple[int, float]]]  # {"ILQL q": [(step, loss), ...], "Monte-Carlo v": ...}


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
    (ctx.out / "features.safetensors").unlink(missing_ok=True)  # both learners are trained: features done
    cache.clear()
    return Learners(ilql, scorer, loss_curves(history, v_history))


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
