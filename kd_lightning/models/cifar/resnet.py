"""CIFAR ResNets of the CRD / DKD benchmarks: resnet8 ... resnet110, resnet8x4, resnet32x4 and resnet50."""

from __future__ import annotations

from torch import Tensor, nn

from kd_lightning.models.cifar.init import reference_init


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """The identity, or a 1x1 conv + BN projection where the stride or the width changes (He et al. 2016, option B)."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN with an identity (or 1x1 conv + BN) shortcut, ReLU after the sum (He et al. 2016)."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.shortcut = _shortcut(in_channels, channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand to ``4 * channels``, each + BN, with an identity (or 1x1 conv + BN)
    shortcut and ReLU after the sum (He et al. 2016, §4.1; the stride on the 3x3 conv, as the CRD code has it)."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = self.expansion * channels
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


def _stage(
    block: type[BasicBlock | Bottleneck], in_channels: int, channels: int, blocks: int, stride: int
) -> nn.Sequential:
    """``blocks`` residual blocks, the first one strided."""
    layers = []
    for i in range(blocks):
        layers.append(block(in_channels, channels, stride if i == 0 else 1))
        in_channels = block.expansion * channels
    return nn.Sequential(*layers)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs (He et al. 2016, §4.2): a 3x3 conv + BN + ReLU stem at ``widths[0]``, three stages
    of ``(depth - 2) / 6`` basic blocks at widths ``widths[1:]`` (strides 1, 2, 2), global average pooling and
    a linear head. Where the shape changes the shortcut is a 1x1 conv + BN, as in the CRD / DKD code (the
    paper's CIFAR networks zero-pad an identity instead, so their counts are slightly lower).

    ``resnet8`` ... ``resnet110`` use widths 16, 16, 32, 64; ``resnet8x4`` / ``resnet32x4`` (the student /
    teacher pair of the CRD and DKD CIFAR-100 tables) use 32, 64, 128, 256.

    Tap points (module paths for feature losses), for a 32x32 input and widths ``w``:

    - ``stem``: (w0, 32, 32), after the ReLU;
    - ``layer1``, ``layer2``, ``layer3``: (w1, 32, 32), (w2, 16, 16), (w3, 8, 8), each stage's last block output
      (after its ReLU);
    - ``pool``: (w3, 1, 1), the pooled embedding the linear ``head`` reads (flattened).
    """

    def __init__(self, depth: int = 32, widths: tuple[int, ...] = (32, 64, 128, 256), num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth={depth} must be 6n + 2")
        blocks = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.layer1 = _stage(BasicBlock, widths[0], widths[1], blocks, 1)
        self.layer2 = _stage(BasicBlock, widths[1], widths[2], blocks, 2)
        self.layer3 = _stage(BasicBlock, widths[2], widths[3], blocks, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(widths[3], num_classes)
        reference_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.head(self.pool(x).flatten(1))


class BottleneckResNet(nn.Module):
    """ResNet-50-style network for 32x32 inputs (He et al. 2016), the CIFAR ``ResNet50`` of the CRD / DKD code
    (teacher of their MobileNetV2 / ShuffleNet students): a 3x3 conv + BN + ReLU stem at 64 channels (no
    max-pool), four stages of ``blocks`` bottleneck blocks at widths 64, 128, 256, 512 (outputs x4; strides
    1, 2, 2, 2), global average pooling and a linear head.

    Tap points, for a 32x32 input:

    - ``stem``: (64, 32, 32), after the ReLU;
    - ``layer1``, ``layer2``, ``layer3``, ``layer4``: (256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4),
      each stage's output (after its last ReLU);
    - ``pool``: (2048, 1, 1), the pooled embedding the linear ``head`` reads (flattened).
    """

    def __init__(self, blocks: tuple[int, int, int, int] = (3, 4, 6, 3), num_classes: int = 100) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.layer1 = _stage(Bottleneck, 64, 64, blocks[0], 1)
        self.layer2 = _stage(Bottleneck, 256, 128, blocks[1], 2)
        self.layer3 = _stage(Bottleneck, 512, 256, blocks[2], 2)
        self.layer4 = _stage(Bottleneck, 1024, 512, blocks[3], 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2048, num_classes)
        reference_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.head(self.pool(x).flatten(1))


_NARROW = (16, 16, 32, 64)


def resnet8(num_classes: int = 100) -> CifarResNet:
    """ResNet-8, widths 16-16-32-64."""
    return CifarResNet(depth=8, widths=_NARROW, num_classes=num_classes)


def resnet14(num_classes: int = 100) -> CifarResNet:
    """ResNet-14, widths 16-16-32-64."""
    return CifarResNet(depth=14, widths=_NARROW, num_classes=num_classes)


def resnet20(num_classes: int = 100) -> CifarResNet:
    """ResNet-20, widths 16-16-32-64 (a CRD / DKD student)."""
    return CifarResNet(depth=20, widths=_NARROW, num_classes=num_classes)


def resnet32(num_classes: int = 100) -> CifarResNet:
    """ResNet-32, widths 16-16-32-64 (a CRD / DKD student)."""
    return CifarResNet(depth=32, widths=_NARROW, num_classes=num_classes)


def resnet44(num_classes: int = 100) -> CifarResNet:
    """ResNet-44, widths 16-16-32-64."""
    return CifarResNet(depth=44, widths=_NARROW, num_classes=num_classes)


def resnet56(num_classes: int = 100) -> CifarResNet:
    """ResNet-56, widths 16-16-32-64 (a CRD / DKD teacher)."""
    return CifarResNet(depth=56, widths=_NARROW, num_classes=num_classes)


def resnet110(num_classes: int = 100) -> CifarResNet:
    """ResNet-110, widths 16-16-32-64 (a CRD / DKD teacher)."""
    return CifarResNet(depth=110, widths=_NARROW, num_classes=num_classes)


def resnet8x4(num_classes: int = 100) -> CifarResNet:
    """ResNet-8 at 4x width, widths 32-64-128-256 (the student of resnet32x4)."""
    return CifarResNet(depth=8, num_classes=num_classes)


def resnet32x4(num_classes: int = 100) -> CifarResNet:
    """ResNet-32 at 4x width, widths 32-64-128-256 (a CRD / DKD teacher)."""
    return CifarResNet(depth=32, num_classes=num_classes)


def resnet50(num_classes: int = 100) -> BottleneckResNet:
    """The CIFAR ResNet-50: bottleneck stages of 3, 4, 6, 3 blocks (a CRD / DKD teacher)."""
    return BottleneckResNet(blocks=(3, 4, 6, 3), num_classes=num_classes)
