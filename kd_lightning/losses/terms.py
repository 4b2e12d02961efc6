"""The term base classes: what every distillation term is and declares.

Every distillation term has the same call shape::

    term(a: Tensor, b: Tensor, targets: Tensor | None = None) -> Tensor  # scalar

and declares what its two arguments are (:class:`~kd_lightning.losses.reads.Read`: a model by name, a
layer, output or input; by default ``a`` is the student's and ``b`` the teacher's logits), so
:class:`~kd_lightning.losses.base.DistillationLoss` routes the outputs of every model to the terms without
knowing what they are. Two opt-in extensions keep that shape for every other term:

- a :class:`MultiLayerTerm` reads several layers per argument and gets lists of tensors;
- a term with ``uses_index = True`` (e.g. CRD's memory bank) also gets the batch's dataset sample
  indices as the keyword ``index`` and the training-set size through :meth:`DistillationTerm.setup_data`.

The hooks a term may implement (:meth:`DistillationTerm.setup_shapes`, ``setup_data``, ``start_epoch``,
``bind_models``, ``pretrain``) are called by the loss and the method; every one does nothing by default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from torch import Tensor, nn

from kd_lightning.engine.errors import ConfigError
from kd_lightning.losses.reads import LOGITS, ReadSpec, Routing, read_of, reads_of


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
    #: Whether ``forward`` reads the hard labels ``targets`` (DKD, NKD, SDD, WKD-L split on the target class):
    #: the loss then depends on the labels even without its cross-entropy (``loss.alpha = 1``).
    reads_labels: bool = False

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
