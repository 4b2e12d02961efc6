"""Logit-based distillation terms: KD, DKD, DIST and the logit standardization option (NKD, WTTM and CTKD:
:mod:`kd_lightning.losses.logit_variants`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.engine.errors import ConfigError, check_positive, check_type
from kd_lightning.losses.base import UNLABELLED
from kd_lightning.losses.precision import at_least_fp32
from kd_lightning.losses.reads import ReadSpec
from kd_lightning.losses.terms import DistillationTerm


def soft_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``KL(softmax(teacher/T) || softmax(student/T))``, averaged over samples, computed in >= fp32."""
    log_p_student = F.log_softmax(at_least_fp32(student_logits) / temperature, dim=-1)
    log_p_teacher = F.log_softmax(at_least_fp32(teacher_logits) / temperature, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


def standardize(logits: Tensor, eps: float = 1e-7) -> Tensor:
    r"""Per-sample z-score of logits, :math:`(z - \mathrm{mean}(z)) / (\mathrm{std}(z) + \epsilon)`
    (unbiased std, as in Sun et al.'s code), in >= fp32."""
    logits = at_least_fp32(logits)
    return (logits - logits.mean(dim=-1, keepdim=True)) / (logits.std(dim=-1, keepdim=True) + eps)


class LogitTerm(DistillationTerm):
    """A term on temperature-softened logits, with Sun et al.'s optional standardization.

    ``temperature``: the term's own T; ``None`` (the default) follows ``loss.temperature``, the one
    value that temperature schedules and sweeps set. A term with its own T keeps it (e.g. KD at 4
    beside DKD at 2).

    ``standardize=True`` applies "Logit Standardization in Knowledge Distillation" (Sun et al.,
    CVPR 2024): student and teacher logits are z-scored per sample before the temperature, so the
    student matches the teacher's logit *relations* rather than their scale. The paper's CIFAR-100
    setting is a base temperature of 2 with the KD weight 9 and CE weight 0.1 (``loss.alpha`` =
    9 / 9.1 ~ 0.989 up to an overall factor of 9.1 absorbed by the learning rate).
    """

    def __init__(
        self, temperature: float | None, standardize: bool, student: ReadSpec = None, teacher: ReadSpec = None
    ) -> None:
        super().__init__(student, teacher)
        check_type(standardize, bool, f"{type(self).__name__} standardize")
        check_positive(temperature, f"{type(self).__name__} temperature", " (or null: loss.temperature)", True)
        #: Without a temperature of its own the term follows ``loss.temperature`` (and its schedules).
        self.follows_loss_temperature = temperature is None
        self.temperature = 4.0 if temperature is None else float(temperature)
        self.standardize = bool(standardize)

    def prepare(self, logits: Tensor) -> Tensor:
        """Logits in >= fp32, z-scored when ``standardize`` is on."""
        return standardize(logits) if self.standardize else at_least_fp32(logits)


class KLDivergence(LogitTerm):
    r"""Soft-target distillation of Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
    Network" (NeurIPS workshop 2015).

    .. math::
        L_{kd} = T^2 \cdot \frac{1}{B}\sum_b \mathrm{KL}\big(\sigma(z_t^b / T)\,\|\,\sigma(z_s^b / T)\big)

    The :math:`T^2` factor keeps gradient magnitudes comparable across temperatures. The paper's
    usual setting is T = 4 with a 0.9 / 0.1 distillation / cross-entropy split (``alpha = 0.9``).
    Softmaxes are computed in float32 so the term stays finite under mixed precision.
    ``standardize=True``: see :class:`LogitTerm` (``loss.terms.kd.standardize=true``).
    """

    def __init__(
        self,
        temperature: float | None = None,
        standardize: bool = False,
        student: ReadSpec = None,
        teacher: ReadSpec = None,
    ) -> None:
        super().__init__(temperature, standardize, student, teacher)

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> Tensor:
        return soft_kl(self.prepare(student), self.prepare(teacher), self.temperature) * self.temperature**2


class DKD(LogitTerm):
    r"""Decoupled Knowledge Distillation (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022).

    With :math:`p = \sigma(z/T)`, the binary split :math:`b = [p_y, 1 - p_y]` on the target class
    :math:`y` and :math:`\hat p = \sigma(z_{\setminus y}/T)` the softmax over the non-target classes:

    .. math::
        L_{dkd} = w_{tc}\, T^2\, \mathrm{KL}(b_t \,\|\, b_s) + w_{nc}\, T^2\, \mathrm{KL}(\hat p_t \,\|\, \hat p_s)

    (TCKD + NCKD, averaged over samples). The paper's :math:`\alpha` and :math:`\beta` are
    ``tckd_weight`` and ``nckd_weight`` here (``loss.alpha`` is the distillation weight). Published
    CIFAR-100 setting: ``tckd_weight = 1``, ``nckd_weight = 8``
    (6 for WRN teachers), T = 4, CE weight 1 and a linear warm-up of the DKD weight over 20 epochs.
    Here ``loss.alpha = 0.5`` gives the paper's equal CE / DKD weights (times 0.5), and
    ``callbacks=alpha_warmup callbacks.alpha_warmup.epochs=20`` ramps ``loss.alpha`` linearly like the
    paper ramps the DKD weight; unlike the paper, the CE weight ``1 - alpha_e`` moves with it (from
    ``1 - alpha/20`` down to ``1 - alpha``).

    Unlabelled rows (target ``-1``) use the teacher's top-1 class as their target, i.e. the class the
    transfer set is labelled with; without ``targets`` every row does.
    """

    reads_labels = True  # splits on the target class (the teacher's top-1 where unlabelled)

    def __init__(
        self,
        tckd_weight: float = 1.0,
        nckd_weight: float = 8.0,
        temperature: float | None = None,
        standardize: bool = False,
        student: ReadSpec = None,
        teacher: ReadSpec = None,
    ) -> None:
        super().__init__(temperature, standardize, student, teacher)
        if tckd_weight < 0 or nckd_weight < 0:
            raise ConfigError(
                f"loss.terms.dkd.tckd_weight={tckd_weight} / loss.terms.dkd.nckd_weight={nckd_weight} must be "
                ">= 0 (published: 1 and 8)"
            )
        self.tckd_weight = float(tckd_weight)
        self.nckd_weight = float(nckd_weight)

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> Tensor:
        zs, zt = self.prepare(student) / self.temperature, self.prepare(teacher) / self.temperature
        target = resolve_targets(zt, targets)
        is_target = F.one_hot(target, zs.shape[-1]).bool()
        tckd = binary_kl(zs, zt, is_target)
        nckd = soft_kl(non_target(zs, is_target), non_target(zt, is_target), 1.0)
        return (self.tckd_weight * tckd + self.nckd_weight * nckd) * self.temperature**2


def binary_kl(student: Tensor, teacher: Tensor, is_target: Tensor) -> Tensor:
    """``KL([p_t, 1 - p_t] || [p_s, 1 - p_s])`` of the target-class probabilities, averaged over samples."""
    log_b_s = torch.stack([masked_logsumexp(student, is_target), masked_logsumexp(student, ~is_target)], dim=-1)
    log_b_t = torch.stack([masked_logsumexp(teacher, is_target), masked_logsumexp(teacher, ~is_target)], dim=-1)
    log_z_s, log_z_t = student.logsumexp(-1, keepdim=True), teacher.logsumexp(-1, keepdim=True)
    return F.kl_div(log_b_s - log_z_s, log_b_t - log_z_t, reduction="batchmean", log_target=True)


def non_target(logits: Tensor, is_target: Tensor) -> Tensor:
    """The ``(B, C - 1)`` logits of every class but the target (``is_target``: one True per row), in class
    order (exactly removed; the paper's code subtracts 1000 from the target logit instead). Gathered at
    computed indices rather than by a boolean mask, whose variable size would make the host wait for the
    device."""
    target = is_target.float().argmax(dim=-1, keepdim=True)
    others = torch.arange(logits.shape[-1] - 1, device=logits.device).expand(logits.shape[0], -1)
    return logits.gather(-1, others + (others >= target).long())


def masked_logsumexp(logits: Tensor, keep: Tensor) -> Tensor:
    """``log sum_{keep} exp(logits)`` per row."""
    return logits.masked_fill(~keep, -torch.inf).logsumexp(dim=-1)


def pearson_distance(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """``1 - mean_rows pearson(a_row, b_row)``."""
    a = a - a.mean(dim=-1, keepdim=True)
    b = b - b.mean(dim=-1, keepdim=True)
    return 1.0 - F.cosine_similarity(a, b, dim=-1, eps=eps).mean()


class DIST(LogitTerm):
    r"""DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022).

    With :math:`Y = \sigma(Z/\tau)` (rows: samples, columns: classes) and
    :math:`d_p(u, v) = 1 - \rho_{\mathrm{pearson}}(u, v)`:

    .. math::
        L_{dist} = w_{inter}\, \tau^2\, \frac{1}{B}\sum_i d_p(Y_{s,i:}, Y_{t,i:})
                 + w_{intra}\, \tau^2\, \frac{1}{C}\sum_j d_p(Y_{s,:j}, Y_{t,:j})

    (inter-class relation per sample + intra-class relation per class across the batch). The paper's
    :math:`\beta` and :math:`\gamma` are ``inter_weight`` and ``intra_weight``. Published: both 1;
    tau = 4 on CIFAR-100 (1 on ImageNet) with CE weight 1 and DIST weight 2.
    """

    def __init__(
        self,
        inter_weight: float = 1.0,
        intra_weight: float = 1.0,
        temperature: float | None = None,
        standardize: bool = False,
        student: ReadSpec = None,
        teacher: ReadSpec = None,
    ) -> None:
        super().__init__(temperature, standardize, student, teacher)
        self.inter_weight = float(inter_weight)
        self.intra_weight = float(intra_weight)

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> Tensor:
        ys = F.softmax(self.prepare(student) / self.temperature, dim=-1)
        yt = F.softmax(self.prepare(teacher) / self.temperature, dim=-1)
        inter = pearson_distance(ys, yt)
        intra = pearson_distance(ys.transpose(0, 1), yt.transpose(0, 1))
        return (self.inter_weight * inter + self.intra_weight * intra) * self.temperature**2


def resolve_targets(teacher: Tensor, targets: Tensor | None) -> Tensor:
    """The class each row is scored against: its label, or the teacher's top-1 class for unlabelled rows
    (target ``-1``) and when no ``targets`` are given (a teacher-labelled transfer set)."""
    top1 = teacher.argmax(dim=-1)
    return top1 if targets is None else torch.where(targets == UNLABELLED, top1, targets)
