"""The parts of ``method=data_free`` around its module: the option checks and DeepInversion's BatchNorm prior."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.engine.errors import ConfigError, check_type

TARGETS = ("sampled", "argmax")
#: The generator's loss parts, logged as ``train/loss_generator_<part>`` (and the total as ``train/loss_generator``).
GENERATOR_PARTS = ("bn", "ce", "adv", "ie")


def batch_norm_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """``model``'s BatchNorm layers that keep running statistics, by dotted path."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    ]


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


class BatchNormPrior:
    r"""DeepInversion's feature-distribution prior (Yin et al. 2020) on a frozen model's BatchNorm layers.

    Forward hooks read each BatchNorm layer's input :math:`a_l` (channels on dim 1) and, inside
    :meth:`capture`, keep :math:`\|\mu(a_l) - \hat\mu_l\|_2 + \|\sigma^2(a_l) - \hat\sigma^2_l\|_2`: the batch's
    per-channel mean and (biased) variance against the layer's running statistics. Outside a capture the
    hooks keep nothing (validation forwards pay a function call per layer).
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = batch_norm_layers(model)
        self._terms: list[Tensor] | None = None
        self._handles = [module.register_forward_hook(self._record) for _, module in self.layers]

    def _record(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if self._terms is None:
            return
        a = inputs[0].float()
        dims = [d for d in range(a.dim()) if d != 1]
        mean, var = a.mean(dims), a.var(dims, unbiased=False)
        self._terms.append(
            torch.linalg.vector_norm(mean - module.running_mean.float())
            + torch.linalg.vector_norm(var - module.running_var.float())
        )

    @contextmanager
    def capture(self) -> Iterator[list[Tensor]]:
        """Collect one term per BatchNorm layer run inside the block (in call order)."""
        self._terms = []
        try:
            yield self._terms
        finally:
            self._terms = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
