"""``method=kd``: a trainable student distilled from frozen teachers through a DistillationLoss."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from itertools import islice
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from kd_lightning.data.contract import HasExampleInput, HasTrainSize, is_deterministic
from kd_lightning.engine.batches import Inputs, batch_size, to_device
from kd_lightning.engine.errors import ConfigError
from kd_lightning.engine.runtime import Runtime
from kd_lightning.engine.taps import Taps
from kd_lightning.engine.weights import in_mode
from kd_lightning.losses import DistillationLoss, soft_kl
from kd_lightning.losses.base import TASK_MODEL
from kd_lightning.methods.base import OptimizerFactory, SchedulerFactory
from kd_lightning.methods.classifier import Batch, ClassifierMethod, unpack
from kd_lightning.methods.loss_reads import check_distils, check_loss_reads, check_sample_index
from kd_lightning.teacher import Teacher
from kd_lightning.teacher.outputs import TeacherOutputCache


class DistillationModule(ClassifierMethod):
    r"""Trains ``student`` with ``loss`` against frozen teachers (Hinton et al. 2015 and every loss term).

    :math:`L = (1 - \alpha)\,\mathrm{CE}(z_s, y) + \alpha \sum_i w_i L_i` (see
    :class:`~kd_lightning.losses.DistillationLoss`); each term reads the outputs of models by name:
    ``student`` and the teachers (``teacher`` by default; ``teachers`` may hold more, e.g. ``teacher_1``).

    - Teachers (:class:`~kd_lightning.teacher.Teacher`) are frozen, run under ``inference_mode``, stay
      in eval mode, never reach the optimizer and are left out of checkpoints unless ``save_teacher``.
      A teacher runs only in steps whose loss reads it (never for ``loss.alpha = 0``); with an output
      cache its logits are looked up by sample index instead. The first teacher is the one validation
      compares the student with.
    - Distributed: teachers are replicated on every rank (DDP ignores parameters without gradients),
      epoch-level losses and torchmetrics are synced across ranks.
    - The optimizer gets the student's parameters and any the loss owns (adapters, heads).
    - Terms reading intermediate layers (or layer inputs) get them through forward hooks
      (:class:`~kd_lightning.engine.taps.Taps`) installed here; a wrong path fails here. Adapters are
      sized by :meth:`setup_for` from one example batch, called by ``setup`` from the datamodule's
      ``example_input()`` unless it was called before ``fit``.
    - Terms with ``pretrains`` (FT's paraphraser) train parts of their own when training starts, on the
      teachers' outputs over one epoch's training batches per pass (:meth:`DistillationTerm.pretrain`).
    - Batches are ``(x, y)`` or ``(x, y, index)``; ``index`` (dataset sample indices) reaches only the
      terms that declare ``uses_index`` (e.g. CRD) and the output cache.

    Logged: ``train/loss`` and ``train/loss_<part>`` (unweighted parts: ``ce`` and each term),
    ``val/acc``, ``val/acc_best``, ``test/acc`` and, with a teacher, ``val/agreement`` (top-1
    student-teacher agreement), ``val/kl_to_teacher`` (KL(teacher || student) at T = 1),
    ``teacher/val_acc`` and ``teacher/test_acc``.
    """

    caches_teacher_outputs = True

    uses_unlabelled_data = True
    compared_with_scratch = True
    teacher_range = (1, None)

    def __init__(
        self,
        student: nn.Module,
        loss: DistillationLoss,
        optimizer: OptimizerFactory,
        num_classes: int,
        teacher: nn.Module | Teacher | None = None,
        teachers: Mapping[str, nn.Module | Teacher] | None = None,
        scheduler: SchedulerFactory | None = None,
        save_teacher: bool = False,
        scale_lr_with_world_size: bool = False,
        runtime: Runtime | None = None,
        teacher_cache: TeacherOutputCache | None = None,
    ) -> None:
        super().__init__(student, num_classes, optimizer, scheduler, scale_lr_with_world_size, save_teacher, runtime)
        self.loss = loss
        given = dict(teachers or {})
        if teacher is not None:
            given = {"teacher": teacher, **given}
        self.teachers: dict[str, Teacher] = {}
        for name, model in given.items():
            wrapped = model if isinstance(model, Teacher) else self.wrap(model, name, teacher_cache)
            self.add_frozen(name, wrapped.model)
            wrapped.bind(self)
            self.teachers[name] = wrapped
        if "teacher" not in self.teachers:
            self.teacher = None  # ``module.teacher``: the default teacher's model, None without one
        models = {TASK_MODEL: student, **{name: t.model for name, t in self.teachers.items()}}
        self.check_config(loss, models, any(t.cache is not None for t in self.teachers.values()))
        if isinstance(loss, DistillationLoss) and loss.needs_teacher:
            loss.bind_models(models)
        self.apply_runtime([("student", student), *(("teacher", t.model) for t in self.teachers.values())])
        distills = loss.needs_teacher
        self.student_taps = Taps(student, loss.layers(TASK_MODEL) if distills else {})
        for name, wrapped in self.teachers.items():
            wrapped.tap(loss.layers(name) if distills else {})
        self.shapes_ready = False
        self.reuse_val_outputs = False
        if self.teachers:
            self.val_agreement = MulticlassAccuracy(num_classes, average="micro")
            self.val_kl = MeanMetric()
            self.teacher_val_acc = MulticlassAccuracy(num_classes, average="micro")
            self.teacher_test_acc = MulticlassAccuracy(num_classes, average="micro")

    @classmethod
    def needs_sample_index(cls, loss: nn.Module | None, cached_teachers: bool) -> bool:
        uses_index = isinstance(loss, DistillationLoss) and loss.needs_teacher and loss.uses_index
        return uses_index or cached_teachers

    def prepare(self, datamodule: L.LightningDataModule) -> None:
        """Size the loss's adapters (and per-sample memories) from the datamodule's example batch."""
        if isinstance(datamodule, HasExampleInput):
            size = datamodule.num_train_samples if isinstance(datamodule, HasTrainSize) else None
            self.setup_for(datamodule.example_input(), size)

    def wrap(self, model: nn.Module, name: str, cache: TeacherOutputCache | None) -> Teacher:
        """A bare teacher module as a :class:`Teacher` run by ``runtime``."""
        return Teacher(model, name, self.runtime.teacher_precision, cache, self.runtime.reuse_val_teacher_outputs)

    @classmethod
    def check_config(cls, loss: nn.Module | None, models: Mapping[str, nn.Module], cached_teachers: bool) -> None:
        """Every model a loss term reads must be the student or a teacher, every layer it names must exist
        (checked on the untrained models, before any teacher is trained), and cached teachers serve logits
        only (:func:`~kd_lightning.methods.loss_reads.check_loss_reads`); a subclass that makes the loss's
        targets itself (``distilled_outputs``: e.g. a combination of teachers) may have teachers no term reads.
        Teachers with a loss that distils nothing (``loss.alpha = 0``, or every term weighted 0) are refused: that
        is supervised training, whose method never loads a teacher."""
        if isinstance(loss, DistillationLoss):
            check_distils(loss, models)
        if isinstance(loss, DistillationLoss) and loss.needs_teacher:
            combines = cls.distilled_outputs is not DistillationModule.distilled_outputs
            check_loss_reads(loss, models, cached_teachers, combines)

    @classmethod
    def metric_names(cls, loss: nn.Module | None, teachers: Sequence[str]) -> set[str]:
        terms = {f"train/loss_{name}" for name in loss.terms} if isinstance(loss, DistillationLoss) else set()
        compared = {
            "val/agreement",
            "val/kl_to_teacher",
            "teacher/val_acc",
            "teacher/test_acc",
        }
        return super().metric_names(loss, teachers) | {"train/loss_ce"} | terms | (compared if teachers else set())

    # ----------------------------------------------------------------------------- forward passes
    def student_outputs(self, x: Inputs) -> dict[str, Tensor]:
        """``{"logits": ..., "<layer>": ...}`` for every student tensor the loss reads."""
        logits, layers = self.student_taps.run(self.student, x)
        return {"logits": logits, **layers}

    def teacher_outputs(self, x: Inputs, name: str = "teacher") -> dict[str, Tensor]:
        """Teacher ``name``'s outputs (logits and tapped layers), see :meth:`Teacher.outputs`."""
        return self.teachers[name].outputs(x)

    def distilled_outputs(self, x: Inputs, split: str, index: Tensor | None) -> dict[str, dict[str, Tensor]]:
        """The outputs of every teacher the loss reads: cached logits or a forward."""
        outputs = {}
        for name in sorted(self.loss.models_read & set(self.teachers)):
            wrapped = self.teachers[name]
            cached = wrapped.cache is not None
            outputs[name] = {"logits": wrapped.logits(x, split, index)} if cached else wrapped.outputs(x)
        return outputs

    def setup_for(self, example: Inputs, num_samples: int | None = None) -> None:
        """Size the loss's adapters and check its shapes from one example batch (student in eval mode,
        no gradients); a no-op when the loss runs no term or needs no example (logit-only losses).
        ``num_samples``: training-set size, for terms indexed by sample (e.g. CRD's memory bank)."""
        if not self.needs_setup:
            return
        example = to_device(example, self.device)
        with in_mode(self.student), torch.no_grad():
            outputs = {TASK_MODEL: self.student_outputs(example)}
        outputs |= {name: self.teachers[name].outputs(example) for name in self.loss.models_read & set(self.teachers)}
        self.loss.setup_shapes(outputs, num_samples)
        self.shapes_ready = True

    def resume_state(self) -> dict[str, Any]:
        """Also the digests of the teachers' weights: resuming with other teachers gets a warning."""
        return {**super().resume_state(), "teachers": {name: t.digest for name, t in self.teachers.items()}}

    @property
    def needs_setup(self) -> bool:
        """Whether :meth:`setup_for` has work left: the terms run, need an example batch (layers, adapters,
        sample indices) and have not seen one; logit-only losses skip the extra forward."""
        return not self.shapes_ready and self.loss.needs_teacher and self.loss.needs_example

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        self.reuse_val_outputs = is_deterministic(datamodule)
        for wrapped in self.teachers.values():
            wrapped.check_cache(datamodule)
        if not self.needs_setup:
            return
        if isinstance(datamodule, HasExampleInput):
            size = datamodule.num_train_samples if isinstance(datamodule, HasTrainSize) else None
            self.setup_for(datamodule.example_input(), size)
        elif self.loss.has_adapters:
            raise ConfigError(
                f"loss.terms {sorted(self.loss.terms)} size adapters from one example batch: call "
                "module.setup_for(example_batch) before fit, or fit with a datamodule that has example_input()"
            )

    def prepare_caches(self, splits: tuple[str, ...]) -> None:
        for wrapped in self.teachers.values():
            wrapped.prepare_cache(self.trainer.datamodule, splits, self.device, self.trainer)

    # ------------------------------------------------------------------------------------ training
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        x, y, index = unpack(batch)
        x = self.formatted(x)
        outputs: dict[str, dict[str, Tensor]] = {}
        if self.loss.needs_teacher:
            check_sample_index(self.loss, index)
            outputs = self.distilled_outputs(x, "train", index)
        outputs[TASK_MODEL] = self.student_outputs(x)
        label_count = self.mean_label_count(y) if self.loss.weighs_task_term else None
        out = self.loss(outputs, y, index=index, label_count=label_count)
        if not self.finite_step(out.total, out.parts, outputs):
            return None  # skipped (runtime.nonfinite=skip): no backward, no optimizer step
        self.record_losses(out.total, out.parts, batch_size(x))
        return out.total

    # ---------------------------------------------------------------------------------- evaluation
    def on_fit_start(self) -> None:
        super().on_fit_start()
        for wrapped in self.teachers.values():
            wrapped.stored_val_logits.clear()
        self.prepare_caches(("train", "val"))

    def on_test_start(self) -> None:
        self.prepare_caches(("test",))

    def on_train_start(self) -> None:
        super().on_train_start()
        if isinstance(self.loss, DistillationLoss) and self.loss.pretrains:
            self.loss.pretrain(self.teacher_passes)
            if self.trainer.world_size > 1:  # every rank trained on its shard: all take rank 0's result
                self.loss.load_state_dict(self.trainer.strategy.broadcast(self.loss.state_dict()))

    def teacher_passes(self) -> Iterator[dict[str, dict[str, Tensor]]]:
        """One pass over the training data (the batches of one training epoch, ``limit_train_batches`` included):
        per batch, the outputs of every teacher the loss reads."""
        count = self.trainer.num_training_batches
        for batch in islice(self.trainer.train_dataloader, None if math.isinf(count) else int(count)):
            x = self.formatted(to_device(unpack(batch)[0], self.device))
            yield self.distilled_outputs(x, "train", None)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        for wrapped in self.teachers.values():
            wrapped.start_epoch(self.current_epoch)
        if isinstance(self.loss, DistillationLoss):
            self.loss.start_epoch(self.current_epoch)

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y, index = unpack(batch)
        x = self.formatted(x)
        logits = self.student(x)
        self.log_student_val(logits, y)
        if not self.teachers:
            return
        store = self.reuse_val_outputs and not self.trainer.sanity_checking
        teacher_logits = self.compared_val_logits(x, y, index, (dataloader_idx, batch_idx), store, logits)
        self.val_agreement(logits, teacher_logits.argmax(dim=-1))
        self.val_kl(soft_kl(logits, teacher_logits, temperature=1.0), weight=batch_size(x))
        self.teacher_val_acc(teacher_logits, y)
        self.log("val/agreement", self.val_agreement)
        self.log("val/kl_to_teacher", self.val_kl)
        self.log("teacher/val_acc", self.teacher_val_acc)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        x, y, index = unpack(batch)
        x = self.formatted(x)
        self.log_student_test(self.student(x), y)
        if self.teachers:
            self.teacher_test_acc(self.compared_test_logits(x, y, index), y)
            self.log("teacher/test_acc", self.teacher_test_acc)

    def compared_val_logits(
        self, x: Tensor, y: Tensor, index: Tensor | None, key: tuple[int, int], store: bool, student: Tensor
    ) -> Tensor:
        """The logits validation compares the student (``student``: its logits) with (``val/agreement``,
        ``val/kl_to_teacher``, ``teacher/val_acc``): the first teacher's; ``store``: keep them for reuse."""
        return next(iter(self.teachers.values())).val_logits(x, index, key, store)

    def compared_test_logits(self, x: Tensor, y: Tensor, index: Tensor | None) -> Tensor:
        """The logits ``teacher/test_acc`` measures: the first teacher's."""
        return next(iter(self.teachers.values())).logits(x, "test", index)
