"""DistillationModule: a frozen teacher, a trainable student and a pluggable DistillationLoss."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from kd_lightning.checkpointing import TeacherOutOfCheckpoints
from kd_lightning.errors import ConfigError
from kd_lightning.losses import UNLABELLED, DistillationLoss, soft_kl
from kd_lightning.runtime import Runtime
from kd_lightning.taps import Taps
from kd_lightning.teacher import freeze

_EVAL_MODE_WARNING = r"Found \d+ module\(s\) in eval mode at the start of training"

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
Batch = tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]


class EpochMeans:
    """Sample-weighted running means of detached scalars over an epoch (tensor ops only: no host sync)."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    def reset(self) -> None:
        self.sums, self.count = {}, 0

    def add(self, values: dict[str, Tensor], weight: int) -> None:
        for name, value in values.items():
            weighted = value.detach().float() * weight
            self.sums[name] = self.sums[name] + weighted if name in self.sums else weighted
        self.count += weight

    def means(self) -> dict[str, Tensor]:
        return {name: total / max(self.count, 1) for name, total in self.sums.items()}


def unpack(batch: Batch) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(x, y, index)`` from an ``(x, y)`` or ``(x, y, index)`` batch (``index`` None for the former)."""
    if len(batch) == 2:
        return batch[0], batch[1], None
    if len(batch) == 3:
        return batch[0], batch[1], batch[2]
    raise ValueError(f"batches must be (x, y) or (x, y, index), got a batch of {len(batch)} items")


class DistillationModule(TeacherOutOfCheckpoints, L.LightningModule):
    """Trains ``student`` with ``loss`` against a frozen ``teacher``.

    - The teacher is frozen (``eval()``, ``requires_grad_(False)``), runs under ``no_grad``, stays in
      eval mode whatever Lightning switches, never reaches the optimizer and is left out of saved
      checkpoints unless ``save_teacher=True`` (it is put back from memory on load).
    - Distributed: the teacher is replicated on every rank (DDP ignores parameters without gradients),
      epoch-level losses and torchmetrics are synced across ranks; ``scale_lr_with_world_size``
      multiplies the learning rate by the number of processes (off by default).
    - With ``loss.alpha == 0`` the teacher never runs in training; ``teacher=None`` is then allowed,
      which makes this module the plain supervised trainer too (``kd-train``, scratch baselines).
    - The optimizer gets the student's parameters and any the loss owns (e.g. adapters).
    - Terms reading intermediate layers (``student_layer`` / ``teacher_layer``) get them through
      forward hooks (:class:`~kd_lightning.taps.Taps`) installed here; a wrong path fails here.
      Adapters are sized by :meth:`setup_for` from one example batch, called by ``setup`` from the
      datamodule's ``example_input()`` unless it was called before ``fit``.
    - Batches are ``(x, y)`` or ``(x, y, index)``; ``index`` (dataset sample indices) reaches only the
      terms that declare ``uses_index`` (e.g. CRD), which need it: without it training fails with a
      :class:`ConfigError` naming ``data.return_index``. Their training-set size comes from the
      datamodule's ``num_train_samples`` (or ``setup_for(..., num_samples=...)``).

    Logged: ``train/loss`` and ``train/loss_<part>`` (unweighted parts: ``ce`` and each term),
    ``val/acc``, ``val/acc_best``, ``test/acc`` and, with a teacher, ``val/agreement`` (top-1
    student-teacher agreement), ``val/kl_to_teacher`` (KL(teacher || student) at T = 1),
    ``teacher/val_acc`` and ``teacher/test_acc``.
    """

    def __init__(
        self,
        student: nn.Module,
        loss: DistillationLoss,
        optimizer: OptimizerFactory,
        num_classes: int,
        teacher: nn.Module | None = None,
        scheduler: SchedulerFactory | None = None,
        save_teacher: bool = False,
        scale_lr_with_world_size: bool = False,
        runtime: Runtime | None = None,
    ) -> None:
        super().__init__()
        self.student = student
        self.loss = loss
        self.teacher = freeze(teacher) if teacher is not None else None
        self.runtime = runtime or Runtime()
        self.apply_runtime()
        self.teacher_cache = self.runtime.build_cache() if teacher is not None else None
        self.val_teacher_logits: dict[tuple[int, int], Tensor] = {}
        self.train_losses = EpochMeans()
        self.reuse_val_outputs = False
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.save_teacher = save_teacher
        self.configure_teacher_loading()
        self.scale_lr_with_world_size = scale_lr_with_world_size
        self.student_taps = Taps(student, loss.layers("student") if teacher is not None else {})
        self.teacher_taps = Taps(self.teacher, loss.layers("teacher")) if self.teacher is not None else None
        self.shapes_ready = False
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc_best = MaxMetric()
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        if teacher is not None:
            self.val_agreement = MulticlassAccuracy(num_classes, average="micro")
            self.val_kl = MeanMetric()
            self.teacher_val_acc = MulticlassAccuracy(num_classes, average="micro")
            self.teacher_test_acc = MulticlassAccuracy(num_classes, average="micro")

    # ----------------------------------------------------------------------------- forward passes
    def forward(self, x: Tensor) -> Tensor:
        """Student logits."""
        return self.student(x)

    def student_outputs(self, x: Tensor) -> dict[str, Tensor]:
        """``{"logits": ..., "<layer path>": ...}`` for every student layer the loss reads."""
        with self.student_taps.capture() as layers:
            logits = self.student(x)
        return {"logits": logits, **layers}

    def teacher_outputs(self, x: Tensor) -> dict[str, Tensor]:
        """Like :meth:`student_outputs`, for the teacher: under ``inference_mode`` and, with
        ``runtime.teacher_precision``, autocast; returned as float32 tensors usable in autograd."""
        if self.teacher is None or self.teacher_taps is None:
            raise RuntimeError("this step needs a teacher but the module was built without one")
        dtype = self.runtime.teacher_dtype
        autocast = torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None)
        # Strategies that cast batches to a low precision (FSDP mixed precision) leave the teacher's
        # weights as they are: feed it inputs of its own dtype.
        weight = next(self.teacher.parameters(), None)
        if weight is not None and x.is_floating_point() and x.dtype != weight.dtype:
            x = x.to(weight.dtype)
        with torch.inference_mode(), self.teacher_taps.capture() as layers, autocast:
            logits = self.teacher(x)
        # Inference tensors cannot be saved for backward: copy them (as float32) outside inference mode.
        outputs = {"logits": logits, **layers}
        return {
            name: out.to(torch.float32, copy=True) if out.is_floating_point() else out.clone()
            for name, out in outputs.items()
        }

    def teacher_logits(self, x: Tensor, split: str, index: Tensor | None) -> Tensor:
        """The teacher's logits for ``x``: from the teacher-output cache (by sample ``index``) or a forward."""
        if self.teacher_cache is None:
            return self.teacher_outputs(x)["logits"]
        if index is None:
            raise ConfigError(
                "runtime.teacher_cache looks teacher outputs up by sample index but batches are (x, y): "
                "set data.return_index=true (kd-distill does this itself)"
            )
        return self.teacher_cache.logits(split, index)

    def setup_for(self, example: Tensor, num_samples: int | None = None) -> None:
        """Size the loss's adapters and check its shapes from one example batch (student in eval mode,
        no gradients); a no-op without a teacher or with ``alpha == 0`` (the teacher never runs).
        ``num_samples``: training-set size, for terms indexed by sample (e.g. CRD's memory bank)."""
        if not self.needs_setup:
            return
        example = example.to(self.device)
        was_training = self.student.training
        self.student.eval()
        with torch.no_grad():
            student = self.student_outputs(example)
        self.student.train(was_training)
        self.loss.setup_shapes(student, self.teacher_outputs(example), num_samples)
        self.shapes_ready = True

    @property
    def needs_setup(self) -> bool:
        """Whether :meth:`setup_for` has work left: the teacher will run, the loss needs an example batch
        (layers, adapters, sample indices) and it was not seen yet; logit-only losses skip the extra forward."""
        return (
            not self.shapes_ready and self.teacher is not None and self.loss.needs_teacher and self.loss.needs_example
        )

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        self.reuse_val_outputs = self.runtime.reuse_val_teacher_outputs and not getattr(
            datamodule, "random_augmentation", True
        )
        if self.teacher_cache is not None:
            self.check_cacheable(datamodule)
        if not self.needs_setup:
            return
        if hasattr(datamodule, "example_input"):
            self.setup_for(datamodule.example_input(), getattr(datamodule, "num_train_samples", None))
        elif self.loss.has_adapters:
            raise ConfigError(
                f"loss.terms {sorted(self.loss.terms)} size adapters from one example batch: call "
                "module.setup_for(example_batch) before fit, or fit with a datamodule that has example_input()"
            )

    def apply_runtime(self) -> None:
        """Memory format and compilation from ``runtime`` (at construction, before Lightning moves the models)."""
        models = {"student": self.student, "teacher": self.teacher}
        for name, model in models.items():
            if model is None:
                continue
            if self.runtime.channels_last:
                model.to(memory_format=torch.channels_last)
            if self.runtime.compiles(name):
                model.compile()

    def formatted(self, x: Tensor) -> Tensor:
        """``x`` in channels-last memory format when ``runtime.channels_last`` and ``x`` is 4-D."""
        if self.runtime.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def check_cacheable(self, datamodule: object) -> None:
        """``runtime.teacher_cache`` needs logit-only terms and data that a sample index determines."""
        layers = self.loss.layers("teacher")
        if layers:
            path, key = next(iter(layers.items()))
            raise ConfigError(
                f"runtime.teacher_cache stores teacher logits only, but {key}={path} reads a teacher layer; "
                "set runtime.teacher_cache=null for feature losses"
            )
        missing = [name for name in ("content_identity", "ordered_dataloader") if not hasattr(datamodule, name)]
        if missing or getattr(datamodule, "random_augmentation", True):
            reason = f"lacks {missing}" if missing else "declares random_augmentation=True"
            raise ConfigError(
                "runtime.teacher_cache needs inputs fixed per sample, but the datamodule "
                f"({type(datamodule).__name__}) {reason}: cached teacher outputs would be stale; "
                "set runtime.teacher_cache=null"
            )

    def prepare_teacher_cache(self, splits: tuple[str, ...]) -> None:
        """Fill the cache's tables for ``splits`` (global rank 0 first, so the others read its disk tables)."""
        if self.teacher_cache is None or self.teacher is None:
            return
        prepare = partial(self.teacher_cache.prepare, self.teacher, self.trainer.datamodule, splits, self.device)
        if self.trainer.is_global_zero:
            prepare()
        self.trainer.strategy.barrier("teacher_cache")
        if not self.trainer.is_global_zero:
            prepare()

    def train(self, mode: bool = True) -> DistillationModule:
        """Switch the student's mode; the teacher always stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    # ------------------------------------------------------------------------------------ training
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        x, y, index = unpack(batch)
        x = self.formatted(x)
        teacher = None
        if self.loss.needs_teacher:
            cached = self.teacher_cache is not None
            teacher = {"logits": self.teacher_logits(x, "train", index)} if cached else self.teacher_outputs(x)
        if index is None and self.loss.needs_teacher and self.loss.uses_index:
            users = sorted(name for name, term in self.loss.terms.items() if term.uses_index)
            raise ConfigError(
                f"loss.terms {users} need dataset sample indices but batches are (x, y): set "
                "data.return_index=true (or use a datamodule whose batches are (x, y, index))"
            )
        out = self.loss(self.student_outputs(x), teacher, y, index=index, label_count=self.mean_label_count(y))
        self.train_losses.add({"loss": out.total, **{f"loss_{name}": v for name, v in out.parts.items()}}, x.shape[0])
        return out.total

    def on_train_epoch_start(self) -> None:
        self.train_losses.reset()

    def on_train_epoch_end(self) -> None:
        # Logged once per epoch: a self.log call per step and value costs Lightning ~0.2 ms each.
        for name, value in self.train_losses.means().items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", sync_dist=True)

    def mean_label_count(self, targets: Tensor) -> Tensor | None:
        """Under data parallelism, the mean number of labelled samples per process, so that the task
        term is the mean over the global batch even when processes hold different numbers of unlabelled
        samples (each process's own mean would weight them unequally); None (the batch's own count) otherwise."""
        if self._trainer is None or self.trainer.world_size == 1 or self.loss.alpha == 1.0:
            return None
        count = (targets != UNLABELLED).sum().float()
        return self.trainer.strategy.reduce(count, reduce_op="mean")

    # ---------------------------------------------------------------------------------- evaluation
    def on_fit_start(self) -> None:
        # Lightning warns about every module in eval mode; the teacher is meant to be, so the
        # warning is replaced by one about the student alone (in on_train_start).
        warnings.filterwarnings("ignore", message=_EVAL_MODE_WARNING, category=PossibleUserWarning)
        self.val_teacher_logits.clear()
        self.prepare_teacher_cache(("train", "val"))

    def on_test_start(self) -> None:
        self.prepare_teacher_cache(("test",))

    def on_train_start(self) -> None:
        # The sanity-check validation must not count towards the best accuracy.
        self.val_acc_best.reset()
        in_eval = [name or "<root>" for name, m in self.student.named_modules() if not m.training]
        if in_eval:
            rank_zero_warn(f"student modules in eval mode at the start of training: {in_eval[:5]}")

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y, index = unpack(batch)
        x = self.formatted(x)
        logits = self.student(x)
        self.val_acc(logits, y)
        self.log("val/acc", self.val_acc, prog_bar=True)
        if self.teacher is not None:
            teacher_logits = self.val_teacher_logits_for(x, index, (dataloader_idx, batch_idx))
            self.val_agreement(logits, teacher_logits.argmax(dim=-1))
            self.val_kl(soft_kl(logits, teacher_logits, temperature=1.0), weight=x.shape[0])
            self.teacher_val_acc(teacher_logits, y)
            self.log("val/agreement", self.val_agreement)
            self.log("val/kl_to_teacher", self.val_kl)
            self.log("teacher/val_acc", self.teacher_val_acc)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def val_teacher_logits_for(self, x: Tensor, index: Tensor | None, key: tuple[int, int]) -> Tensor:
        """Validation teacher logits: cached table, else computed on the first epoch and reused after
        (``runtime.reuse_val_teacher_outputs`` with deterministic data), else computed."""
        if self.teacher_cache is not None:
            return self.teacher_logits(x, "val", index)
        stored = self.val_teacher_logits.get(key)
        if stored is not None and stored.shape[0] == x.shape[0]:
            return stored
        logits = self.teacher_outputs(x)["logits"]
        if self.reuse_val_outputs and not self.trainer.sanity_checking:
            self.val_teacher_logits[key] = logits
        return logits

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        x, y, index = unpack(batch)
        x = self.formatted(x)
        self.test_acc(self.student(x), y)
        self.log("test/acc", self.test_acc)
        if self.teacher is not None:
            self.teacher_test_acc(self.teacher_logits(x, "test", index), y)
            self.log("teacher/test_acc", self.teacher_test_acc)

    # ---------------------------------------------------------------------------------- optimizers
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student parameters plus those owned by the loss; never the teacher's."""
        params = list(self.student.parameters()) + list(self.loss.parameters())
        return [p for p in params if p.requires_grad]

    def configure_optimizers(self) -> OptimizerLRScheduler:
        optimizer = self.optimizer_factory(params=self.trainable_parameters())
        if self.scale_lr_with_world_size:  # linear scaling rule (Goyal et al. 2017): lr x number of processes
            for group in optimizer.param_groups:
                group["lr"] *= self.trainer.world_size
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer)}}
