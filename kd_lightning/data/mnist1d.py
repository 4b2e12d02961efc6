"""MNIST-1D, regenerated offline with the ``mnist1d`` package and cached as ``.npz``."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kd_lightning.data.augment import SignalAugmentation
from kd_lightning.data.in_memory import InMemoryDataModule, augmentation_identity, build_augmentation
from kd_lightning.engine.caching.store import file_digest, write_text_atomic
from kd_lightning.engine.errors import ConfigError, check_type
from kd_lightning.losses.base import UNLABELLED

log = logging.getLogger(__name__)

#: mnist1d's default generator settings (its official 4,000 / 1,000 split uses seed 42).
OFFICIAL_SEED = 42


def generate_mnist1d(num_samples: int, seed: int, train_split: float = 0.8) -> dict[str, np.ndarray]:
    """Generate MNIST-1D locally; never downloads (``make_dataset``, not ``get_dataset``)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    args.train_split = train_split
    data = make_dataset(args)
    return {key: np.asarray(data[key]) for key in ("x", "y", "x_test", "y_test")}


def _cached(path: Path, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Load ``path`` if it is intact (its sha256 as recorded beside it), else build and atomically write it
    (safe for parallel sweep jobs); a damaged file is rebuilt with a warning."""
    digest_file = path.with_name(path.name + ".sha256")
    if path.exists():
        recorded = digest_file.read_text().strip() if digest_file.is_file() else None
        if recorded == file_digest(path):
            with np.load(path) as arrays:
                return dict(arrays)
        log.warning("generated data %s is damaged or unverified; generating it again", path)
    arrays = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as tmp:
        np.savez(tmp, **arrays)
    write_text_atomic(digest_file, file_digest(Path(tmp.name)))
    os.replace(tmp.name, path)
    return arrays


class MNIST1DDataModule(InMemoryDataModule):
    """MNIST-1D (Greydanus 2020): 40-sample signals of 10 digit templates, shifted and noised.

    Splits: ``train`` is the official 4,000 samples and ``test`` the official 1,000 (generator
    seed 42); ``val`` is ``val_samples`` fresh samples from another generator seed, so model
    selection never sees the test set. ``transfer_samples`` adds that many *unlabelled* samples
    (target ``-1``) from a third seed to the training set: only distillation terms use them, the
    teacher labels them. Every split is generated once and cached under ``data_dir``.

    Batches are ``(x, y)`` with ``x`` of shape ``(B, 1, 40)`` (float32) and ``y`` of shape ``(B,)``;
    with ``return_index=True`` they are ``(x, y, index)``, ``index`` ``(B,)`` the samples' positions in
    their split (training: ``0 .. num_train_samples - 1``), which terms with a per-sample memory such
    as CRD need. ``kd-distill`` turns it on by itself when the loss needs it.

    ``augment`` (default None: batches as stored) randomly transforms the inputs of every *training*
    batch once it is on the device (:class:`~kd_lightning.data.augment.SignalAugmentation`: shift, scale,
    shear, noise, mixup): a mapping of its knobs, a config with a ``_target_``, or any callable
    ``x -> x``. Validation, test and the cache-filling :meth:`ordered_dataloader` are never augmented,
    and targets and indices are left as they are. Every model a method forwards on the batch sees the same
    view (function matching, Beyer et al. 2022). With ``augment`` set the datamodule declares
    ``random_augmentation = True``, so ``teacher_cache=disk`` is refused; ``teacher_cache=per_view`` stores
    views and replays them (:meth:`replay_views`).
    """

    num_classes = 10

    def __init__(
        self,
        data_dir: str,
        num_classes: int = 10,
        batch_size: int = 128,
        num_workers: int = 0,
        val_samples: int = 1000,
        transfer_samples: int = 0,
        pin_memory: bool = False,
        return_index: bool = False,
        augment: Mapping[str, Any] | Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__(
            batch_size, num_workers, pin_memory, return_index, build_augmentation(augment, SignalAugmentation)
        )
        for key, value in (("num_classes", num_classes), ("val_samples", val_samples)):
            check_type(value, int, f"data.{key}")
        check_type(transfer_samples, int, "data.transfer_samples")
        if num_classes != self.num_classes:
            raise ConfigError(f"data.num_classes={num_classes} but MNIST-1D has 10 classes; set data.num_classes=10")
        if val_samples < 1:
            raise ConfigError(f"data.val_samples={val_samples} must be >= 1")
        if transfer_samples < 0:
            raise ConfigError(f"data.transfer_samples={transfer_samples} must be >= 0 (0 disables it)")
        self.data_dir = Path(data_dir)
        self.val_samples = val_samples
        self.transfer_samples = transfer_samples

    def _split_files(self) -> dict[str, tuple[Path, int, int]]:
        """Cache file, generator seed and sample count per generated set."""
        files = {
            "official": (self.data_dir / "mnist1d_official.npz", OFFICIAL_SEED, 5000),
            "val": (self.data_dir / f"mnist1d_val_{self.val_samples}.npz", OFFICIAL_SEED + 1000, self.val_samples),
        }
        if self.transfer_samples:
            files["transfer"] = (
                self.data_dir / f"mnist1d_transfer_{self.transfer_samples}.npz",
                OFFICIAL_SEED + 2000,
                self.transfer_samples,
            )
        return files

    def _load(self, name: str) -> dict[str, np.ndarray]:
        path, seed, count = self._split_files()[name]
        split = 0.8 if name == "official" else 1.0
        return _cached(path, lambda: generate_mnist1d(count, seed, split))

    def prepare_data(self) -> None:
        for name in self._split_files():
            self._load(name)

    def build_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        official, val = self._load("official"), self._load("val")
        x_train, y_train = official["x"], official["y"]
        if self.transfer_samples:
            x_transfer = self._load("transfer")["x"]
            x_train = np.concatenate([x_train, x_transfer])
            y_train = np.concatenate([y_train, np.full(len(x_transfer), UNLABELLED)])
        return {
            "train": _tensors(x_train, y_train),
            "val": _tensors(val["x"], val["y"]),
            "test": _tensors(official["x_test"], official["y_test"]),
        }

    def content_identity(self) -> dict[str, Any]:
        """What determines every split's inputs (generator seeds and sizes, the training augmentation if
        any; not batch size or workers)."""
        identity: dict[str, Any] = {
            "dataset": "mnist1d",
            "official_seed": OFFICIAL_SEED,
            "val_samples": self.val_samples,
            "transfer_samples": self.transfer_samples,
        }
        if self.augment is not None:
            identity["augment"] = augmentation_identity(self.augment)
        return identity


def _tensors(x: np.ndarray, y: np.ndarray) -> tuple[Tensor, Tensor]:
    return torch.as_tensor(x, dtype=torch.float32).unsqueeze(1), torch.as_tensor(y, dtype=torch.long)
