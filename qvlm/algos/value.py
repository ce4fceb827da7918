"""Prefix scorer: a V head on a (usually frozen) trunk, regressed on Monte-Carlo returns or TD
targets of the data's policy (controlled decoding: Mudgal et al. 2024, CD-FUDGE and CD-Q). When the
model has Q heads, ``Q(s_t, a_t)`` is regressed on the same targets, so ``Q - V`` can guide
token-level decoding as well.

``V(s_t)`` estimates the expected final reward of continuing ``s_t`` with the base model. It
steers a frozen model blockwise (sample K blocks, keep the best by V) or scores prefixes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qvlm.configs import ValueConfig
from qvlm.losses import Stats, value_regression_loss
from qvlm.masked import masked_mean
from qvlm.mdp import Sample, TokenBatch
from qvlm.model import QVModel
from qvlm.returns import monte_carlo_returns, td_lambda_returns
from qvlm.train.loop import train_loop

__all__ = ["ValueConfig", "value_loss", "train_value"]


def value_loss(model: QVModel, batch: TokenBatch, cfg: ValueConfig) -> tuple[torch.Tensor, Stats]:
    """Squared error of ``V(s_t)`` against the chosen targets on one batch (stats: detached tensors)."""
    h, h_next = model.features(batch)  # (B, T, H)
    mask = batch.response_mask
    v = model.heads.values(h)  # (B, T)
    if cfg.target == "mc":
        # the last V of a truncated row bootstraps the return; terminated rows ignore it
        lengths = mask.sum(1).long()
        last_v = model.heads.values(h_next[torch.arange(len(lengths)), lengths - 1]).detach()
        targets = monte_carlo_returns(batch.rewards, batch.done, cfg.gamma, mask, last_v)
    else:
        v_next = model.heads.values(h_next).detach()
        lam = 0.0 if cfg.target == "td" else cfg.lam
        targets = td_lambda_returns(batch.rewards, v.detach(), v_next, batch.done, cfg.gamma, lam, mask)
    loss, stats = value_regression_loss(v, targets, mask)
    out = {"losses/v": stats["loss"], "values/v": stats["v_mean"], "values/target": masked_mean(targets.detach(), mask)}
    if model.heads.has_q:
        # Q(s_t, a_t) of the data's policy (CD-FUDGE), on the taken actions' outputs only: regressed
        # on the same return, or on r_t + gamma V(s_{t+1}) (done steps: r_t; truncated last steps
        # bootstrap like every other step)
        if cfg.q_target == "next_v":
            v_next = model.heads.values(h_next).detach()
            q_targets = batch.rewards + cfg.gamma * v_next * (1.0 - batch.done)
        else:
            q_targets = targets
        q_losses = [value_regression_loss(q, q_targets, mask)[0] for q in model.heads.q_taken(h, batch.actions)]
        q_loss = torch.stack(q_losses).mean()
        loss = loss + q_loss
        out["losses/q"] = q_loss.detach()
    return loss, out


def train_value(
    model: QVModel,
    tokenizer,
    samples: list[Sample],
    cfg: ValueConfig | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    callbacks=(),
) -> dict[str, list[tuple[int, float]]]:
    """Train a prefix scorer V (and Monte-Carlo Q heads when the model has them); same run-directory
    layout and resume semantics as ILQL."""
    cfg = cfg or ValueConfig()
    return train_loop(
        model,
        tokenizer,
        samples,
        cfg,
        lambda m, b: value_loss(m, b, cfg),
        f"value ({cfg.target})",
        run_dir,
        resume,
        callbacks,
    )
