"""Images in class folders, the ImageNet layout, read with torchvision (the ``vision`` extra)::

    root/train/<class>/*.jpg|png|...     root/val/<class>/...     root/test/<class>/... (optional)

Training images get the usual random-resized-crop + flip pipeline (optionally RandAugment), evaluation
images resize + centre crop; both end normalised. All of it is configured from YAML (``resolution``,
``crop_pct``, ``mean`` / ``std``, ``rand_augment``, ``scale``).
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from kd_lightning.data.contract import check_loader_options
from kd_lightning.engine.errors import ConfigError, check_type

log = logging.getLogger(__name__)

#: ImageNet's per-channel statistics, the default normalisation of pretrained timm / torchvision models.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}


def _torchvision() -> Any:
    """torchvision with its ``datasets`` and ``transforms.v2``; a :class:`ConfigError` naming the extra if missing."""
    try:
        import torchvision
        import torchvision.datasets
        import torchvision.transforms.v2
    except ImportError as error:
        raise ConfigError(
            f"data=image_folder reads images with torchvision, which cannot be imported ({error}); "
            'pip install -e ".[vision]"'
        ) from None
    return torchvision


class Indexed(Dataset):
    """``dataset``'s ``(x, y)`` samples as ``(x, y, index)``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        x, y = self.dataset[index]
        return x, y, index


