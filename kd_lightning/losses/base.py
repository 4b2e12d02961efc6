"""The distillation objective: a hard-label task term plus weighted distillation terms.

:class:`DistillationLoss` combines the masked cross-entropy of the student's logits with the terms of
:mod:`kd_lightning.losses.terms` (each declares what it reads; the loss routes every model's outputs to
it) and relays the terms' hooks (example-batch shapes, bound models, pre-training, epoch starts).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.engine.errors import ConfigError, check_fraction, check_positive, check_type
from kd_lightning.losses.precision import at_least_fp32
from kd_lightning.losses.reads import LOGITS, Routing, as_tuple, routed
from kd_lightning.losses.terms import DistillationTerm

#: Targets equal to this value mark unlabelled samples (e.g. a teacher-labelled transfer set):
#: they are left out of the task term and still take part in every distillation term.
UNLABELLED = -1

#: The model whose logits the task (cross-entropy) term reads.
TASK_MODEL = "student"


class LossOutput(NamedTuple):
    """The weighted total to back-propagate and every unweighted part, keyed by term name."""

    total: Tensor
    parts: dict[str, Tensor]


def masked_cross_entropy(
    logits: Tensor, targets: Tensor, label_smoothing: float = 0.0, label_count: Tensor | None = None
) -> Tensor:
    """Cross-entropy summed over labelled samples and divided by ``label_count`` (default: this batch's
    number of labelled samples; 0, with a graph, when none is labelled). Data-parallel training passes
    the mean count per process, which makes the averaged gradients those of the global batch mean."""
    labelled = targets != UNLABELLED
    if label_count is None:
        label_count = labelled.sum()
    summed = F.cross_entropy(
        at_least_fp32(logits), targets, ignore_index=UNLABELLED, reduction="sum", label_smoothing=label_smoothing
    )
    return summed / label_count.clamp(min=1)


class DistillationLoss(nn.Module):
    r"""Weighted sum of the hard-label task loss and distillation terms.

    .. math::
        L = s\,\Big[(1 - \alpha)\,\mathrm{CE}_{\epsilon}(z_s, y) + \alpha \sum_i w_i\, L_i(s, t)\Big]

    with :math:`\alpha \in [0, 1]` (``alpha = 0``: plain supervised training, the teacher is never
    run; ``alpha = 1``: distillation only), :math:`\epsilon` the label smoothing of the
    cross-entropy, :math:`w_i` the per-term weights (1 by default) and :math:`s` an overall ``scale`` (1 by
    default). Papers that state their loss as :math:`\lambda\,\mathrm{CE} + \sum_i \beta_i L_i` are this with
    :math:`\alpha = 1/2`, :math:`s = 2\lambda`, :math:`w_i = \beta_i / \lambda` (the same gradients, so the
    published learning rate and weight decay apply unchanged). With the single term
    :class:`~kd_lightning.losses.logits.KLDivergence` this is Hinton et al., "Distilling the
    Knowledge in a Neural Network" (2015): :math:`L_{kd} = T^2\,\mathrm{KL}(\sigma(z_t/T)\,\|\,
    \sigma(z_s/T))`.

    Samples whose target is ``-1`` are unlabelled: the task term averages over labelled samples
    only, the distillation terms use every sample.

    Args:
        terms: distillation terms by name (the name appears in logs as ``train/loss_<name>``).
        alpha: weight of distillation against the task loss, in [0, 1].
        temperature: softmax temperature ``T > 0`` shared by every term that has one.
        label_smoothing: label smoothing of the task cross-entropy, in [0, 1).
        weights: optional per-term weights ``w_i`` (default 1 each).
        scale: overall multiplier ``s > 0`` of the loss (default 1).
    """

    def __init__(
        self,
        terms: Mapping[str, DistillationTerm] | None = None,
        alpha: float = 0.9,
        temperature: float = 4.0,
        label_smoothing: float = 0.0,
        weights: Mapping[str, float] | None = None,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        check_type(scale, (int, float), "loss.scale")
        if not (math.isfinite(scale) and scale > 0):
            raise ConfigError(f"loss.scale={scale} must be a finite number > 0 (1: the loss as combined)")
        self.scale = float(scale)
        self.terms = nn.ModuleDict(dict(terms or {}))
        self.alpha = alpha
        self.temperature = temperature
        check_type(label_smoothing, (int, float), "loss.label_smoothing")
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"loss.label_smoothing={label_smoothing} must be in [0, 1); 0 disables it")
        self.label_smoothing = float(label_smoothing)
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(self.terms))
        if unknown:
            raise ConfigError(
                f"loss.weights names {unknown}, which are not in loss.terms {sorted(self.terms)}; "
                "weight only configured terms"
            )
        for name, weight in weights.items():
            check_type(weight, (int, float), f"loss.weights.{name}")
        self.weights = {name: float(weights.get(name, 1.0)) for name in self.terms}

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        note = "; set loss.alpha between 0 (supervised only) and 1 (distillation only)"
        self._alpha = check_fraction(value, "loss.alpha", note)

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        """The shared temperature: every term with one and no ``temperature`` of its own follows it."""
        self._temperature = check_positive(value, "loss.temperature", " (4 is the usual default)")
        for term in self.terms.values():
            if getattr(term, "follows_loss_temperature", False):
                term.temperature = self._temperature

    def reads(self) -> dict[str, list[tuple[Routing, str]]]:
        """Every term's two routings, with the config key of the term (``loss.terms.<name>``)."""
        return {f"loss.terms.{name}": [term.student_read, term.teacher_read] for name, term in self.terms.items()}  # type: ignore[return-value]

    def layers(self, model: str) -> dict[str, str]:
        """The tensors the terms read from ``model`` other than its logits: output key (a dotted module
        path, ``<path>:input`` for a layer's input) -> the config key that names it."""
        paths: dict[str, str] = {}
        for key, routings in self.reads().items():
            for routing in routings:
                for read in as_tuple(routing):
                    if read.model == model and read.is_layer:
                        paths.setdefault(read.key, f"{key}.{read.field}")
        return paths

    @functools.cached_property
    def models_read(self) -> frozenset[str]:
        """Names of the models the distillation terms read (the student's logits feed the task term); the terms
        and their reads are fixed when the loss is built, so this is computed once (forward asks every step)."""
        return frozenset(read.model for routings in self.reads().values() for r in routings for read in as_tuple(r))

    def setup_shapes(self, outputs: Mapping[str, Mapping[str, Tensor]], num_samples: int | None = None) -> None:
        """Let every term size its adapters / check shapes from one example batch's outputs (by model name);
        terms that use sample indices first get the training-set size ``num_samples``."""
        for name, term in self.terms.items():
            if term.uses_index:
                term.setup_data(num_samples, f"loss.terms.{name}")
            term.setup_shapes(
                routed(outputs, term.student_read), routed(outputs, term.teacher_read), f"loss.terms.{name}"
            )

    def bind_models(self, models: Mapping[str, nn.Module]) -> None:
        """Give every term the method's models by name (:meth:`DistillationTerm.bind_models`)."""
        for name, term in self.terms.items():
            term.bind_models(models, f"loss.terms.{name}")

    @property
    def pretrains(self) -> bool:
        """Whether some term trains parts of its own before the first epoch (:meth:`DistillationTerm.pretrain`)."""
        return self.needs_teacher and any(term.pretrains for term in self.terms.values())

    def pretrain(self, passes: Callable[[], Iterable[Mapping[str, Mapping[str, Tensor]]]]) -> None:
        """Run :meth:`DistillationTerm.pretrain` of every term that has it; ``passes()`` iterates once over the
        training data, yielding the teachers' outputs by model name, routed here to each term's teacher read."""
        for name, term in self.terms.items():
            if term.pretrains:
                read = term.teacher_read
                term.pretrain(lambda read=read: (routed(outputs, read) for outputs in passes()), f"loss.terms.{name}")

    def start_epoch(self, epoch: int) -> None:
        """Tell every term that training epoch ``epoch`` (0-based) starts (:meth:`DistillationTerm.start_epoch`)."""
        for term in self.terms.values():
            term.start_epoch(epoch)

    @functools.cached_property
    def uses_index(self) -> bool:
        """Whether some term needs the batch's dataset sample indices (batches ``(x, y, index)``); fixed with
        the terms, computed once."""
        return any(term.uses_index for term in self.terms.values())

    @property
    def has_adapters(self) -> bool:
        """Whether some term sizes adapters from an example batch before training."""
        return any(term.has_adapters for term in self.terms.values())

    @property
    def needs_example(self) -> bool:
        """Whether some term must see one example batch before training: it reads intermediate layers
        (shape checks), sizes adapters or indexes samples. Logit-only losses need none."""
        tapped = any(self.layers(model) for model in self.models_read)
        return tapped or self.has_adapters or self.uses_index

    @property
    def needs_teacher(self) -> bool:
        """Whether the distillation terms run, so the models they read are needed (False for alpha = 0
        or no terms)."""
        return self.alpha > 0.0 and len(self.terms) > 0

    @property
    def distils(self) -> bool:
        """Whether some distillation term counts in the total: ``alpha > 0`` and a term of non-zero weight
        (False: the loss is the cross-entropy alone, supervised training)."""
        return self.needs_teacher and any(weight != 0.0 for weight in self.weights.values())

    @property
    def weighs_task_term(self) -> bool:
        """Whether the hard-label cross-entropy counts in the total (``alpha < 1``); only then does its divisor,
        the number of labelled samples (``label_count``, all-reduced under data parallelism), matter."""
        return self.alpha < 1.0

    @property
    def label_terms(self) -> list[str]:
        """The distillation terms that count in the total (``alpha > 0``, non-zero weight) and read the hard
        labels (:attr:`DistillationTerm.reads_labels`: DKD, NKD, SDD, WKD-L split on the target class)."""
        if not self.needs_teacher:
            return []
        return [name for name, term in self.terms.items() if term.reads_labels and self.weights[name] != 0.0]

    @property
    def reads_labels(self) -> bool:
        """Whether the total depends on the hard labels: the cross-entropy counts (:attr:`weighs_task_term`)
        or a distillation term reads them (:attr:`label_terms`)."""
        return self.weighs_task_term or bool(self.label_terms)

    def forward(
        self,
        outputs: Mapping[str, Mapping[str, Tensor]],
        targets: Tensor,
        index: Tensor | None = None,
        label_count: Tensor | None = None,
    ) -> LossOutput:
        """Combine the task term on the student's logits with every distillation term; ``outputs`` holds
        each model's outputs by name (``{"student": {"logits": ..., "<layer>": ...}, "teacher": ...}``);
        ``index`` (the batch's dataset sample indices) goes, as a keyword, only to terms with
        ``uses_index``; ``label_count`` is what the task term divides by (see :func:`masked_cross_entropy`)."""
        logits = outputs[TASK_MODEL][LOGITS]
        parts = {"ce": masked_cross_entropy(logits, targets, self.label_smoothing, label_count)}
        total = (1.0 - self.alpha) * parts["ce"]
        if self.needs_teacher:
            missing = sorted(self.models_read - set(outputs))
            if missing:
                raise RuntimeError(f"DistillationLoss with alpha > 0 needs the outputs of {missing}")
            for name, term in self.terms.items():
                extra = {"index": index} if term.uses_index else {}
                parts[name] = term(
                    routed(outputs, term.student_read), routed(outputs, term.teacher_read), targets, **extra
                )
                total = total + self.alpha * self.weights[name] * parts[name]
        return LossOutput(total=self.scale * total if self.scale != 1.0 else total, parts=parts)
