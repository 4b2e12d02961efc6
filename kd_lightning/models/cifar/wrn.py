"""Wide ResNets of the CRD / DKD benchmarks: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2."""

from __future__ import annotations

from torch import Tensor, nn

from kd_lightning.models.cifar.init import reference_init


class WideBasicBlock(nn.Module):
    """Pre-activation block (Zagoruyko & Komodakis 2016; the ordering of He et al. 2016, "Identity Mappings in
    Deep Residual Networks"): BN-ReLU-conv3x3 (strided), BN-ReLU-conv3x3, plus the shortcut; no activation after
    the sum. Where the width or stride changes, the shortcut is a 1x1 conv of the *activated* input (as in the
    reference code), else the identity of the input."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.shortcut: nn.Conv2d | None = None
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Conv2d(in_channels, channels, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for 32x32 inputs (Zagoruyko & Komodakis 2016): a 3x3 conv stem at 16
    channels, three stages of ``(depth - 4) / 6`` pre-activation blocks at widths 16k, 32k, 64k (strides 1, 2, 2),
    a final BN + ReLU, global average pooling and a linear head. No dropout (the CRD / DKD models use none).

    Tap points, for a 32x32 input and ``k = widen_factor``:

    - ``stem``: (16, 32, 32), the first conv's output (no BN or ReLU yet: the network is pre-activation);
    - ``stage1``, ``stage2``, ``stage3``: (16k, 32, 32), (32k, 16, 16), (64k, 8, 8), each stage's output: the
      last residual sum, *before* activation (the reference code's stage features);
    - ``stage2.0.relu1``, ``stage3.0.relu1``, ``norm``: (16k, 32, 32), (32k, 16, 16), (64k, 8, 8), the activated
      (BN + ReLU) outputs of stage1, stage2 and stage3, as the next layer reads them;
    - ``pool``: (64k, 1, 1), the pooled embedding the linear ``head`` reads (flattened).
    """

    def __init__(self, depth: int = 40, widen_factor: int = 2, num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth={depth} must be 6n + 4")
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.stem = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.stage1 = self._stage(widths[0], widths[1], blocks, 1)
        self.stage2 = self._stage(widths[1], widths[2], blocks, 2)
        self.stage3 = self._stage(widths[2], widths[3], blocks, 2)
        self.norm = nn.Sequential(nn.BatchNorm2d(widths[3]), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(widths[3], num_classes)
        reference_init(self, zero_linear_bias=True)

    @staticmethod
    def _stage(in_channels: int, channels: int, blocks: int, stride: int) -> nn.Sequential:
        """``blocks`` pre-activation blocks, the first one strided."""
        layers = [WideBasicBlock(in_channels, channels, stride)]
        layers += [WideBasicBlock(channels, channels) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(self.stage3(self.stage2(self.stage1(self.stem(x)))))
        return self.head(self.pool(x).flatten(1))


def wrn_16_1(num_classes: int = 100) -> WideResNet:
    """WRN-16-1: 2 blocks per stage, widths 16-32-64."""
    return WideResNet(depth=16, widen_factor=1, num_classes=num_classes)


def wrn_16_2(num_classes: int = 100) -> WideResNet:
    """WRN-16-2: 2 blocks per stage, widths 32-64-128 (a CRD / DKD student of wrn_40_2)."""
    return WideResNet(depth=16, widen_factor=2, num_classes=num_classes)


def wrn_40_1(num_classes: int = 100) -> WideResNet:
    """WRN-40-1: 6 blocks per stage, widths 16-32-64 (a CRD / DKD student of wrn_40_2)."""
    return WideResNet(depth=40, widen_factor=1, num_classes=num_classes)


def wrn_40_2(num_classes: int = 100) -> WideResNet:
    """WRN-40-2: 6 blocks per stage, widths 32-64-128 (a CRD / DKD teacher)."""
    return WideResNet(depth=40, widen_factor=2, num_classes=num_classes)
