"""Lightning DataModules. Batches are ``(inputs, targets)``; target ``-1`` marks unlabelled samples."""

from kd_lightning.data.augment import SignalAugmentation
from kd_lightning.data.mnist1d import MNIST1DDataModule

__all__ = ["MNIST1DDataModule", "SignalAugmentation"]
