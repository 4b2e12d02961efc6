"""Lightning callbacks: loss schedules and the frozen-teacher guard."""

from kd_lightning.callbacks.guard import FrozenTeacherGuard
from kd_lightning.callbacks.schedules import AlphaWarmup, LossSchedule, TemperatureAnneal

__all__ = ["AlphaWarmup", "FrozenTeacherGuard", "LossSchedule", "TemperatureAnneal"]
