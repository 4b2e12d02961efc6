"""Small models for MNIST-1D (Greydanus, "Scaling down Deep Learning", 2020): 40-sample 1-D signals."""

from __future__ import annotations

from torch import Tensor, nn


class ConvNet1D(nn.Module):
    """A plain 1-D CNN: ``depth`` x (Conv1d(k) -> ReLU), then flatten -> Linear.

    The MNIST-1D paper's CNN (3 conv layers, 25 channels, kernel 5) reaches ~94% test accuracy;
    wider variants serve as teachers. With ``batch_norm`` every block is Conv1d -> BatchNorm1d -> ReLU
    (a teacher whose running statistics data-free distillation matches, ``teacher=cnn1d_bn``).

    Args:
        num_classes: output logits.
        channels: width of every conv layer.
        depth: number of conv layers.
        kernel_size: odd kernel size; padding keeps the length.
        length: input signal length (40 for MNIST-1D).
        in_channels: input channels (1 for MNIST-1D).
        batch_norm: a BatchNorm1d after every conv layer (False: the plain net, same state-dict keys as
            before the option existed).
    """

    def __init__(
        self,
        num_classes: int = 10,
        channels: int = 64,
        depth: int = 3,
        kernel_size: int = 5,
        length: int = 40,
        in_channels: int = 1,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_channels
        for _ in range(depth):
            conv = nn.Conv1d(width, channels, kernel_size, padding=kernel_size // 2, bias=not batch_norm)
            layers += [conv, nn.BatchNorm1d(channels), nn.ReLU()] if batch_norm else [conv, nn.ReLU()]
            width = channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels * length, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return self.head(self.features(x).flatten(1))


class MLP(nn.Module):
    """A multi-layer perceptron on the flattened input: ``Linear -> ReLU`` x ``depth`` -> Linear.

    The MNIST-1D paper's MLP (2 hidden layers of 100) reaches ~68% test accuracy from scratch.

    Args:
        num_classes: output logits.
        in_features: flattened input size (40 for MNIST-1D).
        hidden: width of every hidden layer.
        depth: number of hidden layers.
    """

    def __init__(self, num_classes: int = 10, in_features: int = 40, hidden: int = 100, depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x.flatten(1)))
