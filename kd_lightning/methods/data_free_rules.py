"""The rules of ``method=data_free``, each refused in one line naming the config key before training.

The method's own option values, the teacher's BatchNorm (the prior needs it), the loss (it must distil and keep
no per-sample memory), the teacher-output cache (nothing per sample to store) and the DDP strategy (each step
leaves some parameters without a gradient). The method is :class:`~kd_lightning.methods.data_free.DataFreeDistillation`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from kd_lightning.engine.errors import ConfigError, check_type
from kd_lightning.losses import DistillationLoss
from kd_lightning.methods.data_free_prior import batch_norm_layers

TARGETS = ("sampled", "argmax")


def check_batch_norm(teacher: nn.Module, bn_weight: float) -> None:
    """The BatchNorm prior (``bn_weight > 0``) needs a teacher with BatchNorm layers."""
    if bn_weight > 0 and not batch_norm_layers(teacher):
        raise ConfigError(
            f"method=data_free matches the teacher's BatchNorm statistics (method.bn_weight={bn_weight}), but "
            f"teacher {type(teacher).__name__} has no BatchNorm layers; use a teacher with BatchNorm "
            "(teacher=cnn1d_bn) or set method.bn_weight=0"
        )


def check_settings(settings: Mapping[str, Any]) -> None:
    """The method's own options (those in ``settings``), each refused in one line naming ``method.<key>``."""
    for key in ("batch_size", "steps_per_epoch", "student_steps"):
        if key in settings:
            check_type(settings[key], int, f"method.{key}")
            if settings[key] < 1:
                raise ConfigError(f"method.{key}={settings[key]} must be an integer >= 1")
    for key in ("bn_weight", "ce_weight", "adv_weight", "ie_weight"):
        if key in settings:
            check_type(settings[key], (int, float), f"method.{key}")
            if not math.isfinite(settings[key]) or settings[key] < 0:
                raise ConfigError(f"method.{key}={settings[key]} must be a finite number >= 0 (0 disables the term)")
    lr = settings.get("generator_lr")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, int | float) or not lr > 0 or lr == math.inf):
        raise ConfigError(f"method.generator_lr={lr!r} must be a finite number > 0 (null: optimizer.lr)")
    if "targets" in settings and settings["targets"] not in TARGETS:
        raise ConfigError(f"method.targets={settings['targets']!r}: use one of {list(TARGETS)}")
    augment = settings.get("augment")
    if augment is not None and not callable(augment):
        raise ConfigError(f"method.augment must be a callable on a batch of inputs (or null), got {augment!r}")


def check_loss(loss: nn.Module | None, cached_teachers: bool) -> None:
    """No teacher-output cache, a loss that distils (there are no labels) and keeps no per-sample memory."""
    if cached_teachers:
        raise ConfigError(
            "method=data_free generates new inputs every step, so there are no per-sample teacher outputs "
            "for teacher_cache to store; set teacher_cache=none"
        )
    if not isinstance(loss, DistillationLoss) or not loss.needs_teacher:
        raise ConfigError(
            "method=data_free has no labels, only the teacher: use a distillation loss with loss.alpha > 0 "
            "and at least one term (loss=kd)"
        )
    if loss.uses_index:
        users = sorted(name for name, term in loss.terms.items() if term.uses_index)
        raise ConfigError(
            f"loss.terms {users} keep a memory per training sample, but method=data_free generates new "
            "inputs every step; use a loss without one (loss=kd, dkd, dist, at, ...)"
        )


def check_strategy(trainer: L.Trainer) -> None:
    """Generator and student steps each leave the other's parameters without a gradient: under DDP the
    strategy must look for unused parameters."""
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and not strategy._ddp_kwargs.get("find_unused_parameters"):
        raise ConfigError(
            "method=data_free updates the generator and the student in turns, so each backward leaves some "
            "parameters without a gradient, which DDP must expect: set "
            "trainer.strategy=ddp_spawn_find_unused_parameters_true (or ddp_find_unused_parameters_true)"
        )
