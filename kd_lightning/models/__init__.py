"""Model zoo; any ``nn.Module`` reachable by ``_target_`` works as teacher or student.

``kd_lightning.models.cifar``: the CIFAR networks of the CRD / DKD benchmarks (by name: ``cifar.ZOO``);
``kd_lightning.models.external``: timm, torchvision and Hugging Face models by name."""

from kd_lightning.models import cifar
from kd_lightning.models.cifar import CifarResNet, resnet8x4, resnet32x4
from kd_lightning.models.generator import Generator1D
from kd_lightning.models.mnist1d import MLP, ConvNet1D

__all__ = ["MLP", "CifarResNet", "ConvNet1D", "Generator1D", "cifar", "resnet8x4", "resnet32x4"]
