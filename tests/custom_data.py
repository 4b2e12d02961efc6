"""A datamodule whose training order depends only on the seed and the epoch, not on the number of
processes: each process takes every world_size-th sample of one seeded permutation, so a 2-process
run with batch B/2 sees the same global batches as a 1-process run with batch B (Lightning's own
distributed sampler reshuffles with its own seed, which makes the two runs incomparable). Lightning
calls ``set_epoch`` on the sampler every epoch; validation and test are not split (every process
evaluates the whole set, and the synced metrics are the same)."""

from __future__ import annotations

from torch.utils.data import DataLoader, DistributedSampler

from kd_lightning.data import MNIST1DDataModule


class GlobalOrderMNIST1D(MNIST1DDataModule):
    """MNIST-1D with one global training order; run with ``trainer.use_distributed_sampler=false``."""

    def __init__(self, *args, order_seed: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.order_seed = order_seed

    def train_dataloader(self) -> DataLoader:
        dataset = self.splits["train"]
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.order_seed)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)
