"""VGG-BN networks of the CRD / DKD benchmarks: vgg8, vgg11, vgg13, vgg16, vgg19."""

from __future__ import annotations

from torch import Tensor, nn

from kd_lightning.models.cifar.init import reference_init

#: Conv widths per stage, by depth (the name's layer count: the convs plus the original's three fully connected
#: layers, here one linear head): configurations A (11), B (13), D (16), E (19) of Simonyan & Zisserman, and the
#: CRD code's "S" (8).
_CONFIGS: dict[int, tuple[tuple[int, ...], ...]] = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


class VGG(nn.Module):
    """VGG with BatchNorm, CIFAR variant of the CRD / DKD code (Simonyan & Zisserman 2015; BN after Ioffe &
    Szegedy 2015): five stages of 3x3 conv (with bias) + BN + ReLU at the widths of the ``depth``'s
    configuration, 2x2 max-pooling before stages 2, 3 and 4 (none before stage 5: on 32x32 inputs the reference
    code skips that pool, so stages 4 and 5 are both 4x4), global average pooling and one linear head (no fully
    connected stack).

    Tap points, for a 32x32 input:

    - ``stage1``, ``stage2``, ``stage3``, ``stage4``, ``stage5``: (64, 32, 32), (128, 16, 16), (256, 8, 8),
      (512, 4, 4), (512, 4, 4), each stage's output after its last ReLU (before the next stage's max-pool);
    - ``pool``: (512, 1, 1), the pooled embedding the linear ``head`` reads (flattened).
    """

    def __init__(self, depth: int = 13, num_classes: int = 100) -> None:
        super().__init__()
        if depth not in _CONFIGS:
            raise ValueError(f"depth={depth}: VGG depths are {sorted(_CONFIGS)}")
        stages, in_channels = [], 3
        for index, widths in enumerate(_CONFIGS[depth]):
            layers: list[nn.Module] = [nn.MaxPool2d(2)] if index in (1, 2, 3) else []
            for width in widths:
                layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
                in_channels = width
            stages.append(nn.Sequential(*layers))
        self.stage1, self.stage2, self.stage3, self.stage4, self.stage5 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(in_channels, num_classes)
        reference_init(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage5(self.stage4(self.stage3(self.stage2(self.stage1(x)))))
        return self.head(self.pool(x).flatten(1))


def vgg8(num_classes: int = 100) -> VGG:
    """VGG-8-BN: one conv per stage (a CRD / DKD student of vgg13)."""
    return VGG(depth=8, num_classes=num_classes)


def vgg11(num_classes: int = 100) -> VGG:
    """VGG-11-BN (configuration A)."""
    return VGG(depth=11, num_classes=num_classes)


def vgg13(num_classes: int = 100) -> VGG:
    """VGG-13-BN (configuration B; a CRD / DKD teacher)."""
    return VGG(depth=13, num_classes=num_classes)


def vgg16(num_classes: int = 100) -> VGG:
    """VGG-16-BN (configuration D)."""
    return VGG(depth=16, num_classes=num_classes)


def vgg19(num_classes: int = 100) -> VGG:
    """VGG-19-BN (configuration E)."""
    return VGG(depth=19, num_classes=num_classes)
