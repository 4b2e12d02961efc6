"""Schedules of loss hyper-parameters (alpha, temperature), applied at each training epoch start."""

from __future__ import annotations

import lightning as L
from typing_extensions import override

from kd_lightning.errors import ConfigError
from kd_lightning.module import DistillationModule


class LossSchedule(L.Callback):
    """Sets ``pl_module.loss.<attribute>`` from :meth:`value_at` at every training epoch start.

    Subclasses implement ``value_at(epoch, target)`` where ``target`` is the configured value
    (read once when fitting starts). The value is a function of the epoch only, so a resumed run
    continues the schedule where it stopped.
    """

    attribute: str

    def __init__(self) -> None:
        self._target: float | None = None

    def value_at(self, epoch: int, target: float) -> float:
        raise NotImplementedError

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, DistillationModule):
            raise TypeError(f"{type(self).__name__} needs a DistillationModule")
        self._target = getattr(pl_module.loss, self.attribute)

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = self.value_at(trainer.current_epoch, self._target)
        setattr(pl_module.loss, self.attribute, value)
        pl_module.log(f"schedule/{self.attribute}", value, on_step=False, on_epoch=True)


class AlphaWarmup(LossSchedule):
    """Linear warm-up of the distillation weight: ``alpha_e = alpha * min(1, (e + 1) / epochs)``.

    As in DKD (Zhao et al., CVPR 2022), which warms its distillation terms up over 20 epochs so
    the early, poorly-fit student is not dominated by the teacher's targets.
    """

    attribute = "alpha"

    def __init__(self, epochs: int = 5) -> None:
        super().__init__()
        if epochs < 1:
            raise ConfigError(f"callbacks.alpha_warmup.epochs={epochs} must be >= 1")
        self.epochs = epochs

    def value_at(self, epoch: int, target: float) -> float:
        return target * min(1.0, (epoch + 1) / self.epochs)


class TemperatureAnneal(LossSchedule):
    """Linear temperature annealing from ``start`` to the configured ``T`` over ``epochs`` epochs:
    ``T_e = start + (T - start) * min(1, e / epochs)``."""

    attribute = "temperature"

    def __init__(self, start: float = 8.0, epochs: int = 10) -> None:
        super().__init__()
        if start <= 0 or epochs < 1:
            raise ConfigError(f"callbacks.temperature_anneal needs start > 0 and epochs >= 1 (got {start}, {epochs})")
        self.start = start
        self.epochs = epochs

    def value_at(self, epoch: int, target: float) -> float:
        return self.start + (target - self.start) * min(1.0, epoch / self.epochs)
