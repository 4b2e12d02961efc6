"""Lightning's ModelCheckpoint with a ``last.ckpt`` that is the last epoch's, and a monitored metric at the
checkpoint of a run that ``trainer.max_steps`` ends inside an epoch."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint


class ModelCheckpoint(LightningModelCheckpoint):
    """:class:`lightning.pytorch.callbacks.ModelCheckpoint` whose ``last.ckpt`` (``save_last=True``) is
    written at every save point (each epoch's end, or each validation), as resuming with
    ``ckpt_path=last`` assumes.

    Lightning 2.5+ refreshes ``last.ckpt`` only when a top-k checkpoint is saved at the same step, so with a
    monitored metric that stopped improving it keeps an older epoch: a crash then resumes from the last
    improvement and repeats the epochs after it, and anything reading ``last.ckpt`` gets old weights.

    A run that ``trainer.max_steps`` ends inside an epoch would save its final checkpoint at the epoch's end
    without validating first (Lightning validates at the end of an epoch's batches), so the monitored metric
    (``val/loss``) is missing there and Lightning warns. The step that reaches ``max_steps`` asks the trainer to
    stop (``trainer.should_stop``), which makes Lightning validate after that step, as an early stop does:
    the checkpoint saved at the end then holds the final validation's metric.
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        if 0 < trainer.max_steps <= trainer.global_step and self.monitor is not None:
            trainer.should_stop = True  # validate after this last step, before the checkpoint at the end

    def _save_last_if_not_saved(self, trainer: L.Trainer) -> None:
        skip = not self.save_last or self._should_skip_saving_checkpoint(trainer)
        if not skip and self._last_global_step_saved != trainer.global_step:  # nothing saved at this step yet
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_not_saved(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_not_saved(trainer)
