"""Batched in-memory datasets: the same batches, bit for bit and in the same shuffled order, as a plain
``TensorDataset`` with ``default_collate``, also through a ``Subset`` and a distributed sampler."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

from kd_lightning.data.tensors import BatchedTensorDataset, batched_loader


def tensors() -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    return (
        torch.randn(70, 1, 40, generator=generator),
        torch.randint(0, 10, (70,), generator=generator),
        torch.arange(70),
    )


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
        plain = DataLoader(TensorDataset(*tensors()), **options)
        assert_same(batches(batched_loader(BatchedTensorDataset(*tensors()), **options)), batches(plain))


def test_subsets_and_distributed_samplers_keep_the_batches() -> None:
    rows = range(10, 50)
    plain = DataLoader(Subset(TensorDataset(*tensors()), rows), batch_size=8)
    assert_same(batches(batched_loader(Subset(BatchedTensorDataset(*tensors()), rows), batch_size=8)), batches(plain))
    for rank in (0, 1):
        sampler = DistributedSampler(range(70), num_replicas=2, rank=rank, shuffle=True, seed=5)
        ours = batched_loader(BatchedTensorDataset(*tensors()), batch_size=8, sampler=sampler)
        theirs = DataLoader(TensorDataset(*tensors()), batch_size=8, sampler=sampler)
        assert_same(batches(ours), batches(theirs))
