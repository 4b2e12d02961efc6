"""Everything a run can check before any training: run after the models and data are built, before a
teacher is trained or a step is taken, so bad input costs seconds, not a teacher fit."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from torch import nn

from kd_lightning.data.contract import HasTrainSize, check_label_mixing
from kd_lightning.engine.checks import check_constructor_options, check_fit, check_monitored
from kd_lightning.engine.errors import ConfigError
from kd_lightning.engine.instantiate import build
from kd_lightning.methods.base import Method
from kd_lightning.recipes.teacher import config_key

log = logging.getLogger(__name__)


def preflight(
    cfg: DictConfig,
    factory: Callable[..., Method],
    loss: Any,
    datamodule: L.LightningDataModule,
    models: Mapping[str, nn.Module],
    teacher_cfgs: Mapping[str, DictConfig],
    trainer: L.Trainer,
) -> None:
    """The method's own checks (``factory``: its constructor with the configured options; layer paths, models
    read), the teachers' fit recipes, a non-empty training
    set, and that ``optimized_metric`` and every monitored metric will be logged."""
    method: type[Method] = factory.func  # type: ignore[attr-defined]
    check_teacher_count(method, teacher_cfgs)
    method.check_options(factory.keywords, models)  # type: ignore[attr-defined]
    method.check_trainer(trainer)
    cached = bool(teacher_cfgs) and bool(cfg.get("teacher_cache"))
    method.check_config(loss, models, cached)
    if cached:
        build(cfg.teacher_cache, "teacher_cache").check_data(datamodule)
    check_label_mixing(datamodule, loss, trainer.callbacks)
    for name, teacher_cfg in teacher_cfgs.items():
        if teacher_cfg.get("fit") and not teacher_cfg.get("checkpoint"):
            check_fit(teacher_cfg.fit, f"{config_key(name)}.fit")
    if isinstance(datamodule, HasTrainSize) and datamodule.num_train_samples < 1:
        raise ConfigError("the training set is empty (data.num_train_samples = 0); check the data config")
    check_monitored(method.metric_names(loss, list(teacher_cfgs)), trainer.callbacks, cfg.optimized_metric)


def check_option_names(factory: Callable[..., Method]) -> None:
    """Every ``method.<key>`` names an argument of the method's constructor (:func:`check_constructor_options`)."""
    check_constructor_options(factory, "method", OFFERED)


#: What the classifier recipes pass every method themselves (:func:`~kd_lightning.recipes.components.offer`).
OFFERED = frozenset({"student", "teacher", "teachers", "loss", "optimizer", "scheduler", "num_classes", "runtime"})


def check_teacher_count(method: type[Method], teacher_cfgs: Mapping[str, DictConfig]) -> None:
    """The method takes as many teachers (``method.teachers``) as it has: ``Method.teacher_range``."""
    fewest, most = method.teacher_range
    count = len(teacher_cfgs)
    if fewest <= count and (most is None or count <= most):
        return
    takes = f"{fewest}" if fewest == most else f"{fewest} to {most}" if most is not None else f"at least {fewest}"
    fix = (
        f"drop the extra ones (e.g. ~method.teachers.{next(iter(teacher_cfgs))} on the command line)"
        if most is not None and count > most
        else "add one (method.teachers.teacher=${teacher})"
    )
    raise ConfigError(
        f"{method.__name__} takes {takes} teacher(s) in method.teachers, got {count} {sorted(teacher_cfgs)}; {fix}"
    )


def check_resume_checkpoint(ckpt_path: str, method: Method) -> None:
    """The checkpoint to resume must hold this method's trainable weights with their shapes (a checkpoint of
    another student architecture is refused by name); one distilled from other teachers gets a warning."""
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise ConfigError(
            f"ckpt_path={ckpt_path} could not be read as a checkpoint ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); point ckpt_path at a kd-distill checkpoint"
        ) from None
    state = checkpoint.get("state_dict", {}) if isinstance(checkpoint, dict) else {}
    frozen = tuple(f"{name}." for name in method.frozen_models())
    expected = {name: tensor.shape for name, tensor in method.state_dict().items() if not name.startswith(frozen)}
    missing = sorted(name for name in expected if name not in state)
    mismatched = sorted(n for n in expected if n in state and tuple(state[n].shape) != tuple(expected[n]))
    if missing or mismatched:
        what = f"missing: {missing[:3]}" if missing else f"shape differs: {mismatched[:3]}"
        raise ConfigError(
            f"ckpt_path={ckpt_path} is not a checkpoint of this student/method ({what}); resume with the "
            "student config it was trained with, or start a fresh run"
        )
    stored = ((checkpoint.get("kd_lightning") or {}) if isinstance(checkpoint, dict) else {}).get("teachers") or {}
    current = method.resume_state().get("teachers") or {}
    differing = sorted(name for name in stored if name in current and stored[name] != current[name])
    if differing:
        log.warning(
            "ckpt_path=%s was distilled from other weights of %s than this run's; resuming anyway", ckpt_path, differing
        )
