"""The training engine: one epoch loop for every kind of training in cliplab.

A :class:`TrainTask` says *what* is trained (model, optimizer, batches, the loss of a batch, dev metrics,
the tensors to save); :class:`TrainLoop` does the rest, the same way for each task:

- epochs of optimizer steps (gradient accumulation, float16 loss scaling, gradient clipping, averaging
  across processes under ``torchrun``), the LR schedule stepped per optimizer step, or per epoch on the
  dev score for ``ReduceLROnPlateau``;
- a NaN/inf loss or dev score stops training with a clear error and is never saved as best;
- early stopping on a dev metric (higher or lower is better, by the settings), ``best/`` (the selected
  model) and ``last.pt`` (resumable state) in the run folder (file names in :mod:`cliplab.rundir`);
- exact resume: ``last.pt`` holds the trained tensors, optimizer, scheduler and loss-scaler state, the CPU
  random state (and the CUDA one when training on a GPU) and the selection state, so that a killed run
  resumed from it ends where an uninterrupted one does (batches must be a function of (seed, epoch));
  the checkpoint records the training config, and resuming with a changed one is refused;
- per-epoch records in ``metrics.jsonl`` and TensorBoard (when installed), ``tqdm.auto`` progress.

Checkpoints hold tensors and plain values only: they load through
:func:`cliplab.models.checkpoint.load_checkpoint` (``weights_only=True``).

Layering: besides :mod:`cliplab.train.distributed` it imports only ``rundir``, ``utils``, ``errors`` and
``models.checkpoint`` (nothing of contrastive training), so contrastive training
(:mod:`cliplab.train.trainer`) and captioning (:mod:`cliplab.caption.train`, a layer above ``train``) both
run on it.
"""

from __future__ import annotations

import math
import numbers
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cliplab import rundir
from cliplab.errors import ConfigError, NumericError
from cliplab.models.checkpoint import load_checkpoint
from cliplab.rundir import BEST, CHECKPOINT, METRICS, append_metrics, check_resume_config, truncate_metrics
from cliplab.train.distributed import DistContext
from cliplab.utils import atomic_write


@dataclass
class LoopSettings:
    """How the engine runs a task (the task's own config supplies the values). Given an ``evaluator`` (the
    :class:`~cliplab.eval.evaluators.Evaluator` class scoring the task's dev split), the selection metric
    defaults to its primary metric and the direction is the one it gives for that metric."""

    epochs: int
    patience: int = 0  # stop after this many epochs without a better dev score; 0: never
    select_metric: str | None = None  # the key of the task's ``dev`` metrics that picks ``best/``
    select_direction: str = "max"  # "max": higher is better, "min": lower is better
    grad_accum_steps: int = 1
    grad_clip: float = 0.0  # max gradient norm; 0: no clipping
    evaluator: Any = None  # an Evaluator class: select_metric's default and its direction

    def __post_init__(self) -> None:
        if self.evaluator is not None:
            self.select_metric = self.select_metric or self.evaluator.primary_metric
            self.select_direction = self.evaluator.direction(self.select_metric)
        if self.select_direction not in ("max", "min"):
            raise ConfigError(f"select_direction must be max or min, not {self.select_direction!r}")
        if self.grad_accum_steps < 1:
            raise ConfigError("grad_accum_steps must be >= 1")


class TrainTask:
    """What one kind of training provides to :class:`TrainLoop`.

    Set in ``__init__``: ``model`` (with ``save(folder)``), ``optimizer``, ``scheduler`` (a torch LR scheduler),
    ``params`` (the trained tensors: gradient clipping and averaging cover them) and, for float16 autocast,
    ``scaler``. Fill in :meth:`batches`, :meth:`loss`, :meth:`state` and :meth:`restore`; the other hooks
    have defaults.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    params: list[torch.Tensor]
    scaler: Any = None  # torch.amp.GradScaler or None
    loss_name = "training"  # the NaN message: "{loss_name} loss is nan at epoch ..."
    nan_advice = "Lower train.lr"
    epoch_bar = True  # a progress bar over epochs (off for a task that logs a line per epoch)

    def batches(self, epoch: int) -> Sequence:
        """The batches of one epoch, a function of (seed, epoch) only (exact resume relies on it)."""
        raise NotImplementedError

    def loss(self, batch, epoch: int, step: int) -> torch.Tensor:
        """The loss of one batch (``step`` counts from 1 within the epoch); the engine does backward."""
        raise NotImplementedError

    def after_update(self) -> None:
        """Called after every optimizer step (e.g. to clamp a parameter)."""

    def train_record(self, batches: Sequence, seconds: float) -> dict:
        """Extra fields of the epoch's record, after its optimizer steps (``seconds`` they took)."""
        return {}

    def evaluate(self) -> dict[str, dict]:
        """Split name -> metrics after an epoch; the ``dev`` entry holds the selection metric."""
        return {}

    def report(self, record: dict, bar) -> None:
        """Show an epoch's record (``bar``: the epoch progress bar)."""

    def state(self) -> dict:
        """What the checkpoint holds besides the engine's state: ``model`` tensors (and e.g. ``loss``)."""
        raise NotImplementedError

    def restore(self, ckpt: dict, where: str) -> None:
        """Load :meth:`state`'s entries of a checkpoint (``where`` names it in errors)."""
        raise NotImplementedError

    def save_best(self, folder: Path) -> None:
        self.model.save(folder)

    def save_checkpoint(self, epoch: int, path: Path, ckpt: dict) -> None:
        """Write ``last.pt`` after ``epoch`` (atomically: a kill leaves the previous one)."""
        atomic_write(path, lambda p: torch.save(ckpt, p))

    def append_record(self, run_dir: Path, record: dict) -> None:
        append_metrics(run_dir, record)


