"""Q# for a language model (issue 22; Zhou et al., NeurIPS 2025): learn the distribution of the reference
policy's return, ``Z(s, a)`` and ``Z(s)``, and guide at any ``beta = 1 / alpha`` with the soft-optimal
``Q*_alpha = alpha log E[exp(R / alpha)]`` read from one set of heads (:class:`qvlm.heads.DistHeads`).

Round 0 is the reference policy's own samples (given, e.g. the demo's, or decoded here): every step is
labelled with its response's return. Each later round:

1. roll in: decode the round's prompts with the current guided policy at the round's beta (the roll-in
   strengths are taken in turn, so the states each one visits are covered) for a cut of ``h`` tokens,
   ``h`` uniform over the response, one per response;
2. roll out: from there the reference policy writes the rest (one pass:
   :func:`qvlm.decoding.sampling.sample_rollout` with ``guide_steps``), and the reward scores it;
3. label: every step from ``h`` on, whose action and continuation are the reference policy's, with the
   return (two-hot on the heads' support); the roll-in's steps are not labelled: their continuation was
   not the reference policy's;
4. fit: cross-entropy of ``Z(s_t, a_t)`` and ``Z(s_t)`` on minibatches drawn from every round so far.
   The labels are fixed returns, so the target never moves (no bootstrapping, no target heads).

The episode ends at ``max_new_tokens`` (the reward scores exactly those tokens), so every return is
complete. With a frozen trunk each sample's features are computed once; checkpoints after each round
hold the heads, optimiser, every RNG and the replay set (labels included), and a resume recomputes the
features round by round in the first run's batches: it ends with the heads an uninterrupted run ends
with. Several processes share each round as soft Q-learning does (:mod:`qvlm.algos.rounds`). The reward
calls and decoded tokens spent are counted and saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from qvlm.algos.rounds import (
    cache_features,
    decode_round,
    fit_round,
    owned_items,
    prompts_sha,
    restore_replay,
    round_prompts,
    score_round,
)
from qvlm.configs import DecodeConfig, QSharpConfig, parse_numbers
from qvlm.distributional import categorical_loss, two_hot
from qvlm.errors import QVLMError
from qvlm.jsonl import write_samples
from qvlm.losses import Stats
from qvlm.masked import masked_mean
from qvlm.mdp import Sample, TokenBatch, encode_samples
from qvlm.model import QVModel
from qvlm.returns import monte_carlo_returns
from qvlm.rewards import RewardFn, get_reward
from qvlm.train.checkpoint import save_run
from qvlm.train.distributed import is_main_process, launch_world
from qvlm.train.harness import Run
from qvlm.train.optim import make_optimizer

__all__ = ["QSharpConfig", "cut_points", "label_mask", "qsharp_loss", "train_qsharp"]


def cut_points(seed: int, round_idx: int, n_rows: int, horizon: int) -> list[int]:
    """Each response's roll-in length ``h``, uniform over ``0 .. horizon - 1``, from a generator keyed by
    (seed, round): the same on every process and on a resume."""
    gen = torch.Generator().manual_seed(seed * 1_000_033 + round_idx)
    return torch.randint(horizon, (n_rows,), generator=gen).tolist()


def label_mask(response_mask: torch.Tensor, label_from: torch.Tensor) -> torch.Tensor:
    """The steps a return labels: real steps ``t >= label_from`` (0-based), those the reference policy
    wrote. ``response_mask (B, T)``, ``label_from (B,)`` -> ``(B, T)``. Mask (1, 1, 1, 0), from 1 ->
    (0, 1, 1, 0)."""
    steps = torch.arange(response_mask.shape[1], device=response_mask.device)
    return response_mask * (steps[None, :] >= label_from[:, None].to(response_mask.device)).to(response_mask.dtype)


def qsharp_loss(
    model: QVModel,
    batch: TokenBatch,
    label_from: torch.Tensor,
    gamma: float = 1.0,
    v_scale: float = 1.0,
    q_target: str = "return",
) -> tuple[torch.Tensor, Stats]:
    """Cross-entropy of ``Z(s_t)`` against the two-hot of the return on the labelled steps
    (:func:`label_mask`), ``v_scale`` times, plus ``Z(s_t, a_t)``'s against the same targets
    (``q_target`` ``return``) or, on every real step, against ``Z(s_{t+1})`` as the state head predicts it
    (``next_z``; the two-hot of the return where the episode ends: in a token MDP ``Z(s, a) = Z(s + a)``,
    discounted: its support scaled by gamma, projected). Stats are detached 0-dim tensors."""
    heads = model.heads
    h, h_next = model.features(batch)  # (B, T, H) each
    mask = label_mask(batch.response_mask, label_from)
    returns = monte_carlo_returns(batch.rewards, batch.done, gamma, batch.response_mask)  # (B, T)
    target = two_hot(returns, heads.support)  # (B, T, K)
    q_mask, q_tgt = mask, target
    if q_target == "next_z":
        with torch.no_grad():
            nxt = torch.softmax(heads.v_logits(h_next).float(), dim=-1)  # (B, T, K): Z(s_{t+1})
            if gamma != 1.0:  # r + gamma Z(s'): each atom z_b moves to r + gamma z_b, projected back
                moved = batch.rewards[..., None] + gamma * heads.support  # (B, T, K)
                nxt = (nxt[..., None] * two_hot(moved, heads.support)).sum(-2)
            done = batch.done[..., None].bool()
            q_tgt = torch.where(done, target, nxt.to(target.dtype))
        q_mask = batch.response_mask
    q_loss, q_stats = categorical_loss(heads.q_logits_taken(h, batch.actions), q_tgt, q_mask)
    v_loss, v_stats = categorical_loss(heads.v_logits(h), target, mask)
    loss = q_loss + v_scale * v_loss
    return loss, {
        "losses/z_q": q_stats["loss"],
        "losses/z_v": v_stats["loss"],
        "charts/z_q_excess": q_stats["excess"],  # KL(target || Z(s, a)): 0 at a perfect fit
        "values/return": masked_mean(returns.detach(), mask),
        "charts/labelled_steps": mask.sum().detach(),
    }


def _check_complete(samples: Sequence[Sample], where: str) -> None:
    """Q# labels complete returns: refuse a sample cut by the length limit that did not end its episode."""
    for i, s in enumerate(samples):
        if not (s.finished or s.terminal):
            raise QVLMError(
                f"{s.label(i)} ({where}): cut by the length limit without ending its episode; Q# labels complete "
                "returns: sample with a fixed horizon (qvlm sample --fixed-horizon) or give finished responses"
            )


