"""Progress that reaches a log file: lines inside each epoch and one per epoch when there is no progress bar."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from typing_extensions import override

from kd_lightning.engine.errors import ConfigError

#: The metrics an epoch line shows by default, when logged.
SHOWN = ("train/loss", "val/acc", "val/agreement")


def duration(seconds: float) -> str:
    """``42 s``, ``12 min``, ``3 h 05 min``: a remaining time as a person reads it."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60:02d} min"


def batch_rows(batch: Any) -> int | None:
    """Rows of the first tensor in ``batch`` (a tensor, or a tuple / list / dict holding tensors)."""
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.dim() else None
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    return next((rows for rows in map(batch_rows, items) if rows is not None), None)


class EpochLines(L.Callback):
    """Progress as plain lines, on global rank 0, when the run has no progress bar: kd_lightning turns the
    bar off when stdout is not a terminal (a log file, CI, a SLURM job's output), where a bar prints only at
    the end. With a terminal (a bar) it prints nothing.

    - Inside an epoch, at most every ``interval_s`` seconds (none when ``interval_s`` is 0 or the epoch ends
      first)::

          distill epoch 3/80  step 120/400  2,345 samples/s  epoch ETA 12 s  run ETA 21 min

      ``step`` counts the epoch's training batches; samples/s is measured since the epoch started; the run's
      ETA covers the epochs (or ``trainer.max_steps``) still to come at the same rate, validation excluded.
    - Once per training epoch::

          distill epoch 3/80  train/loss 1.2345  val/acc 0.7120  val/agreement 0.8010  1.4 s

      printed when the next epoch starts (or training ends), because the epoch's training loss is logged
      after the callbacks' ``on_train_epoch_end``.

    ``label`` names the fit (``distill``, ``teacher``, ``scratch``, ``llm``); ``shown``: the metrics of the
    epoch line, when logged. The per-step cost is one clock read.
    """

    def __init__(self, label: str = "", interval_s: float = 30.0, shown: Sequence[str] = SHOWN) -> None:
        if not (isinstance(interval_s, (int, float)) and math.isfinite(interval_s) and interval_s >= 0):
            raise ConfigError(
                f"callbacks.epoch_lines.interval_s={interval_s!r}: use seconds >= 0 (0 turns the in-epoch lines off)"
            )
        self.label = label
        self.interval_s = float(interval_s)
        self.shown = tuple(shown)
        self._started: float | None = None
        self._epoch: int | None = None
        self._next_line = math.inf

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush(trainer)
        self._started, self._epoch = time.perf_counter(), trainer.current_epoch
        quiet = trainer.progress_bar_callback is not None or not trainer.is_global_zero or not self.interval_s
        self._next_line = math.inf if quiet else self._started + self.interval_s

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if now >= self._next_line:
            self._next_line = now + self.interval_s
            self._step_line(trainer, batch, batch_idx + 1, now - (self._started or now))

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush(trainer)

    def _prefix(self, trainer: L.Trainer, epoch: int) -> str:
        epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else "?"
        return f"{self.label} epoch {epoch + 1}/{epochs}".strip()

    def _step_line(self, trainer: L.Trainer, batch: Any, done: int, elapsed: float) -> None:
        total = trainer.num_training_batches
        rate = done / max(elapsed, 1e-9)  # batches per second
        rows = batch_rows(batch)
        samples = f"{rate * rows:,.0f} samples/s" if rows else f"{rate:.2f} batches/s"
        parts = [self._prefix(trainer, trainer.current_epoch)]
        if math.isfinite(total):
            epoch_left, run_left = total - done, self._run_batches_left(trainer, int(total), done)
            if run_left is not None:  # max_steps may end the epoch early
                epoch_left = min(epoch_left, run_left)
            parts += [f"step {done}/{int(total)}", samples, f"epoch ETA {duration(epoch_left / rate)}"]
            if run_left is not None:
                parts.append(f"run ETA {duration(run_left / rate)}")
        else:
            parts += [f"step {done}", samples]
        print("  ".join(parts), flush=True)

    @staticmethod
    def _run_batches_left(trainer: L.Trainer, per_epoch: int, done: int) -> int | None:
        """Training batches left in the run (None when neither max_epochs nor max_steps bounds it)."""
        bounds = []
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            bounds.append((trainer.max_epochs - trainer.current_epoch - 1) * per_epoch + per_epoch - done)
        if trainer.max_steps is not None and trainer.max_steps > 0:
            bounds.append((trainer.max_steps - trainer.global_step) * trainer.accumulate_grad_batches)
        return max(min(bounds), 0) if bounds else None

    @rank_zero_only
    def _flush(self, trainer: L.Trainer) -> None:
        if self._epoch is None or self._started is None or trainer.progress_bar_callback is not None:
            return
        metrics = trainer.callback_metrics
        parts = [self._prefix(trainer, self._epoch)]
        parts += [f"{name} {float(metrics[name]):.4f}" for name in self.shown if name in metrics]
        parts.append(f"{time.perf_counter() - self._started:.1f} s")
        print("  ".join(parts), flush=True)
        self._epoch = None
