"""DeepInversion's BatchNorm prior of ``method=data_free`` and the names of its generator's loss parts.

The method's rules (option values, teacher, loss, cache, strategy) are :mod:`kd_lightning.methods.data_free_rules`'s.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

#: The generator's loss parts, logged as ``train/loss_generator_<part>`` (and the total as ``train/loss_generator``).
GENERATOR_PARTS = ("bn", "ce", "adv", "ie")


def batch_norm_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """``model``'s BatchNorm layers that keep running statistics, by dotted path."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    ]


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
