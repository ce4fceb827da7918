"""What the demo's phases share: one :class:`DemoContext` (output directory, model, tokenizer,
reward, prompt splits, decoding config, log), and the small helpers every phase uses."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from qvlm.configs import DecodeConfig, DemoConfig
from qvlm.eval.metrics import json_safe
from qvlm.fileio import atomic_write_text
from qvlm.rewards import RewardFn, score

__all__ = ["DemoContext", "save_json"]


@dataclass
class DemoContext:
    """The state the demo's phases share; each phase is a function of it (and of earlier phases' results)."""

    cfg: DemoConfig  # resolved: no preset zeros left
    out: Path  # output directory; every phase caches its result here
    model: Any  # the base model (PreTrainedModel), frozen
    tokenizer: Any
    reward: RewardFn
    reward_name: str
    train_prompts: list[str]  # sampled from and trained on
    val_prompts: list[str]  # training side, never trained on: choose what to show
    eval_prompts: list[str]  # held out: decoded once, for the table
    decode: DecodeConfig  # the base decoding config (seed, length, batch, guidance_top_k)
    log: Callable[[str], None] = print
    progress: bool = True

    def phase(self, name: str) -> Path:
        """Log the start of phase ``name`` with the time, and return its path in the output directory."""
        self.log(f"[{name}] {time.strftime('%H:%M:%S')}")
        return self.out / name

    def score(self, prompts: list[str], texts: list[str]) -> list[float]:
        """The reward of each response (checked: one finite number each)."""
        return score(self.reward, prompts, texts, name=f"reward {self.reward_name}")


def save_json(path: Path, obj) -> None:
    """Write ``obj`` as JSON atomically, non-finite floats as null (``Infinity`` is not JSON)."""
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2) + "\n")
