"""Feature distillation terms: FitNets (hint + regressor), attention transfer and VID."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.adapters import connector, pointwise_mlp
from kd_lightning.errors import ConfigError
from kd_lightning.losses.base import LayerTerm
from kd_lightning.losses.precision import at_least_fp32


def unsized(term: LayerTerm, student: Tensor, teacher: Tensor) -> RuntimeError:
    return RuntimeError(
        f"{type(term).__name__} got student {list(student.shape)} and teacher {list(teacher.shape)} features "
        "before its adapters were sized; DistillationModule.setup_for(example_input) sizes them before training"
    )


class FitNets(LayerTerm):
    r"""FitNets hints (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015).

    .. math::
        L_{hint} = \beta \cdot \frac{1}{N}\,\big\| r(F_s) - F_t \big\|_2^2

    with :math:`r` a regressor (:func:`~kd_lightning.adapters.connector`: 1x1 conv + BN for conv
    maps, linear for vectors, identity when the shapes already match) sized from one example batch
    and trained with the student, and :math:`N` the number of elements (mean squared error). The paper
    trains the hint in a separate first stage; like CRD's benchmark (Tian et al., 2020) this trains it
    jointly with CE, with ``beta = 100``.
    """

    has_adapters = True

    def __init__(self, student_layer: str = "logits", teacher_layer: str = "logits", beta: float = 100.0) -> None:
        super().__init__(student_layer, teacher_layer, beta)
        self.regressor: nn.Module | None = None

    def setup_shapes(self, student: Tensor, teacher: Tensor, key: str) -> None:
        self.regressor = connector(student, teacher, key)

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> Tensor:
        if self.regressor is not None:
            student = self.regressor(student)
        elif student.shape != teacher.shape:
            raise unsized(self, student, teacher)
        return self.beta * F.mse_loss(at_least_fp32(student), at_least_fp32(teacher))


def attention_map(features: Tensor, p: float = 2.0) -> Tensor:
    """Zagoruyko & Komodakis' spatial attention: ``mean_c |F_c|^p`` flattened and L2-normalised per sample."""
    return F.normalize(at_least_fp32(features).abs().pow(p).mean(dim=1).flatten(1), dim=1)


class AttentionTransfer(LayerTerm):
    r"""Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017).

    With :math:`Q = \mathrm{vec}\big(\sum_c |F_c|^p\big)` over the channels of a 1-D or 2-D map:

    .. math::
        L_{at} = \frac{\beta}{2} \cdot \frac{1}{B\,N}\sum_{b}
                 \Big\| \frac{Q_s^b}{\|Q_s^b\|_2} - \frac{Q_t^b}{\|Q_t^b\|_2} \Big\|_2^2

    (:math:`N` spatial positions). Published: ``p = 2``, ``beta = 1000`` (the authors' code takes the
    mean of the squared difference and weights it by ``beta / 2``). Channel counts may differ; the
    spatial sizes must match.
    """

    def __init__(
        self, student_layer: str = "logits", teacher_layer: str = "logits", beta: float = 1000.0, p: float = 2.0
    ) -> None:
        super().__init__(student_layer, teacher_layer, beta)
        self.p = float(p)

    def setup_shapes(self, student: Tensor, teacher: Tensor, key: str) -> None:
        if student.dim() < 3 or student.dim() != teacher.dim() or student.shape[2:] != teacher.shape[2:]:
            raise ConfigError(
                f"{key}: attention transfer needs conv maps (B, C, *S) of the same spatial size S, got student "
                f"{list(student.shape)} and teacher {list(teacher.shape)}; pick matching student_layer/teacher_layer"
            )

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> Tensor:
        diff = attention_map(student, self.p) - attention_map(teacher, self.p)
        return self.beta / 2 * diff.pow(2).mean()


class VID(LayerTerm):
    r"""Variational Information Distillation (Ahn et al., "Variational Information Distillation for
    Knowledge Transfer", CVPR 2019).

    Maximises a variational lower bound on the mutual information between teacher and student
    features with a Gaussian :math:`q(t \mid s) = \mathcal{N}(\mu(s), \sigma^2)`, i.e. minimises

    .. math::
        L_{vid} = \beta \cdot \frac{1}{N} \sum_{c, x}
                  \Big( \tfrac12 \log \sigma_c^2 + \frac{(t_{c,x} - \mu_{c,x}(s))^2}{2 \sigma_c^2} \Big),
        \qquad \sigma_c^2 = \log(1 + e^{\alpha_c}) + \epsilon

    over channels :math:`c` and positions :math:`x` (:math:`N` elements, constant dropped), with
    :math:`\mu` three pointwise layers (:func:`~kd_lightning.adapters.pointwise_mlp`) and one learned
    variance per teacher channel, both trained with the student. As in CRD's implementation:
    initial variance 5, :math:`\epsilon = 10^{-5}`, ``beta = 1``. Not zero at a perfect fit: its
    minimum is the :math:`\tfrac12 \log \sigma^2` term.
    """

    has_adapters = True

    def __init__(
        self,
        student_layer: str = "logits",
        teacher_layer: str = "logits",
        beta: float = 1.0,
        init_variance: float = 5.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__(student_layer, teacher_layer, beta)
        self.init_variance = float(init_variance)
        self.eps = float(eps)
        self.mean: nn.Module | None = None
        self.raw_variance: nn.Parameter | None = None

    def setup_shapes(self, student: Tensor, teacher: Tensor, key: str) -> None:
        self.mean = pointwise_mlp(student, teacher, key)
        raw = math.log(math.expm1(self.init_variance - self.eps))  # softplus(raw) + eps = init_variance
        self.raw_variance = nn.Parameter(torch.full((teacher.shape[1],), raw, device=teacher.device))

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> Tensor:
        if self.mean is None or self.raw_variance is None:
            raise unsized(self, student, teacher)
        variance = F.softplus(at_least_fp32(self.raw_variance)) + self.eps
        variance = variance.view(1, -1, *[1] * (teacher.dim() - 2))
        mean = at_least_fp32(self.mean(student))
        nll = 0.5 * (torch.log(variance) + (at_least_fp32(teacher) - mean).pow(2) / variance)
        return self.beta * nll.mean()