def warmup_cosine(warmup: int, total: int, constant: bool = False) -> Callable[[int], float]:
    """LR factor of optimizer step ``step``: linear warmup over ``warmup`` steps, then cosine decay to 0 at
    ``total`` (or ``constant``: 1 after the warmup); for ``torch.optim.lr_scheduler.LambdaLR``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if constant:
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def refuse_changed_config(run_dir: str | Path, record: dict) -> None:
    """Refuse early (before anything is computed or overwritten) to resume ``run_dir``'s checkpoint with
    other settings; a no-op without a checkpoint."""
    path = Path(run_dir) / CHECKPOINT
    if path.is_file():
        check_resume_config(run_dir, load_checkpoint(path, "cpu", mmap=True).get("config"), record)


def tensorboard_writer(run_dir: Path):
    """A TensorBoard writer for ``run_dir``, or None (with a note) when TensorBoard is not installed."""
    from cliplab.extras import available

    if not available("torch.utils.tensorboard"):  # optional: every value is in metrics.jsonl as well
        print('note: tensorboard is not installed (pip install "cliplab[tensorboard]"); per-epoch metrics '
              f"are in {METRICS}", file=sys.stderr)
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / rundir.TENSORBOARD))


class TrainLoop:
    """Runs a :class:`TrainTask` for ``settings.epochs`` epochs in ``run_dir`` (see the module docstring).

    ``config_record``: the flat settings stored in the checkpoint, which a resume must match. ``dist``: a
    :class:`~cliplab.train.distributed.DistContext` (or anything with ``is_main``, ``barrier()`` and
    ``average_gradients(params)``); only the main process writes. ``log``: where a resume is announced.
    """

    def __init__(self, task: TrainTask, settings: LoopSettings, run_dir: str | Path, *, device: torch.device,
                 config_record: dict, resume: bool = True, progress: bool = True, tensorboard: bool = True,
                 dist=None, log: Callable[[str], Any] | None = None) -> None:
        self.task, self.settings, self.run_dir = task, settings, Path(run_dir)
        self.device, self.config_record, self.resume = torch.device(device), config_record, resume
        self.dist = dist or DistContext()
        self.progress, self.tensorboard = progress and self.dist.is_main, tensorboard and self.dist.is_main
        self.log = log or (lambda *a: None)
        worst = -math.inf if settings.select_direction == "max" else math.inf
        self.state = {"best_metric": worst, "best_epoch": -1, "bad_epochs": 0, "stopped_early": False}
        self.plateau = isinstance(task.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        self.writer = None

    def run(self) -> dict:
        """Train (resuming from ``last.pt`` when asked and present); returns the selection state:
        ``best_metric``, ``best_epoch`` (-1: no dev metrics), ``bad_epochs``, ``stopped_early``."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        start = self._resume() if self.resume and (self.run_dir / CHECKPOINT).is_file() else self._fresh()
        self.dist.barrier()
        self.writer = tensorboard_writer(self.run_dir) if self.tensorboard else None
        bar = tqdm(range(start, self.settings.epochs), desc="train", unit="epoch", dynamic_ncols=True,
                   disable=not (self.progress and self.task.epoch_bar))
        try:
            for epoch in bar:
                if self.state["stopped_early"]:
                    break
                self._epoch(epoch, bar)
        finally:
            bar.close()
            if self.writer is not None:
                self.writer.close()
        if self.state["best_epoch"] < 0 and self.dist.is_main:  # no dev metrics: the last epoch's model
            self.task.save_best(self.run_dir / BEST)
        return dict(self.state)

    # -- resuming
    def _fresh(self) -> int:
        if self.dist.is_main and (self.run_dir / METRICS).exists():
            (self.run_dir / METRICS).unlink()
        return 0

    def _resume(self) -> int:
        task, path = self.task, self.run_dir / CHECKPOINT
        ckpt = load_checkpoint(path, self.device)
        check_resume_config(self.run_dir, ckpt.get("config"), self.config_record)
        task.restore(ckpt, str(path))
        task.optimizer.load_state_dict(ckpt["optimizer"])
        task.scheduler.load_state_dict(ckpt["scheduler"])
        if task.scaler is not None and ckpt.get("scaler"):
            task.scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["torch_rng"].cpu())
        if self.device.type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"].cpu(), self.device)
        self.state = {k: ckpt[k] for k in self.state}
        if self.dist.is_main:
            truncate_metrics(self.run_dir, ckpt["epoch"])
        self.log(f"resuming after epoch {ckpt['epoch']}")
        return ckpt["epoch"] + 1

    # -- one epoch
    def _epoch(self, epoch: int, bar) -> None:
        task = self.task
        t0 = time.time()
        batches = task.batches(epoch)
        losses = self._steps(epoch, batches)
        record = {"epoch": epoch, "train_loss": float(np.mean(losses)), "lr": task.optimizer.param_groups[0]["lr"],
                  **task.train_record(batches, time.time() - t0)}
        record.update(task.evaluate())
        if "dev" in record and self.settings.select_metric:
            self._select(epoch, record["dev"])
        record["epoch_seconds"] = time.time() - t0  # optimisation + dev evaluation (training time across resumes)
        task.report(record, bar)
        if self.dist.is_main:
            self._log(record)
            self._checkpoint(epoch)
        self.dist.barrier()

    def _steps(self, epoch: int, batches: Sequence) -> list[float]:
        task, accum, n = self.task, self.settings.grad_accum_steps, len(batches)
        task.model.train()
        task.optimizer.zero_grad(set_to_none=True)
        losses = []
        steps = tqdm(batches, total=n, desc=f"epoch {epoch}", unit="batch", leave=False, dynamic_ncols=True,
                     disable=not self.progress or n < 20)
        for step, batch in enumerate(steps, 1):
            loss = task.loss(batch, epoch, step)
            value = float(loss.item())
            if not math.isfinite(value):
                last = f"{CHECKPOINT} holds epoch {epoch - 1}" if epoch > 0 else "no epoch finished"
                raise NumericError(f"{task.loss_name} loss is {value} at epoch {epoch}, batch {step} (lr "
                                   f"{task.optimizer.param_groups[0]['lr']:.3g}); stopped, {last}. {task.nan_advice}")
            # accumulation averages gradients of micro-batches; each keeps its own in-batch negatives
            scaled = loss / accum
            (task.scaler.scale(scaled) if task.scaler is not None else scaled).backward()
            losses.append(value)
            steps.set_postfix(loss=f"{value:.3f}", refresh=False)
            if step % accum == 0 or step == n:
                self._update()
        return losses

    def _update(self) -> None:
        task, scaler = self.task, self.task.scaler
        self.dist.average_gradients(task.params)
        if scaler is not None:
            scaler.unscale_(task.optimizer)
        if self.settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(task.params, self.settings.grad_clip)
        if scaler is not None:
            scaler.step(task.optimizer)
            scaler.update()
        else:
            task.optimizer.step()
        task.optimizer.zero_grad(set_to_none=True)
        if not self.plateau:
            task.scheduler.step()
        task.after_update()

    def _select(self, epoch: int, dev: dict) -> None:
        """Early stopping and ``best/`` on the dev score (and the plateau schedule's step)."""
        metric, state = self.settings.select_metric, self.state
        score = dev[metric]
        if not math.isfinite(score):
            raise NumericError(f"dev {metric} is {score} at epoch {epoch}; not saved as best")
        if self.plateau:
            self.task.scheduler.step(score)
        best = state["best_metric"]
        if score > best if self.settings.select_direction == "max" else score < best:
            state.update(best_metric=score, best_epoch=epoch, bad_epochs=0)
            if self.dist.is_main:
                self.task.save_best(self.run_dir / BEST)
        else:
            state["bad_epochs"] += 1
            if self.settings.patience and state["bad_epochs"] >= self.settings.patience:
                state["stopped_early"] = True

    # -- writing
    def _log(self, record: dict) -> None:
        self.task.append_record(self.run_dir, record)
        if self.writer is None:
            return
        step = record["epoch"]
        for key in ("train_loss", "lr", "temperature"):
            if key in record:
                self.writer.add_scalar(key, record[key], step)
        for split, metrics in record.items():  # dev and any other evaluated split
            if isinstance(metrics, dict):
                for key, value in metrics.items():
                    if isinstance(value, numbers.Real):
                        self.writer.add_scalar(f"{split}/{key}", value, step)
        self.writer.flush()

    def _checkpoint(self, epoch: int) -> None:
        task = self.task
        ckpt = {"epoch": epoch, **task.state(), "optimizer": task.optimizer.state_dict(),
                "scheduler": task.scheduler.state_dict(),
                "scaler": task.scaler.state_dict() if task.scaler is not None else None,
                "torch_rng": torch.get_rng_state(), "config": self.config_record, **self.state}
        if self.device.type == "cuda":
            ckpt["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        task.save_checkpoint(epoch, self.run_dir / CHECKPOINT, ckpt)
