"""Datamodules whose splits fit in memory as tensors (MNIST-1D, CIFAR, sklearn's digits): everything but
where the samples come from.

A subclass implements :meth:`InMemoryDataModule.build_splits` (``train`` / ``val`` / ``test`` inputs and
targets as tensors) and ``content_identity()``, and may give :meth:`InMemoryDataModule.input_transform`
(e.g. stored ``uint8`` images to normalised floats, applied to each gathered batch). This class serves the
splits a whole batch at a time (:func:`~kd_lightning.data.tensors.batched_loader`), with sample indices
when ``return_index``, applies ``augment`` to training batches on their device (fresh random values, or
stored per-sample ones when views are replayed: ``teacher_cache=per_view``) and implements the rest of the
datamodule contract (:mod:`kd_lightning.data.contract`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning.data.contract import ViewSource, check_loader_options
from kd_lightning.data.tensors import batched_loader
from kd_lightning.engine.errors import ConfigError

SPLITS = ("train", "val", "test")


class InMemoryDataModule(L.LightningDataModule):
    """Tensor splits served whole-batch, optionally augmented on the device (see the module docstring).

    Batches are ``(x, y)`` or, with ``return_index=True``, ``(x, y, index)`` (``index``: the samples'
    positions in their split). ``augment`` is a callable ``x -> x`` applied to training batches only, once
    they are on their device; with ``draw`` / ``apply_per_sample`` its views can be stored and replayed.
    """

    #: A sample index fixes the input exactly, so teacher outputs can be cached (``teacher_cache``); an
    #: instance with ``augment`` set declares True.
    random_augmentation = False

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool = False,
        return_index: bool = False,
        augment: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        check_loader_options(batch_size, num_workers, pin_memory, return_index)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.return_index = bool(return_index)
        self.augment = augment
        if augment is not None:
            self.random_augmentation = True
        self.view_source: ViewSource | None = None
        self.splits: dict[str, TensorDataset] = {}

    # ----------------------------------------------------------------------------- for subclasses
    def build_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Inputs and int64 targets of ``train``, ``val`` and ``test`` (target ``-1``: unlabelled)."""
        raise NotImplementedError

    def input_transform(self) -> Callable[[Tensor], Tensor] | None:
        """Applied to the gathered inputs of every batch of every split (None: served as stored)."""
        return None

    # ------------------------------------------------------------------------------------ the splits
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        splits = self.build_splits()
        self.splits = {}
        for name in SPLITS:
            x, y = splits[name]
            tensors = [x, y.long()] + ([torch.arange(len(x))] if self.return_index else [])
            self.splits[name] = TensorDataset(*tensors)

    @property
    def num_train_samples(self) -> int:
        """Size of the training set: the range of training indices."""
        self.prepare_data()
        self.setup()
        return len(self.splits["train"])

    def _loader(self, split: str, shuffle: bool, batch_size: int | None = None) -> DataLoader:
        return batched_loader(
            self.splits[split],
            self.input_transform(),
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0 and batch_size is None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def ordered_dataloader(self, split: str) -> DataLoader:
        """``split`` in index order, unshuffled and never augmented (for computing per-sample teacher outputs)."""
        self.prepare_data()
        self.setup()
        return self._loader(split, shuffle=False, batch_size=max(self.batch_size, 512))

    def example_input(self) -> Tensor:
        """One batch of two validation inputs, for shape checks before training."""
        self.prepare_data()
        self.setup()
        x, transform = self.splits["val"].tensors[0][:2], self.input_transform()
        return transform(x) if transform is not None else x

    # ------------------------------------------------------------------------------- augmentation
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


def build_augmentation(augment: Any, default: type) -> Callable[[Tensor], Tensor] | None:
    """``data.augment`` as a callable: None stays None; a mapping with a ``_target_`` is instantiated, one
    without is the knobs of ``default`` (the datamodule's own augmentation class); a callable is used as it is."""
    if augment is None:
        return None
    if isinstance(augment, DictConfig):
        augment = OmegaConf.to_container(augment, resolve=True)
    if isinstance(augment, Mapping):
        knobs = dict(augment)
        if "_target_" in knobs:
            from hydra.utils import instantiate

            return build_augmentation(instantiate(knobs), default)
        try:
            return default(**knobs)
        except TypeError as error:
            accepted = ", ".join(name for name in inspect.signature(default).parameters if name != "self")
            raise ConfigError(
                f"data.augment has a key {default.__name__} does not take ({error}); use {accepted} "
                "(or give a _target_)"
            ) from None
    if not callable(augment):
        raise ConfigError(
            f"data.augment={augment!r} must be null, a mapping of {default.__name__} knobs, or a callable x -> x"
        )
    return augment


def augmentation_identity(augment: Callable[[Tensor], Tensor]) -> dict[str, Any]:
    """What a datamodule's ``content_identity`` records of an augmentation: its class and knobs."""
    cls = type(augment)
    config = augment.config() if callable(getattr(augment, "config", None)) else {"repr": repr(augment)}
    return {"_target_": f"{cls.__module__}.{cls.__qualname__}", **config}
