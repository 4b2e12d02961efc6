"""Callbacks the tests add from the command line (``+callbacks.<name>._target_=tests.custom_callbacks...``)."""

from __future__ import annotations

import os
import signal

import lightning as L


class KillAtEpoch(L.Callback):
    """SIGKILLs its own process when training epoch ``epoch`` starts: a crash with no clean-up at all."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


class FailInRunDir(L.Callback):
    """Raises when training epoch ``epoch`` starts in a run directory named ``run_dir`` (one stage of a
    multi-stage run): a crash part-way through a chain."""

    def __init__(self, run_dir: str, epoch: int) -> None:
        self.run_dir, self.epoch = run_dir, epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if os.path.basename(trainer.default_root_dir) == self.run_dir and trainer.current_epoch == self.epoch:
            raise RuntimeError(f"simulated crash in {self.run_dir} at epoch {self.epoch}")
