"""What a datamodule may offer kd_lightning, declared in one place.

A datamodule is any ``LightningDataModule`` whose batches are ``(x, y)`` or, with sample indices,
``(x, y, index)``; target ``-1`` (:data:`~kd_lightning.losses.UNLABELLED`) marks an unlabelled sample.
Everything below is optional; each member unlocks something, and the library checks for the protocol
that a feature needs (``isinstance(datamodule, ...)``) instead of probing attributes one by one.

=====================  =========================================================================
member                 unlocks
=====================  =========================================================================
``example_input()``    shape checks, adapter sizing and class-count checks before any training
``num_train_samples``  terms with a per-sample memory (CRD's bank) sized without a config value
``random_augmentation``  ``False`` declares that a sample index fixes the input: teacher validation
                       outputs are reused across epochs and the teacher-output cache is allowed
``content_identity()``  the cache key of the inputs (what determines every split)
``ordered_dataloader(split)``  the split in index order, to fill the teacher-output cache
``return_index``       a constructor argument: batches carry sample indices (CRD, the cache)
``transfer_samples``   a constructor argument: unlabelled samples added to training (left out when
                       the method does not learn from them)
``replay_views(source)``  with ``augment`` (``draw(x, generator)`` / ``apply_per_sample(x, values)``):
                       training batches augmented from stored per-sample parameters, the teacher
                       cache for augmented data (``teacher_cache=per_view``, FKD)
``mixes_inputs``       ``True`` declares that a training input mixes two samples (mixup) while its
                       target is the first one's: :func:`check_label_mixing` then refuses a loss
                       that reads hard labels (a weighted task term, a term on the target class)
=====================  =========================================================================
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch.utils.data import DataLoader

from kd_lightning.engine.errors import ConfigError, check_type


@runtime_checkable
class HasExampleInput(Protocol):
    def example_input(self) -> torch.Tensor:
        """A small batch of inputs (e.g. two samples) of the shape the models receive."""


@runtime_checkable
class HasTrainSize(Protocol):
    @property
    def num_train_samples(self) -> int:
        """Size of the training set: the range of training sample indices."""


@runtime_checkable
class CacheableData(Protocol):
    """Data whose teacher outputs can be computed once per sample and reused."""

    #: False when a sample index determines the model input exactly (no random augmentation).
    random_augmentation: bool

    def content_identity(self) -> Mapping[str, Any]:
        """Everything that determines the inputs of every split (source, seeds, sizes, transforms)."""

    def ordered_dataloader(self, split: str) -> DataLoader:
        """The split's samples in index order (0, 1, 2, ...), batches ``(x, ...)``."""


@runtime_checkable
class ViewSource(Protocol):
    def draw(self, index: torch.Tensor) -> Mapping[str, torch.Tensor]:
        """The stored augmentation parameters of samples ``index`` in the current view."""


@runtime_checkable
class ReplaysViews(CacheableData, Protocol):
    """Augmented data whose training views can be replayed from stored per-sample parameters.

    ``augment`` draws a batch's random values (``draw(x, generator=...)``, whose ``per_sample()`` gives one
    row per sample) and applies stored ones (``apply_per_sample(x, values)``); after
    ``replay_views(source)`` training batches ``(x, y, index)`` are augmented with ``source.draw(index)``
    instead of fresh random values (``None``: fresh values again)."""

    augment: Any

    def replay_views(self, source: ViewSource | None) -> None:
        """Augment training batches from ``source``'s stored parameters."""


def check_loader_options(batch_size: int, num_workers: int, pin_memory: bool, return_index: bool) -> None:
    """The loader options every datamodule takes (``data.batch_size``, ``num_workers``, ``pin_memory``,
    ``return_index``): types and ranges, each error naming its key."""
    for key, value in (("batch_size", batch_size), ("num_workers", num_workers)):
        check_type(value, int, f"data.{key}")
    check_type(pin_memory, bool, "data.pin_memory")
    check_type(return_index, bool, "data.return_index")
    if num_workers < 0:
        raise ConfigError(f"data.num_workers={num_workers} must be >= 0 (0: load in the main process)")
    if batch_size < 1:
        raise ConfigError(f"data.batch_size={batch_size} must be >= 1")


