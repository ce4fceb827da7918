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


def _read_rows(path: Path) -> list[tuple[str, dict]]:
    """``(line, object)`` of each line of a metrics.jsonl file. A last line that is not a whole JSON
    object with a ``step`` is what a run killed while appending leaves: it is dropped, with a warning;
    a damaged line before it is a :class:`QVLMError` naming the file and line (issue 25)."""
    from qvlm.errors import QVLMError, warn
    from qvlm.fileio import os_error

    try:
        raw = path.read_bytes()
    except OSError as err:
        raise os_error(path, err) from None
    lines = raw.split(b"\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for i, line in enumerate(lines[: last + 1]):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("step"), int) and not isinstance(obj["step"], bool):
            rows.append((line.decode("utf-8").rstrip("\r"), obj))
        elif i == last:
            if is_main_process():
                warn(
                    f"{path}:{i + 1}: dropped a torn last line (a run killed while writing it); the metrics of "
                    "the steps before it are kept"
                )
        else:
            raise QVLMError(
                f"{path}:{i + 1}: damaged metrics line (not a JSON object with a step); delete that line, or the "
                "file to start its log afresh (the checkpoint does not depend on it)"
            )
    return rows


def read_history(path: Path, before_step: int | None = None) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` from a metrics.jsonl file (steps < ``before_step`` if given).
    A torn last line (a run killed while appending it) is dropped with a warning."""
    return _history(_read_rows(path) if path.is_file() else [], before_step)


def _history(rows: list[tuple[str, dict]], before_step: int | None = None) -> dict[str, list[tuple[int, float]]]:
    history: dict[str, list[tuple[int, float]]] = {}
    for _, obj in rows:
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
        if resume_step and path.is_file():  # drop lines past the checkpoint that is resumed (and a torn one)
            rows = _read_rows(path)
            kept = [line for line, obj in rows if obj["step"] < resume_step]
            self.history = _history(rows, before_step=resume_step)
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
