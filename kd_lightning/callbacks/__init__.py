"""Lightning callbacks: loss schedules, the frozen-teacher guard, epoch lines for log files, checkpoints."""

from kd_lightning.callbacks.checkpoint import ModelCheckpoint
from kd_lightning.callbacks.guard import ChanceTeacherWarning, FrozenTeacherGuard
from kd_lightning.callbacks.progress import EpochLines
from kd_lightning.callbacks.schedules import AlphaWarmup, HintPreStage, LossSchedule, TemperatureAnneal, TermWarmup

__all__ = [
    "AlphaWarmup",
    "ChanceTeacherWarning",
    "EpochLines",
    "FrozenTeacherGuard",
    "HintPreStage",
    "LossSchedule",
    "ModelCheckpoint",
    "TemperatureAnneal",
    "TermWarmup",
]
