"""Connectors that map a student feature onto a teacher feature's shape, sized from example outputs.

FitNets' regressor (Romero et al., 2015) and most feature methods since use a 1x1 convolution +
BatchNorm for conv maps and a linear layer for vectors (e.g. torchdistill, CRD's ``ConvReg``).
"""

from __future__ import annotations

from torch import Tensor, nn

from kd_lightning.engine.errors import ConfigError

#: Per-sample rank -> (pointwise layer, its BatchNorm): vectors, 1-D maps, 2-D maps.
_POINTWISE: dict[int, tuple[type[nn.Module], type[nn.Module]]] = {
    2: (nn.Linear, nn.BatchNorm1d),
    3: (nn.Conv1d, nn.BatchNorm1d),
    4: (nn.Conv2d, nn.BatchNorm2d),
}


def check_bridgeable(student: Tensor, teacher: Tensor, key: str) -> None:
    """Raise a :class:`ConfigError` naming ``key`` unless a pointwise map can turn ``student`` into
    ``teacher``'s shape: same rank (vectors, 1-D or 2-D maps) and the same spatial size."""
    if student.dim() != teacher.dim() or student.dim() not in _POINTWISE or student.shape[2:] != teacher.shape[2:]:
        raise ConfigError(
            f"{key}: no adapter maps student features {list(student.shape[1:])} to teacher features "
            f"{list(teacher.shape[1:])} (per sample); pick layers of the same rank and spatial size "
            "(vectors or conv maps)"
        )


def pointwise(rank: int, in_channels: int, out_channels: int, bias: bool = True) -> nn.Module:
    """``Linear`` for vectors (rank 2), a 1x1 ``Conv1d`` / ``Conv2d`` for 1-D / 2-D maps."""
    layer = _POINTWISE[rank][0]
    if layer is nn.Linear:
        return nn.Linear(in_channels, out_channels, bias=bias)
    return layer(in_channels, out_channels, kernel_size=1, bias=bias)


def connector(student: Tensor, teacher: Tensor, key: str) -> nn.Module:
    """A module mapping tensors shaped like ``student`` to ``teacher``'s shape.

    - identical shapes: ``nn.Identity`` (nothing to learn);
    - vectors ``(B, Cs) -> (B, Ct)``: ``Linear(Cs, Ct)``;
    - 1-D / 2-D maps ``(B, Cs, *S) -> (B, Ct, *S)`` with the same spatial size ``S``: 1x1 conv + BN.

    Anything else (different ranks or spatial sizes) raises a :class:`ConfigError` naming ``key``.
    """
    if student.shape[1:] == teacher.shape[1:]:
        return nn.Identity()
    check_bridgeable(student, teacher, key)
    rank, s_channels, t_channels = student.dim(), student.shape[1], teacher.shape[1]
    if rank == 2:
        layer = pointwise(rank, s_channels, t_channels)
    else:
        layer = nn.Sequential(pointwise(rank, s_channels, t_channels, bias=False), _POINTWISE[rank][1](t_channels))
    return layer.to(student.device)


def pointwise_mlp(student: Tensor, teacher: Tensor, key: str, hidden: int | None = None) -> nn.Module:
    """Three pointwise layers with ReLUs (``Cs -> H -> H -> Ct``, no bias; ``H = Ct`` by default),
    the mean regressor of VID (Ahn et al., 2019) as in CRD's implementation."""
    check_bridgeable(student, teacher, key)
    rank, s_channels, t_channels = student.dim(), student.shape[1], teacher.shape[1]
    hidden = hidden or t_channels
    return nn.Sequential(
        pointwise(rank, s_channels, hidden, bias=False),
        nn.ReLU(),
        pointwise(rank, hidden, hidden, bias=False),
        nn.ReLU(),
        pointwise(rank, hidden, t_channels, bias=False),
    ).to(student.device)
