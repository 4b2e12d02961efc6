"""How the models run: teacher precision, memory format, compilation, validation-output reuse, threads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kd_lightning.engine.errors import ConfigError, check_type
from kd_lightning.engine.nonfinite import check_nonfinite_settings
from kd_lightning.engine.threads import CpuThreads, check_cpu_threads

TEACHER_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_TARGETS = ("teacher", "student", "both")


@dataclass
class Runtime:
    """Execution options of a run (``conf/runtime/``); the teacher cache is ``conf/teacher_cache/``.

    Args:
        teacher_precision: ``bf16`` / ``fp16`` runs the teacher alone under autocast (its outputs are
            cast back to float32 for the loss); ``null`` runs it like the student.
        channels_last: put both models and 4-D inputs in channels-last memory format (conv nets).
        compile: ``teacher`` / ``student`` / ``both``: ``torch.compile`` those forwards (``null``: off).
        reuse_val_teacher_outputs: compute the teacher's validation outputs once and reuse them every
            epoch, when the datamodule declares ``random_augmentation = False``.
        cpu_threads: torch's CPU threads for this run: ``auto`` (one for small models, else the usable
            cores; :mod:`kd_lightning.engine.threads`), a number, or ``null`` (torch's default).
        nonfinite: ``error`` stops the run at the first non-finite training loss, naming the step and
            the parts; ``skip`` skips such steps with a warning and counts them (``train/nonfinite_steps``).
        nonfinite_check_every: how often ``error`` mode reads its check on the host: ``auto`` (every step
            on the CPU, every 100 on accelerators, where each read stalls the device) or a number of steps;
            also before validation, checkpoints and at epoch end (:mod:`kd_lightning.engine.nonfinite`).
            ``skip`` decides every step, so it reads every step.
    """

    teacher_precision: str | None = None
    channels_last: bool = False
    compile: str | None = None
    reuse_val_teacher_outputs: bool = True
    cpu_threads: CpuThreads = "auto"
    nonfinite: str = "error"
    nonfinite_check_every: int | str = "auto"

    def __post_init__(self) -> None:
        for name in ("channels_last", "reuse_val_teacher_outputs"):
            check_type(getattr(self, name), bool, f"runtime.{name}")
        check_cpu_threads(self.cpu_threads, "runtime.cpu_threads")
        check_nonfinite_settings(self.nonfinite, self.nonfinite_check_every, "runtime")
        if self.teacher_precision is not None and self.teacher_precision not in TEACHER_DTYPES:
            raise ConfigError(
                f"runtime.teacher_precision={self.teacher_precision!r}: use one of {sorted(TEACHER_DTYPES)} or null"
            )
        if self.compile is not None and self.compile not in COMPILE_TARGETS:
            raise ConfigError(f"runtime.compile={self.compile!r}: use one of {list(COMPILE_TARGETS)} or null")

    def compiles(self, model: str) -> bool:
        return self.compile in (model, "both")
