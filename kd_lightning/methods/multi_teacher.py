"""``method=multi_teacher``: K frozen teachers, combined per sample into one soft target."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from kd_lightning.engine.batches import Inputs
from kd_lightning.engine.errors import ConfigError
from kd_lightning.losses import UNLABELLED, DistillationLoss
from kd_lightning.losses.base import TASK_MODEL
from kd_lightning.losses.mixture import mixture_logits
from kd_lightning.methods.kd import DistillationModule

#: The name loss terms read the combined target under (the individual teachers keep their own names).
COMBINED = "teacher"
COMBINATIONS = ("mean", "weights", "confidence")


def checked_weights(combine: Any, weights: Any, teachers: Sequence[str]) -> dict[str, float] | None:
    """``method.weights`` normalised to sum to 1 for ``combine=weights`` (None for the other combinations,
    which take none: weights given with them would be ignored, so they are refused), each teacher's a finite
    number >= 0, not all 0; a bad ``method.combine`` or ``method.weights`` is one line naming it."""
    if combine not in COMBINATIONS:
        raise ConfigError(f"method.combine={combine!r}: use one of {list(COMBINATIONS)}")
    if combine != "weights":
        if weights is not None:
            raise ConfigError(
                f"method.weights={dict(weights) if isinstance(weights, Mapping) else weights} is ignored by "
                f"method.combine={combine} ({'1/K each' if combine == 'mean' else 'weights per sample'}); set "
                "method.combine=weights to weigh the teachers by them, or method.weights=null"
            )
        return None
    example = "{" + ", ".join(f"{name}: 1.0" for name in teachers) + "}"
    if not isinstance(weights, Mapping) or sorted(map(str, weights)) != sorted(teachers):
        given = dict(weights) if isinstance(weights, Mapping) else weights
        raise ConfigError(
            f"method.weights={given} must give every teacher {sorted(teachers)} a weight >= 0 (not all 0) for "
            f"combine=weights, e.g. method.weights='{example}'"
        )
    for name, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight < 0:
            raise ConfigError(
                f"method.weights.{name}={weight!r} must be a finite number >= 0 (the teacher's share of the "
                f"combined target); e.g. method.weights='{example}'"
            )
    total = sum(weights.values())
    if total <= 0:
        raise ConfigError(f"method.weights={dict(weights)} are all 0; give at least one teacher a weight > 0")
    return {str(name): float(weight) / total for name, weight in weights.items()}


class MultiTeacherDistillation(DistillationModule):
    r"""Distils K frozen teachers (any architectures) into the student through one combined target.

    At the loss temperature :math:`T`, with teacher logits :math:`z_k` and per-sample weights
    :math:`w_k(x)` (summing to 1), the combined target distribution and the logits the loss terms read as
    the model ``teacher`` are

    .. math::
        p(x) = \sum_k w_k(x)\,\sigma(z_k / T), \qquad z(x) = T \log p(x)

    so that :math:`\sigma(z / T) = p` exactly, for every logit term at that temperature. ``combine``:

    - ``mean``: :math:`w_k = 1/K` (the ensemble of soft targets, Hinton et al. 2015, §1);
    - ``weights``: fixed ``weights`` by teacher name (normalised);
    - ``confidence``: :math:`w_k(x) = \mathrm{softmax}_k(-\ell_k(x))` with :math:`\ell_k` the teacher's
      cross-entropy on the label, or its entropy for unlabelled samples: teachers that are right and sure
      weigh more, per sample (the weighting of CA-MKD, Zhang et al. 2022, without its feature term).

    The teachers are also models of their own name, so a term can read one teacher alone
    (``teacher: {model: teacher_1}``: per-teacher losses and weights). Validation compares the student with
    the combined target (``val/agreement``, ``teacher/val_acc``) and logs each teacher's accuracy and
    agreement (``teacher/<name>/val_acc``, ``val/agreement/<name>``, ``teacher/<name>/test_acc``).
    """

    def __init__(
        self,
        *args: Any,
        combine: str = "mean",
        weights: Mapping[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if COMBINED in self.teachers:
            raise ConfigError(
                f"method.teachers: {COMBINED!r} names the combined target of multi_teacher; name the teachers "
                "otherwise (teacher_0, teacher_1, ...)"
            )
        if not self.teachers:
            raise ConfigError("method=multi_teacher needs method.teachers (one or more teacher configs by name)")
        self.combine = combine
        self.fixed_weights = checked_weights(combine, weights, list(self.teachers))
        self.per_teacher_val = nn.ModuleDict({name: self.accuracy() for name in self.teachers})
        self.per_teacher_agreement = nn.ModuleDict({name: self.accuracy() for name in self.teachers})
        self.per_teacher_test = nn.ModuleDict({name: self.accuracy() for name in self.teachers})

    def accuracy(self) -> MulticlassAccuracy:
        return MulticlassAccuracy(self.test_acc.num_classes, average="micro")

    @classmethod
    def check_options(cls, options: Mapping[str, Any], models: Mapping[str, nn.Module]) -> None:
        """``method.combine`` and ``method.weights`` (:func:`checked_weights`), before any teacher is trained."""
        super().check_options(options, models)
        teachers = [name for name in models if name != TASK_MODEL]
        checked_weights(options.get("combine", "mean"), options.get("weights"), teachers)

    @classmethod
    def check_config(cls, loss: nn.Module | None, models: Mapping[str, nn.Module], cached_teachers: bool) -> None:
        super().check_config(loss, {**models, COMBINED: nn.Identity()}, cached_teachers)

    @classmethod
    def metric_names(cls, loss: nn.Module | None, teachers: Sequence[str]) -> set[str]:
        own = {f"teacher/{n}/val_acc" for n in teachers} | {f"teacher/{n}/test_acc" for n in teachers}
        return super().metric_names(loss, teachers) | own | {f"val/agreement/{n}" for n in teachers}

    # ---------------------------------------------------------------------------------- combining
    @property
    def temperature(self) -> float:
        return self.loss.temperature if isinstance(self.loss, DistillationLoss) else 1.0

    def combined(self, logits: Mapping[str, Tensor], targets: Tensor | None) -> Tensor:
        """``T log sum_k w_k softmax(z_k / T)`` (see the class docstring), float32."""
        names = list(self.teachers)
        stacked = torch.stack([logits[name].float() for name in names])  # (K, B, C)
        return mixture_logits(stacked, torch.log(self.sample_weights(names, stacked, targets)), self.temperature)

    def sample_weights(self, names: list[str], logits: Tensor, targets: Tensor | None) -> Tensor:
        """Per-teacher, per-sample weights ``(K, B)`` summing to 1 over teachers."""
        K, B = logits.shape[:2]
        if self.combine == "mean":
            return torch.full((K, B), 1.0 / K, device=logits.device)
        if self.combine == "weights":  # one constant per teacher, filled on the device (no host-to-device copy)
            weights = [torch.full((1, B), self.fixed_weights[n], device=logits.device) for n in names]
            return torch.cat(weights)
        log_p = F.log_softmax(logits, dim=-1)
        entropy = -(log_p.exp() * log_p).sum(-1)  # (K, B)
        if targets is None:
            return torch.softmax(-entropy, dim=0)
        labelled = targets != UNLABELLED
        picked = log_p.gather(-1, targets.clamp(min=0)[None, :, None].expand(K, B, 1)).squeeze(-1)
        loss = torch.where(labelled[None], -picked, entropy)
        return torch.softmax(-loss, dim=0)

    def teacher_logits_of(self, x: Tensor, split: str, index: Tensor | None) -> dict[str, Tensor]:
        return {name: teacher.logits(x, split, index) for name, teacher in self.teachers.items()}

    def distilled_outputs(self, x: Inputs, split: str, index: Tensor | None) -> dict[str, dict[str, Tensor]]:
        """Each teacher the loss reads by its own name, and the combined target as ``teacher``; the labels
        (for ``combine=confidence``) come from :meth:`training_step` through ``self._targets``."""
        outputs = super().distilled_outputs(x, split, index)
        logits = {
            name: outputs[name]["logits"] if name in outputs else t.logits(x, split, index)
            for name, t in self.teachers.items()
        }
        outputs[COMBINED] = {"logits": self.combined(logits, self._targets)}
        return outputs

    #: The labels of the batch in training, for ``combine=confidence`` (set around the parent's step).
    _targets: Tensor | None = None

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        self._targets = batch[1]
        try:
            return super().training_step(batch, batch_idx)
        finally:
            self._targets = None

    # ---------------------------------------------------------------------------------- evaluation
    def compared_val_logits(
        self, x: Tensor, y: Tensor, index: Tensor | None, key: tuple[int, int], store: bool, student: Tensor
    ) -> Tensor:
        logits = {name: t.val_logits(x, index, key, store) for name, t in self.teachers.items()}
        for name, teacher_logits in logits.items():
            self.per_teacher_val[name](teacher_logits, y)
            self.per_teacher_agreement[name](student, teacher_logits.argmax(-1))
            self.log(f"teacher/{name}/val_acc", self.per_teacher_val[name])
            self.log(f"val/agreement/{name}", self.per_teacher_agreement[name])
        return self.combined(logits, y)

    def compared_test_logits(self, x: Tensor, y: Tensor, index: Tensor | None) -> Tensor:
        logits = self.teacher_logits_of(x, "test", index)
        for name, teacher_logits in logits.items():
            self.per_teacher_test[name](teacher_logits, y)
            self.log(f"teacher/{name}/test_acc", self.per_teacher_test[name])
        return self.combined(logits, y)
