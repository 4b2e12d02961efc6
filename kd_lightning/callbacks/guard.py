"""A guard that fails loudly when a teacher (any frozen model of a method) stops being frozen."""

from __future__ import annotations

import lightning as L
from typing_extensions import override

from kd_lightning.methods.base import HasFrozenModels


class FrozenTeacherGuard(L.Callback):
    """Raises if a frozen model (a teacher) is in train mode, has trainable parameters, or reached the
    optimizer; checks every model of :meth:`~kd_lightning.methods.base.Method.frozen_models`.

    Checked when training starts, at every training epoch start and after every validation loop
    (where a stray ``model.train()`` would otherwise switch BatchNorm/Dropout silently).
    """

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, pl_module, "training starts")

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, pl_module, f"epoch {trainer.current_epoch} starts")

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, pl_module, "validation ends")

    @staticmethod
    def _check(trainer: L.Trainer, pl_module: L.LightningModule, when: str) -> None:
        if not isinstance(pl_module, HasFrozenModels):
            return
        for name, model in pl_module.frozen_models().items():
            in_train_mode = [path or "<root>" for path, m in model.named_modules() if m.training]
            if in_train_mode:
                raise RuntimeError(f"{name} modules in train mode when {when}: {in_train_mode[:5]}")
            trainable = [path for path, p in model.named_parameters() if p.requires_grad]
            if trainable:
                raise RuntimeError(f"{name} parameters require grad when {when}: {trainable[:5]}")
            frozen = {id(p) for p in model.parameters()}
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    if any(id(p) in frozen for p in group["params"]):
                        raise RuntimeError(f"{name} parameters are in the optimizer when {when}")
