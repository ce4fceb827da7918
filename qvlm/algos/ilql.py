"""ILQL: offline joint Q/V training from scored text (Snell et al. 2023, "Offline RL for Natural
Language Generation with Implicit Language Q Learning").

Losses (qvlm.losses): twin-Q TD regression toward ``r + gamma (1 - done) V(s')``, expectile
regression of V toward the min of the target Q heads, a CQL term, and (when the trunk trains)
advantage-weighted cross-entropy on the LM logits. Target Q heads follow by Polyak averaging.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qvlm.configs import ILQLConfig
from qvlm.errors import QVLMError
from qvlm.losses import Stats, awac_loss, cql_loss, expectile_loss, ilql_q_loss
from qvlm.masked import masked_mean
from qvlm.mdp import Sample, TokenBatch
from qvlm.model import QVModel
from qvlm.returns import td_targets
from qvlm.train.loop import train_loop

__all__ = ["ILQLConfig", "ilql_loss", "train_ilql"]


def ilql_loss(model: QVModel, batch: TokenBatch, cfg: ILQLConfig) -> tuple[torch.Tensor, Stats]:
    """The ILQL objective on one batch: ``q + v + cql_scale * cql (+ awac_scale * awac)``.

    Stats are detached 0-dim tensors (no device sync here); the train loop logs them as floats.
    """
    awac = not model.frozen and cfg.awac_scale > 0
    if awac:  # the LM logits from the trunk's own pass (one forward on a sharded trunk: --fsdp)
        h, h_next, lm_logits = model.features_and_logits(batch)  # (B, T, H) each, (B, T, V)
    else:
        h, h_next = model.features(batch)  # (B, T, H) each
    mask, actions = batch.response_mask, batch.actions
    if cfg.cql_scale > 0:  # CQL needs Q of every token; without it only the taken actions' outputs are computed
        q_all = model.heads.q_values(h)  # num_q x (B, T, V)
        q_taken = [q.gather(-1, actions[..., None]).squeeze(-1) for q in q_all]  # num_q x (B, T)
    else:
        q_taken = model.heads.q_taken(h, actions)
    target_q = model.heads.target_q_taken(h, actions)  # (B, T), min over target heads
    v = model.heads.values(h)  # (B, T)
    v_next = model.heads.values(h_next).detach()  # (B, T); unused where done
    td_target = td_targets(batch.rewards, v_next, batch.done, cfg.gamma)

    q_loss, q_stats = ilql_q_loss(q_taken, td_target, mask)
    v_loss, v_stats = expectile_loss(target_q, v, mask, cfg.tau)
    loss = q_loss + v_loss
    stats = {
        "losses/q": q_stats["loss"],
        "losses/v": v_stats["loss"],
        "values/q_taken": q_stats["q_mean"],
        "values/v": v_stats["v_mean"],
        "values/advantage": masked_mean((target_q - v).detach(), mask),
    }
    if cfg.cql_scale > 0:
        cql = torch.stack([cql_loss(q, actions, mask)[0] for q in q_all]).mean()
        loss = loss + cfg.cql_scale * cql
        stats["losses/cql"] = cql.detach()
    if awac:
        awac, awac_stats = awac_loss(lm_logits, actions, target_q - v, mask, cfg.awac_beta)
        loss = loss + cfg.awac_scale * awac
        stats["losses/awac"] = awac_stats["loss"]
    stats["losses/total"] = loss.detach()
    return loss, stats


def train_ilql(
    model: QVModel,
    tokenizer,
    samples: list[Sample],
    cfg: ILQLConfig | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    callbacks=(),
) -> dict[str, list[tuple[int, float]]]:
    """Train ``model``'s heads (and trunk, unless frozen) with ILQL; returns the metric history.

    With ``run_dir``: checkpoints every ``cfg.checkpoint_every`` steps, final heads, metrics.jsonl,
    TensorBoard. ``resume=True`` continues from ``run_dir/checkpoint`` to the same end state an
    uninterrupted run reaches. ``callbacks`` are called as ``cb(step, stats)`` after each step.
    """
    cfg = cfg or ILQLConfig()
    if not model.heads.has_q:
        raise QVLMError("ILQL needs Q heads; build the model with with_q=True")

    def sync_targets(step: int) -> None:
        if (step + 1) % cfg.target_sync_every == 0:
            model.heads.sync_targets(cfg.polyak)

    return train_loop(
        model,
        tokenizer,
        samples,
        cfg,
        lambda m, b: ilql_loss(m, b, cfg),
        "ilql",
        run_dir,
        resume,
        callbacks,
        after_step=sync_targets,
    )
