"""``method=supervised``: the student alone, on the labelled data (``kd-train``, scratch baselines)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from kd_lightning.engine.batches import batch_size
from kd_lightning.engine.errors import ConfigError, check_type
from kd_lightning.engine.runtime import Runtime
from kd_lightning.losses import masked_cross_entropy
from kd_lightning.methods.base import OptimizerFactory, SchedulerFactory
from kd_lightning.methods.classifier import Batch, ClassifierMethod, unpack


class Supervised(ClassifierMethod):
    r"""Plain supervised training: :math:`L = \mathrm{CE}_{\epsilon}(z_s, y)` over the labelled samples,
    :math:`\epsilon` the label smoothing. No teacher; unlabelled samples are left out of the data.
    Logs ``train/loss``, ``train/loss_ce``, ``val/acc``, ``val/acc_best``, ``test/acc``."""

    def __init__(
        self,
        student: nn.Module,
        num_classes: int,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        label_smoothing: float = 0.0,
        scale_lr_with_world_size: bool = False,
        runtime: Runtime | None = None,
    ) -> None:
        super().__init__(student, num_classes, optimizer, scheduler, scale_lr_with_world_size, runtime=runtime)
        type(self).check_options({"label_smoothing": label_smoothing}, {})
        self.label_smoothing = float(label_smoothing)
        self.apply_runtime([("student", student)])

    @classmethod
    def check_options(cls, options: Mapping[str, Any], models: Mapping[str, nn.Module]) -> None:
        """``method.label_smoothing``: a number in [0, 1)."""
        smoothing = options.get("label_smoothing", 0.0)
        check_type(smoothing, (int, float), "method.label_smoothing")
        if not 0.0 <= smoothing < 1.0:
            raise ConfigError(f"method.label_smoothing={smoothing} must be in [0, 1); 0 disables it")

    @classmethod
    def metric_names(cls, loss: nn.Module | None, teachers: Sequence[str]) -> set[str]:
        return super().metric_names(loss, teachers) | {"train/loss_ce"}

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        x, y, _ = unpack(batch)
        logits = self.student(self.formatted(x))
        ce = masked_cross_entropy(logits, y, self.label_smoothing, self.mean_label_count(y))
        if not self.finite_step(ce, {"ce": ce}, {"student": {"logits": logits}}):
            return None  # skipped (runtime.nonfinite=skip)
        self.record_losses(ce, {"ce": ce}, batch_size(x))
        return ce

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        x, y, _ = unpack(batch)
        self.log_student_val(self.student(self.formatted(x)), y)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        x, y, _ = unpack(batch)
        self.log_student_test(self.student(self.formatted(x)), y)
