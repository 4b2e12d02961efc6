"""MNIST-1D, regenerated offline with the ``mnist1d`` package and cached as ``.npz``."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning.data.augment import SignalAugmentation
from kd_lightning.data.contract import ViewSource
from kd_lightning.data.tensors import batched_loader
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


class MNIST1DDataModule(L.LightningDataModule):
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
    #: A sample index fixes the input exactly, so teacher outputs can be cached (``teacher_cache``);
    #: an instance with ``augment`` set declares True.
    random_augmentation = False

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
        super().__init__()
        for key, value in (("num_classes", num_classes), ("batch_size", batch_size), ("num_workers", num_workers)):
            check_type(value, int, f"data.{key}")
        for key, value in (("val_samples", val_samples), ("transfer_samples", transfer_samples)):
            check_type(value, int, f"data.{key}")
        check_type(pin_memory, bool, "data.pin_memory")
        check_type(return_index, bool, "data.return_index")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers={num_workers} must be >= 0 (0: load in the main process)")
        if num_classes != self.num_classes:
            raise ConfigError(f"data.num_classes={num_classes} but MNIST-1D has 10 classes; set data.num_classes=10")
        if batch_size < 1:
            raise ConfigError(f"data.batch_size={batch_size} must be >= 1")
        if val_samples < 1:
            raise ConfigError(f"data.val_samples={val_samples} must be >= 1")
        if transfer_samples < 0:
            raise ConfigError(f"data.transfer_samples={transfer_samples} must be >= 0 (0 disables it)")
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_samples = val_samples
        self.transfer_samples = transfer_samples
        self.pin_memory = pin_memory
        self.return_index = bool(return_index)
        self.augment = build_augmentation(augment)
        if self.augment is not None:
            self.random_augmentation = True
        self.view_source: ViewSource | None = None
        self.splits: dict[str, TensorDataset] = {}

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

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        official, val = self._load("official"), self._load("val")
        x_train, y_train = official["x"], official["y"]
        if self.transfer_samples:
            x_transfer = self._load("transfer")["x"]
            x_train = np.concatenate([x_train, x_transfer])
            y_train = np.concatenate([y_train, np.full(len(x_transfer), UNLABELLED)])
        self.splits = {
            "train": _tensors(x_train, y_train, self.return_index),
            "val": _tensors(val["x"], val["y"], self.return_index),
            "test": _tensors(official["x_test"], official["y_test"], self.return_index),
        }

    @property
    def num_train_samples(self) -> int:
        """Size of the training set (official + transfer samples): the range of training indices."""
        self.prepare_data()
        self.setup()
        return len(self.splits["train"])

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return batched_loader(
            self.splits[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    @property
    def mixes_inputs(self) -> bool:
        """Whether a training input mixes two samples (mixup), so its target is only the first one's."""
        return bool(getattr(self.augment, "mixes_inputs", False))

    def replay_views(self, source: ViewSource | None) -> None:
        """Augment training batches with ``source``'s stored per-sample parameters (``teacher_cache=per_view``)
        instead of fresh random values; None: fresh values again."""
        if source is not None and not self.return_index:
            raise ConfigError("teacher_cache=per_view replays views by sample index: set data.return_index=true")
        self.view_source = source

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Augment the inputs of a training batch (already on its device): with fresh random values, or the
        stored ones of the batch's samples when views are replayed; any other batch as it is."""
        if self.augment is None or self.trainer is None or not self.trainer.training:
            return batch
        x, *rest = batch
        if self.view_source is None:
            return type(batch)([self.augment(x), *rest])
        values = self.view_source.draw(rest[-1])
        return type(batch)([self.augment.apply_per_sample(x, values), *rest])

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

    def ordered_dataloader(self, split: str) -> DataLoader:
        """``split`` in index order, unshuffled (for computing per-sample teacher outputs)."""
        self.prepare_data()
        self.setup()
        return batched_loader(self.splits[split], batch_size=max(self.batch_size, 512), shuffle=False)

    def example_input(self) -> torch.Tensor:
        """One batch of two inputs, for shape checks before training."""
        self.prepare_data()
        self.setup()
        return self.splits["val"].tensors[0][:2]


def build_augmentation(augment: Any) -> Callable[[Tensor], Tensor] | None:
    """``data.augment`` as a callable: None stays None; a mapping with a ``_target_`` is instantiated, one
    without is :class:`SignalAugmentation`'s knobs; a callable is used as it is."""
    if augment is None:
        return None
    if isinstance(augment, DictConfig):
        augment = OmegaConf.to_container(augment, resolve=True)
    if isinstance(augment, Mapping):
        knobs = dict(augment)
        if "_target_" in knobs:
            from hydra.utils import instantiate

            return build_augmentation(instantiate(knobs))
        try:
            return SignalAugmentation(**knobs)
        except TypeError as error:
            raise ConfigError(
                f"data.augment has a key SignalAugmentation does not take ({error}); use max_shift, scale, shear, "
                "iid_noise, corr_noise, corr_noise_sigma, mixup_alpha (or give a _target_)"
            ) from None
    if not callable(augment):
        raise ConfigError(
            f"data.augment={augment!r} must be null, a mapping of SignalAugmentation knobs, or a callable x -> x"
        )
    return augment


def augmentation_identity(augment: Callable[[Tensor], Tensor]) -> dict[str, Any]:
    """What :meth:`MNIST1DDataModule.content_identity` records of an augmentation: its class and knobs."""
    cls = type(augment)
    config = augment.config() if callable(getattr(augment, "config", None)) else {"repr": repr(augment)}
    return {"_target_": f"{cls.__module__}.{cls.__qualname__}", **config}


def _tensors(x: np.ndarray, y: np.ndarray, with_index: bool = False) -> TensorDataset:
    tensors = [torch.as_tensor(x, dtype=torch.float32).unsqueeze(1), torch.as_tensor(y, dtype=torch.long)]
    if with_index:
        tensors.append(torch.arange(len(x)))
    return TensorDataset(*tensors)
