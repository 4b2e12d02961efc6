"""scikit-learn's bundled handwritten digits: real 8x8 images shipped inside the package, never downloaded."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.data.image_augment import CropFlip
from kd_lightning.data.in_memory import InMemoryDataModule, augmentation_identity, build_augmentation
from kd_lightning.engine.errors import ConfigError, check_type

#: Grey levels of the digits (pixel values 0..16).
LEVELS = 16.0
SAMPLES = 1797


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 images (N, 8, 8) with values 0..16 and their labels, from ``sklearn.datasets.load_digits``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError(
            "data=digits reads scikit-learn's bundled digits: pip install scikit-learn (or kd-lightning[vision])"
        ) from None
    digits = load_digits()
    return np.asarray(digits.images, dtype=np.float32), np.asarray(digits.target, dtype=np.int64)


class DigitsDataModule(InMemoryDataModule):
    """The UCI optical-recognition digits as shipped in scikit-learn (Alpaydin & Kaynak 1998): 1,797 grey 8x8
    images of the digits 0-9 written by 43 people, a second real, offline image dataset beside MNIST-1D.

    Splits: ``test_samples`` and ``val_samples`` images drawn per class (stratified, ``split_seed``), the rest
    train. Pixels are scaled to ``[0, 1]`` (``/ 16``) and standardised with the training set's mean and std
    (one value, grey images); ``resolution`` > 8 upsamples every image once at load (bilinear), for models built
    for larger inputs (the ``demo_digits`` recipe feeds timm / torchvision nets 32x32); ``channels: 3`` repeats
    the grey channel (RGB models). Batches ``(x, y[, index])`` with ``x`` of shape
    ``(B, channels, resolution, resolution)``.

    ``augment``: a mapping of :class:`~kd_lightning.data.image_augment.CropFlip`'s knobs (padding black, as
    stored; digits are not mirror-symmetric, so set ``flip: false``), a config with ``_target_``, or None.
    """

    num_classes = 10

    def __init__(
        self,
        num_classes: int = 10,
        resolution: int = 8,
        channels: int = 1,
        val_samples: int = 300,
        test_samples: int = 400,
        split_seed: int = 0,
        augment: Mapping[str, Any] | Callable[[Tensor], Tensor] | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        return_index: bool = False,
    ) -> None:
        for key, value in (
            ("num_classes", num_classes),
            ("resolution", resolution),
            ("channels", channels),
            ("val_samples", val_samples),
            ("test_samples", test_samples),
            ("split_seed", split_seed),
        ):
            check_type(value, int, f"data.{key}")
        if num_classes != self.num_classes:
            raise ConfigError(f"data.num_classes={num_classes} but the digits have 10 classes; set data.num_classes=10")
        if resolution < 8:
            raise ConfigError(f"data.resolution={resolution} must be >= 8 (the images are 8x8; larger upsamples)")
        if channels not in (1, 3):
            raise ConfigError(f"data.channels={channels}: use 1 (grey) or 3 (grey repeated, for RGB models)")
        if val_samples < 10 or test_samples < 10 or val_samples + test_samples > SAMPLES - 500:
            raise ConfigError(
                f"data.val_samples={val_samples} / data.test_samples={test_samples}: each must be >= 10 (one per "
                f"class) and together leave at least 500 of the {SAMPLES} images for training"
            )
        self.resolution = resolution
        self.channels = channels
        self.val_samples = val_samples
        self.test_samples = test_samples
        self.split_seed = split_seed
        self._stats: tuple[float, float] | None = None
        if isinstance(augment, Mapping) and "_target_" not in augment:
            augment = {"fill": -self.stats()[0] / self.stats()[1], **augment}
        super().__init__(batch_size, num_workers, pin_memory, return_index, build_augmentation(augment, CropFlip))

    def stats(self) -> tuple[float, float]:
        """Mean and standard deviation of the training pixels (scaled to [0, 1], at 8x8)."""
        if self._stats is None:
            images, labels = load_digits_arrays()
            train = self.split_rows(labels)["train"]
            pixels = images[train] / LEVELS
            self._stats = (float(pixels.mean()), float(pixels.std()))
        return self._stats

    def split_rows(self, labels: np.ndarray) -> dict[str, np.ndarray]:
        """Sample positions of each split: test and val stratified by class with ``split_seed``, sorted."""
        from sklearn.model_selection import train_test_split

        rows = np.arange(len(labels))
        rest, test = train_test_split(rows, test_size=self.test_samples, stratify=labels, random_state=self.split_seed)
        train, val = train_test_split(
            rest, test_size=self.val_samples, stratify=labels[rest], random_state=self.split_seed + 1
        )
        return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}

    def build_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        images, labels = load_digits_arrays()
        mean, std = self.stats()
        x = torch.from_numpy((images / LEVELS - mean) / std).unsqueeze(1)
        if self.resolution != 8:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        x = x.expand(-1, self.channels, -1, -1).contiguous()
        y = torch.from_numpy(labels)
        return {name: (x[rows], y[rows]) for name, rows in self.split_rows(labels).items()}

    def content_identity(self) -> dict[str, Any]:
        """What determines every split's inputs (not batch size or workers)."""
        identity: dict[str, Any] = {
            "dataset": "sklearn_digits",
            "resolution": self.resolution,
            "channels": self.channels,
            "val_samples": self.val_samples,
            "test_samples": self.test_samples,
            "split_seed": self.split_seed,
        }
        if self.augment is not None:
            identity["augment"] = augmentation_identity(self.augment)
        return identity
