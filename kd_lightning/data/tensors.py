"""In-memory datasets served a batch at a time: one gather per tensor instead of one ``__getitem__`` per sample.

A ``DataLoader`` over a plain ``TensorDataset`` calls ``__getitem__`` once per sample and then
``default_collate`` stacks the rows, the largest item in the profile of an MNIST-1D KD epoch
(docs/performance.md, "CPU: end to end"). :func:`batched_loader` wraps the dataset in
:class:`WholeBatches`, which answers the loader's ``__getitems__(indices)`` with ``tensor[indices]`` for each
tensor: the same values, bit for bit, in the same order (the sampler is untouched, so shuffling, seeding,
``Subset`` and Lightning's distributed samplers work as before). The dataset itself stays a plain
``TensorDataset``: a loader a user builds over it with the default collate works as it always did.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset


class WholeBatches(Dataset):
    """``dataset``'s samples, gathered a whole batch at a time (``__getitems__``); a batch comes out collated,
    so load it with ``collate_fn=WholeBatches.collate`` (:func:`batched_loader` does). ``transform`` maps the
    gathered inputs (the first tensor) of a batch, e.g. stored ``uint8`` images to normalised floats."""

    def __init__(self, dataset: TensorDataset, transform: Callable[[Tensor], Tensor] | None = None) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> list[Tensor]:
        return [tensor[0] for tensor in self.__getitems__([index])]

    def __getitems__(self, indices: list[int]) -> list[Tensor]:
        rows = torch.as_tensor(indices, dtype=torch.long)
        x, *rest = (tensor[rows] for tensor in self.dataset.tensors)
        return [self.transform(x) if self.transform is not None else x, *rest]

    @staticmethod
    def collate(batch: list[Tensor]) -> list[Tensor]:
        """The batch as gathered: ``[x, y, ...]``, what ``default_collate`` makes of per-sample rows."""
        return batch


def batched_loader(
    dataset: TensorDataset, transform: Callable[[Tensor], Tensor] | None = None, **options: Any
) -> DataLoader:
    """A ``DataLoader`` over ``dataset`` (``options``: batch size, shuffle, workers, ...) that gathers each batch
    whole (its inputs through ``transform``) and serves it as it is."""
    return DataLoader(WholeBatches(dataset, transform), collate_fn=WholeBatches.collate, **options)