def _round(model, tokenizer, prompts, reward, cfg: QSharpConfig, r: int, run: Run) -> tuple[list[Sample], dict]:
    """Round ``r``'s samples: round 0 the reference policy's; later rounds a guided roll-in of a random
    cut, then the reference policy's roll-out; each sample's ``meta["label_from"]`` is its cut."""
    betas = parse_numbers(cfg.betas)
    beta = 0.0 if r == 0 else betas[(r - 1) % len(betas)]
    decode = DecodeConfig(
        max_new_tokens=cfg.max_new_tokens,
        beta=beta,
        num_return_sequences=cfg.samples_per_prompt,
        batch_size=cfg.decode_batch_size,
        guidance_top_k=cfg.guidance_top_k,
    )
    batch_prompts = round_prompts(prompts, r, cfg.prompts_per_round)
    rows = len(batch_prompts) * cfg.samples_per_prompt
    cuts = cut_points(cfg.seed, r, rows, cfg.max_new_tokens) if r else [0] * rows
    rollout, local = decode_round(model, tokenizer, batch_prompts, decode, cfg.seed, r, cuts if r else None)
    samples, charts = score_round(reward, rollout, tokenizer, local, r, run, fixed_horizon=True)
    for s, cut in zip(samples, cuts):
        s.meta["label_from"] = cut
    charts["charts/rollin_beta"] = beta
    return samples, charts


