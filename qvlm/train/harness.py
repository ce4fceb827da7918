"""One run harness for every trainer (issue 21): the mechanics a training run needs, written once, so that
an algorithm module keeps only its phases (``# rollout``, ``# targets``, ``# optimise``), as a torchtune
recipe hands setup and checkpointing to shared utilities.

A trainer drives a :class:`Run` top to bottom::

    run = Run(cfg, run_dir, desc="ppo", unit="it", total=cfg.iterations, callbacks=callbacks)
    run.join(device, fsdp=cfg.trunk.fsdp, divisible=[(cfg.prompts_per_iter, "--prompts-per-iter", "prompts")])
    optimizer = make_optimizer(...)                      # the algorithm's parameter groups
    run.track(model, optimizer, fingerprint=...)         # what a checkpoint holds
    if resume:
        extra = run.restore().extra                      # the algorithm's own state
    with run:                                            # metrics.jsonl + TensorBoard, progress
        for it in run.steps():
            ...                                          # the algorithm's phases
            run.log(it, floats, postfix=("charts/reward",))
            run.advance(it + 1, floats, extra=...)       # checkpoint when due, then callbacks
    run.finish(lambda: save_policy_run(...))             # the final save, then every process waits

What it owns: the distributed start (counts the processes must divide, FSDP/DeepSpeed with one process
refused, the launcher's group joined, the seed), resume (the latest checkpoint, refused for other settings
or data), metrics and progress, the checkpoint cadence (every ``cfg.checkpoint_every`` units and at the
last one), the divergence check, the message naming the checkpoint kept when a run stops, the final save
and the barrier that makes every process return once the main one has written the run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from qvlm.errors import QVLMError
from qvlm.progress import progress
from qvlm.train.checkpoint import Resumed, latest_checkpoint, load_checkpoint, save_checkpoint
from qvlm.train.distributed import barrier, check_batch_size, check_divides, check_fsdp, init_distributed
from qvlm.train.metrics import MetricsLogger
from qvlm.train.rng import set_seed
from qvlm.train.zero import check_deepspeed

__all__ = ["batch_indices", "check_finite", "Run"]


def batch_indices(
    n_items: int, batch_size: int, seed: int, start_step: int, total_steps: int
) -> Iterator[tuple[int, list[int]]]:
    """``(step, sample indices of the global batch)`` for steps ``start_step .. total_steps - 1``.

    Epoch ``e`` visits the samples in a permutation drawn from ``seed + e``, so the batch of any
    step is known without replaying earlier ones: a resumed run sees the batches an uninterrupted
    run would, and every rank of a multi-process run sees the same global batch.
    """
    per_epoch = math.ceil(n_items / batch_size)
    for step in range(start_step, total_steps):
        epoch, k = divmod(step, per_epoch)
        order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        yield step, order[k * batch_size : (k + 1) * batch_size]


def check_finite(step: int, objective: float, stats: Mapping[str, float]) -> None:
    """Stop a diverged run: raise :class:`QVLMError` when the objective, a ``losses/*`` term or the
    gradient norm is NaN or infinite, naming the step and the loss terms."""
    watched = {"objective": objective, **{k: v for k, v in stats.items() if k.startswith("losses/")}}
    if "charts/grad_norm" in stats:
        watched["charts/grad_norm"] = stats["charts/grad_norm"]
    if all(math.isfinite(v) for v in watched.values()):
        return
    terms = ", ".join(f"{k}={v:.6g}" for k, v in watched.items())
    raise QVLMError(
        f"training diverged at step {step}: {terms}. Nothing of this step was saved; the last good checkpoint "
        "stays. Lower lr, keep grad_clip on, or scale the rewards down, then resume or start again"
    )


class Run:
    """The mechanics of one training run of ``total`` units (steps, iterations or rounds) into ``run_dir``
    (None: nothing is written). ``cfg`` is the algorithm's config: its ``seed``, ``checkpoint_every`` and
    ``progress`` are read here, and checkpoints record it. ``callbacks`` are called as
    ``cb(unit index, floats)`` after each unit's checkpoint."""

    def __init__(
        self,
        cfg,
        run_dir: str | Path | None,
        *,
        desc: str,
        total: int,
        unit: str = "step",
        callbacks: Sequence[Callable[[int, dict[str, float]], None]] = (),
    ):
        self.cfg, self.desc, self.total, self.unit = cfg, desc, total, unit
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.callbacks = list(callbacks)
        self.start = 0  # the first unit this process runs (a resume's position)
        self.metrics_start = 0  # the first metrics step it logs (steps and units differ for soft Q)
        self.saved_at: int | None = None  # the unit of the latest checkpoint
        self.model = self.optimizer = self.scheduler = None
        self.fingerprint: str | None = None
        self.logger: MetricsLogger | None = None
        self.bar = None

    # ------------------------------------------------------------------ setup

    def join(
        self,
        device: torch.device | str,
        *,
        fsdp: bool = False,
        deepspeed: str = "",
        divisible: Sequence[tuple[int, str, str]] = (),
        batch_size: int | None = None,
    ) -> None:
        """The distributed start: refuse, before any work, a global batch size or another per-step count
        (``(count, flag, what)``) that the launcher's processes do not divide, and FSDP or DeepSpeed in one
        process; join the launcher's process group (gloo on CPU, NCCL on CUDA; alone: nothing); seed every
        RNG with ``cfg.seed``."""
        if batch_size is not None:
            check_batch_size(batch_size)
        for count, flag, what in divisible:
            check_divides(count, flag, what)
        check_fsdp(fsdp)
        check_deepspeed(deepspeed)
        init_distributed(device, deepspeed=bool(deepspeed))
        set_seed(self.cfg.seed)

    def track(self, model, optimizer, *, scheduler=None, fingerprint: str | None = None) -> None:
        """What a checkpoint holds: the model's trainable state, the optimiser (and LR schedule), and the
        fingerprint of the data it trains on (a resume on other data is refused)."""
        self.model, self.optimizer, self.scheduler, self.fingerprint = model, optimizer, scheduler, fingerprint

    def restore(self) -> Resumed:
        """Load the latest checkpoint of ``run_dir`` (model, optimiser, schedule, every RNG) and continue
        from it; returns it (its ``extra`` holds the algorithm's own state)."""
        if self.run_dir is None:
            raise QVLMError("resume needs a run directory; pass run_dir")
        resumed = load_checkpoint(
            self.run_dir, self.model, self.optimizer, self.cfg, scheduler=self.scheduler, fingerprint=self.fingerprint
        )
        self.start = self.metrics_start = self.saved_at = resumed.step
        return resumed

    # ------------------------------------------------------------------ the loop

    def __enter__(self) -> Run:
        self.logger = MetricsLogger(self.run_dir, resume_step=self.metrics_start)
        self.bar = progress(
            total=self.total, initial=self.start, desc=self.desc, enabled=self.cfg.progress, unit=self.unit
        )
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        self.logger.close()
        if self.model is not None:
            self.model.eval()

    @property
    def history(self) -> dict[str, list[tuple[int, float]]]:
        """``{metric: [(step, value)]}`` of the run (a resumed run's earlier steps included)."""
        return self.logger.history

    def steps(self) -> range:
        """The units this process still runs."""
        return range(self.start, self.total)

    def log(self, step: int, floats: dict[str, float], postfix: Sequence[str] = ()) -> None:
        """Log one step's metrics (main process: metrics.jsonl and TensorBoard) and show ``postfix``'s
        metrics on the progress bar."""
        self.logger.log(step, floats)
        if postfix:
            self.bar.set_postfix({k.split("/")[-1]: f"{floats[k]:.4g}" for k in postfix if k in floats})

    def advance(
        self,
        done: int,
        floats: dict[str, float] | None = None,
        *,
        step: int | None = None,
        data_position: Any = None,
        extra: dict | Callable[[], dict] | None = None,
    ) -> None:
        """``done`` units are complete: a checkpoint when one is due (every ``cfg.checkpoint_every`` units,
        and at the last), then the callbacks. The checkpoint records ``step`` (default ``done``), the
        ``data_position`` and the algorithm's ``extra`` state (a dict, or a function that builds it only
        when a checkpoint is written)."""
        self.bar.update(1)
        every = self.cfg.checkpoint_every
        if self.run_dir is not None and (done == self.total or (every and done % every == 0)):
            extra = extra() if callable(extra) else extra
            self.save(done if step is None else step, data_position=data_position, extra=extra)
            self.saved_at = done
        for cb in self.callbacks:
            cb(done - 1, floats or {})

    def save(self, step: int, *, data_position: Any = None, extra: dict | None = None) -> None:
        """Write a checkpoint of ``step`` now (every process calls it; the main one writes)."""
        save_checkpoint(
            self.run_dir,
            self.model,
            self.optimizer,
            step,
            self.cfg,
            scheduler=self.scheduler,
            data_position=data_position,
            fingerprint=self.fingerprint,
            extra=extra,
        )

    def stopped(self, error: QVLMError, where: str) -> QVLMError:
        """``error`` (raised by a phase, e.g. a reward) as the run's stop: where it happened, that nothing of
        this unit was applied, and the checkpoint kept to resume from once the cause is fixed."""
        ckpt = latest_checkpoint(self.run_dir) if self.run_dir is not None else None
        kept = (
            f"the last checkpoint ({ckpt}) is intact: fix the cause and rerun with --resume"
            if ckpt
            else "no checkpoint was written yet"
        )
        return QVLMError(f"{where}: {error}; stopped before updating, {kept}")

    # ------------------------------------------------------------------ the end

    def finish(self, save: Callable[[], None] | None = None) -> None:
        """The final save (with a run directory; every process calls ``save``, which writes on the main
        one), then every process waits until the main one has written the run."""
        if save is not None and self.run_dir is not None:
            save()
        barrier()
