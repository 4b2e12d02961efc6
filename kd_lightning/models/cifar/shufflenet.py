"""ShuffleNet V1 / V2 of the CRD / DKD benchmarks (their ``ShuffleV1`` and ``ShuffleV2``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ChannelShuffle(nn.Module):
    """Channel shuffle (Zhang et al. 2018): ``(B, g * n, H, W)`` viewed as ``(B, g, n, H, W)``, transposed to
    ``(B, n, g, H, W)`` and flattened back, so the next grouped conv sees channels from every group. Our own
    module rather than ``torch.nn.ChannelShuffle``, which has lacked a CUDA kernel in some builds
    (pytorch/pytorch#65325, #121208)."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        return x.reshape(b, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(b, c, h, w)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


class ShuffleV1Unit(nn.Module):
    """ShuffleNet unit (Zhang et al. 2018, Fig. 2): grouped 1x1 conv + BN + ReLU to ``out_channels / 4``, channel
    shuffle, 3x3 depthwise conv + BN (strided), grouped 1x1 conv + BN, then ReLU after adding the input (stride 1)
    or after concatenating its 3x3 average pool (stride 2; ``out_channels`` is then the branch's width only).
    As in the CRD code, a ReLU also follows the depthwise conv (the paper has none there); ``input_groups=1``
    makes the first 1x1 conv dense (the paper's first unit)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int, input_groups: int) -> None:
        super().__init__()
        mid = out_channels // 4
        self.branch = nn.Sequential(
            nn.Conv2d(in_channels, mid, 1, groups=input_groups, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(),
            ChannelShuffle(input_groups),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(),
            nn.Conv2d(mid, out_channels, 1, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else None
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.branch(x)
        out = out + x if self.shortcut is None else torch.cat([out, self.shortcut(x)], 1)
        return self.relu(out)


class ShuffleNetV1(nn.Module):
    """ShuffleNet (Zhang et al. 2018) for 32x32 inputs, as the CRD / DKD code builds it (``ShuffleV1``): a 1x1
    conv + BN + ReLU stem to 24 channels (no stride, no max-pool), three stages of ``blocks`` units at widths
    ``out_channels`` with ``groups`` groups (the first unit of each stage strided and concatenating), global
    average pooling and a linear head. The defaults are the benchmarks' ShuffleNetV1 (g = 3, widths 240, 480,
    960, 4 / 8 / 4 units).

    Tap points, for a 32x32 input with the defaults:

    - ``stem``: (24, 32, 32), after the ReLU;
    - ``stage1``, ``stage2``, ``stage3``: (240, 16, 16), (480, 8, 8), (960, 4, 4), each stage's last unit output
      (after its ReLU);
    - ``pool``: (960, 1, 1), the pooled embedding the linear ``head`` reads (flattened).
    """

    def __init__(
        self,
        out_channels: tuple[int, int, int] = (240, 480, 960),
        blocks: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
    ) -> None:
        super().__init__()
        in_channels = 24
        self.stem = nn.Sequential(nn.Conv2d(3, in_channels, 1, bias=False), nn.BatchNorm2d(in_channels), nn.ReLU())
        stages = []
        for index, (width, count) in enumerate(zip(out_channels, blocks, strict=True)):
            units = [ShuffleV1Unit(in_channels, width - in_channels, 2, groups, 1 if index == 0 else groups)]
            units += [ShuffleV1Unit(width, width, 1, groups, groups) for _ in range(count - 1)]
            stages.append(nn.Sequential(*units))
            in_channels = width
        self.stage1, self.stage2, self.stage3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.head(self.pool(x).flatten(1))


class ShuffleV2Unit(nn.Module):
    """ShuffleNet V2 basic unit (Ma et al. 2018, Fig. 3c): split the channels in halves; the second half goes
    through 1x1 conv + BN + ReLU, 3x3 depthwise conv + BN, 1x1 conv + BN + ReLU; concatenated back after the
    untouched first half, then a 2-group channel shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            nn.Conv2d(half, half, 1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(),
            nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False),
            nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(),
        )
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        kept, transformed = x.chunk(2, dim=1)
        return self.shuffle(torch.cat([kept, self.branch(transformed)], 1))


class ShuffleV2DownUnit(nn.Module):
    """ShuffleNet V2 down-sampling unit (Ma et al. 2018, Fig. 3d): both branches read the whole input; left:
    3x3 depthwise conv (stride 2) + BN, 1x1 conv + BN + ReLU; right: 1x1 conv + BN + ReLU, 3x3 depthwise conv
    (stride 2) + BN, 1x1 conv + BN + ReLU; each to ``out_channels / 2``, concatenated, then a 2-group channel
    shuffle."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.left = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(),
        )
        self.right = nn.Sequential(
            nn.Conv2d(in_channels, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(),
            nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False),
            nn.BatchNorm2d(mid),
            nn.Conv2d(mid, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(),
        )
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.shuffle(torch.cat([self.left(x), self.right(x)], 1))


class ShuffleNetV2(nn.Module):
    """ShuffleNet V2 (Ma et al. 2018) for 32x32 inputs, as the CRD / DKD code builds it (``ShuffleV2``, the 1x
    size): a 1x1 conv + BN + ReLU stem to 24 channels (no stride, no max-pool), three stages of one
    down-sampling unit and ``blocks`` basic units at widths ``out_channels``, a 1x1 conv + BN + ReLU to
    ``last_channels``, global average pooling and a linear head.

    Tap points, for a 32x32 input with the defaults:

    - ``stem``: (24, 32, 32), after the ReLU;
    - ``stage1``, ``stage2``, ``stage3``: (116, 16, 16), (232, 8, 8), (464, 4, 4), each stage's last unit output
      (after its channel shuffle);
    - ``conv_last``: (1024, 4, 4), after its ReLU;
    - ``pool``: (1024, 1, 1), the pooled embedding the linear ``head`` reads (flattened).
    """

    def __init__(
        self,
        out_channels: tuple[int, int, int] = (116, 232, 464),
        blocks: tuple[int, int, int] = (3, 7, 3),
        last_channels: int = 1024,
        num_classes: int = 100,
    ) -> None:
        super().__init__()
        in_channels = 24
        self.stem = nn.Sequential(nn.Conv2d(3, in_channels, 1, bias=False), nn.BatchNorm2d(in_channels), nn.ReLU())
        stages = []
        for width, count in zip(out_channels, blocks, strict=True):
            stages.append(
                nn.Sequential(ShuffleV2DownUnit(in_channels, width), *(ShuffleV2Unit(width) for _ in range(count)))
            )
            in_channels = width
        self.stage1, self.stage2, self.stage3 = stages
        self.conv_last = nn.Sequential(
            nn.Conv2d(in_channels, last_channels, 1, bias=False), nn.BatchNorm2d(last_channels), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(last_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_last(self.stage3(self.stage2(self.stage1(self.stem(x)))))
        return self.head(self.pool(x).flatten(1))


def shufflenetv1(num_classes: int = 100) -> ShuffleNetV1:
    """ShuffleNet V1, g = 3 (the CRD / DKD "ShuffleNetV1" student)."""
    return ShuffleNetV1(num_classes=num_classes)


def shufflenetv2(num_classes: int = 100) -> ShuffleNetV2:
    """ShuffleNet V2 1x (the CRD / DKD "ShuffleNetV2" student)."""
    return ShuffleNetV2(num_classes=num_classes)
