"""``method=deit``: DeiT's distillation token (Touvron et al. 2021), a student with a class and a distillation head."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from kd_lightning.engine.batches import Inputs, to_device
from kd_lightning.engine.errors import ConfigError
from kd_lightning.engine.runtime import Runtime
from kd_lightning.engine.taps import Taps, find_module
from kd_lightning.engine.weights import in_mode
from kd_lightning.losses import DistillationLoss
from kd_lightning.losses.base import TASK_MODEL
from kd_lightning.losses.deit import DeiTDistillation
from kd_lightning.methods.base import OptimizerFactory, SchedulerFactory
from kd_lightning.methods.kd import DistillationModule
from kd_lightning.teacher import Teacher


class DeiTDistillationModule(DistillationModule):
    r"""DeiT's distillation through attention (Touvron et al., "Training data-efficient image transformers &
    distillation through attention", ICML 2021) for a student with two heads: the class token's classifier
    (``cls_head``, a dotted module path) and the distillation token's (read by the
    :class:`~kd_lightning.losses.deit.DeiTDistillation` term of ``distillation``).

    - Training: the task term of ``distillation`` (a :class:`~kd_lightning.losses.DistillationLoss`:
      :math:`(1 - \alpha)\,\mathrm{CE}(z_{cls}, y) + \alpha\,L_{deit}(z_{dist}, z_t)`) reads the **class head**'s
      logits :math:`z_{cls}`, the distillation term the distillation head's :math:`z_{dist}`.
    - Evaluation: the student's own output, which for the models this method takes is the average of the two heads'
      logits, :math:`(z_{cls} + z_{dist}) / 2` (Hugging Face ``DeiTForImageClassificationWithTeacher``; timm's
      ``VisionTransformerDistilled`` in eval mode; the authors' ``DistilledVisionTransformer``).

    The objective is this method's own (``method.distillation``), so ``loss=...`` does not change it.
    """

    def __init__(
        self,
        student: nn.Module,
        distillation: DistillationLoss,
        optimizer: OptimizerFactory,
        num_classes: int,
        cls_head: str = "model.cls_classifier",
        teachers: Mapping[str, nn.Module | Teacher] | None = None,
        scheduler: SchedulerFactory | None = None,
        save_teacher: bool = False,
        scale_lr_with_world_size: bool = False,
        runtime: Runtime | None = None,
    ) -> None:
        if not any(isinstance(term, DeiTDistillation) for term in distillation.terms.values()):
            raise ConfigError(
                "method.distillation.terms must hold a kd_lightning.losses.deit.DeiTDistillation term (the "
                "distillation head against the teacher); see conf/method/deit.yaml"
            )
        super().__init__(
            student,
            distillation,
            optimizer,
            num_classes,
            teachers=teachers,
            scheduler=scheduler,
            save_teacher=save_teacher,
            scale_lr_with_world_size=scale_lr_with_world_size,
            runtime=runtime,
        )
        self.cls_head = cls_head
        self.head_taps = Taps(student, {cls_head: "method.cls_head"})

    @classmethod
    def metric_names(cls, loss: nn.Module | None, teachers: Sequence[str]) -> set[str]:
        return super().metric_names(None, teachers) | {"train/loss_ce", "train/loss_deit"}

    @classmethod
    def check_options(cls, options: Mapping[str, object], models: Mapping[str, nn.Module]) -> None:
        """Before any teacher is trained: ``method.distillation``'s layers and ``method.cls_head`` exist."""
        super().check_options(options, models)
        distillation = options.get("distillation")
        if isinstance(distillation, DistillationLoss):
            try:
                cls.check_config(distillation, models, False)
            except ConfigError as error:  # the terms are configured under the method, not `loss`
                raise ConfigError(str(error).replace("loss.terms.", "method.distillation.terms.")) from None
        if TASK_MODEL in models:
            find_module(models[TASK_MODEL], str(options.get("cls_head", "model.cls_classifier")), "method.cls_head")

    @classmethod
    def check_config(cls, loss: nn.Module | None, models: Mapping[str, nn.Module], cached_teachers: bool) -> None:
        """Checks ``method.distillation`` when the method is built; the run's ``loss`` (not used) is left alone."""
        if isinstance(loss, DistillationLoss) and any(isinstance(t, DeiTDistillation) for t in loss.terms.values()):
            super().check_config(loss, models, cached_teachers)

    def student_outputs(self, x: Inputs) -> dict[str, Tensor]:
        """The student's outputs the loss reads; in training ``logits`` is the class head's (the task term's input),
        in evaluation the model's own output (the two heads averaged)."""
        with self.head_taps.capture() as heads:
            outputs = super().student_outputs(x)
        if self.student.training:
            outputs["logits"] = heads[self.cls_head]
        return outputs

    def setup_for(self, example: Inputs, num_samples: int | None = None) -> None:
        """Also check, on the example batch, that the student's output averages its two heads."""
        if self.needs_setup:
            with in_mode(self.student), torch.no_grad():
                self.check_heads(to_device(example, self.device))
        super().setup_for(example, num_samples)

    def check_heads(self, x: Inputs) -> None:
        """Raise unless the student's output is ``(cls + dist) / 2`` of its two heads."""
        name = next(key for key, term in self.loss.terms.items() if isinstance(term, DeiTDistillation))
        head = self.loss.terms[name].student_read.key
        with self.head_taps.capture() as heads, self.student_taps.capture() as layers:
            logits = self.student(x)
        cls, dist = heads[self.cls_head], layers[head]
        same_shapes = logits.shape == cls.shape == dist.shape
        average = (cls + dist) / 2 if same_shapes else cls
        if not same_shapes or not bool((logits - average).abs().max() <= 1e-4 * (1 + average.abs().max())):
            raise ConfigError(
                f"{TASK_MODEL} output is not the average of method.cls_head={self.cls_head!r} and the distillation "
                f"head {head!r}: method=deit needs a two-head student (e.g. conf/student/deit_tiny.yaml)"
            )