def train_qsharp(
    model: QVModel,
    tokenizer,
    prompts: Sequence[str],
    reward: str | RewardFn,
    cfg: QSharpConfig | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    initial: Sequence[Sample] | None = None,
    callbacks: Sequence[Callable[[int, dict[str, float]], None]] = (),
) -> dict[str, list[tuple[int, float]]]:
    """Train ``model``'s distributional heads by Q# toward ``reward`` (a name of
    :func:`qvlm.rewards.get_reward` or a batch callable ``(prompts, responses) -> floats``); returns the
    metric history.

    ``initial``: the reference policy's samples for round 0 (complete episodes, every step labelled; e.g.
    ``qvlm sample --fixed-horizon`` or the demo's), instead of decoding round 0 here. With ``run_dir``: a
    checkpoint every ``cfg.checkpoint_every`` rounds, the final heads, ``replay.jsonl`` (every sample with
    its ``label_from``), ``metrics.jsonl``, TensorBoard, and in ``training.json`` the reward calls and
    decoded tokens spent (round 0's given samples are not counted: they cost the caller's sampling).
    """
    cfg = cfg or QSharpConfig()
    if not model.heads.distributional:
        raise QVLMError("Q# learns return distributions: build the model with bins > 0 (QVModel.from_trunk(bins=51))")
    if not prompts:
        raise QVLMError("Q# needs prompts to roll in from; give a prompt file with at least one")
    if initial is not None:
        _check_complete(initial, "round 0")
    reward = get_reward(reward)  # a name of qvlm.rewards, or a batch callable as it is
    run = Run(cfg, run_dir, desc="train qsharp", total=cfg.rounds + 1, unit="round", callbacks=callbacks)
    if cfg.q_target == "next_z" and launch_world() > 1:  # its two terms average over different steps
        raise QVLMError("--q-target next_z runs in one process only; use --q-target return under a launcher")
    run.join(model.device, divisible=[(cfg.prompts_per_round, "--prompts-per-round", "prompts")])
    pad_id = tokenizer.pad_token_id
    optimizer = make_optimizer(model, cfg.lr, 1e-5, cfg.weight_decay)
    run.track(model, optimizer)
    step, replay, items, sizes, spent = 0, [], [], [], {"reward_calls": 0, "decoded_tokens": 0}
    if resume:
        resumed = run.restore()
        step = resumed.step  # optimiser steps; the run's units are rounds
        run.start, replay, items, sizes = restore_replay(resumed, model, tokenizer, prompts, cfg.max_length,
                                                         cfg.batch_size)  # fmt: skip
        spent = {k: int(resumed.extra[k]) for k in spent}
    mine = {i for k, n in enumerate(sizes) for i in owned_items(range(sum(sizes[:k]), sum(sizes[: k + 1])))}
    label_from = torch.tensor([int(s.meta.get("label_from", 0)) for s in replay], dtype=torch.long)
    with run:
        for r in run.steps():
            # rollout: round 0 the reference policy's samples; then a guided roll-in, the reference's roll-out
            if r == 0 and initial is not None:
                new, charts = [Sample(**{**vars(s), "meta": {**s.meta, "label_from": 0}}) for s in initial], {}
            else:
                new, charts = _round(model, tokenizer, prompts, reward, cfg, r, run)
                spent["reward_calls"] += len(new)
                spent["decoded_tokens"] += sum(len(s.response_ids or []) + s.finished for s in new)
            # replay: every round is kept; a frozen trunk's features are computed once, here
            own = owned_items(range(len(items), len(items) + len(new)))
            replay, sizes, mine = replay + new, sizes + [len(new)], mine | set(own)
            items += encode_samples(new, tokenizer, cfg.max_length)
            label_from = torch.cat([label_from, torch.tensor([s.meta["label_from"] for s in new], dtype=torch.long)])
            cache_features(model, items, own, cfg.batch_size, pad_id)
            # optimise: cross-entropy of the return distributions on minibatches of every round
            per_step = fit_round(
                model, optimizer, items,
                lambda m, b: qsharp_loss(m, b, label_from[b.index.cpu()], cfg.gamma, cfg.v_scale, cfg.q_target),
                tokens_of=lambda i: max(items[i].n_steps - int(label_from[i]), 0),  # the labelled steps
                mine=mine, steps=cfg.steps_per_round, batch_size=cfg.batch_size, seed=cfg.seed, round_idx=r,
                first_step=step, pad_id=pad_id, grad_clip=cfg.grad_clip,
            )  # fmt: skip
            # log and checkpoint
            charts.update({"charts/round": float(r), "charts/replay_size": float(len(replay)),
                           **{f"charts/{k}": float(v) for k, v in spent.items()}})  # fmt: skip
            for k, floats in enumerate(per_step):
                last = k == len(per_step) - 1
                run.log(step + k, {**floats, **charts} if last else floats,
                        postfix=("losses/z_q", "charts/guided_reward") if last else ())  # fmt: skip
            step += len(per_step)
            extra = {"round": r + 1, "prompts_sha": prompts_sha(prompts), "round_sizes": list(sizes), **spent}
            run.advance(r + 1, charts, step=step, data_position=r + 1,
                        extra=lambda: {**extra, "replay": [s.to_json() for s in replay]})  # fmt: skip

    def save() -> None:
        if is_main_process():
            write_samples(run.run_dir / "replay.jsonl", replay)
        info = {"algorithm": "qsharp", "samples": len(replay), "steps": step, **spent}
        save_run(run.run_dir, model, cfg, info)

    run.finish(save)
    return run.history
