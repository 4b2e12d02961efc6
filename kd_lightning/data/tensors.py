"""In-memory datasets served a batch at a time: one gather per tensor instead of one ``__getitem__`` per sample.

A ``DataLoader`` over a plain ``TensorDataset`` calls ``__getitem__`` once per sample and then
``default_collate`` stacks the rows: about 1.4 ms per batch of 128 on one CPU core, a quarter of an MNIST-1D
KD step (docs/performance.md, "CPU: end to end"). :class:`BatchedTensorDataset` answers the loader's
``__getitems__(indices)`` with ``tensor[indices]`` for each tensor: the same values, bit for bit, in the
same order (the sampler is untouched, so shuffling, seeding and Lightning's distributed samplers work as
before).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset


class BatchedTensorDataset(TensorDataset):
    """A ``TensorDataset`` whose batches are gathered whole (``__getitems__``); load it with
    :func:`batched_loader` (or ``collate_fn=BatchedTensorDataset.collate``): a batch is already collated."""

    def __getitems__(self, indices: list[int]) -> list[Tensor]:
        rows = torch.as_tensor(indices, dtype=torch.long)
        return [tensor[rows] for tensor in self.tensors]

    @staticmethod
    def collate(batch: list[Tensor]) -> list[Tensor]:
        """The batch as gathered: ``[x, y, ...]``, what ``default_collate`` makes of per-sample rows."""
        return batch


def batched_loader(dataset: BatchedTensorDataset, **options: Any) -> DataLoader:
    """A ``DataLoader`` over ``dataset`` (``options``: batch size, shuffle, workers, ...) that serves its
    gathered batches as they are."""
    return DataLoader(dataset, collate_fn=BatchedTensorDataset.collate, **options)
