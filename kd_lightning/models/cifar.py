"""CIFAR-style ResNets as used by the CRD / DKD benchmarks (resnet8x4, resnet32x4, ...)."""

from __future__ import annotations

from torch import Tensor, nn


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN with an identity (or 1x1 conv + BN) shortcut (He et al. 2016)."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs (He et al. 2016, §4.2): a 3x3 stem, three stages of ``(depth - 2) / 6``
    basic blocks at widths ``widths[1:]`` (strides 1, 2, 2), global average pooling, a linear head.

    ``resnet8x4`` / ``resnet32x4`` are the student / teacher pair of the CRD and DKD CIFAR-100 tables
    (widths 32, 64, 128, 256). Stages are ``layer1..layer3`` for feature taps.
    """

    def __init__(self, depth: int = 32, widths: tuple[int, ...] = (32, 64, 128, 256), num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth={depth} must be 6n + 2")
        blocks = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, in_channels = [], widths[0]
        for stage, channels in enumerate(widths[1:]):
            layers = [
                BasicBlock(in_channels if i == 0 else channels, channels, 2 if (i == 0 and stage) else 1)
                for i in range(blocks)
            ]
            stages.append(nn.Sequential(*layers))
            in_channels = channels
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.head(self.pool(x).flatten(1))


def resnet8x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(depth=8, num_classes=num_classes)


def resnet32x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(depth=32, num_classes=num_classes)
