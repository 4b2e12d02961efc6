"""``method=foundation_distill``: label-free feature distillation from a frozen foundation model, then a linear probe
or a fine-tune of the student on the labelled data."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from omegaconf import DictConfig
from torch import nn

from kd_lightning.engine.errors import ConfigError
from kd_lightning.engine.runtime import Runtime
from kd_lightning.engine.taps import find_module
from kd_lightning.losses import DistillationLoss
from kd_lightning.losses.foundation import FoundationFeatures
from kd_lightning.methods.base import OptimizerFactory, SchedulerFactory
from kd_lightning.methods.kd import DistillationModule
from kd_lightning.methods.stages import MultiStageMethod, Stage, frozen_from, method_of
from kd_lightning.methods.supervised import Supervised
from kd_lightning.teacher import Teacher

PROBES = ("linear", "finetune")


class FeatureDistillation(DistillationModule):
    r"""Distils the teachers' features into the student with ``distillation`` (this method's own
    :class:`~kd_lightning.losses.DistillationLoss`, e.g. :class:`~kd_lightning.losses.foundation.FoundationFeatures`);
    with ``distillation.alpha = 1`` no label is read (:math:`L = \sum_i w_i L_i`), so the student learns from
    unlabelled images. Teachers run live (their features are not cached)."""

    caches_teacher_outputs = False

    def __init__(
        self,
        student: nn.Module,
        distillation: DistillationLoss,
        optimizer: OptimizerFactory,
        num_classes: int,
        teachers: Mapping[str, nn.Module | Teacher] | None = None,
        scheduler: SchedulerFactory | None = None,
        save_teacher: bool = False,
        scale_lr_with_world_size: bool = False,
        runtime: Runtime | None = None,
    ) -> None:
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

    @classmethod
    def check_options(cls, options: Mapping[str, object], models: Mapping[str, nn.Module]) -> None:
        """Before any teacher is trained: the layers ``method.distillation`` reads exist."""
        super().check_options(options, models)
        distillation = options.get("distillation")
        if isinstance(distillation, DistillationLoss):
            try:
                cls.check_config(distillation, models, False)
            except ConfigError as error:  # the terms are configured under the method, not `loss`
                raise ConfigError(str(error).replace("loss.terms.", "method.distil.distillation.terms.")) from None

    @classmethod
    def check_config(cls, loss: nn.Module | None, models: Mapping[str, nn.Module], cached_teachers: bool) -> None:
        """Checks ``method.distillation`` when the method is built; the run's ``loss`` (not used) is left alone."""
        if isinstance(loss, DistillationLoss) and any(isinstance(t, FoundationFeatures) for t in loss.terms.values()):
            super().check_config(loss, models, cached_teachers)

    @classmethod
    def metric_names(cls, loss: nn.Module | None, teachers: Sequence[str]) -> set[str]:
        return super().metric_names(None, teachers)


class Probe(Supervised):
    r"""Supervised training of a student that starts from the weights of the frozen model ``teachers['backbone']``
    (an earlier stage's student, same architecture): ``probe: linear`` trains only the classifier ``head`` (a dotted
    module path) on the frozen backbone, kept in eval mode (a linear probe); ``finetune`` trains every weight.
    :math:`L = \mathrm{CE}(z_s, y)` over the labelled samples."""

    teacher_range = (1, 1)

    def __init__(
        self,
        student: nn.Module,
        num_classes: int,
        optimizer: OptimizerFactory,
        teachers: Mapping[str, nn.Module | Teacher],
        probe: str = "linear",
        head: str = "head",
        scheduler: SchedulerFactory | None = None,
        label_smoothing: float = 0.0,
        scale_lr_with_world_size: bool = False,
        runtime: Runtime | None = None,
    ) -> None:
        type(self).check_options({"probe": probe}, {})
        backbone = teachers["backbone"]
        backbone = backbone.model if isinstance(backbone, Teacher) else backbone
        student.load_state_dict(backbone.state_dict())
        self.probe, self.head_path = probe, head
        head_module = find_module(student, head, "method.probe.head")
        if probe == "linear":
            student.requires_grad_(False)
            head_module.requires_grad_(True)
        super().__init__(student, num_classes, optimizer, scheduler, label_smoothing, scale_lr_with_world_size, runtime)

    @classmethod
    def check_options(cls, options: Mapping[str, object], models: Mapping[str, nn.Module]) -> None:
        probe = options.get("probe", "linear")
        if probe not in PROBES:
            raise ConfigError(f"method.probe.probe={probe!r} must be one of {list(PROBES)}")
        super().check_options(options, models)
        if "student" in models:
            find_module(models["student"], str(options.get("head", "head")), "method.probe.head")

    def train(self, mode: bool = True) -> Probe:
        """A linear probe keeps the backbone in eval mode (its BatchNorm statistics frozen), the head trains."""
        super().train(mode)
        if self.probe == "linear" and mode:
            self.student.eval()
            find_module(self.student, self.head_path, "method.probe.head").train()
        return self


class FoundationDistillThenProbe(MultiStageMethod):
    """Two stages: ``features`` distils the teacher's features into the student without labels (``distil``, a
    :class:`FeatureDistillation` config), then ``probe`` trains the student from that stage's best checkpoint on the
    labelled data (``probe``, a :class:`Probe` config: linear probe or fine-tune). The summary's test accuracy is the
    probed student's."""

    def __init__(self, distil: DictConfig, probe: DictConfig) -> None:
        self.distil = method_of(distil, "distil")
        self.probe = method_of(probe, "probe")

    def stages(self, cfg: DictConfig) -> list[Stage]:
        student = cfg.student.model
        distil = self.distil.copy()
        distil.teachers = {"teacher": cfg.teacher}
        probe = self.probe.copy()
        probe.teachers = {"backbone": frozen_from(student)}
        return [Stage("features", distil, student), Stage("probe", probe, student, {"backbone": "features"})]
