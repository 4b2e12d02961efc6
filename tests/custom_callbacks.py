"""Callbacks the tests add from the command line (``+callbacks.<name>._target_=tests.custom_callbacks...``)."""

from __future__ import annotations

import json
import os
import signal

import lightning as L
import torch


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


class RecordLoss(L.Callback):
    """Appends to the JSON-lines file ``path``, at every training epoch start of a method with a loss, the run
    directory's name, the epoch, ``loss.alpha`` and ``loss.weights``; and at fit start the student's weights to
    ``<path>.<run directory name>.pt`` (what each stage of a multi-stage run starts from)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if hasattr(pl_module, "loss"):
            name = os.path.basename(trainer.default_root_dir)
            weights = {key: value.detach().clone() for key, value in pl_module.student.state_dict().items()}
            torch.save(weights, f"{self.path}.{name}.pt")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loss = getattr(pl_module, "loss", None)
        if loss is not None and hasattr(loss, "weights"):
            row = [os.path.basename(trainer.default_root_dir), trainer.current_epoch, loss.alpha, dict(loss.weights)]
            with open(self.path, "a") as file:
                file.write(json.dumps(row) + "\n")
