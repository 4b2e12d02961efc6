"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) as an in-memory datamodule: splits, normalisation, augmentation.

The files, their layout under ``data.root`` and how they are read or fetched are
:mod:`kd_lightning.data.cifar_files`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kd_lightning.data.cifar_files import LAYOUTS, download_archive, read_batch
from kd_lightning.data.image_augment import CropFlip
from kd_lightning.data.in_memory import InMemoryDataModule, augmentation_identity, build_augmentation
from kd_lightning.engine.caching.store import file_digest
from kd_lightning.engine.errors import ConfigError, check_type


class CIFARDataModule(InMemoryDataModule):
    """CIFAR-10 / CIFAR-100 from ``root`` (layout: :mod:`~kd_lightning.data.cifar_files`), in memory as uint8.

    Splits: ``train`` is the 50,000 training images less ``val_samples`` held out for model selection
    (a per-class-balanced draw with ``split_seed``); ``val`` is that hold-out, or, with ``val_samples: 0``,
    the test set (the published CIFAR protocol, which selects the best epoch on test: report it as such);
    ``test`` is the 10,000 test images. Inputs are normalised with ``mean`` / ``std`` (per channel; default
    the training set's statistics) when a batch is gathered; targets are the fine labels, or the 20
    super-classes with ``label: coarse`` (CIFAR-100).

    ``augment`` transforms training batches on their device: a mapping of
    :class:`~kd_lightning.data.image_augment.CropFlip`'s knobs (``conf/data/cifar100.yaml`` sets the standard
    ``{padding: 4, flip: true}``; its padding is black, the normalised zero pixel, as torchvision's pipeline
    pads), a config with a ``_target_``, or a callable; None: no augmentation (and the teacher-output cache
    is allowed). Random augmentation declares ``random_augmentation = True``: ``teacher_cache=per_view``
    stores views of it.
    """

    def __init__(
        self,
        root: str,
        dataset: str = "cifar100",
        num_classes: int = 100,
        label: str = "fine",
        val_samples: int = 5000,
        split_seed: int = 0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        augment: Mapping[str, Any] | Callable[[Tensor], Tensor] | None = None,
        download: bool = False,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        return_index: bool = False,
    ) -> None:
        if dataset not in LAYOUTS:
            raise ConfigError(f"data.dataset={dataset!r}: use one of {sorted(LAYOUTS)}")
        layout = LAYOUTS[dataset]
        if label not in ("fine", "coarse") or (label == "coarse" and dataset != "cifar100"):
            raise ConfigError(f"data.label={label!r}: use 'fine' (or 'coarse', CIFAR-100's 20 super-classes)")
        check_type(val_samples, int, "data.val_samples")
        check_type(download, bool, "data.download")
        classes = 20 if label == "coarse" else layout.num_classes
        if num_classes != classes:
            raise ConfigError(
                f"data.num_classes={num_classes} but {dataset} ({label}) has {classes}; set it to {classes}"
            )
        if not 0 <= val_samples < 50000:
            raise ConfigError(f"data.val_samples={val_samples} must be in 0..49999 (0: validate on the test set)")
        self.mean = _stats(mean, layout.mean, "data.mean")
        self.std = _stats(std, layout.std, "data.std")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"data.std={list(self.std)} must be > 0")
        if isinstance(augment, Mapping) and "_target_" not in augment:
            augment = {"fill": [-m / s for m, s in zip(self.mean, self.std, strict=True)], **augment}
        super().__init__(batch_size, num_workers, pin_memory, return_index, build_augmentation(augment, CropFlip))
        self.root = Path(root)
        self.dataset = dataset
        self.layout = layout
        self.num_classes = classes
        self.label = label
        self.val_samples = val_samples
        self.split_seed = split_seed
        self.download = download
        self.label_names: list[str] = []
        self._file_digests: dict[str, str] | None = None

    # ------------------------------------------------------------------------------------- files
    @property
    def folder(self) -> Path:
        return self.root / self.layout.folder

    def files(self) -> list[Path]:
        names = [*self.layout.train_files, self.layout.test_file, self.layout.meta_file]
        return [self.folder / name for name in names]

    def file_digests(self) -> dict[str, str]:
        """sha256 of every file, computed once."""
        if self._file_digests is None:
            self.prepare_data()
            self._file_digests = {path.name: file_digest(path) for path in self.files()}
        return self._file_digests

    def prepare_data(self) -> None:
        missing = [path for path in self.files() if not path.is_file()]
        if not missing:
            return
        if self.download:
            download_archive(self.layout.url, self.layout.md5, self.root)
            missing = [path for path in self.files() if not path.is_file()]
        if missing:
            raise ConfigError(
                f"data.root={self.root}: {self.dataset} not found ({missing[0]} is missing). Expected the python "
                f"version as distributed, unpacked: {self.folder}/{{{', '.join(p.name for p in self.files())}}} "
                f"(from {self.layout.url}); or set data.download=true to fetch it"
            )

    def _images(self, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        key = "labels" if self.dataset == "cifar10" else f"{self.label}_labels"
        images, labels = [], []
        for name in names:
            batch = read_batch(self.folder / name)
            if "data" not in batch or key not in batch:
                raise ConfigError(
                    f"data.root: {self.folder / name} lacks 'data' or {key!r}; is it a {self.dataset} file?"
                )
            raw, targets = np.asarray(batch["data"]), np.asarray(batch[key])
            if raw.ndim != 2 or raw.shape[1] != 3072:
                raise ConfigError(f"data.root: {self.folder / name} holds images of shape {raw.shape}, not (N, 3072)")
            if raw.dtype != np.uint8 or targets.dtype.kind not in "iu" or targets.ndim != 1:
                raise ConfigError(
                    f"data.root: {self.folder / name} holds {raw.dtype} pixels and {targets.dtype} labels, not uint8 "
                    "pixels and integer labels as distributed"
                )
            if len(targets) != len(raw):
                raise ConfigError(
                    f"data.root: {self.folder / name} holds {len(raw)} images but {len(targets)} labels; the file is "
                    "damaged or edited (each image needs exactly one label)"
                )
            images.append(raw.reshape(-1, 3, 32, 32))
            labels.append(targets.astype(np.int64))
        return np.concatenate(images), np.concatenate(labels)

    def build_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        meta = read_batch(self.folder / self.layout.meta_file)
        names_key = "label_names" if self.dataset == "cifar10" else f"{self.label}_label_names"
        self.label_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(names_key, [])]
        x, y = self._images(self.layout.train_files)
        x_test, y_test = self._images([self.layout.test_file])
        for split, targets in (("training", y), ("test", y_test)):
            if len(targets) and (targets.min() < 0 or targets.max() >= self.num_classes):
                raise ConfigError(
                    f"data.root: {split} labels in {self.folder} span {targets.min()}..{targets.max()}, not "
                    f"0..{self.num_classes - 1} (data.num_classes={self.num_classes})"
                )
        test = (torch.from_numpy(x_test), torch.from_numpy(y_test))
        if not self.val_samples:
            return {"train": (torch.from_numpy(x), torch.from_numpy(y)), "val": test, "test": test}
        held = balanced_holdout(y, self.val_samples, self.num_classes, self.split_seed)
        kept = np.setdiff1d(np.arange(len(y)), held)
        if not len(kept):
            raise ConfigError(
                f"data.val_samples={self.val_samples} holds out every one of the {len(y)} training images; set "
                f"data.val_samples below {len(y)} (0: validate on the test split)"
            )
        split = {"train": kept, "val": held}
        return {name: (torch.from_numpy(x[rows]), torch.from_numpy(y[rows])) for name, rows in split.items()} | {
            "test": test
        }

    def input_transform(self) -> Callable[[Tensor], Tensor]:
        return Normalize(self.mean, self.std)

    def content_identity(self) -> dict[str, Any]:
        """What determines every split's inputs: the files' contents, the split, the normalisation and the
        training augmentation (not the directory, batch size or workers)."""
        identity: dict[str, Any] = {
            "dataset": self.dataset,
            "label": self.label,
            "files": self.file_digests(),
            "val_samples": self.val_samples,
            "split_seed": self.split_seed if self.val_samples else None,
            "mean": list(self.mean),
            "std": list(self.std),
        }
        if self.augment is not None:
            identity["augment"] = augmentation_identity(self.augment)
        return identity


class Normalize:
    """uint8 images (B, C, H, W) to float32 ``(x / 255 - mean) / std`` per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, x: Tensor) -> Tensor:
        return (x.float().div_(255.0) - self.mean) / self.std


def balanced_holdout(labels: np.ndarray, count: int, num_classes: int, seed: int) -> np.ndarray:
    """``count`` sample positions, as equal a share of each class as ``count`` allows, drawn with ``seed``
    (sorted)."""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    share, extra = divmod(count, num_classes)
    chosen = [rows[: share + (c < extra)] for c, rows in enumerate(per_class)]
    return np.sort(np.concatenate(chosen))


def _stats(values: Sequence[float] | None, default: Sequence[float], key: str) -> tuple[float, ...]:
    if values is None:
        return tuple(default)
    stats = tuple(float(v) for v in values)
    if len(stats) != 3:
        raise ConfigError(f"{key}={list(stats)} must have 3 values (one per RGB channel)")
    return stats
