"""OFD: the overhaul of feature distillation (pre-ReLU features, a margin from the teacher's BatchNorm, partial L2)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from kd_lightning.engine.adapters import pointwise
from kd_lightning.engine.errors import ConfigError
from kd_lightning.engine.taps import find_module
from kd_lightning.losses.features import unsized
from kd_lightning.losses.precision import at_least_fp32
from kd_lightning.losses.reads import ReadSpec
from kd_lightning.losses.terms import MultiLayerTerm

_NORMS: dict[int, type[nn.Module]] = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d}


def margin_from_batchnorm(weight: Tensor, bias: Tensor, tail: float = 1e-3) -> Tensor:
    r"""Per channel, :math:`E[x \mid x < 0]` for :math:`x \sim \mathcal N(m, s^2)` with :math:`s = |\gamma|`,
    :math:`m = \beta` the BatchNorm's affine parameters (the pre-ReLU response's assumed distribution):

    .. math::
        \mathrm{margin} = m - s\,\frac{\varphi(m / s)}{\Phi(-m / s)}\quad\text{if } \Phi(-m / s) > 10^{-3},
        \text{ else } -3 s

    computed in float64 (Heo et al.'s ``get_margin_from_BN``)."""
    s = weight.detach().double().abs().clamp_min(1e-12)
    m = bias.detach().double()
    below = torch.special.ndtr(-m / s)
    expected = -s * torch.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / below.clamp_min(tail) + m
    return torch.where(below > tail, expected, -3 * s)


def partial_l2(student: Tensor, teacher: Tensor, margin: Tensor) -> Tensor:
    """Heo et al.'s partial L2, summed: the teacher clipped below at the margin, and no loss where both the
    student and the (clipped) teacher are non-positive and the student is below it: ``(s - t')^2 * [s > t' or t' > 0]``
    with ``t' = max(t, margin)``."""
    target = torch.maximum(teacher, margin)
    keep = (student > target) | (target > 0)
    return ((student - target).pow(2) * keep).sum()


class OFD(MultiLayerTerm):
    r"""A comprehensive overhaul of feature distillation (Heo et al., ICCV 2019; code: clovaai/overhaul-distillation,
    ``CIFAR-100/distiller.py``).

    Pre-ReLU features :math:`F_t^i` of the teacher (``teacher_layers``: the BatchNorms before its ReLUs, or
    any pre-ReLU tensor with ``teacher_bns`` naming the BatchNorm that sets its statistics) and
    :math:`F_s^i` of the student (``student_layers``, pre-ReLU too), paired shallow to deep, :math:`n` pairs:

    .. math::
        L_{ofd} = \frac{\beta}{B} \sum_{i=1}^{n} 2^{-(n - i)} \sum
                  \big(c_i(F_s^i) - t'\big)^2\,\big[c_i(F_s^i) > t' \lor t' > 0\big],\qquad
        t' = \max(F_t^i, m_i)

    with :math:`c_i` a 1x1 conv + BN connector (trained with the student, in its checkpoint) and :math:`m_i` the
    per-channel margin :func:`margin_from_batchnorm` of teacher BatchNorm :math:`i` (its affine weight and bias,
    read before training; method=kd binds the teacher's modules). Deviation, for teachers without a BatchNorm
    there: when ``teacher_bns[i]`` is not an affine BatchNorm, the margin uses the per-channel mean and
    (population) standard deviation of that layer's output over the example batch instead, which for a
    BatchNorm output are its bias and, up to its epsilon, its weight's magnitude. Published (CIFAR-100):
    ``beta = 1e-3`` beside CE weight 1 (``alpha = 0.5``); ImageNet ``1e-4``. Not 0 at equality (the
    connector), and a student below a non-positive teacher target is free. In-place ReLUs after a tapped layer
    would overwrite the pre-ReLU tensor: tap models whose ReLUs are not in-place.
    """

    has_adapters = True

    def __init__(
        self,
        student_layers: Sequence[str],
        teacher_layers: Sequence[str],
        teacher_bns: Sequence[str] | None = None,
        beta: float = 1e-3,
        student: ReadSpec = None,
        teacher: ReadSpec = None,
    ) -> None:
        super().__init__(student_layers, teacher_layers, beta, student, teacher)
        self.teacher_bns = list(teacher_bns) if teacher_bns is not None else list(teacher_layers)
        if len(self.teacher_bns) != len(self.teacher_read):
            raise ConfigError(
                f"loss.terms.ofd.teacher_bns has {len(self.teacher_bns)} entries for {len(self.teacher_read)} "
                "teacher_layers; name one BatchNorm per teacher layer (or leave it out: the layers are the BatchNorms)"
            )
        self.connectors: nn.ModuleList | None = None
        #: Per teacher layer, its BatchNorm (the teacher's module, not this term's) or None: batch statistics.
        self._bns: list[nn.Module | None] | None = None

    def bind_models(self, models: Mapping[str, nn.Module], key: str) -> None:
        model = self.teacher_read[0].model  # type: ignore[index]
        self._bns = []
        for i, path in enumerate(self.teacher_bns):
            module = find_module(models[model], path, f"{key}.teacher_bns[{i}]")
            affine = isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine
            self._bns.append(module if affine else None)

    def setup_shapes(self, student: list[Tensor], teacher: list[Tensor], key: str) -> None:
        bns = self._bns or [None] * len(teacher)
        connectors = []
        for i, (s, t, bn) in enumerate(zip(student, teacher, bns, strict=True)):
            shaped = s.dim() == t.dim() and s.dim() in _NORMS and s.shape[2:] == t.shape[2:]
            if not shaped or (bn is not None and bn.num_features != t.shape[1]):
                raise ConfigError(
                    f"{key}: pair {i} maps student {list(s.shape)} onto teacher {list(t.shape)}"
                    + (f" (BatchNorm of {bn.num_features} channels)" if bn is not None else "")
                    + "; pick pre-ReLU conv maps of one rank and spatial size per pair"
                )
            conv = pointwise(s.dim(), s.shape[1], t.shape[1], bias=False)
            nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (t.shape[1] * math.prod(conv.weight.shape[2:]))))
            connectors.append(nn.Sequential(conv, _NORMS[s.dim()](t.shape[1])))
            if bn is not None:
                margin = margin_from_batchnorm(bn.weight, bn.bias)
            else:
                per_channel = t.detach().transpose(0, 1).flatten(1).double()
                margin = margin_from_batchnorm(per_channel.std(1, correction=0), per_channel.mean(1))
            margin = margin.to(t.device, torch.float32)
            self.register_buffer(f"margin{i}", margin.view(1, -1, *[1] * (t.dim() - 2)), persistent=False)
        self.connectors = nn.ModuleList(connectors).to(student[0].device)

    def forward(self, student: list[Tensor], teacher: list[Tensor], targets: Tensor | None = None) -> Tensor:
        if self.connectors is None:
            raise unsized(self, student[0], teacher[0])
        count = len(student)
        total = student[0].new_zeros((), dtype=torch.float32)
        for i, (s, t, connector) in enumerate(zip(student, teacher, self.connectors, strict=True)):
            t = at_least_fp32(t)
            margin = getattr(self, f"margin{i}").to(t.dtype)
            total = total + partial_l2(at_least_fp32(connector(s)), t, margin) / 2 ** (count - i - 1)
        return self.beta * total / student[0].shape[0]
