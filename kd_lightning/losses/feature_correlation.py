"""Channel-correlation feature terms: ICKD (inter-channel correlation) and NST (neuron selectivity transfer).

Both compare channels of one sample with each other, so student and teacher maps may have different spatial
sizes (ICKD) or channel counts (NST, no adapter).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.engine.adapters import pointwise
from kd_lightning.engine.errors import ConfigError
from kd_lightning.losses.features import unsized
from kd_lightning.losses.precision import at_least_fp32, autocast_off
from kd_lightning.losses.reads import ReadSpec
from kd_lightning.losses.terms import LayerTerm

#: Per spatial rank: the BatchNorm of a 1-D / 2-D map and its adaptive average pooling.
_NORMS: dict[int, type[nn.Module]] = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d}
_POOLS = {3: F.adaptive_avg_pool1d, 4: F.adaptive_avg_pool2d}


def check_maps(student: Tensor, teacher: Tensor, key: str, method: str) -> None:
    """A :class:`ConfigError` naming ``key`` unless both are conv maps of one rank: (B, C, L) or (B, C, H, W)."""
    if student.dim() != teacher.dim() or student.dim() not in _NORMS:
        raise ConfigError(
            f"{key}: {method} needs conv maps of one rank, both (B, C, L) or both (B, C, H, W), got student "
            f"{list(student.shape)} and teacher {list(teacher.shape)}; pick conv layers for student_layer/teacher_layer"
        )


def channel_gram(features: Tensor) -> Tensor:
    """``(B, C, C)`` inner products of the channels of each sample (spatially flattened), each row L2-normalised."""
    flat = features.flatten(2)
    return F.normalize(flat @ flat.transpose(1, 2), dim=2)


class ICKD(LayerTerm):
    r"""Inter-channel correlation KD (Liu et al., "Exploring Inter-Channel Correlation for Diversity-preserved
    Knowledge Distillation", ICCV 2021; code: ADLab-AutoDrive/ICKD, ``Cifar100/distiller_zoo/ICKD.py``).

    With :math:`e` a 1x1 conv (no bias) + BatchNorm from the student's to the teacher's :math:`C` channels (always
    present, as in the authors' code; trained with the student, in its checkpoint) and :math:`G(F) = F F^\top`
    the :math:`C \times C` channel Gram matrix of the spatially flattened map with every row L2-normalised:

    .. math::
        L_{ickd} = \frac{\beta}{B\,C} \sum_b \big\| G(e(F_s^b)) - G(F_t^b) \big\|_F^2

    Spatial sizes may differ (the Gram matrix is :math:`C \times C`). Published (CIFAR-100): ``beta = 2.5``
    beside CE weight 1 (``alpha = 0.5``), on the last conv stage. Not 0 when student equals teacher: the
    student map goes through the learned embedding first.
    """

    has_adapters = True

    def __init__(
        self,
        student_layer: str = "logits",
        teacher_layer: str = "logits",
        beta: float = 2.5,
        student: ReadSpec = None,
        teacher: ReadSpec = None,
    ) -> None:
        super().__init__(student_layer, teacher_layer, beta, student, teacher)
        self.embed: nn.Module | None = None

    def setup_shapes(self, student: Tensor, teacher: Tensor, key: str) -> None:
        check_maps(student, teacher, key, "ICKD")
        rank, channels = student.dim(), teacher.shape[1]
        self.embed = nn.Sequential(pointwise(rank, student.shape[1], channels, bias=False), _NORMS[rank](channels))
        self.embed.to(student.device)

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> Tensor:
        if self.embed is None:
            raise unsized(self, student, teacher)
        embedded = at_least_fp32(self.embed(student))
        with autocast_off(embedded):
            diff = channel_gram(embedded) - channel_gram(at_least_fp32(teacher))
            return self.beta * diff.pow(2).sum() / (teacher.shape[0] * teacher.shape[1])


def polynomial_kernel(a: Tensor, b: Tensor, degree: int = 2, offset: float = 0.0) -> Tensor:
    """``(B, Cb, Ca)`` kernel values ``(a_i . b_j + offset)^degree`` between the channel vectors of each sample."""
    return (b @ a.transpose(1, 2) + offset).pow(degree)


class NST(LayerTerm):
    r"""Neuron selectivity transfer (Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity
    Transfer", 2017; the transcription in HobbitLong/RepDistiller, ``distiller_zoo/NST.py``).

    Each channel's spatially flattened activations, L2-normalised, are one sample of the "selectivity"
    distribution; NST minimises the squared maximum mean discrepancy between the student's and the teacher's
    channels with the polynomial kernel :math:`k(x, y) = (x^\top y + c)^d`:

    .. math::
        L_{nst} = \frac{\beta}{B} \sum_b \Big[\overline{k(f_t^b, f_t^b)} + \overline{k(f_s^b, f_s^b)}
                  - 2\,\overline{k(f_s^b, f_t^b)}\Big]

    (bars: means over all channel pairs). Channel counts may differ (no adapter); the map with more positions
    is average-pooled to the other's spatial size (the code pools the larger of two square maps). Published:
    ``d = 2``, ``c = 0``, ``beta = 50`` (RepDistiller's CIFAR-100 setting, CE weight 1: ``alpha = 0.5``).
    The teacher-teacher term is constant (no gradient) and makes the loss 0 at equality.
    """

    def __init__(
        self,
        student_layer: str = "logits",
        teacher_layer: str = "logits",
        beta: float = 50.0,
        degree: int = 2,
        offset: float = 0.0,
        student: ReadSpec = None,
        teacher: ReadSpec = None,
    ) -> None:
        super().__init__(student_layer, teacher_layer, beta, student, teacher)
        if int(degree) < 1:
            raise ConfigError(f"loss.terms.nst.degree={degree} must be an integer >= 1 (2: the paper's kernel)")
        self.degree = int(degree)
        self.offset = float(offset)

    def setup_shapes(self, student: Tensor, teacher: Tensor, key: str) -> None:
        check_maps(student, teacher, key, "NST")
        small, large = sorted((student.shape[2:], teacher.shape[2:]), key=math.prod)
        if any(s > t for s, t in zip(small, large, strict=True)):
            raise ConfigError(
                f"{key}: NST pools the larger map to the smaller's spatial size, but student {list(student.shape[2:])} "
                f"and teacher {list(teacher.shape[2:])} are each larger in some dimension; pick layers whose sizes nest"
            )

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> Tensor:
        student, teacher = at_least_fp32(student), at_least_fp32(teacher)
        if student.shape[2:] != teacher.shape[2:]:
            pool = _POOLS[student.dim()]
            if math.prod(student.shape[2:]) > math.prod(teacher.shape[2:]):
                student = pool(student, teacher.shape[2:])
            else:
                teacher = pool(teacher, student.shape[2:])
        fs, ft = F.normalize(student.flatten(2), dim=2), F.normalize(teacher.flatten(2), dim=2)
        with autocast_off(fs):
            mmd = self.kernel_mean(ft, ft).detach() + self.kernel_mean(fs, fs) - 2 * self.kernel_mean(fs, ft)
            return self.beta * mmd

    def kernel_mean(self, a: Tensor, b: Tensor) -> Tensor:
        """The kernel averaged over every channel pair and sample."""
        return polynomial_kernel(a, b, self.degree, self.offset).mean()
