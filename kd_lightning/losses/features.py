"""Feature distillation terms: FitNets (hint + regressor), attention transfer, VID and ReviewKD."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.engine.adapters import connector, pointwise_mlp
from kd_lightning.engine.errors import ConfigError
from kd_lightning.losses.precision import at_least_fp32
from kd_lightning.losses.reads import ReadSpec
from kd_lightning.losses.terms import LayerTerm, MultiLayerTerm


def unsized(term: LayerTerm, student: Tensor, teacher: Tensor) -> RuntimeError:
    return RuntimeError(
        f"{type(term).__name__} got student {list(student.shape)} and teacher {list(teacher.shape)} features "
        "before its adapters were sized; DistillationModule.setup_for(example_input) sizes them before training"
    )


class FitNets(LayerTerm):
    r"""FitNets hints (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015).

    .. math::
        L_{hint} = \beta \cdot \frac{1}{N}\,\big\| r(F_s) - F_t \big\|_2^2

    with :math:`r` a regressor (:func:`~kd_lightning.engine.adapters.connector`: 1x1 conv + BN for conv
    maps, linear for vectors, identity when the shapes already match) sized from one example batch
    and trained with the student, and :math:`N` the number of elements (mean squared error). By default the
    hint is trained jointly with CE, like CRD's benchmark (Tian et al., 2020), with ``beta = 100``;
    the paper's separate first stage is the two-stage method
    :class:`~kd_lightning.methods.FitNetsTwoStage` (``method=fitnets_two_stage``).
    """

    has_adapters = True

    def __init__(
        self,
        student_layer: str = "logits",
        teacher_layer: str = "logits",
        beta: float = 100.0,
        student: ReadSpec = None,
        teacher: ReadSpec = None,
    ) -> None:
        super().__init__(student_layer, teacher_layer, beta, student, teacher)
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
        self,
        student_layer: str = "logits",
        teacher_layer: str = "logits",
        beta: float = 1000.0,
        p: float = 2.0,
        student: ReadSpec = None,
        teacher: ReadSpec = None,
    ) -> None:
        super().__init__(student_layer, teacher_layer, beta, student, teacher)
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
    :math:`\mu` three pointwise layers (:func:`~kd_lightning.engine.adapters.pointwise_mlp`) and one learned
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
        student: ReadSpec = None,
        teacher: ReadSpec = None,
    ) -> None:
        super().__init__(student_layer, teacher_layer, beta, student, teacher)
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


#: Per spatial rank (1-D / 2-D maps): convolution, BatchNorm, adaptive average pooling.
_MAPS: dict[int, tuple[type[nn.Module], type[nn.Module], object]] = {
    1: (nn.Conv1d, nn.BatchNorm1d, F.adaptive_avg_pool1d),
    2: (nn.Conv2d, nn.BatchNorm2d, F.adaptive_avg_pool2d),
}


def hcl(student: Tensor, teacher: Tensor, levels: tuple[int, ...] = (4, 2, 1)) -> Tensor:
    r"""ReviewKD's hierarchical context loss on one pair of same-shaped maps ``(B, C, *S)``:

    .. math::
        \mathrm{HCL}(F_s, F_t) = \frac{\mathrm{MSE}(F_s, F_t) + \sum_{j} 2^{-j}\,
            \mathrm{MSE}(P_{l_j}(F_s), P_{l_j}(F_t))}{1 + \sum_j 2^{-j}}

    with :math:`P_l` adaptive average pooling to :math:`l` (1-D) or :math:`l \times l` (2-D) and the
    levels :math:`l_j` of ``levels`` smaller than the map's (first) spatial size, :math:`j = 1, 2, \dots`.
    """
    student, teacher = at_least_fp32(student), at_least_fp32(teacher)
    pool = _MAPS[student.dim() - 2][2]
    loss = F.mse_loss(student, teacher)
    weight, total = 1.0, 1.0
    for level in levels:
        if level >= student.shape[2]:
            continue
        size = (level,) * (student.dim() - 2)
        weight /= 2.0
        loss = loss + weight * F.mse_loss(pool(student, size), pool(teacher, size))
        total += weight
    return loss / total


class ABF(nn.Module):
    """ReviewKD's attention-based fusion of one student stage with the fused output of the deeper stages.

    ``conv1`` (1x1 conv + BN) maps the stage to ``mid`` channels; with a deeper residual, both are
    concatenated and a 1x1 conv + sigmoid gives two per-position attention maps that weight their sum;
    the result, resized (nearest) to the teacher's spatial size, is the residual passed on, and ``conv2``
    (3-wide conv + BN) maps it to the teacher's channels.
    """

    def __init__(self, rank: int, in_channels: int, mid: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        conv, norm, _ = _MAPS[rank]
        self.conv1 = nn.Sequential(conv(in_channels, mid, 1, bias=False), norm(mid))
        self.conv2 = nn.Sequential(conv(mid, out_channels, 3, padding=1, bias=False), norm(out_channels))
        self.att_conv = nn.Sequential(conv(2 * mid, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)  # as in the authors' code
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, out_size: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        x = self.conv1(x)
        if self.att_conv is not None and residual is not None:
            residual = F.interpolate(residual, size=x.shape[2:], mode="nearest")
            attention = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * attention[:, :1] + residual * attention[:, 1:]
        if x.shape[2:] != out_size:
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.conv2(x), x


class ReviewKD(MultiLayerTerm):
    r"""Knowledge review (Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021).

    The student's stages :math:`F_s^1 \dots F_s^n` (``student_layers``, shallow to deep) are fused
    from deep to shallow by attention-based fusion modules (:class:`ABF`), so each stage's output
    :math:`\hat F_s^i` also "reviews" the deeper ones, and each is compared to the teacher's stage
    :math:`F_t^i` (``teacher_layers``, same order) with the hierarchical context loss (:func:`hcl`):

    .. math::
        L_{review} = \beta \sum_{i=1}^{n} \mathrm{HCL}\big(\hat F_s^i, F_t^i\big), \qquad
        \hat F_s^n, R^n = \mathrm{ABF}_n(F_s^n), \quad
        \hat F_s^i, R^i = \mathrm{ABF}_i(F_s^i, R^{i+1})

    The ABFs (``mid_channels`` wide, sized from one example batch) are trained with the student.
    Works on 1-D ``(B, C, L)`` and 2-D ``(B, C, H, W)`` maps (all of one rank); channels and spatial
    sizes may differ between student and teacher (the fused map is resized to the teacher's).
    Published (CIFAR-100): ``beta = 1`` beside CE weight 1 (``alpha = 0.5`` keeps that ratio), HCL
    levels 4, 2, 1, ``mid_channels`` 64 to 256 depending on the network (default 64), and the review
    loss weight warmed up linearly over the first 20 epochs (here: ``callbacks=alpha_warmup
    callbacks.alpha_warmup.epochs=20``, which also ramps ``alpha``'s share of CE).
    """

    has_adapters = True

    def __init__(
        self,
        student_layers: list[str],
        teacher_layers: list[str],
        beta: float = 1.0,
        mid_channels: int = 64,
        levels: tuple[int, ...] = (4, 2, 1),
        student: ReadSpec = None,
        teacher: ReadSpec = None,
    ) -> None:
        super().__init__(student_layers, teacher_layers, beta, student, teacher)
        if mid_channels < 1:
            raise ConfigError(f"loss.terms.reviewkd.mid_channels={mid_channels} must be >= 1")
        self.mid_channels = int(mid_channels)
        self.levels = tuple(int(level) for level in levels)
        self.abfs: nn.ModuleList | None = None

    def setup_shapes(self, student: list[Tensor], teacher: list[Tensor], key: str) -> None:
        ranks = {f.dim() for f in [*student, *teacher]}
        if len(ranks) != 1 or ranks.pop() - 2 not in _MAPS:
            raise ConfigError(
                f"{key}: ReviewKD needs conv maps of one rank, all (B, C, L) or all (B, C, H, W), got student "
                f"{[list(f.shape) for f in student]} and teacher {[list(f.shape) for f in teacher]}; "
                "pick conv stages for student_layers/teacher_layers"
            )
        rank, last = student[0].dim() - 2, len(student) - 1
        self.abfs = nn.ModuleList(
            ABF(rank, s.shape[1], self.mid_channels, t.shape[1], fuse=i < last)
            for i, (s, t) in enumerate(zip(student, teacher, strict=True))
        ).to(student[0].device)

    def fused(self, student: list[Tensor], teacher: list[Tensor]) -> list[Tensor]:
        """The ABF outputs per stage, shallow to deep (computed deep to shallow)."""
        if self.abfs is None:
            raise unsized(self, student[0], teacher[0])
        outputs: list[Tensor] = []
        residual = None
        for i in reversed(range(len(student))):
            out, residual = self.abfs[i](student[i], residual, tuple(teacher[i].shape[2:]))
            outputs.insert(0, out)
        return outputs

    def forward(self, student: list[Tensor], teacher: list[Tensor], targets: Tensor | None = None) -> Tensor:
        fused = self.fused(student, teacher)
        return self.beta * sum(hcl(s, t, self.levels) for s, t in zip(fused, teacher, strict=True))
