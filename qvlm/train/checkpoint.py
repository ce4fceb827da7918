"""Resumable checkpoints and the final run directory of a trainer.

Layout of ``run_dir/checkpoint/``: one complete checkpoint per folder ``step-<step>/`` and a small
``latest`` file naming the current one. A save builds the new folder under a temporary name,
renames it into place, replaces ``latest`` atomically (``os.replace``), then removes everything
else (older checkpoints, temporary folders left by a killed save). A process killed at any instant
therefore leaves ``latest`` naming a complete checkpoint (or, before the first pointer, at least
one complete ``step-*`` folder), and the next save cleans up what it left.

A checkpoint holds the heads and trainable trunk tensors (safetensors), ``trainer_state.pt``
(optimiser, LR schedule, step, data position, every RNG state, the data fingerprint and any extra
state of the trainer: tensors and plain values, loadable with ``torch.load(weights_only=True)``)
and ``config.json``. Only the main process writes (:func:`qvlm.train.distributed.is_main_process`).

A model with FSDP2-sharded weights (``--fsdp``) is gathered collectively first (every process calls
:func:`save_checkpoint`; rank 0 receives the full tensors and writes them), and its optimiser state
is saved by parameter name (``torch.distributed.checkpoint.state_dict``, full tensors); a resume loads
the full tensors on every process and each keeps its shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_model as load_model_file

from qvlm.configs import flat
from qvlm.errors import QVLMError
from qvlm.fileio import atomic_write_text, read_text
from qvlm.heads import load_heads_state, load_tensors, save_heads, save_tensors
from qvlm.mdp import EncodedSample
from qvlm.model import QVModel
from qvlm.train.distributed import (
    full_optimizer_state_dict,
    has_sharded_parameters,
    is_main_process,
    load_full_optimizer_state_dict,
    load_full_state_dict,
    trainable_state,
)
from qvlm.train.rng import rng_state, set_rng_state

__all__ = [
    "Resumed",
    "data_fingerprint",
    "has_checkpoint",
    "latest_checkpoint",
    "checkpoint_step",
    "save_checkpoint",
    "load_checkpoint",
    "save_run",
]

CHECKPOINT_DIR = "checkpoint"
POINTER = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)(?:\.(\d+))?$")  # step-00000012, or step-00000012.1 when re-saved


@dataclass
class Resumed:
    """What :func:`load_checkpoint` restored besides the model, optimiser, schedule and RNG."""

    step: int  # the step to continue from
    data_position: Any  # where the data stream was (the offline loop: the step)
    extra: dict = field(default_factory=dict)  # the trainer's own state, as saved
    path: Path | None = None  # the checkpoint folder read


def data_fingerprint(items: Sequence[EncodedSample]) -> str:
    """sha256 of the encoded data: per sample its token ids, step rewards and end flags (per
    multi-turn episode, :class:`qvlm.envs.tokens.EpisodeTokens`: its ids, action mask, token rewards,
    done and truncated).

    The hashed text is the compact JSON ``[[prompt_ids, response_ids, rewards, terminated,
    truncated], ...]`` (floats as Python's shortest round-trip repr), so a resume can tell the
    same data from other data (another file, tokenizer or max_length).
    """
    rows = [
        [e.token_ids, e.action_mask, e.token_rewards, e.done, e.truncated]  # a multi-turn episode
        if hasattr(e, "action_mask")
        else [e.prompt_ids, e.response_ids, e.rewards, e.terminated, e.truncated]
        for e in items
    ]
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def _step_key(name: str) -> tuple[int, int] | None:
    m = _STEP_DIR.match(name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def checkpoint_step(ckpt: Path) -> int:
    """The step a checkpoint folder of :func:`latest_checkpoint` holds (``step-00000010`` or, re-saved,
    ``step-00000010.1``: 10)."""
    key = _step_key(Path(ckpt).name)
    if key is None:
        raise QVLMError(f"{ckpt}: not a checkpoint folder (step-NNNNNNNN); start a new run directory")
    return key[0]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint folder a resume reads: the one ``latest`` names, else (a save killed before
    its first pointer) the newest complete ``step-*`` folder; None when there is none."""
    root = Path(run_dir) / CHECKPOINT_DIR
    pointer = root / POINTER
    try:  # a damaged pointer (not text, say) counts as missing: the newest complete folder is read
        named = root / pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None
    except (OSError, ValueError):
        named = None
    if named is not None and named.parent == root and _step_key(named.name) and (named / "trainer_state.pt").is_file():
        return named
    steps = [p for p in root.glob("step-*") if _step_key(p.name) and (p / "trainer_state.pt").is_file()]
    return max(steps, key=lambda p: _step_key(p.name)) if steps else None


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a checkpoint to resume from."""
    return latest_checkpoint(run_dir) is not None


def _check_plain(value, where: str) -> None:
    """Refuse extra state that ``torch.load(weights_only=True)`` could not read back."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise QVLMError(f"checkpoint extra state {where}: key {k!r} must be a str or int")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not (value is None or isinstance(value, (str, int, float, bool, torch.Tensor))):
        raise QVLMError(
            f"checkpoint extra state {where} is a {type(value).__name__}; store tensors, numbers, strings, "
            "None and lists/dicts of them (loadable with torch.load(weights_only=True))"
        )


def _canonical(obj):
    """``obj`` with every dict, list and tuple rebuilt and every string interned, so that pickle's memo
    (which reuses objects by identity) sees the same sharing whatever built the state: an optimiser state
    loaded by a resume holds fresh key strings where an uninterrupted run's share one ("step"), and its
    ``trainer_state.pt`` would otherwise differ in bytes while equal in value (issue 25)."""
    if type(obj) is str:
        return sys.intern(obj)
    if type(obj) is dict:
        return {_canonical(k): _canonical(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_canonical(v) for v in obj)
    return obj  # tensors (their sharing is meant), numbers, None, and subclasses left as they are


def _torch_save_atomic(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    torch.save(_canonical(obj), tmp)
    os.replace(tmp, path)


def _save_model_tensors(model: QVModel | torch.nn.Module, folder: Path, trainable: dict[str, torch.Tensor]) -> None:
    """Heads (``heads.safetensors`` + config) and trainable trunk tensors (``trunk.safetensors``); a
    model other than a QVModel (a reward model, PPO's actor-critic) keeps its trainable parameters in
    ``trainable.safetensors``: frozen weights (a LoRA policy's base, a frozen reference) never change,
    so they are not copied into every checkpoint. ``trainable``: those tensors (trainable trunk
    tensors of a QVModel), gathered on every process first (:func:`_gather_trainable`)."""
    if not isinstance(model, QVModel):
        save_tensors(folder / "trainable.safetensors", trainable)
        return
    save_heads(model.heads, folder)
    if trainable:
        save_tensors(folder / "trunk.safetensors", trainable)


def _gather_trainable(model: QVModel | torch.nn.Module) -> dict[str, torch.Tensor]:
    """What :func:`_save_model_tensors` writes besides heads: a QVModel's trainable trunk tensors,
    another model's trainable parameters. Collective when weights are sharded (every process calls
    it; rank 0 gets the full tensors)."""
    return model.trainable_trunk_state() if isinstance(model, QVModel) else trainable_state(model)


def _load_trainable_state(model: torch.nn.Module, path: Path) -> None:
    saved = load_tensors(path)
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(saved) != expected:
        missing, extra = sorted(expected - set(saved)), sorted(set(saved) - expected)
        raise QVLMError(
            f"{path}: its tensors do not fit this model (missing {missing[:3]}, unexpected {extra[:3]}); resume "
            "with the settings the run started with"
        )
    for name, tensor in saved.items():
        if params[name].shape != tensor.shape:  # a shard's shape is the full one
            raise QVLMError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model {tuple(params[name].shape)}")
    if has_sharded_parameters(model):
        load_full_state_dict(model, saved)  # each process keeps its shard
        return
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)


def save_checkpoint(
    run_dir: str | Path,
    model: QVModel | torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    config,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    data_position: Any = None,
    fingerprint: str | None = None,
    extra: dict | None = None,
) -> Path | None:
    """Write a complete checkpoint of ``step`` and point ``latest`` at it; returns its folder
    (None in a process other than the main one, which writes nothing).

    ``data_position`` (default: ``step``) and ``extra`` are plain values or tensors an online
    trainer needs to continue (e.g. its iteration, a KL coefficient, a rollout buffer).
    """
    extra = dict(extra or {})
    _check_plain(extra, "extra")
    _check_plain(data_position, "data_position")
    by_name = has_sharded_parameters(model)
    zero = hasattr(optimizer, "step_loss")  # DeepSpeed ZeRO (qvlm.train.zero): partitioned AdamW moments
    if by_name:  # sharded weights: gathered on every process (collectives), written by the main one
        trainable, optimizer_state = _gather_trainable(model), full_optimizer_state_dict(model, optimizer)
    elif zero:  # whole weights on every process; the moments gathered collectively
        optimizer_state = optimizer.state_dict()
    if not is_main_process():
        return None
    if not by_name:
        trainable = _gather_trainable(model)
        if not zero:
            optimizer_state = optimizer.state_dict()
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    _save_model_tensors(model, tmp, trainable)
    state = {
        "step": step,
        "data_position": step if data_position is None else data_position,
        "optimizer": optimizer_state,
        "optimizer_by_name": by_name,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_state(),
        "fingerprint": fingerprint,
        "extra": extra,
    }
    _torch_save_atomic(state, tmp / "trainer_state.pt")
    atomic_write_text(tmp / "config.json", json.dumps(flat(config), indent=2) + "\n")
    name, k = f"step-{step:08d}", 0
    while (root / name).exists():  # re-saving a step (a resumed run's end): a fresh name, never a swap
        k += 1
        name = f"step-{step:08d}.{k}"
    os.replace(tmp, root / name)
    atomic_write_text(root / POINTER, name + "\n")
    _remove_all_but(root, keep=name)
    return root / name


def _remove_all_but(root: Path, keep: str) -> None:
    """Remove older checkpoints and leftovers of killed saves. Each folder is first renamed to
    ``.trash-*`` (so no ``step-*`` folder is ever half deleted), then deleted."""
    for entry in root.iterdir():
        if entry.name in (keep, POINTER) or not entry.is_dir():
            continue
        if not (_step_key(entry.name) or entry.name.startswith((".tmp-", ".trash-"))):
            continue
        trash = entry
        if not entry.name.startswith(".trash-"):
            trash = root / f".trash-{uuid.uuid4().hex[:12]}"
            os.replace(entry, trash)
        shutil.rmtree(trash, ignore_errors=True)
    for entry in root.glob(f".{POINTER}.*.tmp"):  # a pointer write killed before its rename
        entry.unlink(missing_ok=True)


def load_checkpoint(
    run_dir: str | Path,
    model: QVModel | torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    fingerprint: str | None = None,
) -> Resumed:
    """Restore heads, trainable trunk tensors, optimiser, schedule and every RNG state from the
    latest checkpoint of ``run_dir``; returns the step (and data position, extra state) to go on from.

    Refuses a checkpoint written with a different config, or (when ``fingerprint`` is given) for
    other data.
    """
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        legacy = Path(run_dir) / CHECKPOINT_DIR / "trainer_state.pt"
        if legacy.is_file():
            raise QVLMError(
                f"{legacy.parent}: a checkpoint in the layout of an older qvlm, which cannot be resumed; "
                "start a new run directory"
            )
        raise QVLMError(f"{run_dir}: no checkpoint to resume; run without --resume to start fresh")
    try:
        saved = json.loads(read_text(ckpt / "config.json"))
    except ValueError as err:  # QVLMError (unreadable, not UTF-8) or JSONDecodeError
        if isinstance(err, QVLMError):
            raise
        raise QVLMError(
            f"{ckpt / 'config.json'}: damaged ({err}); restore the checkpoint or start a new run directory"
        ) from None
    if not isinstance(saved, dict):
        raise QVLMError(f"{ckpt / 'config.json'}: damaged (not a JSON object); start a new run directory")
    current = json.loads(json.dumps(flat(config)))
    # a field added since the checkpoint was written (e.g. fsdp) counts as saved at its default; one
    # retired since (not in the config any more) is not compared
    defaults = json.loads(json.dumps(flat(type(config)())))
    diff = sorted(k for k in current if saved.get(k, defaults.get(k)) != current[k] and k not in _RESUMABLE)
    if diff:
        raise QVLMError(
            f"{ckpt}: written with a different config ({', '.join(diff)} differ); "
            "resume with the same settings or start a new run directory"
        )
    if isinstance(model, QVModel):
        _check_same_model(ckpt, model)
    state = _load_trainer_state(ckpt / "trainer_state.pt")
    if fingerprint is not None and state["fingerprint"] != fingerprint:
        raise QVLMError(
            f"{ckpt}: the run started on other data (fingerprint {str(state['fingerprint'])[:12]}, this data "
            f"{fingerprint[:12]}: the samples, tokenizer or max_length changed); resume with the same "
            "samples file and settings, or start a new run directory"
        )
    if not isinstance(model, QVModel):
        if (ckpt / "trainable.safetensors").is_file():
            _load_trainable_state(model, ckpt / "trainable.safetensors")
        else:  # checkpoints written before trainable.safetensors held the whole model
            load_model_file(model, str(ckpt / "model.safetensors"))
    else:
        load_heads_state(model.heads, load_tensors(ckpt / "heads.safetensors"), ckpt / "heads.safetensors")
        if (ckpt / "trunk.safetensors").is_file():
            model.load_trunk_state(load_tensors(ckpt / "trunk.safetensors"))
    sharded = has_sharded_parameters(model)
    if sharded != bool(state.get("optimizer_by_name")):
        raise QVLMError(
            f"{ckpt}: written {'with' if state.get('optimizer_by_name') else 'without'} sharded weights (--fsdp); "
            "resume with the --fsdp setting the run started with"
        )
    try:
        if sharded:
            load_full_optimizer_state_dict(model, optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, RuntimeError) as err:
        raise QVLMError(
            f"{ckpt / 'trainer_state.pt'}: the optimiser state does not fit this model ({err}); resume with the "
            "--trunk, --head-hidden, --q-head and --with-q settings the run started with"
        ) from None
    if scheduler is not None:
        if state["scheduler"] is None:
            raise QVLMError(f"{ckpt}: saved without an LR schedule; resume with the settings the run started with")
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return Resumed(int(state["step"]), state["data_position"], state["extra"], ckpt)


# heads_config.json fields that must match on resume, and the flag that sets each
_HEAD_FLAGS = {
    "hidden_size": "--model",
    "vocab_size": "--model",
    "num_q_heads": "--model",
    "head_hidden": "--head-hidden",
    "with_q": "--with-q",
    "q_head": "--q-head",
}


def _check_same_model(ckpt: Path, model: QVModel) -> None:
    """Refuse a resume onto heads or a trunk mode other than the checkpoint's, naming what differs."""
    try:
        saved = json.loads(read_text(ckpt / "heads_config.json"))
    except ValueError as err:
        if isinstance(err, QVLMError):
            raise
        raise QVLMError(f"{ckpt / 'heads_config.json'}: damaged ({err}); start a new run directory") from None
    current = asdict(model.heads.config)
    diff = [
        f"{k} {saved.get(k)!r} -> {current[k]!r} ({flag})"
        for k, flag in _HEAD_FLAGS.items()
        if saved.get(k) != current[k]
    ]
    if diff:
        raise QVLMError(
            f"{ckpt}: the run started with other heads ({'; '.join(diff)}); resume with the settings it started with "
            "or start a new run directory"
        )
    saved_trunk = (ckpt / "trunk.safetensors").is_file()
    trains_trunk = any(p.requires_grad for p in model.trunk.parameters())
    if saved_trunk != trains_trunk:
        raise QVLMError(
            f"{ckpt}: the run started with a {'trained' if saved_trunk else 'frozen'} trunk, this one is "
            f"{model.trunk_config.mode}; resume with the --trunk it started with or start a new run directory"
        )


_STATE_KEYS = ("step", "data_position", "optimizer", "scheduler", "rng", "fingerprint", "extra")


def _load_trainer_state(path: Path) -> dict:
    """``trainer_state.pt`` (weights_only); a damaged or foreign file is a :class:`QVLMError` naming it."""
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 (unpickling raises many types: EOFError, UnpicklingError, RuntimeError, ...)
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise QVLMError(
            f"{path}: damaged checkpoint state ({reason}); restore it or start a new run directory"
        ) from None
    if not isinstance(state, dict) or any(k not in state for k in _STATE_KEYS):
        raise QVLMError(f"{path}: not a qvlm checkpoint state (fields missing); start a new run directory")
    return state


# fields that may change between an interrupted run and its resume
_RESUMABLE = {"checkpoint_every", "progress"}


def save_run(run_dir: str | Path, model: QVModel, config, extra: dict | None = None) -> None:
    """Save the final heads (and trainable trunk tensors) plus the training config (main process only).

    Every process calls it: a sharded trunk is gathered collectively first; the main one writes."""
    trainable = model.trainable_trunk_state()
    if not is_main_process():
        return
    run_dir = Path(run_dir)
    _save_model_tensors(model, run_dir, trainable)
    info = {"config": flat(config), "trunk": asdict(model.trunk_config), **(extra or {})}
    atomic_write_text(run_dir / "training.json", json.dumps(info, indent=2) + "\n")
