"""A small generator of 1-D signals for data-free distillation (``method=data_free``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kd_lightning.engine.errors import ConfigError


class Generator1D(nn.Module):
    """Noise (and optionally a class) -> a batch of 1-D signals of ``shape``, DAFL's generator in 1-D.

    ``z`` (``latent_dim``) -> Linear -> ``(hidden, ceil(L / 4))`` -> BatchNorm -> 2 x (Upsample(2) -> Conv1d(3)
    -> BatchNorm -> LeakyReLU(0.2)) -> Conv1d(3) to the signal's channels -> BatchNorm (affine: the output
    starts standardised per channel, and its scale and offset are learned) -> cropped to length ``L``.
    With ``num_classes`` the generator is class-conditional: a learned class embedding is concatenated to
    ``z`` (the method then asks the teacher for the sampled class).

    Args:
        shape: one sample's shape, ``(channels, length)`` or ``(length,)`` (e.g. ``(1, 40)`` for MNIST-1D).
        latent_dim: size of the noise ``z``.
        hidden: channels of the first conv stage (the second has ``hidden // 2``).
        num_classes: condition on a class label (``forward(z, y)``); None: unconditional (``forward(z)``).
    """

    def __init__(
        self, shape: Sequence[int], latent_dim: int = 64, hidden: int = 64, num_classes: int | None = None
    ) -> None:
        super().__init__()
        shape = tuple(int(d) for d in shape)
        if len(shape) not in (1, 2) or min(shape, default=0) < 1:
            raise ConfigError(
                f"method.generator makes 1-D signals (channels, length) or (length,), but the data's inputs have "
                f"shape {list(shape)}; give method.generator a model for these inputs"
            )
        if latent_dim < 1 or hidden < 2:
            raise ConfigError(f"method.generator: latent_dim={latent_dim} must be >= 1 and hidden={hidden} >= 2")
        self.shape = shape
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        channels, self.length = (1, shape[0]) if len(shape) == 1 else shape
        self.base = math.ceil(self.length / 4)
        self.hidden = hidden
        self.embed = nn.Embedding(num_classes, latent_dim) if num_classes else None
        inputs = latent_dim * (2 if num_classes else 1)
        self.project = nn.Sequential(nn.Linear(inputs, hidden * self.base), nn.BatchNorm1d(hidden * self.base))
        self.body = nn.Sequential(
            nn.Upsample(scale_factor=2),
            nn.Conv1d(hidden, hidden, 3, padding=1, bias=False),
            nn.BatchNorm1d(hidden),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv1d(hidden, hidden // 2, 3, padding=1, bias=False),
            nn.BatchNorm1d(hidden // 2),
            nn.LeakyReLU(0.2),
            nn.Conv1d(hidden // 2, channels, 3, padding=1, bias=False),
            nn.BatchNorm1d(channels),
        )

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """Signals ``(B, *shape)`` from noise ``z`` ``(B, latent_dim)`` and, if conditional, classes ``y`` ``(B,)``."""
        if self.embed is not None:
            if y is None:
                raise ValueError("this generator is class-conditional: call it with classes y")
            z = torch.cat([z, self.embed(y)], dim=1)
        h = self.project(z).view(z.shape[0], self.hidden, self.base)
        x = self.body(h)[..., : self.length]
        return x.reshape(z.shape[0], *self.shape)
