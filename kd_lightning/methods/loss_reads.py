"""What a :class:`~kd_lightning.losses.DistillationLoss` demands of the method that runs it, checked early.

:func:`check_loss_reads` holds the config-time rules of ``method=kd`` and its subclasses
(:meth:`~kd_lightning.methods.kd.DistillationModule.check_config`): every model a term reads exists, every
teacher is read, every layer path exists, cached teachers serve logits only. :func:`check_sample_index` is the
training-time rule that terms indexed by sample get batches with indices; :func:`check_distils` refuses teachers
for a loss that distils nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from kd_lightning.engine.errors import ConfigError
from kd_lightning.engine.taps import Taps
from kd_lightning.losses import DistillationLoss
from kd_lightning.losses.base import TASK_MODEL


def check_distils(loss: DistillationLoss, models: Mapping[str, nn.Module]) -> None:
    """Refuse teachers (``models`` beyond the student) with a loss that distils nothing (``loss.alpha = 0``, every
    term weighted 0, or no terms): that is supervised training, whose method never loads a teacher."""
    if loss.distils or not set(models) - {TASK_MODEL}:
        return
    why = (
        f"loss.alpha={loss.alpha:g}"
        if loss.alpha == 0.0
        else f"loss.weights={loss.weights}"
        if loss.terms
        else "loss.terms={}"
    )
    raise ConfigError(
        f"{why} distils nothing (cross-entropy only), so the teacher would never be used; train the student "
        "alone with method=supervised, or give the distillation a weight (loss.alpha > 0, loss.weights > 0)"
    )


def check_loss_reads(
    loss: DistillationLoss, models: Mapping[str, nn.Module], cached_teachers: bool, combines: bool
) -> None:
    """Every model ``loss`` reads must be in ``models`` (the student or a teacher), every teacher must be read
    by some term unless the method ``combines`` the teachers' outputs itself, every layer a term names must
    exist (hooks installed and removed again), and with ``cached_teachers`` no term may read a teacher's
    layer. Each failure is a :class:`ConfigError` naming the config key."""
    for key, routings in loss.reads().items():
        for routing in routings:
            for read in routing if isinstance(routing, tuple) else (routing,):
                if read.model not in models:
                    raise ConfigError(
                        f"{key}.{read.field.split('.')[0]} reads model {read.model!r}, which this method does "
                        f"not have ({sorted(models)}); name one of them, or add it to method.teachers"
                    )
    # Unless the method makes the loss's targets itself (e.g. a combination of teachers), a teacher no term
    # reads would be obtained, maybe trained, for nothing.
    unread = [] if combines else sorted(set(models) - loss.models_read - {TASK_MODEL})
    if unread:
        raise ConfigError(
            f"method.teachers.{unread[0]} is read by no loss term, so it would be obtained (maybe trained) for "
            f"nothing; remove it (~method.teachers.{unread[0]}) or point a term at it "
            f"(loss.terms.<term>.teacher.model={unread[0]})"
        )
    for name in loss.models_read & set(models):
        layers = loss.layers(name)
        Taps(models[name], layers).remove()
        if cached_teachers and name != TASK_MODEL and layers:
            path, config_key = next(iter(layers.items()))
            raise ConfigError(
                f"teacher_cache stores teacher logits only, but {config_key}={path} reads a layer of {name}; "
                "set teacher_cache=none for feature losses"
            )


def check_sample_index(loss: DistillationLoss, index: Tensor | None) -> None:
    """Terms with ``uses_index`` (e.g. CRD's memory bank) need the batch's dataset sample indices: a
    :class:`ConfigError` naming ``data.return_index`` when a batch came without them."""
    if index is None and loss.uses_index:
        users = sorted(name for name, term in loss.terms.items() if term.uses_index)
        raise ConfigError(
            f"loss.terms {users} need dataset sample indices but batches are (x, y): set "
            "data.return_index=true (or use a datamodule whose batches are (x, y, index))"
        )
