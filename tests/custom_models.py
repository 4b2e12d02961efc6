"""A model this library did not define, built by ``_target_: tests.custom_models.TinyNet`` in configs."""

from __future__ import annotations

from torch import Tensor, nn


class TinyNet(nn.Module):
    """A small 1-D conv net with its own module names: ``stem`` -> ``blocks.0`` (length 40) ->
    ``blocks.1`` (stride 2, length 20) -> average pool -> ``head``."""

    def __init__(self, num_classes: int = 10, width: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(1, width, 3, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Conv1d(width, width, 3, padding=1), nn.BatchNorm1d(width), nn.ReLU()),
            nn.Sequential(nn.Conv1d(width, width, 3, stride=2, padding=1), nn.BatchNorm1d(width), nn.ReLU()),
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=-1))
