"""Batches gathered whole: the same batches, bit for bit and in the same shuffled order, as a plain
``TensorDataset`` with ``default_collate``, also through a ``Subset`` of the loader's dataset (as the sharded
cache fill takes one) and a distributed sampler; the dataset itself still loads with the default collate."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

from kd_lightning.data import MNIST1DDataModule
from kd_lightning.data.tensors import WholeBatches, batched_loader


def dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(70, 1, 40, generator=generator), torch.randint(0, 10, (70,), generator=generator)
    return TensorDataset(x, y, torch.arange(70))


def batches(loader: DataLoader, seed: int = 3) -> list[list[torch.Tensor]]:
    torch.manual_seed(seed)
    return list(loader)


def assert_same(got: list[list[torch.Tensor]], expected: list[list[torch.Tensor]]) -> None:
    assert len(got) == len(expected)
    for mine, theirs in zip(got, expected, strict=True):
        assert type(mine) is type(theirs) is list
        assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))


def test_batched_loader_serves_the_default_loaders_batches() -> None:
    for options in ({"batch_size": 16, "shuffle": True}, {"batch_size": 32, "shuffle": False, "drop_last": True}):
        assert_same(batches(batched_loader(dataset(), **options)), batches(DataLoader(dataset(), **options)))


def test_subsets_and_distributed_samplers_keep_the_batches() -> None:
    rows = range(10, 50)
    ours = DataLoader(Subset(batched_loader(dataset()).dataset, rows), batch_size=8, collate_fn=WholeBatches.collate)
    assert_same(batches(ours), batches(DataLoader(Subset(dataset(), rows), batch_size=8)))
    for rank in (0, 1):
        sampler = DistributedSampler(range(70), num_replicas=2, rank=rank, shuffle=True, seed=5)
        theirs = DataLoader(dataset(), batch_size=8, sampler=sampler)
        assert_same(batches(batched_loader(dataset(), batch_size=8, sampler=sampler)), batches(theirs))


def test_a_loader_built_over_the_datamodules_splits_with_the_default_collate_still_works(kd_home: Path) -> None:
    data = MNIST1DDataModule(str(kd_home / "data"), batch_size=8, return_index=True)
    data.prepare_data()
    data.setup()
    assert type(data.splits["train"]) is TensorDataset  # what a subclass's own train_dataloader builds over
    plain, ours = DataLoader(data.splits["train"], batch_size=8), data.ordered_dataloader("train")
    x, y, index = next(iter(plain))
    assert (x.shape, y.shape, index.tolist()) == (torch.Size([8, 1, 40]), torch.Size([8]), list(range(8)))
    assert torch.equal(next(iter(ours))[0][:8], x)
