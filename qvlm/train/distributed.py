"""Multi-process hooks: which process writes files.

Every file a trainer writes (checkpoints, metrics, the final run directory) is written by the main
process only, so the same code runs unchanged under ``torchrun`` / ``accelerate launch``.
"""

from __future__ import annotations

import os

import torch

__all__ = ["is_main_process"]


def is_main_process() -> bool:
    """True in the process that writes files: rank 0 of an initialised ``torch.distributed`` group,
    else the process whose ``RANK`` environment variable is 0 or unset (a launcher sets it before
    the group exists), so a single process is always the main one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0") or 0) == 0
