"""Training without training data: a datamodule whose training batches are step indices, for methods that
make their own inputs (``method=data_free``); validation and test are another datamodule's."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


class _Steps(Dataset):
    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor(index)


class SyntheticSteps(L.LightningDataModule):
    """``steps_per_epoch`` placeholder training batches (each the step's index, a 0-d tensor) and the
    validation / test loaders of ``datamodule``, whose training loader is never asked for.

    What the wrapped datamodule offers for shapes and evaluation is passed on: ``example_input()`` (one
    validation batch), ``random_augmentation``, ``num_classes``. Its ``prepare_data`` / ``setup`` run as
    Lightning asks (they load the splits; no training input is read from them).
    """

    def __init__(self, datamodule: L.LightningDataModule, steps_per_epoch: int) -> None:
        super().__init__()
        self.datamodule = datamodule
        self.steps_per_epoch = int(steps_per_epoch)

    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: str) -> None:
        self.datamodule.setup(stage)

    def teardown(self, stage: str) -> None:
        self.datamodule.teardown(stage)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Steps(self.steps_per_epoch), batch_size=None, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return self.datamodule.val_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.datamodule.test_dataloader()

    def example_input(self) -> torch.Tensor:
        return self.datamodule.example_input()  # type: ignore[attr-defined, operator]

    @property
    def random_augmentation(self) -> bool:
        return getattr(self.datamodule, "random_augmentation", True)

    @property
    def num_classes(self) -> int | None:
        return getattr(self.datamodule, "num_classes", None)
