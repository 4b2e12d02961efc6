r"""Teacher input adapters: the student's batch converted to what the teacher expects (``teacher.input``).

A teacher trained elsewhere often wants other inputs than the student is given: ImageNet normalisation
at 224 pixels while the student sees CIFAR statistics at 32, or its own tokenizer's ids. The adapter is
a module applied to the batch's ``x`` wherever the teacher runs (distillation steps, validation, the
teacher-output cache, a teacher trained here with ``teacher.fit``); the student's input is untouched.
Its configuration lives in its buffers, so the cache keys of outputs computed through it change with it.

``teacher.input: null`` (default): the teacher reads the student's batch as it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.engine.batches import Inputs
from kd_lightning.engine.errors import ConfigError

KEY = "teacher.input"
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "area")


def _channel_stats(values: Sequence[float] | None, default: float, channels: int, key: str) -> Tensor:
    if values is None:
        return torch.full((channels,), float(default))
    stats = torch.as_tensor(list(values), dtype=torch.float32).flatten()
    if stats.numel() == 1:
        stats = stats.expand(channels).clone()
    if stats.numel() != channels:
        raise ConfigError(f"{KEY}.{key} has {stats.numel()} values but the images have {channels} channels")
    return stats


class ImageInput(nn.Module):
    r"""Re-normalise, re-size and re-channel an image batch ``x`` of shape (B, C, H, W) for the teacher.

    With the student's per-channel statistics :math:`(\mu_s, \sigma_s)` and the teacher's :math:`(\mu_t,
    \sigma_t)`, the pixel values :math:`x \sigma_s + \mu_s` are normalised for the teacher:

    .. math:: x_t = \mathrm{resize}\Big(\frac{x\,\sigma_s + \mu_s - \mu_t}{\sigma_t}\Big)

    (per-channel affine maps commute with bilinear resizing, so the order does not matter). ``size``:
    the teacher's resolution (an int for square images, ``[H, W]``, or None to keep it), resized with
    ``interpolation`` (``antialias`` when shrinking); ``channels``: the teacher's channel count, a
    one-channel (grey) batch repeated to it. Missing statistics mean "already normalised that way"
    (mean 0, std 1).
    """

    def __init__(
        self,
        size: int | Sequence[int] | None = None,
        interpolation: str = "bilinear",
        antialias: bool = True,
        student_mean: Sequence[float] | None = None,
        student_std: Sequence[float] | None = None,
        teacher_mean: Sequence[float] | None = None,
        teacher_std: Sequence[float] | None = None,
        channels: int | None = None,
    ) -> None:
        super().__init__()
        if interpolation not in INTERPOLATIONS:
            raise ConfigError(f"{KEY}.interpolation={interpolation!r}: use one of {list(INTERPOLATIONS)}")
        stats = [s for s in (student_mean, student_std, teacher_mean, teacher_std) if s is not None]
        width = max([len(list(s)) for s in stats] + [channels or 1])
        s_mean = _channel_stats(student_mean, 0.0, width, "student_mean")
        s_std = _channel_stats(student_std, 1.0, width, "student_std")
        t_mean = _channel_stats(teacher_mean, 0.0, width, "teacher_mean")
        t_std = _channel_stats(teacher_std, 1.0, width, "teacher_std")
        if (s_std <= 0).any() or (t_std <= 0).any():
            raise ConfigError(f"{KEY}: standard deviations must be > 0")
        if isinstance(size, int):
            size = (size, size)
        if size is not None and (len(list(size)) != 2 or min(size) < 1):
            raise ConfigError(f"{KEY}.size={list(size)} must be an int or [height, width] of positive ints")
        self.interpolation = interpolation
        self.antialias = antialias
        self.target_size = tuple(size) if size is not None else None
        self.target_channels = channels
        # Buffers: on the teacher's device, and part of what the teacher-output cache hashes (the last three
        # record the settings read in forward from the attributes above, which need no device sync).
        self.register_buffer("scale", (s_std / t_std).view(1, -1, 1, 1))
        self.register_buffer("shift", ((s_mean - t_mean) / t_std).view(1, -1, 1, 1))
        self.register_buffer("size", torch.tensor(list(size) if size is not None else [], dtype=torch.long))
        self.register_buffer("channels", torch.tensor([channels or 0], dtype=torch.long))
        self.register_buffer("mode", torch.tensor([INTERPOLATIONS.index(interpolation), int(antialias)]))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ConfigError(f"{KEY} is an ImageInput, which needs image batches (B, C, H, W); got {tuple(x.shape)}")
        channels = self.target_channels
        if channels and x.shape[1] != channels:
            if x.shape[1] != 1:
                raise ConfigError(
                    f"{KEY}.channels={channels} repeats one-channel images, but the batch has {x.shape[1]} channels"
                )
            x = x.expand(-1, channels, -1, -1)
        x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        size = self.target_size
        if size is not None and tuple(x.shape[-2:]) != size:
            shrinking = x.shape[-2] > size[0] or x.shape[-1] > size[1]
            antialias = self.antialias and shrinking and self.interpolation in ("bilinear", "bicubic")
            x = F.interpolate(
                x,
                size=size,
                mode=self.interpolation,
                antialias=antialias,
                **({} if self.interpolation in ("nearest", "area") else {"align_corners": False}),
            )
        return x


class TokenInput(nn.Module):
    """The teacher's own tokenisation of a text batch: the datamodule tokenises each row with the teacher's
    tokenizer as well (``data.teacher_tokenizer``) under keys ``<prefix>input_ids``, ``<prefix>attention_mask``,
    ...; this returns those keys without the prefix, what the teacher model reads. (The student's model reads
    the unprefixed keys.)"""

    def __init__(self, prefix: str = "teacher_") -> None:
        super().__init__()
        if not prefix:
            raise ConfigError(f"{KEY}.prefix must be non-empty (the student's keys have none)")
        self.prefix = prefix
        # A buffer so that the prefix is part of the teacher-output cache's key.
        self.register_buffer("prefix_bytes", torch.tensor(list(prefix.encode()), dtype=torch.uint8))

    def forward(self, x: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if not isinstance(x, Mapping):
            raise ConfigError(f"{KEY} is a TokenInput, which needs tokenised text batches (a mapping of tensors)")
        selected = {key[len(self.prefix) :]: value for key, value in x.items() if key.startswith(self.prefix)}
        if "input_ids" not in selected:
            raise ConfigError(
                f"{KEY} reads the teacher's tokenisation ({self.prefix}input_ids), which the batch lacks: set "
                "data.teacher_tokenizer to the teacher's tokenizer directory"
            )
        return selected


class AdaptedModel(nn.Module):
    """``model`` reading ``input``'s conversion of its input: ``model(input(x))`` (how a teacher with an input
    adapter is trained here, labelled into the cache and checked). Starts in ``model``'s mode, so a caller that
    restores the wrapper's mode afterwards leaves a frozen teacher in eval mode."""

    def __init__(self, input: nn.Module, model: nn.Module) -> None:
        super().__init__()
        self.input = input
        self.model = model
        self.train(model.training)

    def forward(self, x: Inputs) -> Tensor:
        return self.model(self.input(x))


def adapted(model: nn.Module, input: nn.Module | None) -> nn.Module:
    """``model`` behind ``input`` (an :class:`AdaptedModel`), or ``model`` itself without an adapter."""
    return model if input is None else AdaptedModel(input, model)
