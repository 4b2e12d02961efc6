"""WKD-F: Wasserstein distance between Gaussians fitted to the channels of student and teacher feature maps."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kd_lightning.engine.adapters import pointwise
from kd_lightning.engine.errors import ConfigError
from kd_lightning.losses.features import unsized
from kd_lightning.losses.precision import at_least_fp32
from kd_lightning.losses.reads import ReadSpec
from kd_lightning.losses.terms import LayerTerm

_NORMS: dict[int, type[nn.Module]] = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d}


def channel_gaussians(features: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per sample and channel, the mean and the standard deviation ``sqrt(var + eps)`` (unbiased variance) over
    the positions of ``(B, C, *S)`` maps: a diagonal Gaussian per sample."""
    flat = features.flatten(2)
    return flat.mean(2), torch.sqrt(flat.var(2) + eps)


class WKDF(LayerTerm):
    r"""Wasserstein distance for feature distillation, WKD-F (Lv et al., "Wasserstein Distance Rivals
    Kullback-Leibler Divergence for Knowledge Distillation", NeurIPS 2024; code: JiamingLv/WKD,
    ``mdistiller/distillers/WKD.py``, ``wkd_feature_loss`` with one spatial cell).

    Each sample's channels of the teacher's map and of the projected student map :math:`p(F_s)` (a 1x1 conv
    + BN + ReLU, as the authors' ``ConvReg``; trained with the student, in its checkpoint) are summarised by
    diagonal Gaussians :math:`\mathcal N(\mu, \mathrm{diag}\,\sigma^2)` over the positions
    (:math:`\sigma = \sqrt{\mathrm{var} + \epsilon}`, unbiased variance). The squared 2-Wasserstein distance
    between diagonal Gaussians is :math:`\|\mu_s - \mu_t\|^2 + \|\sigma_s - \sigma_t\|^2`; the mean part is
    weighted by :math:`\rho`:

    .. math::
        L_{wkdf} = \frac{\beta\,w(e)}{B} \sum_b \Big(\rho\,\|\mu_s^b - \mu_t^b\|^2 + \|\sigma_s^b - \sigma_t^b\|^2\Big)

    :math:`w(e) = 1` until ``decay_start_epoch``, then cosine-shaped to 0 at ``decay_end_epoch``:
    :math:`w(e) = \tfrac12\big(1 + \cos(\pi\,(e - e_0) / (e_1 - e_0))\big)` with :math:`e` the 1-based epoch
    (the authors' schedule; ``null``: no decay). Published (CIFAR-100, ResNet32x4 -> ResNet8x4): ``beta = 0.08``,
    ``rho = 4``, ``eps = 1e-5``, decay from epoch 150 to 240, CE weight 1 (``alpha = 0.5``), the last stage.
    The code's finer spatial grids and full-covariance variant are not here. Not 0 at equality (the projector).
    """

    has_adapters = True

    def __init__(
        self,
        student_layer: str = "logits",
        teacher_layer: str = "logits",
        beta: float = 0.08,
        mean_weight: float = 4.0,
        eps: float = 1e-5,
        decay_start_epoch: int | None = None,
        decay_end_epoch: int | None = None,
        student: ReadSpec = None,
        teacher: ReadSpec = None,
    ) -> None:
        super().__init__(student_layer, teacher_layer, beta, student, teacher)
        if (decay_start_epoch is None) != (decay_end_epoch is None) or (
            decay_start_epoch is not None and not 0 <= decay_start_epoch < decay_end_epoch  # type: ignore[operator]
        ):
            raise ConfigError(
                f"loss.terms.wkd_f.decay_start_epoch={decay_start_epoch} / decay_end_epoch={decay_end_epoch}: give "
                "both with 0 <= start < end (the authors': 150 and 240, the run's epochs), or neither (no decay)"
            )
        self.mean_weight = float(mean_weight)
        self.eps = float(eps)
        self.decay = None if decay_start_epoch is None else (int(decay_start_epoch), int(decay_end_epoch))  # type: ignore[arg-type]
        self.schedule = 1.0
        self.projector: nn.Module | None = None

    def start_epoch(self, epoch: int) -> None:
        """The cosine decay of the weight at 0-based ``epoch`` (the authors count from 1)."""
        if self.decay is not None:
            start, end = self.decay
            progress = min(max(epoch + 1 - start, 0), end - start) / (end - start)
            self.schedule = 0.5 * (1 + math.cos(math.pi * progress))

    def setup_shapes(self, student: Tensor, teacher: Tensor, key: str) -> None:
        rank = student.dim()
        if rank != teacher.dim() or rank not in _NORMS or student.shape[2:] != teacher.shape[2:]:
            raise ConfigError(
                f"{key}: WKD-F projects student features {list(student.shape)} onto teacher features "
                f"{list(teacher.shape)} pointwise; pick conv maps of one rank and spatial size"
            )
        if math.prod(teacher.shape[2:]) < 2:
            raise ConfigError(f"{key}: WKD-F needs maps of >= 2 positions for a variance, got {list(teacher.shape)}")
        channels = teacher.shape[1]
        self.projector = nn.Sequential(pointwise(rank, student.shape[1], channels), _NORMS[rank](channels), nn.ReLU())
        self.projector.to(student.device)

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> Tensor:
        if self.projector is None:
            raise unsized(self, student, teacher)
        mean_s, std_s = channel_gaussians(at_least_fp32(self.projector(student)), self.eps)
        mean_t, std_t = channel_gaussians(at_least_fp32(teacher), self.eps)
        distance = self.mean_weight * (mean_s - mean_t).pow(2).sum() + (std_s - std_t).pow(2).sum()
        return self.beta * self.schedule * distance / teacher.shape[0]
