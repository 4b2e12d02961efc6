"""The distillation objective: a hard-label task term plus weighted distillation terms.

Every distillation term has the same call shape::

    term(a: Tensor, b: Tensor, targets: Tensor | None = None) -> Tensor  # scalar

and declares what its two arguments are (:class:`~kd_lightning.losses.reads.Read`: a model by name, a
layer, output or input; by default ``a`` is the student's and ``b`` the teacher's logits), so
:class:`DistillationLoss` routes the outputs of every model to the terms without knowing what they are.
Two opt-in extensions keep that shape for every other term:

- a :class:`MultiLayerTerm` reads several layers per argument and gets lists of tensors;
- a term with ``uses_index = True`` (e.g. CRD's memory bank) also gets the batch's dataset sample
  indices as the keyword ``index`` and the training-set size through :meth:`DistillationTerm.setup_data`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.engine.errors import ConfigError, check_type
from kd_lightning.losses.precision import at_least_fp32
from kd_lightning.losses.reads import LOGITS, ReadSpec, Routing, as_tuple, read_of, reads_of, routed

#: Targets equal to this value mark unlabelled samples (e.g. a teacher-labelled transfer set):
#: they are left out of the task term and still take part in every distillation term.
UNLABELLED = -1

#: The model whose logits the task (cross-entropy) term reads.
TASK_MODEL = "student"


class DistillationTerm(nn.Module):
    """Base class of distillation terms: ``forward(a, b, targets=None) -> scalar``.

    ``student`` / ``teacher`` (``{model, layer, io}``, each optional) say what ``a`` and ``b`` are; by
    default the logits of the models named ``student`` and ``teacher``. They are kept as
    ``student_read`` / ``teacher_read``.
    """

    #: Whether :meth:`setup_shapes` creates parameters (which must exist before the optimizer is built).
    has_adapters: bool = False
    #: Whether ``forward`` takes the keyword ``index`` (the batch's dataset sample indices, ``(B,)``);
    #: such terms need a datamodule that yields ``(x, y, index)`` batches (``data.return_index=true``).
    uses_index: bool = False
    #: Whether :meth:`pretrain` trains parts of the term (FT's paraphraser) before the student's first epoch.
    pretrains: bool = False

    def __init__(self, student: ReadSpec = None, teacher: ReadSpec = None) -> None:
        super().__init__()
        self.student_read: Routing = read_of(student, "student")
        self.teacher_read: Routing = read_of(teacher, "teacher")

    def setup_shapes(self, student: Tensor, teacher: Tensor, key: str) -> None:
        """Called once before training with the outputs of one example batch: size adapters, check
        shapes (raise a :class:`ConfigError` naming ``key``). Terms without either do nothing."""

    def setup_data(self, num_samples: int | None, key: str) -> None:
        """Called before :meth:`setup_shapes` for terms with ``uses_index``: ``num_samples`` is the size of
        the training set the indices range over (``None`` when the datamodule does not say)."""

    def start_epoch(self, epoch: int) -> None:
        """Called at every training epoch start with the 0-based epoch, by the methods that train with the
        loss: terms with a schedule of their own (CTKD's curriculum) set it here, as a function of the epoch
        only, so a resumed run continues it. Other terms do nothing."""

    def bind_models(self, models: Mapping[str, nn.Module], key: str) -> None:
        """Called once by the method, before :meth:`setup_shapes`, with its models by name (``student``,
        ``teacher``, ...): terms that use a model's own modules (SRD: the teacher's classifier; OFD: its BatchNorms)
        look them up here (a :class:`ConfigError` naming ``key`` if absent) and keep them unregistered, out of
        the term's parameters and state dict. Other terms do nothing."""

    def pretrain(self, teacher_passes: Callable[[], Iterable[Tensor | list[Tensor]]], key: str) -> None:
        """Called by the method at the start of training, for terms with ``pretrains``, after the optimizer is
        built: each ``teacher_passes()`` iterates once over the training data and yields, per batch, what the
        term's teacher read is (the teachers frozen, the student not run). Terms train modules of their own here
        with optimizers of their own (FT's paraphraser), keep them out of the student's optimizer (no
        ``requires_grad`` when it is built) and skip what a restored checkpoint already holds."""


class LayerTerm(DistillationTerm):
    """A term on intermediate outputs: ``student_layer`` / ``teacher_layer`` are dotted module paths
    (e.g. ``features.2``, ``layer3``) of the student and teacher, shorthands for
    ``student: {layer: ...}`` / ``teacher: {layer: ...}`` (which may also name another model and
    ``io: input``); ``"logits"`` reads the model outputs. ``beta`` is the method's published weight."""

    def __init__(
        self,
        student_layer: str = LOGITS,
        teacher_layer: str = LOGITS,
        beta: float = 1.0,
        student: ReadSpec = None,
        teacher: ReadSpec = None,
    ) -> None:
        super().__init__()
        self.student_read = read_of(student, "student", student_layer, "student_layer")
        self.teacher_read = read_of(teacher, "teacher", teacher_layer, "teacher_layer")
        self.beta = float(beta)


class MultiLayerTerm(DistillationTerm):
    """A term on several intermediate outputs per side: ``student_layers`` / ``teacher_layers`` are lists
    of dotted module paths, paired in order; ``forward`` and ``setup_shapes`` get lists of tensors in
    the same order. ``student`` / ``teacher`` (``{model, io}``) pick other models or layer inputs.
    ``beta`` is the method's published weight."""

    def __init__(
        self,
        student_layers: Sequence[str],
        teacher_layers: Sequence[str],
        beta: float = 1.0,
        student: ReadSpec = None,
        teacher: ReadSpec = None,
    ) -> None:
        super().__init__()
        self.student_read = reads_of(student, "student", list(student_layers), "student_layers")
        self.teacher_read = reads_of(teacher, "teacher", list(teacher_layers), "teacher_layers")
        name = type(self).__name__
        if not self.student_read or len(self.student_read) != len(self.teacher_read):
            raise ConfigError(
                f"{name} pairs student_layers {list(student_layers)} with teacher_layers "
                f"{list(teacher_layers)} in order; give both lists the same (non-zero) length"
            )
        self.beta = float(beta)


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
        check_type(value, (int, float), "loss.alpha")
        if not 0.0 <= value <= 1.0:
            raise ConfigError(
                f"loss.alpha={value} is outside [0, 1]; set loss.alpha between 0 "
                "(supervised only) and 1 (distillation only)"
            )
        self._alpha = float(value)

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        """The shared temperature: every term with one and no ``temperature`` of its own follows it."""
        check_type(value, (int, float), "loss.temperature")
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"loss.temperature={value} must be > 0 (4 is the usual default)")
        self._temperature = float(value)
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
