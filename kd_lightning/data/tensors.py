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

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset


class WholeBatches(Dataset):
    """``dataset``'s samples, gathered a whole batch at a time (``__getitems__``); a batch comes out collated,
    so load it with ``collate_fn=WholeBatches.collate`` (:func:`batched_loader` does)."""

    def __init__(self, dataset: TensorDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> list[Tensor]:
        rows = torch.as_tensor(indices, dtype=torch.long)
        return [tensor[rows] for tensor in self.dataset.tensors]

    @staticmethod
    def collate(batch: list[Tensor]) -> list[Tensor]:
        """The batch as gathered: ``[x, y, ...]``, what ``default_collate`` makes of per-sample rows."""
        return batch


def batched_loader(dataset: TensorDataset, **options: Any) -> DataLoader:
    """A ``DataLoader`` over ``dataset`` (``options``: batch size, shuffle, workers, ...) that gathers each batch
    whole and serves it as it is."""
    return DataLoader(WholeBatches(dataset), collate_fn=WholeBatches.collate, **options)
