"""Metrics of a training run: ``metrics.jsonl`` (one object per step) and TensorBoard.

Losses return their stats as detached 0-dim tensors; :func:`stats_to_floats` turns a step's stats
into floats with one device sync, at logging time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

from qvlm.fileio import atomic_write_text
from qvlm.train.distributed import is_main_process

__all__ = ["stats_to_floats", "read_history", "MetricsLogger"]


def stats_to_floats(stats: Mapping[str, torch.Tensor | float]) -> dict[str, float]:
    """``{name: float}`` from detached 0-dim tensors (and plain numbers), in the order given.

    The tensors are stacked (as float64, exact for every float dtype) and read with one
    ``.tolist()``: one device sync per call instead of one per value.
    """
    tensors = {k: v for k, v in stats.items() if isinstance(v, torch.Tensor)}
    floats = {}
    if tensors:
        device = next(iter(tensors.values())).device
        stacked = torch.stack([v.detach().to(device, torch.float64).reshape(()) for v in tensors.values()])
        floats = dict(zip(tensors, stacked.tolist()))
    return {k: floats[k] if k in floats else float(v) for k, v in stats.items()}


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

    Keys are grouped by prefix (``losses/q``, ``charts/v_mean``), as CleanRL does. Only the main
    process writes files; every process keeps ``history``.
    """

    def __init__(self, run_dir: Path | None, resume_step: int = 0):
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.file = None
        self.tb = None
        if run_dir is None:
            return
        path = run_dir / "metrics.jsonl"
        kept = []
        if resume_step and path.is_file():  # drop lines past the checkpoint that is resumed
            kept = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] < resume_step]
            self.history = read_history(path, before_step=resume_step)
        if not is_main_process():
            return
        run_dir.mkdir(parents=True, exist_ok=True)
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