class ImageFolderDataModule(L.LightningDataModule):
    """An image classification set in class folders (see the module docstring), via
    ``torchvision.datasets.ImageFolder`` and ``torchvision.transforms.v2``.

    Splits: ``root/train``; ``root/val`` (or ``validation``), else ``val_fraction`` of train held out with
    ``split_seed``; ``root/test``, else the validation split. Classes are the train folder's sub-folders in
    sorted order; validation and test must have the same ones.

    Transforms: training ``RandomResizedCrop(resolution, scale)`` + ``RandomHorizontalFlip`` (+
    ``RandAugment`` when ``rand_augment``) then normalisation with ``mean`` / ``std``; evaluation
    ``Resize(resolution / crop_pct)`` + ``CenterCrop(resolution)`` + the same normalisation. With
    ``train_augment: false`` training uses the evaluation transform (``random_augmentation = False``: the
    teacher-output cache is then allowed).
    """

    def __init__(
        self,
        root: str,
        num_classes: int,
        resolution: int = 224,
        crop_pct: float = 0.875,
        scale: Sequence[float] = (0.08, 1.0),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        train_augment: bool = True,
        rand_augment: bool = False,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        return_index: bool = False,
    ) -> None:
        super().__init__()
        for key, value in (("num_classes", num_classes), ("resolution", resolution)):
            check_type(value, int, f"data.{key}")
        for key, value in (("train_augment", train_augment), ("rand_augment", rand_augment)):
            check_type(value, bool, f"data.{key}")
        check_loader_options(batch_size, num_workers, pin_memory, return_index)
        if not 0 < crop_pct <= 1:
            raise ConfigError(f"data.crop_pct={crop_pct} must be in (0, 1] (the centre crop's share of the resize)")
        if not 0 < val_fraction < 1:
            raise ConfigError(f"data.val_fraction={val_fraction} must be in (0, 1) (used when there is no root/val)")
        if len(list(mean)) != len(list(std)):
            raise ConfigError(f"data.mean and data.std need one value per channel each (got {list(mean)}, {list(std)})")
        self.root = Path(root)
        self.num_classes = num_classes
        self.resolution = resolution
        self.crop_pct = float(crop_pct)
        self.scale = tuple(float(v) for v in scale)
        self.mean = [float(v) for v in mean]
        self.std = [float(v) for v in std]
        self.train_augment = train_augment
        self.rand_augment = rand_augment
        self.val_fraction = float(val_fraction)
        self.split_seed = split_seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.return_index = return_index
        self.random_augmentation = train_augment
        self.class_names: list[str] = []
        self.splits: dict[str, Dataset] = {}
        self._identity: dict[str, Any] | None = None

    # ---------------------------------------------------------------------------------- transforms
    def eval_transform(self) -> Callable[[Any], Tensor]:
        transforms = _torchvision().transforms.v2
        return transforms.Compose(
            [
                transforms.ToImage(),
                transforms.Resize(round(self.resolution / self.crop_pct), antialias=True),
                transforms.CenterCrop(self.resolution),
                transforms.ToDtype(torch.float32, scale=True),
                transforms.Normalize(self.mean, self.std),
            ]
        )

    def train_transform(self) -> Callable[[Any], Tensor]:
        if not self.train_augment:
            return self.eval_transform()
        transforms = _torchvision().transforms.v2
        steps = [
            transforms.ToImage(),
            transforms.RandomResizedCrop(self.resolution, scale=self.scale, antialias=True),
            transforms.RandomHorizontalFlip(),
        ]
        if self.rand_augment:
            steps.append(transforms.RandAugment())
        steps += [transforms.ToDtype(torch.float32, scale=True), transforms.Normalize(self.mean, self.std)]
        return transforms.Compose(steps)

    # ------------------------------------------------------------------------------------- folders
    def folder(self, split: str) -> Path | None:
        for name in SPLIT_FOLDERS[split]:
            if (self.root / name).is_dir():
                return self.root / name
        return None

    def prepare_data(self) -> None:
        if self.folder("train") is None:
            raise ConfigError(
                f"data.root={self.root}: no train folder. Expected the ImageNet layout: "
                f"{self.root}/train/<class>/<image>.jpg|png (and optionally val/ and test/ alike)"
            )

    def _folder_dataset(self, path: Path, transform: Callable[[Any], Tensor]) -> Dataset:
        datasets = _torchvision().datasets
        linked: list[str] = []

        def inside(file: str) -> bool:  # an image reached through no symbolic link
            if not datasets.folder.has_file_allowed_extension(file, datasets.folder.IMG_EXTENSIONS):
                return False
            through_link = any(part.is_symlink() for part in [Path(file), *Path(file).parents] if path in part.parents)
            if through_link:
                linked.append(file)
            return not through_link

        try:
            dataset = datasets.ImageFolder(str(path), transform=transform, is_valid_file=inside)
        except (FileNotFoundError, RuntimeError) as error:
            raise ConfigError(f"data.root: {path} is not a folder of class folders with images ({error})") from None
        if linked:
            log.warning(
                "data.root: %d files under %s are reached through symbolic links (e.g. %s) and were left out: a "
                "folder reads only the images inside it",
                len(linked),
                path,
                linked[0],
            )
        if self.class_names and dataset.classes != self.class_names:
            raise ConfigError(
                f"data.root: {path} has classes {dataset.classes[:5]}... but train has {self.class_names[:5]}...; "
                "every split needs the same class folders"
            )
        return dataset

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.prepare_data()
        train_folder = self.folder("train")
        train = self._folder_dataset(train_folder, self.train_transform())
        self.class_names = list(train.classes)
        if len(self.class_names) != self.num_classes:
            raise ConfigError(
                f"data.num_classes={self.num_classes} but {train_folder} has {len(self.class_names)} class folders; "
                f"set data.num_classes={len(self.class_names)}"
            )
        # The training images under the evaluation transform (one scan of the folder, a copy of train's list):
        # the held-out validation share and the ordered loader the teacher cache labels.
        self._eval_train = copy.copy(train)
        self._eval_train.transform = self.eval_transform()
        val_folder = self.folder("val")
        if val_folder is not None:
            val = self._folder_dataset(val_folder, self.eval_transform())
        else:
            held = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.split_seed))
            count = max(1, round(self.val_fraction * len(train)))
            val = Subset(self._eval_train, held[:count].sort().values.tolist())
            train = Subset(train, held[count:].sort().values.tolist())
        test_folder = self.folder("test")
        test = self._folder_dataset(test_folder, self.eval_transform()) if test_folder is not None else val
        self.splits = {"train": train, "val": val, "test": test}
        self._train_rows = train.indices if isinstance(train, Subset) else None

    @property
    def num_train_samples(self) -> int:
        self.setup()
        return len(self.splits["train"])  # type: ignore[arg-type]

    def _loader(self, dataset: Dataset, shuffle: bool, batch_size: int | None = None) -> DataLoader:
        return DataLoader(
            Indexed(dataset) if self.return_index else dataset,
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0 and batch_size is None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.splits["train"], shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.splits["val"], shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.splits["test"], shuffle=False)

    def ordered_dataloader(self, split: str) -> DataLoader:
        """``split`` in index order with the evaluation transform (training images un-augmented)."""
        self.setup()
        dataset = self.splits[split]
        if split == "train":
            dataset = self._eval_train if self._train_rows is None else Subset(self._eval_train, self._train_rows)
        return self._loader(dataset, shuffle=False, batch_size=max(self.batch_size, 256))

    def example_input(self) -> Tensor:
        """Two validation images, transformed as validation transforms them."""
        self.setup()
        val = self.splits["val"]
        return torch.stack([val[i][0] for i in range(min(2, len(val)))])  # type: ignore[arg-type]

    def content_identity(self) -> dict[str, Any]:
        """The files (relative paths, sizes, modification times), the split and the transforms; computed once."""
        if self._identity is None:
            self.setup()
            digest = hashlib.sha256()
            for path in sorted(p for p in self.root.rglob("*") if p.is_file()):
                stat = path.stat()
                digest.update(f"{path.relative_to(self.root)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
            self._identity = {
                "dataset": "image_folder",
                "files": digest.hexdigest(),
                "classes": self.class_names,
                "val_fraction": self.val_fraction if self.folder("val") is None else None,
                "split_seed": self.split_seed,
                "resolution": self.resolution,
                "crop_pct": self.crop_pct,
                "mean": self.mean,
                "std": self.std,
                "train_augment": self.train_augment,
            }
        return self._identity