def check_view_replay(datamodule: object, key: str) -> None:
    """Refuse (naming ``key``) data whose training views cannot be stored and replayed per sample."""
    augment = getattr(datamodule, "augment", None)
    if isinstance(datamodule, ReplaysViews) and (augment is None or is_deterministic(datamodule)):
        raise ConfigError(f"{key} stores augmented views, but the data has no augmentation; use teacher_cache=disk")
    if not isinstance(datamodule, ReplaysViews) or not callable(getattr(augment, "apply_per_sample", None)):
        raise ConfigError(
            f"{key} replays stored augmented views, but the datamodule ({type(datamodule).__name__}) cannot "
            "(it needs replay_views and an augment with draw / apply_per_sample); use teacher_cache=none"
        )
    if getattr(datamodule, "mixes_inputs", False):
        raise ConfigError(
            f"{key} stores one view per sample, but data.augment mixes samples of a batch (mixup): set "
            "data.augment.mixup_alpha=0 or teacher_cache=none"
        )
    if not getattr(datamodule, "return_index", False):
        raise ConfigError(f"{key} labels and replays views by sample index: set data.return_index=true")


def is_deterministic(datamodule: object) -> bool:
    """Whether the datamodule declares that a sample index fixes its input (``random_augmentation=False``)."""
    return getattr(datamodule, "random_augmentation", True) is False


def check_cacheable(datamodule: object, key: str) -> None:
    """Refuse (naming ``key``) data whose per-sample outputs cannot be cached."""
    if not isinstance(datamodule, CacheableData) or not is_deterministic(datamodule):
        reason = (
            "declares random_augmentation=True"
            if isinstance(datamodule, CacheableData)
            else "lacks content_identity / ordered_dataloader / random_augmentation"
        )
        raise ConfigError(
            f"{key} needs inputs fixed per sample, but the datamodule ({type(datamodule).__name__}) {reason}: "
            "cached teacher outputs would be stale; "
            + (
                "use teacher_cache=per_view (stored augmented views) or "
                if isinstance(datamodule, ReplaysViews)
                else ""
            )
            + f"set {key}=none"
        )


def check_label_mixing(datamodule: object, loss: object, callbacks: Iterable[object] = ()) -> None:
    """Refuse a loss that reads hard labels on mixed inputs: with ``mixes_inputs`` (mixup), a batch's targets
    are the first sample's labels only, so the cross-entropy weighted ``1 - loss.alpha`` (the loss's
    ``weighs_task_term``) or a term that splits on the target class (its ``label_terms``, e.g. DKD) would train
    on wrong labels. Mixup is for pure distillation without labels (``loss.alpha = 1``; function matching, Beyer
    et al. 2022); a callback that schedules ``loss.alpha`` (e.g. ``AlphaWarmup``) is refused as well, since it
    lowers alpha below 1. A loss that does not say whether it reads labels (no ``reads_labels``) is not judged."""
    if not getattr(datamodule, "mixes_inputs", False):
        return
    mixup = getattr(getattr(datamodule, "augment", None), "mixup_alpha", None)
    key = "data.augment.mixup_alpha" + (f"={mixup}" if mixup is not None else "")
    if getattr(loss, "reads_labels", None) is None:
        return
    if loss.weighs_task_term:
        raise ConfigError(
            f"{key} mixes the inputs of two samples but keeps only the first one's label, and "
            f"loss.alpha={loss.alpha} weights the hard-label cross-entropy by {1.0 - loss.alpha:g}: it would learn "
            "wrong labels; set loss.alpha=1.0 (pure distillation, as function matching does) or "
            "data.augment.mixup_alpha=0"
        )
    if loss.label_terms:
        raise ConfigError(
            f"{key} mixes the inputs of two samples but keeps only the first one's label, and "
            f"loss.terms.{loss.label_terms[0]} reads the target class: it would learn wrong labels; use a term "
            "that reads no label (loss=kd) or set data.augment.mixup_alpha=0"
        )
    schedules = sorted(type(c).__name__ for c in callbacks if getattr(c, "attribute", None) == "alpha")
    if schedules:
        raise ConfigError(
            f"{key} needs pure distillation (loss.alpha=1), but the callback {schedules[0]} schedules loss.alpha "
            "below 1 (a hard-label cross-entropy on mixed inputs); remove it from callbacks or set "
            "data.augment.mixup_alpha=0"
        )
