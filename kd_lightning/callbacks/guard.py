"""A guard that fails loudly when the teacher stops being frozen."""

from __future__ import annotations

import lightning as L
from typing_extensions import override

from kd_lightning.module import DistillationModule


class FrozenTeacherGuard(L.Callback):
    """Raises if the teacher is in train mode, has trainable parameters, or reached the optimizer.

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
        if not isinstance(pl_module, DistillationModule) or pl_module.teacher is None:
            return
        teacher = pl_module.teacher
        in_train_mode = [name or "<root>" for name, m in teacher.named_modules() if m.training]
        if in_train_mode:
            raise RuntimeError(f"teacher modules in train mode when {when}: {in_train_mode[:5]}")
        trainable = [name for name, p in teacher.named_parameters() if p.requires_grad]
        if trainable:
            raise RuntimeError(f"teacher parameters require grad when {when}: {trainable[:5]}")
        teacher_params = {id(p) for p in teacher.parameters()}
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                if any(id(p) in teacher_params for p in group["params"]):
                    raise RuntimeError(f"teacher parameters are in the optimizer when {when}")
