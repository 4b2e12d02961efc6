"""A split labelled by several processes: each process's shard of an ordered loader, and the shards joined.

:class:`~kd_lightning.teacher.outputs.TeacherOutputCache` fills a table under a multi-process strategy with
these: process ``rank`` labels :func:`shard_of` the split's loader, :func:`gather_shards` joins every process's
rows into the table a single process's pass gives, bit for bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

if TYPE_CHECKING:
    from lightning.pytorch import Trainer


def shard_of(loader: DataLoader, world_size: int, rank: int) -> tuple[DataLoader, int]:
    """Process ``rank``'s part of ``loader`` and the rows each part spans at most: ``ceil(batches / world)``
    whole batches from batch ``rank * ceil(batches / world)`` on (a :class:`~torch.utils.data.Subset` of its
    dataset, with its batch size, collate function and workers; the last shards may be shorter, or empty), so
    each batch a process runs is one that a single process's pass over ``loader`` runs."""
    total = len(loader.dataset)
    size = -(-len(loader) // world_size) * loader.batch_size
    rows = range(min(rank * size, total), min((rank + 1) * size, total))
    part = DataLoader(
        Subset(loader.dataset, rows),
        batch_size=loader.batch_size,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
    )
    return part, size


def gather_shards(
    shard: dict[str, np.ndarray], size: int, total: int, trainer: Trainer, whole_table: tuple[str, ...]
) -> dict[str, np.ndarray]:
    """Every process's ``shard`` table (at most ``size`` rows each) joined into the table of ``total`` rows.

    Global rank 0's shard is never empty: it broadcasts the array names, dtypes and row shapes, and the
    arrays named in ``whole_table`` (one value for the whole table, not one row per sample). Each per-row
    array is padded to ``size`` rows, sent as its bytes (``trainer.strategy.all_gather``: no dtype is
    converted on the way), concatenated in rank order and trimmed to ``total`` rows."""
    strategy = trainer.strategy
    layout = {name: (array.dtype.str, array.shape[1:]) for name, array in shard.items()}
    whole = {name: array for name, array in shard.items() if name in whole_table}
    layout, whole = strategy.broadcast((layout, whole), src=0)
    table = {}
    for name, (dtype, row_shape) in layout.items():
        if name in whole_table:
            table[name] = whole[name]
            continue
        padded = np.zeros((size, *row_shape), dtype=dtype)
        if name in shard:
            padded[: len(shard[name])] = shard[name]
        sent = torch.from_numpy(padded.reshape(size, -1).view(np.uint8)).to(strategy.root_device)
        received = strategy.all_gather(sent).cpu().numpy()  # (world, size, bytes per row)
        rows = np.ascontiguousarray(received.reshape(-1, received.shape[-1])[:total])
        table[name] = rows.view(dtype).reshape(total, *row_shape)
    return table
