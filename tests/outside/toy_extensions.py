"""A method, a loss term, a model and a dataset defined outside kd_lightning, as a user would write them.

``tests/test_extending.py`` adds them to ``kd-distill`` with YAML files in a config directory of its own
(``--config-dir``), touching no library file: the recipe in docs/architecture.md, checked.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning.losses import DistillationTerm
from kd_lightning.methods import DistillationModule


class TwoTeacherMean(DistillationModule):
    """Distils from the mean of two teachers' logits, ``z_t = (z_teacher + z_teacher_1) / 2`` (the
    simplest multi-teacher scheme): the loss terms read it as the model ``teacher``."""

    def distilled_outputs(self, x: Tensor, split: str, index: Tensor | None) -> dict[str, dict[str, Tensor]]:
        logits = [self.teachers[name].logits(x, split, index) for name in ("teacher", "teacher_1")]
        return {"teacher": {"logits": torch.stack(logits).mean(dim=0)}}


class CosineLogits(DistillationTerm):
    """``1 - cos(z_s, z_t)`` averaged over the batch: a loss term of one's own."""

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> Tensor:
        return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


class ToyMLP(nn.Module):
    """A two-layer perceptron with names of its own (``hidden``, ``out``)."""

    def __init__(self, in_features: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU())
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.hidden(x))


class Blobs(L.LightningDataModule):
    """Gaussian blobs: ``num_classes`` centres in ``features`` dimensions, samples drawn once from ``seed``."""

    def __init__(
        self, num_classes: int = 3, features: int = 8, samples: int = 600, batch_size: int = 64, seed: int = 0
    ) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        centres = 3 * torch.randn(num_classes, features, generator=generator)
        y = torch.randint(num_classes, (samples,), generator=generator)
        x = centres[y] + torch.randn(samples, features, generator=generator)
        third = samples // 3
        self.splits = {
            "train": TensorDataset(x[:third], y[:third]),
            "val": TensorDataset(x[third : 2 * third], y[third : 2 * third]),
            "test": TensorDataset(x[2 * third :], y[2 * third :]),
        }
        self.batch_size = batch_size

    def example_input(self) -> Tensor:
        return self.splits["val"].tensors[0][:2]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["train"], batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], batch_size=self.batch_size)
