"""Lightning callbacks: loss schedules, quantization-aware distillation, the frozen-teacher guard, epoch lines
for log files, checkpoints."""

from kd_lightning.callbacks.checkpoint import ModelCheckpoint
from kd_lightning.callbacks.guard import ChanceTeacherWarning, FrozenTeacherGuard
from kd_lightning.callbacks.progress import EpochLines
from kd_lightning.callbacks.qat import QuantizationAware
from kd_lightning.callbacks.schedules import AlphaWarmup, LossSchedule, TemperatureAnneal, TermWarmup

__all__ = [
    "AlphaWarmup",
    "ChanceTeacherWarning",
    "EpochLines",
    "FrozenTeacherGuard",
    "LossSchedule",
    "ModelCheckpoint",
    "QuantizationAware",
    "TemperatureAnneal",
    "TermWarmup",
]
