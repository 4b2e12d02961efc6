"""What every classification method shares: the student, its accuracy metrics and epoch-level losses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MaxMetric
from torchmetrics.classification import MulticlassAccuracy

from kd_lightning.engine.batches import Inputs
from kd_lightning.engine.runtime import Runtime
from kd_lightning.losses import UNLABELLED
from kd_lightning.methods.base import Method, OptimizerFactory, SchedulerFactory

Batch = tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]


def unpack(batch: Batch) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(x, y, index)`` from an ``(x, y)`` or ``(x, y, index)`` batch (``index`` None for the former)."""
    if len(batch) == 2:
        return batch[0], batch[1], None
    if len(batch) == 3:
        return batch[0], batch[1], batch[2]
    raise ValueError(f"batches must be (x, y) or (x, y, index), got a batch of {len(batch)} items")


class EpochMeans:
    """Sample-weighted running means of detached scalars over an epoch (tensor ops only: no host sync). The
    scalars of a step are stacked into one tensor and added in one operation (a step's names rarely change;
    each set of names keeps its own sum)."""

    def __init__(self) -> None:
        self.sums: dict[tuple[str, ...], Tensor] = {}
        self.count = 0

    def reset(self) -> None:
        self.sums, self.count = {}, 0

    def add(self, values: Mapping[str, Tensor], weight: int) -> None:
        names = tuple(values)
        stacked = torch.stack([value.detach() for value in values.values()]).float()
        if names in self.sums:
            self.sums[names].add_(stacked, alpha=weight)
        else:
            self.sums[names] = stacked * weight
        self.count += weight

    def means(self) -> dict[str, Tensor]:
        totals: dict[str, Tensor] = {}
        for names, stacked in self.sums.items():
            for name, total in zip(names, stacked.unbind(), strict=True):
                totals[name] = totals[name] + total if name in totals else total
        return {name: total / max(self.count, 1) for name, total in totals.items()}


class ClassifierMethod(Method):
    """Base of methods that train a classifier ``student`` on ``(x, y[, index])`` batches.

    Logged: ``train/loss`` and ``train/loss_<part>`` (epoch means of what :meth:`record_losses` got),
    ``val/acc``, ``val/acc_best`` (best epoch so far; the sanity check does not count) and ``test/acc``.
    ``runtime`` sets the memory format and compilation of the models (:meth:`apply_runtime`).
    """

    def __init__(
        self,
        student: nn.Module,
        num_classes: int,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        scale_lr_with_world_size: bool = False,
        save_teacher: bool = False,
        runtime: Runtime | None = None,
    ) -> None:
        runtime = runtime or Runtime()
        super().__init__(
            optimizer,
            scheduler,
            scale_lr_with_world_size,
            save_teacher,
            runtime.nonfinite,
            runtime.nonfinite_check_every,
        )
        self.student = student
        self.runtime = runtime
        self.train_losses = EpochMeans()
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc_best = MaxMetric()
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    @classmethod
    def metric_names(cls, loss: nn.Module | None, teachers: Sequence[str]) -> set[str]:
        student = {"train/loss", "val/acc", "val/acc_best", "test/acc", "test/acc_last"}
        return super().metric_names(loss, teachers) | student

    def forward(self, x: Tensor) -> Tensor:
        """Student logits."""
        return self.student(x)

    def apply_runtime(self, models: Sequence[tuple[str, nn.Module]]) -> None:
        """Memory format and compilation from ``runtime`` (at construction, before Lightning moves the
        models); ``models`` as ``(role, model)`` pairs, the role ``student`` or ``teacher``."""
        for role, model in models:
            if self.runtime.channels_last:
                model.to(memory_format=torch.channels_last)
            if self.runtime.compiles(role):
                model.compile()

    def formatted(self, x: Inputs) -> Inputs:
        """``x`` in channels-last memory format when ``runtime.channels_last`` and ``x`` is a 4-D tensor."""
        if self.runtime.channels_last and isinstance(x, Tensor) and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def mean_label_count(self, targets: Tensor) -> Tensor | None:
        """Under data parallelism, the mean number of labelled samples per process, so that the task
        term is the mean over the global batch even when processes hold different numbers of unlabelled
        samples (each process's own mean would weight them unequally); None (the batch's own count) otherwise."""
        if self._trainer is None or self.trainer.world_size == 1:
            return None
        count = (targets != UNLABELLED).sum().float()
        return self.trainer.strategy.reduce(count, reduce_op="mean")

    # --------------------------------------------------------------------------- epoch-level logs
    def record_losses(self, total: Tensor, parts: Mapping[str, Tensor], batch_size: int) -> None:
        """Add a step's loss and its parts to the epoch means logged as ``train/loss[_<part>]``."""
        self.train_losses.add({"loss": total, **{f"loss_{name}": value for name, value in parts.items()}}, batch_size)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.train_losses.reset()

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        # Logged once per epoch: a self.log call per step and value costs Lightning ~0.2 ms each.
        for name, value in self.train_losses.means().items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", sync_dist=True)

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.trainer.ckpt_path is None:  # a fresh fit starts its best accuracy afresh; a resumed one keeps it
            self.val_acc_best.reset()
        self.warn_modules_in_eval(self.student, "student")

    def resume_state(self) -> dict[str, Any]:
        """The best validation accuracy so far (it spans epochs: a resumed run must not restart it)."""
        best = self.val_acc_best.compute() if self.val_acc_best.update_called else None
        return {**super().resume_state(), "val_acc_best": best}

    def restore(self, state: Mapping[str, Any]) -> None:
        super().restore(state)
        self.val_acc_best.reset()
        if state.get("val_acc_best") is not None:
            self.val_acc_best(torch.as_tensor(state["val_acc_best"]))

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.val_acc_best(self.val_acc.compute())
        # torchmetrics syncs the value across processes; sync_dist only tells Lightning it is global.
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True, sync_dist=True)

    def log_student_val(self, logits: Tensor, targets: Tensor) -> None:
        self.val_acc(logits, targets)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def log_student_test(self, logits: Tensor, targets: Tensor) -> None:
        self.test_acc(logits, targets)
        self.log("test/acc", self.test_acc)
