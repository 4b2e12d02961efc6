"""The CIFAR model zoo of the CRD (Tian et al. 2020) and DKD (Zhao et al. 2022) benchmarks, as in their code
(HobbitLong/RepDistiller ``models/``, megvii-research/mdistiller ``mdistiller/models/cifar/``): same layers,
parameter counts and weight initialisation (:mod:`kd_lightning.models.cifar.init`), our own module names. Every
factory is ``name(num_classes=100) -> nn.Module`` whose forward returns logits only; each class docstring lists
its tap points (module paths for feature losses). ``ZOO`` maps the names to the factories (the names of
``conf/teacher`` and ``conf/student``)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from kd_lightning.models.cifar.mobilenetv2 import InvertedResidual, MobileNetV2, mobilenetv2
from kd_lightning.models.cifar.resnet import (
    BasicBlock,
    Bottleneck,
    BottleneckResNet,
    CifarResNet,
    resnet8,
    resnet8x4,
    resnet14,
    resnet20,
    resnet32,
    resnet32x4,
    resnet44,
    resnet50,
    resnet56,
    resnet110,
)
from kd_lightning.models.cifar.shufflenet import (
    ChannelShuffle,
    ShuffleNetV1,
    ShuffleNetV2,
    ShuffleV1Unit,
    ShuffleV2DownUnit,
    ShuffleV2Unit,
    shufflenetv1,
    shufflenetv2,
)
from kd_lightning.models.cifar.vgg import VGG, vgg8, vgg11, vgg13, vgg16, vgg19
from kd_lightning.models.cifar.wrn import WideBasicBlock, WideResNet, wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2

#: Every zoo model by name: ``ZOO[name](num_classes)``.
ZOO: dict[str, Callable[[int], nn.Module]] = {
    factory.__name__: factory
    for factory in (
        resnet8,
        resnet14,
        resnet20,
        resnet32,
        resnet44,
        resnet56,
        resnet110,
        resnet8x4,
        resnet32x4,
        resnet50,
        wrn_16_1,
        wrn_16_2,
        wrn_40_1,
        wrn_40_2,
        vgg8,
        vgg11,
        vgg13,
        vgg16,
        vgg19,
        mobilenetv2,
        shufflenetv1,
        shufflenetv2,
    )
}

__all__ = [
    "VGG",
    "ZOO",
    "BasicBlock",
    "Bottleneck",
    "BottleneckResNet",
    "ChannelShuffle",
    "CifarResNet",
    "InvertedResidual",
    "MobileNetV2",
    "ShuffleNetV1",
    "ShuffleNetV2",
    "ShuffleV1Unit",
    "ShuffleV2DownUnit",
    "ShuffleV2Unit",
    "WideBasicBlock",
    "WideResNet",
    "mobilenetv2",
    "resnet8",
    "resnet8x4",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet32x4",
    "resnet44",
    "resnet50",
    "resnet56",
    "resnet110",
    "shufflenetv1",
    "shufflenetv2",
    "vgg8",
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
    "wrn_16_1",
    "wrn_16_2",
    "wrn_40_1",
    "wrn_40_2",
]
