"""Model zoo; any ``nn.Module`` reachable by ``_target_`` works as teacher or student."""

from kd_lightning.models.mnist1d import MLP, ConvNet1D

__all__ = ["MLP", "ConvNet1D"]
