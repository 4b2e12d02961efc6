"""Lightning DataModules. Batches are ``(inputs, targets)``; target ``-1`` marks unlabelled samples."""

from typing import Any

from kd_lightning.data.augment import SignalAugmentation
from kd_lightning.data.cifar import CIFARDataModule
from kd_lightning.data.digits import DigitsDataModule
from kd_lightning.data.image_augment import CropFlip
from kd_lightning.data.in_memory import InMemoryDataModule
from kd_lightning.data.mnist1d import MNIST1DDataModule

__all__ = [
    "CIFARDataModule",
    "CropFlip",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "InMemoryDataModule",
    "MNIST1DDataModule",
    "SignalAugmentation",
    "TextClassificationDataModule",
]

#: Datamodules imported on first use: they need optional packages (``torchvision``: the ``vision`` extra;
#: ``datasets`` and ``transformers``: the ``text`` extra) that ``import kd_lightning.data`` does not load.
_LAZY = {
    "ImageFolderDataModule": "kd_lightning.data.image_folder",
    "TextClassificationDataModule": "kd_lightning.data.text",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
