r"""The standard CIFAR training augmentation, vectorised over a batch on its device: random crop with zero
padding and horizontal flip (He et al. 2016, §4.2; every CIFAR KD benchmark since, e.g. CRD, DKD).

For an image batch :math:`x \in \mathbb{R}^{B \times C \times H \times W}` and padding :math:`p`, sample
:math:`i` draws offsets :math:`a_i, b_i \sim U\{0, \dots, 2p\}` and a flip :math:`f_i \sim
\mathrm{Bernoulli}(1/2)`:

.. math:: y_{i,c,h,w} = \tilde x_{i,c,\,h + a_i,\, w'}, \qquad
          w' = \begin{cases} W - 1 - w + b_i & f_i = 1 \\ w + b_i & f_i = 0 \end{cases}

with :math:`\tilde x` the batch padded by :math:`p` pixels of value ``fill`` on every side: torchvision's
``RandomCrop(H, padding=p)`` then ``RandomHorizontalFlip()`` on each image. The datamodules apply it to
normalised batches, so ``fill`` is the normalised value of a black pixel, :math:`-\mu_c / \sigma_c`, as
normalising after a zero-padded crop would give.

``draw`` / ``apply_per_sample`` split the random values from their effect, so a view can be stored per
sample and replayed (``teacher_cache=per_view``, FKD).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kd_lightning.engine.errors import ConfigError, check_type

KEY = "data.augment"


@dataclass(frozen=True)
class CropFlipDraw:
    """One batch's random values: crop offsets into the padded image and flips, each (B,) int64."""

    top: Tensor
    left: Tensor
    flip: Tensor

    def per_sample(self) -> dict[str, Tensor]:
        """The per-sample values (a view's parameters, one row per sample)."""
        return {"top": self.top, "left": self.left, "flip": self.flip}


class CropFlip:
    """Random crop (``padding`` pixels of ``fill`` on each side, crop back to the input size) and horizontal
    flip (``flip``), per sample; see the module docstring for the formula.

    Args:
        padding: pixels of padding :math:`p` on each side; 0 disables the crop.
        flip: flip each image left-right with probability 1/2.
        fill: the padding's value, one per channel or one for all (the datamodule sets the normalised black).
    """

    mixes_inputs = False

    def __init__(self, padding: int = 4, flip: bool = True, fill: float | Sequence[float] = 0.0) -> None:
        check_type(padding, int, f"{KEY}.padding")
        check_type(flip, bool, f"{KEY}.flip")
        if padding < 0:
            raise ConfigError(f"{KEY}.padding={padding} must be >= 0 (0 disables the random crop)")
        self.padding = padding
        self.flip = flip
        self.fill = [float(v) for v in fill] if isinstance(fill, Sequence) else [float(fill)]

    def config(self) -> dict[str, Any]:
        """The knobs, as a datamodule's ``content_identity`` records them."""
        return {"padding": self.padding, "flip": self.flip, "fill": self.fill}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(padding={self.padding}, flip={self.flip})"

    def draw(self, x: Tensor, generator: torch.Generator | None = None) -> CropFlipDraw:
        """This batch's random values, on ``x``'s device, from ``generator`` (default: torch's global generator
        of that device, which ``seed_everything`` seeds)."""
        if x.dim() != 4:
            raise ValueError(f"CropFlip needs image batches (B, C, H, W), got {tuple(x.shape)}")
        batch = x.shape[0]
        random = {"device": x.device, "generator": generator}
        top = torch.randint(0, 2 * self.padding + 1, (batch,), **random)
        left = torch.randint(0, 2 * self.padding + 1, (batch,), **random)
        flip = torch.randint(0, 2, (batch,), **random) if self.flip else torch.zeros(batch, dtype=torch.long)
        return CropFlipDraw(top, left, flip.to(x.device))

    def apply(self, x: Tensor, draw: CropFlipDraw) -> Tensor:
        """``x`` cropped and flipped by ``draw``'s values (a new tensor)."""
        batch, channels, height, width = x.shape
        padded = x
        if self.padding:
            fill = torch.as_tensor(self.fill, dtype=x.dtype, device=x.device)
            if fill.numel() not in (1, channels):
                raise ConfigError(f"{KEY}.fill has {fill.numel()} values but the images have {channels} channels")
            pad = self.padding
            padded = fill.view(1, -1, 1, 1).expand(batch, channels, height + 2 * pad, width + 2 * pad).clone()
            padded[:, :, pad : pad + height, pad : pad + width] = x
        rows = draw.top.to(x.device).view(-1, 1) + torch.arange(height, device=x.device)  # (B, H)
        columns = torch.arange(width, device=x.device).expand(batch, width)
        flipped = draw.flip.to(x.device).view(-1, 1).bool()
        columns = torch.where(flipped, width - 1 - columns, columns) + draw.left.to(x.device).view(-1, 1)  # (B, W)
        samples = torch.arange(batch, device=x.device).view(-1, 1, 1)
        out = padded.permute(0, 2, 3, 1)[samples, rows.unsqueeze(-1), columns.unsqueeze(1)]  # (B, H, W, C)
        return out.permute(0, 3, 1, 2).contiguous()

    def apply_per_sample(self, x: Tensor, values: Mapping[str, Tensor]) -> Tensor:
        """``x`` transformed by stored per-sample values (:meth:`CropFlipDraw.per_sample` of a draw)."""
        return self.apply(x, CropFlipDraw(**values))

    def __call__(self, x: Tensor) -> Tensor:
        return self.apply(x, self.draw(x))
