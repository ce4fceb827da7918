"""Atomic, resumable checkpoints and the final run directory of a trainer."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qvlm.errors import QVLMError
from qvlm.fileio import atomic_write_text
from qvlm.heads import save_heads
from qvlm.model import QVModel

__all__ = ["save_checkpoint", "load_checkpoint", "save_run"]


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
