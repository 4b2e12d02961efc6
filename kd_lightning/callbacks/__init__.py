"""Lightning callbacks: loss schedules and the frozen-teacher guard."""

from kd_lightning.callbacks.guard import FrozenTeacherGuard
from kd_lightning.callbacks.schedules import AlphaWarmup, HintPreStage, LossSchedule, TemperatureAnneal

__all__ = ["AlphaWarmup", "FrozenTeacherGuard", "HintPreStage", "LossSchedule", "TemperatureAnneal"]
