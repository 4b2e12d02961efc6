"""Schedules of loss hyper-parameters (alpha, temperature), applied at each training epoch start."""

from __future__ import annotations

import lightning as L
from typing_extensions import override

from kd_lightning.engine.errors import ConfigError
from kd_lightning.losses import DistillationLoss


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
        if not isinstance(getattr(pl_module, "loss", None), DistillationLoss):
            raise ConfigError(
                f"{type(self).__name__} schedules a DistillationLoss; this method has none (method=kd has)"
            )
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


class TermWarmup(L.Callback):
    """Linear warm-up of every distillation term's weight, the task term left as it is:
    ``w_e = w * min(1, (e + 1) / epochs)``. The published warm-up of DKD (Zhao et al., CVPR 2022) and ReviewKD
    (Chen et al., CVPR 2021): their loss is ``CE + min(1, epoch / 20) * L_kd`` with the cross-entropy's weight
    fixed (:class:`AlphaWarmup`, which ramps ``loss.alpha``, also lowers the cross-entropy's weight from 1 to
    ``1 - alpha``). A function of the epoch, so a resumed run continues the ramp.
    """

    def __init__(self, epochs: int = 20) -> None:
        if epochs < 1:
            raise ConfigError(f"callbacks.term_warmup.epochs={epochs} must be >= 1")
        self.epochs = epochs
        self._configured: dict[str, float] | None = None

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loss = getattr(pl_module, "loss", None)
        if not isinstance(loss, DistillationLoss):
            raise ConfigError("TermWarmup schedules a DistillationLoss's term weights; this method has none")
        self._configured = dict(loss.weights)

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ramp = min(1.0, (trainer.current_epoch + 1) / self.epochs)
        pl_module.loss.weights = {name: weight * ramp for name, weight in self._configured.items()}
        pl_module.log("schedule/term_warmup", ramp, on_step=False, on_epoch=True)


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
