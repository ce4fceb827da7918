"""Mechanics every trainer shares: batch order, metrics logging, atomic checkpoints, resume.

A run directory holds ``heads.safetensors`` + ``heads_config.json`` (the final heads),
``checkpoint/`` (the latest resumable state), ``metrics.jsonl`` and ``tb/`` (TensorBoard).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from qvlm.errors import QVLMError
from qvlm.heads import save_heads
from qvlm.fileio import atomic_write_text
from qvlm.mdp import EncodedSample, Sample, TokenBatch, collate, encode_samples
from qvlm.model import QVModel

__all__ = [
    "batch_schedule",
    "read_history",
    "MetricsLogger",
    "save_checkpoint",
    "load_checkpoint",
    "save_run",
    "set_seed",
    "make_optimizer",
    "train_loop",
]


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def batch_schedule(
    items: list[EncodedSample], batch_size: int, seed: int, start_step: int, total_steps: int, pad_token_id: int
) -> Iterator[tuple[int, TokenBatch]]:
    """``(step, batch)`` for steps ``start_step .. total_steps - 1``.

    Epoch ``e`` visits the samples in a permutation drawn from ``seed + e``, so the batch of any
    step is known without replaying earlier ones: a resumed run sees the batches an uninterrupted
    run would.
    """
    per_epoch = math.ceil(len(items) / batch_size)
    for step in range(start_step, total_steps):
        epoch, k = divmod(step, per_epoch)
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        idx = order[k * batch_size : (k + 1) * batch_size]
        yield step, collate([items[i] for i in idx], pad_token_id, index=idx)


def read_history(path: Path, before_step: int | None = None) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` from a metrics.jsonl file (steps < ``before_step`` if given)."""
    history: dict[str, list[tuple[int, float]]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            obj = json.loads(line)
            if before_step is not None and obj["step"] >= before_step:
                continue
            for k, v in obj.items():
                if k != "step":
                    history.setdefault(k, []).append((obj["step"], v))
    return history


class MetricsLogger:
    """Metrics to ``metrics.jsonl`` (one object per step) and TensorBoard when it is installed.

    Keys are grouped by prefix (``losses/q``, ``charts/v_mean``), as CleanRL does.
    """

    def __init__(self, run_dir: Path | None, resume_step: int = 0):
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.file = None
        self.tb = None
        if run_dir is None:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        kept = []
        if resume_step and path.is_file():  # drop lines past the checkpoint that is resumed
            kept = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] < resume_step]
            self.history = read_history(path, before_step=resume_step)
        atomic_write_text(path, "".join(l + "\n" for l in kept))
        self.file = path.open("a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step or None)
        except ImportError:
            self.tb = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.history.setdefault(k, []).append((step, v))
            if self.tb is not None:
                self.tb.add_scalar(k, v, step)
        if self.file is not None:
            self.file.write(json.dumps({"step": step, **metrics}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _state_file_write(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, model: QVModel, optimizer: torch.optim.Optimizer, step: int, config) -> None:
    """Write ``run_dir/checkpoint`` atomically: build it in a temp dir, then swap it in."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint.", dir=run_dir))
    save_heads(model.heads, tmp)
    trunk_state = model.trainable_trunk_state()
    if trunk_state:
        save_file({k: v.contiguous() for k, v in trunk_state.items()}, str(tmp / "trunk.safetensors"))
    # optimizer moments, step and RNG: tensors and plain Python values, loadable with weights_only
    _state_file_write(
        {"optimizer": optimizer.state_dict(), "step": step, "torch_rng": torch.get_rng_state()},
        tmp / "trainer_state.pt",
    )
    atomic_write_text(tmp / "config.json", json.dumps(asdict(config), indent=2) + "\n")
    final = run_dir / "checkpoint"
    old = run_dir / ".checkpoint.old"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(run_dir: Path, model: QVModel, optimizer: torch.optim.Optimizer, config) -> int:
    """Restore heads, trainable trunk tensors, optimizer and RNG from ``run_dir/checkpoint``.

    Returns the step to continue from. Refuses a checkpoint written with a different config.
    """
    ckpt = run_dir / "checkpoint"
    if not (ckpt / "trainer_state.pt").is_file():
        raise QVLMError(f"{run_dir}: no checkpoint to resume; run without --resume to start fresh")
    saved = json.loads((ckpt / "config.json").read_text())
    current = json.loads(json.dumps(asdict(config)))
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k) and k not in _RESUMABLE)
    if diff:
        raise QVLMError(
            f"{ckpt}: written with a different config ({', '.join(diff)} differ); "
            "resume with the same settings or start a new run directory"
        )
    model.heads.load_state_dict(load_file(str(ckpt / "heads.safetensors")))
    if (ckpt / "trunk.safetensors").is_file():
        model.load_trunk_state(load_file(str(ckpt / "trunk.safetensors")))
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])


# fields that may change between an interrupted run and its resume
_RESUMABLE = {"checkpoint_every", "progress"}


def save_run(run_dir: Path, model: QVModel, config, extra: dict | None = None) -> None:
    """Save the final heads (and trainable trunk tensors) plus the training config."""
    save_heads(model.heads, run_dir)
    trunk_state = model.trainable_trunk_state()
    if trunk_state:
        tmp = run_dir / ".trunk.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in trunk_state.items()}, str(tmp))
        os.replace(tmp, run_dir / "trunk.safetensors")
    info = {"config": asdict(config), "trunk": asdict(model.trunk_config), **(extra or {})}
    atomic_write_text(run_dir / "training.json", json.dumps(info, indent=2) + "\n")


def make_optimizer(model: QVModel, lr: float, trunk_lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the heads (``lr``) and the trunk's trainable tensors (``trunk_lr``), if any."""
    groups = [{"params": [p for p in model.heads.parameters() if p.requires_grad], "lr": lr}]
    trunk = [p for p in model.trunk.parameters() if p.requires_grad]
    if trunk:
        groups.append({"params": trunk, "lr": trunk_lr})
    return torch.optim.AdamW(groups, weight_decay=weight_decay)


def train_loop(
    model: QVModel,
    tokenizer,
    samples: list[Sample],
    cfg,
    loss_fn: Callable[[QVModel, TokenBatch], tuple[torch.Tensor, dict[str, float]]],
    name: str,
    run_dir: str | Path | None = None,
    resume: bool = False,
    callbacks=(),
    after_step: Callable[[int], None] | None = None,
) -> dict[str, list[tuple[int, float]]]:
    """The loop every offline trainer shares; returns the metric history.

    ``cfg`` carries seed, max_length, batch_size, epochs, steps, lr, trunk_lr, weight_decay,
    grad_clip, checkpoint_every and progress. Each step: ``loss_fn`` on the step's batch, backward,
    clip, optimiser step, ``after_step(step)`` (e.g. target sync), log, checkpoint, ``callbacks``.
    With ``run_dir``: checkpoints, final heads, metrics.jsonl, TensorBoard; ``resume=True``
    continues from ``run_dir/checkpoint`` to the state an uninterrupted run reaches.
    """
    run_dir = Path(run_dir) if run_dir is not None else None
    set_seed(cfg.seed)
    items = encode_samples(samples, tokenizer, cfg.max_length)
    total = cfg.steps or cfg.epochs * -(-len(items) // cfg.batch_size)
    optimizer = make_optimizer(model, cfg.lr, cfg.trunk_lr, cfg.weight_decay)
    start = load_checkpoint(run_dir, model, optimizer, cfg) if resume and run_dir else 0
    logger = MetricsLogger(run_dir, resume_step=start)
    model.train()
    bar = tqdm(total=total, initial=start, desc=f"train {name}", disable=not cfg.progress, unit="step")
    try:
        for step, batch in batch_schedule(items, cfg.batch_size, cfg.seed, start, total, tokenizer.pad_token_id):
            loss, stats = loss_fn(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                params = [p for g in optimizer.param_groups for p in g["params"]]
                stats["charts/grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            optimizer.step()
            if after_step is not None:
                after_step(step)
            logger.log(step, stats)
            bar.update(1)
            bar.set_postfix({k.split("/")[-1]: f"{v:.4f}" for k, v in stats.items() if k.startswith("losses/")})
            if run_dir and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                save_checkpoint(run_dir, model, optimizer, step + 1, cfg)
            for cb in callbacks:
                cb(step, stats)
    finally:
        bar.close()
        logger.close()
        model.eval()
    if run_dir:
        save_checkpoint(run_dir, model, optimizer, total, cfg)
        save_run(run_dir, model, cfg, {"algorithm": name, "samples": len(samples), "steps": total})
    return logger.history
