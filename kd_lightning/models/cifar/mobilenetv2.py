"""MobileNetV2 of the CRD / DKD benchmarks (their ``mobile_half``: expansion 6, width 0.5)."""

from __future__ import annotations

from torch import Tensor, nn

from kd_lightning.models.cifar.init import reference_init

#: Per stage, the inverted-residual groups (expansion t, channels c at width 1, blocks n, first stride s) of
#: Sandler et al.'s Table 2, except the 24-channel group's stride: 1 (not 2), the CRD code's change for 32x32
#: inputs. Grouped by output resolution as the reference code taps them (16x16, 8x8, 4x4, 2x2).
_STAGES: tuple[tuple[tuple[int, int, int, int], ...], ...] = (
    ((1, 16, 1, 1), (6, 24, 2, 1)),
    ((6, 32, 3, 2),),
    ((6, 64, 4, 2), (6, 96, 3, 1)),
    ((6, 160, 3, 2), (6, 320, 1, 1)),
)


def _conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
) -> list[nn.Module]:
    """Conv (no bias, "same" padding) + BN + ReLU, as layers to splice into an ``nn.Sequential``."""
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]


class InvertedResidual(nn.Module):
    """Inverted residual with linear bottleneck (Sandler et al. 2018): 1x1 expansion conv + BN + ReLU (present
    even at expansion 1, as in the reference code), 3x3 depthwise conv + BN + ReLU (strided), 1x1 linear
    projection conv + BN; the identity is added when the stride is 1 and the width is unchanged. ReLU, not the
    paper's ReLU6, as in the CRD code."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.conv = nn.Sequential(
            *_conv_bn_relu(in_channels, hidden, 1),
            *_conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs (Sandler et al. 2018), as the CRD / DKD code builds it: a 3x3 conv + BN +
    ReLU stem (stride 2) at ``int(32 * width_mult)`` channels, the 17 inverted residuals of the paper's Table 2
    (widths ``int(c * width_mult)``; the 24-channel group at stride 1, not 2) in four stages by resolution, a
    1x1 conv + BN + ReLU to 1280 channels (more only for ``width_mult > 1``), global average pooling and a linear
    head. ``width_mult=0.5`` is the benchmarks' "MobileNetV2" (their ``mobile_half``).

    Tap points, for a 32x32 input at ``width_mult=0.5``:

    - ``stem``: (16, 16, 16), after the ReLU;
    - ``stage1``, ``stage2``, ``stage3``, ``stage4``: (12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2), each
      stage's last inverted residual output (linear: no activation, by design; the reference code's stage
      features);
    - ``conv_last``: (1280, 2, 2), after its ReLU;
    - ``pool``: (1280, 1, 1), the pooled embedding the linear ``head`` reads (flattened).
    """

    def __init__(self, width_mult: float = 0.5, num_classes: int = 100) -> None:
        super().__init__()
        in_channels = int(32 * width_mult)
        self.stem = nn.Sequential(*_conv_bn_relu(3, in_channels, 3, 2))
        stages = []
        for groups in _STAGES:
            blocks = []
            for expansion, channels, count, first_stride in groups:
                out_channels = int(channels * width_mult)
                for i in range(count):
                    blocks.append(InvertedResidual(in_channels, out_channels, first_stride if i == 0 else 1, expansion))
                    in_channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        last_channels = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv_last = nn.Sequential(*_conv_bn_relu(in_channels, last_channels, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(last_channels, num_classes)
        reference_init(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage4(self.stage3(self.stage2(self.stage1(self.stem(x)))))
        return self.head(self.pool(self.conv_last(x)).flatten(1))


def mobilenetv2(num_classes: int = 100) -> MobileNetV2:
    """MobileNetV2 at width 0.5, expansion 6: the "MobileNetV2" student of the CRD / DKD tables."""
    return MobileNetV2(width_mult=0.5, num_classes=num_classes)
