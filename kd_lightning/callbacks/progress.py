"""Progress that reaches a log file: one line per epoch when there is no progress bar."""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

#: The metrics an epoch line shows, when logged.
SHOWN = ("train/loss", "val/acc", "val/agreement")


class EpochLines(L.Callback):
    """Prints ``distill epoch 3/80  train/loss 1.2345  val/acc 0.7120  val/agreement 0.8010  1.4 s`` once per
    training epoch, on global rank 0, when the run has no progress bar: kd_lightning turns the bar off when
    stdout is not a terminal (a log file, CI, a SLURM job's output), where a bar prints only at the end.

    An epoch's line is printed when the next epoch starts (or training ends), because the epoch's training
    loss is logged after the callbacks' ``on_train_epoch_end``. ``label`` names the fit (``distill``,
    ``teacher``, ``scratch``)."""

    def __init__(self, label: str = "") -> None:
        self.label = label
        self._started: float | None = None
        self._epoch: int | None = None

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush(trainer)
        self._started, self._epoch = time.perf_counter(), trainer.current_epoch

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush(trainer)

    @rank_zero_only
    def _flush(self, trainer: L.Trainer) -> None:
        if self._epoch is None or self._started is None or trainer.progress_bar_callback is not None:
            return
        metrics = trainer.callback_metrics
        parts = [f"{self.label} epoch {self._epoch + 1}/{trainer.max_epochs}".strip()]
        parts += [f"{name} {float(metrics[name]):.4f}" for name in SHOWN if name in metrics]
        parts.append(f"{time.perf_counter() - self._started:.1f} s")
        print("  ".join(parts), flush=True)
        self._epoch = None
