"""Relation distillation terms: RKD, SP, PKT, CC — they compare (B x B) relations between the samples
of a batch, so student and teacher features may have any, different, widths (no adapter needed)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.losses.precision import at_least_fp32, autocast_off
from kd_lightning.losses.reads import ReadSpec
from kd_lightning.losses.terms import LayerTerm


def embed(features: Tensor) -> Tensor:
    """Features flattened per sample to ``(B, D)``, in >= fp32."""
    return at_least_fp32(features).flatten(1)


def span_coordinates(e: Tensor) -> Tensor:
    """Rows of ``e`` ``(B, D)`` with ``D > B`` and no gradient as ``(B, B)`` float64 coordinates in an orthonormal
    basis of their span (``e^T = Q R``, rows of ``R^T``): every distance and inner product between rows is kept
    (Householder QR is backward stable: errors ~1e-16 of the rows' norm), and the ``(B, B, D)`` difference tensors
    of :func:`pairwise_distances` and :func:`angle_cosines` shrink to ``(B, B, B)`` (a teacher's unpooled feature
    map: D = 2,560 at B = 128 cost 1.2 s a step). Rows needing a gradient, or D <= B, are returned as they are."""
    if e.requires_grad or e.shape[1] <= e.shape[0]:
        return e
    return torch.linalg.qr(e.T.double()).R.T


def differences(e: Tensor) -> Tensor:
    """``(B, B, D)`` difference vectors ``e_j - e_i`` at ``[i, j]``, computed directly: expanding the Gram
    matrix (``|a|^2 + |b|^2 - 2 a.b``) cancels catastrophically in float32 for close samples."""
    return e[None, :, :] - e[:, None, :]


def pairwise_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distances between rows, exactly 0 on the diagonal (differentiable everywhere)."""
    d2 = differences(e).pow(2).sum(dim=-1)
    off_diagonal = ~torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return torch.where(off_diagonal, d2.clamp_min(eps).sqrt(), torch.zeros_like(d2))


def angle_cosines(e: Tensor, eps: float = 1e-12, dtype: torch.dtype | None = None) -> Tensor:
    """``cos`` of the angle at ``e_i`` between ``e_j`` and ``e_k``, as a ``(B, B, B)`` tensor ``[i, j, k]``
    (0 where ``j == i`` or ``k == i``): unit difference vectors, batched dot products (as in Park et al.'s
    code); ``dtype``: the unit vectors' for the dot products (default ``e``'s; the differences stay in ``e``'s)."""
    diff = differences(e)
    norms = diff.pow(2).sum(dim=-1, keepdim=True).clamp_min(eps).sqrt()
    unit = torch.where(norms > eps**0.5, diff / norms, torch.zeros_like(diff)).to(dtype or e.dtype)
    return torch.bmm(unit, unit.transpose(1, 2))


class RelationTerm(LayerTerm):
    """``beta * compare(relation(student), relation(teacher))`` on per-sample flattened features."""

    def relation(self, e: Tensor) -> Tensor:
        raise NotImplementedError

    def compare(self, student: Tensor, teacher: Tensor) -> Tensor:
        """Mean squared difference of the relation matrices (``||.||_F^2 / B^2``)."""
        return (student - teacher).pow(2).mean()

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> Tensor:
        with autocast_off(student):
            return self.beta * self.compare(self.relation(embed(student)), self.relation(embed(teacher)))


class RKD(LayerTerm):
    r"""Relational Knowledge Distillation (Park et al., CVPR 2019), distance + angle.

    .. math::
        L_{rkd} = w_d \sum_{i,j} \ell_\delta\Big(\frac{\|s_i - s_j\|}{\mu_s}, \frac{\|t_i - t_j\|}{\mu_t}\Big)
                + w_a \sum_{i,j,k} \ell_\delta\big(\cos\angle s_i s_j s_k,\ \cos\angle t_i t_j t_k\big)

    averaged over the :math:`B^2` pairs and :math:`B^3` triplets, with :math:`\mu` the mean off-diagonal
    distance and :math:`\ell_\delta` the Huber loss (smooth L1, delta 1). Published: ``w_d = 25``,
    ``w_a = 50``; ``beta`` scales both.
    """

    def __init__(
        self,
        student_layer: str = "logits",
        teacher_layer: str = "logits",
        beta: float = 1.0,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
        student: ReadSpec = None,
        teacher: ReadSpec = None,
    ) -> None:
        super().__init__(student_layer, teacher_layer, beta, student, teacher)
        self.distance_weight = float(distance_weight)
        self.angle_weight = float(angle_weight)

    @staticmethod
    def normalised_distances(e: Tensor) -> Tensor:
        d = pairwise_distances(e)
        off_diagonal = ~torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
        return d / d[off_diagonal].mean()

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> Tensor:
        s, t = embed(student), span_coordinates(embed(teacher))
        with autocast_off(student):
            distance = F.smooth_l1_loss(self.normalised_distances(s), self.normalised_distances(t).to(s.dtype))
            angle = F.smooth_l1_loss(angle_cosines(s), angle_cosines(t, dtype=s.dtype))
        return self.beta * (self.distance_weight * distance + self.angle_weight * angle)


class SP(RelationTerm):
    r"""Similarity-Preserving KD (Tung & Mori, ICCV 2019).

    .. math::
        G = \mathrm{rownorm}(F F^\top),\qquad L_{sp} = \frac{\beta}{B^2}\,\|G_t - G_s\|_F^2

    with :math:`F` the ``(B, D)`` flattened features and each row of :math:`G` L2-normalised.
    Published: ``beta = 3000``.
    """

    def __init__(
        self,
        student_layer: str = "logits",
        teacher_layer: str = "logits",
        beta: float = 3000.0,
        student: ReadSpec = None,
        teacher: ReadSpec = None,
    ) -> None:
        super().__init__(student_layer, teacher_layer, beta, student, teacher)

    def relation(self, e: Tensor) -> Tensor:
        return F.normalize(e @ e.T, dim=1)


class PKT(RelationTerm):
    r"""Probabilistic Knowledge Transfer (Passalis & Tefas, ECCV 2018), cosine kernel.

    .. math::
        p_{ij} = \frac{K(f_i, f_j)}{\sum_k K(f_i, f_k)},\quad K(a, b) = \tfrac12\big(1 + \cos(a, b)\big),\quad
        L_{pkt} = \frac{\beta}{B^2}\sum_{i,j} p^t_{ij} \log\frac{p^t_{ij} + \epsilon}{p^s_{ij} + \epsilon}

    with :math:`\epsilon = 10^{-7}` as in the authors' code. ``beta = 30000`` as in CRD's benchmark.
    """

    def __init__(
        self,
        student_layer: str = "logits",
        teacher_layer: str = "logits",
        beta: float = 30000.0,
        eps: float = 1e-7,
        student: ReadSpec = None,
        teacher: ReadSpec = None,
    ) -> None:
        super().__init__(student_layer, teacher_layer, beta, student, teacher)
        self.eps = float(eps)

    def relation(self, e: Tensor) -> Tensor:
        e = F.normalize(e, dim=1)
        kernel = (e @ e.T + 1.0) / 2.0
        return kernel / kernel.sum(dim=1, keepdim=True)

    def compare(self, student: Tensor, teacher: Tensor) -> Tensor:
        return (teacher * torch.log((teacher + self.eps) / (student + self.eps))).mean()


class CC(RelationTerm):
    r"""Correlation Congruence (Peng et al., ICCV 2019), Gaussian RBF kernel by its Taylor series.

    On L2-normalised features :math:`\|f_i - f_j\|^2 = 2 - 2 f_i^\top f_j`, so

    .. math::
        k(f_i, f_j) = e^{-\gamma \|f_i - f_j\|^2}
                    \approx e^{-2\gamma} \sum_{p=0}^{P} \frac{(2\gamma)^p}{p!}\,(f_i^\top f_j)^p,\qquad
        L_{cc} = \frac{\beta}{B^2}\,\|C_t - C_s\|_F^2

    Published: ``gamma = 0.4``, ``P = 2``. (CRD's benchmark instead uses a bilinear surrogate with
    weight 0.02 on adapter-matched embeddings; this is the paper's kernel form, ``beta = 1``.)
    """

    def __init__(
        self,
        student_layer: str = "logits",
        teacher_layer: str = "logits",
        beta: float = 1.0,
        gamma: float = 0.4,
        order: int = 2,
        student: ReadSpec = None,
        teacher: ReadSpec = None,
    ) -> None:
        super().__init__(student_layer, teacher_layer, beta, student, teacher)
        self.gamma = float(gamma)
        self.order = int(order)

    def relation(self, e: Tensor) -> Tensor:
        cosine = F.normalize(e, dim=1) @ F.normalize(e, dim=1).T
        series = sum((2 * self.gamma) ** p / math.factorial(p) * cosine**p for p in range(self.order + 1))
        return math.exp(-2 * self.gamma) * series
