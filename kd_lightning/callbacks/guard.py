"""Guards of the teacher: it fails loudly when a teacher (any frozen model of a method) stops being frozen, and
warns when a teacher guesses on the validation split."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
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


#: A teacher's validation accuracy at most this far above 1/K (K classes) counts as guessing.
CHANCE_MARGIN = 0.05


class ChanceTeacherWarning(L.Callback):
    """Warns once, after the first validation of a fit, when the teacher's validation accuracy
    (``teacher/val_acc``) is no better than guessing (at most ``1/K + CHANCE_MARGIN`` for K classes): a
    teacher that does not fit the data teaches the student noise. The warning names the usual causes: its
    classes numbered in another order than the data's, another input than it was trained on, untrained weights.
    """

    def __init__(self) -> None:
        self.warned = False

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.warned or "teacher/val_acc" not in trainer.callback_metrics:
            return
        classes = getattr(getattr(pl_module, "teacher_val_acc", None), "num_classes", None)
        accuracy = float(trainer.callback_metrics["teacher/val_acc"])
        self.warned = True
        if classes and classes > 1 and accuracy <= 1 / classes + CHANCE_MARGIN:
            rank_zero_warn(
                f"teacher/val_acc={accuracy:.3f} is chance level for {classes} classes: the teacher does not fit "
                "this data. Check that its classes are numbered as the data's (a Hugging Face id2label, a "
                "checkpoint trained on another label order), that it reads the input it was trained on "
                "(teacher.input: normalisation, size, tokenizer), and that its weights are trained "
                "(teacher.checkpoint)"
            )
