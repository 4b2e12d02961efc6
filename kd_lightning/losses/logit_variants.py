"""Logit-matching variants published 2023-24, each checked against its authors' code: NKD (normalized
non-target distillation), WTTM (transformed teacher matching with sample-adaptive weights) and CTKD (a learned
temperature trained adversarially through gradient reversal, with its curriculum)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.engine.errors import ConfigError, check_type
from kd_lightning.losses.logits import LogitTerm, non_target, resolve_targets, soft_kl
from kd_lightning.losses.precision import at_least_fp32
from kd_lightning.losses.reads import ReadSpec
from kd_lightning.losses.terms import DistillationTerm


class NKD(LogitTerm):
    r"""Normalized KD (Yang et al., "From Knowledge Distillation to Self-Knowledge Distillation: A Unified
    Approach with Normalized Loss and Customized Soft Labels", ICCV 2023).

    With :math:`y` the target class, :math:`p = \sigma(z)` (temperature 1) and :math:`\hat p = \sigma(z_{\setminus
    y} / T)` the softmax over the non-target classes only (the normalized non-target distribution):

    .. math::
        L_{nkd} = \frac{1}{B}\sum_b \Big[-\,p_{t,y}\,\log p_{s,y}
                 \;-\; \gamma\, T^2 \sum_{i \ne y} \hat p_{t,i} \log \hat p_{s,i}\Big]

    The target term is at temperature 1 whatever :math:`T`; only the non-target term is softened. The target
    term is the label's cross-entropy weighted by the teacher's confidence (it pushes :math:`p_{s,y}` towards 1);
    the non-target term is a cross-entropy, i.e. the KL plus the teacher's (constant) entropy. So
    :math:`L_{nkd} \ge 0` but it is not 0, nor minimal, when the student equals the teacher. The teacher's
    target probability is treated as a constant (detached), as in the authors' code.

    Published: the authors' CIFAR-100 config (ResNet-34 -> ResNet-18) uses ``temp=3, gamma=3.5``; their
    ImageNet configs ``temp=1, gamma=1.5``; the loss is added with weight 1 to the cross-entropy (weight 1),
    i.e. ``loss.alpha = 0.5`` here (times 0.5). Unlabelled rows (target ``-1``) and calls without ``targets``
    use the teacher's top-1 class, as :class:`DKD` does.

    Checked against the authors' ``NKDLoss`` in github.com/yzd-v/cls_KD, ``mmcls/models/dis_losses/nkd.py``
    at commit 1e5d48f36957ee460d39d7ebc592c6cc7f8f3d66 (after 9466b3f, which fixed the non-target mask:
    before it, ``scatter_(1, label, 1)`` kept the target class in the "non-target" softmax);
    ``tests/test_nkd_wttm.py`` compares values and gradients with a transcription of that code.
    """

    reads_labels = True  # splits on the target class (the teacher's top-1 where unlabelled)

    def __init__(
        self,
        gamma: float = 1.5,
        temperature: float | None = None,
        standardize: bool = False,
        student: ReadSpec = None,
        teacher: ReadSpec = None,
    ) -> None:
        super().__init__(temperature, standardize, student, teacher)
        check_type(gamma, (int, float), "loss.terms.nkd.gamma")
        if gamma < 0:
            raise ConfigError(
                f"loss.terms.nkd.gamma={gamma} must be >= 0 (published: 3.5 on CIFAR-100, 1.5 on ImageNet)"
            )
        self.gamma = float(gamma)

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> Tensor:
        zs, zt = self.prepare(student), self.prepare(teacher)
        target = resolve_targets(zt, targets)
        index = target.unsqueeze(-1)
        log_ps_target = F.log_softmax(zs, dim=-1).gather(-1, index).squeeze(-1)
        pt_target = F.softmax(zt, dim=-1).gather(-1, index).squeeze(-1).detach()
        target_term = -(pt_target * log_ps_target).mean()
        is_target = F.one_hot(target, zs.shape[-1]).bool()
        log_qs = F.log_softmax(non_target(zs, is_target) / self.temperature, dim=-1)
        qt = F.softmax(non_target(zt, is_target) / self.temperature, dim=-1)
        non_target_term = -(qt * log_qs).sum(dim=-1).mean()
        return target_term + self.gamma * self.temperature**2 * non_target_term


class WTTM(LogitTerm):
    r"""Weighted transformed teacher matching (Zheng & Yang, "Knowledge Distillation Based on Transformed
    Teacher Matching", ICLR 2024).

    The teacher's probabilities :math:`p_t = \sigma(z_t)` are power-transformed with
    :math:`\gamma = 1/T` and renormalized, :math:`\tilde p_t = p_t^{\gamma} / U_\gamma(p_t)` with
    :math:`U_\gamma(p_t) = \sum_i p_{t,i}^{\gamma}` (which equals :math:`\sigma(z_t / T)`); the student is **not**
    tempered, and each sample is weighted by :math:`U_\gamma(p_t)` (larger for a less confident teacher):

    .. math::
        L_{wttm} = \frac{1}{B}\sum_b U_\gamma(p_t^b)\;\mathrm{KL}\big(\sigma(z_t^b / T)\,\|\,\sigma(z_s^b)\big)

    Unlike :class:`KLDivergence` there is no :math:`T^2` factor (the student's softmax is not divided by
    :math:`T`, so its gradients do not shrink with :math:`T`); this is the authors' loss as written. It is
    :math:`\ge 0` and is 0 at student == teacher only for :math:`T = 1`. ``temperature`` is :math:`1/\gamma`
    (the authors' ``--ttm_l``); ``null`` follows ``loss.temperature``.

    Published: the authors' README runs WTTM with ``--ttm_l 0.2`` (T = 5) and weight 4 beside a
    cross-entropy of weight 1 (there, with CRD); the per-pair gamma / beta of the paper's appendix A.4 were not
    transcribed here. Checked against the authors' ``WTTM`` in github.com/zkxufo/TTM,
    ``distiller_zoo/wttm.py`` (unchanged since commit 2de9060d32b85221c00d864d47b8f68016491d86; HEAD
    fe457b33a71ba27536ec04fe3d32c5b04963522f); ``tests/test_nkd_wttm.py`` compares values and gradients with a
    transcription of that code.
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
        zs, zt = self.prepare(student), self.prepare(teacher)
        gamma = 1.0 / self.temperature
        log_ps = F.log_softmax(zs, dim=-1)
        log_pt_transformed = F.log_softmax(zt * gamma, dim=-1)
        # U = sum_i p_i^gamma = exp(logsumexp(gamma * log p)), stable for peaked teachers and large gamma.
        weight = (F.log_softmax(zt, dim=-1) * gamma).logsumexp(dim=-1).exp()
        kl = (log_pt_transformed.exp() * (log_pt_transformed - log_ps)).sum(dim=-1)
        return (weight * kl).mean()


class _ScaleGradient(torch.autograd.Function):
    """The identity forward; backward multiplies the gradient by ``scale`` (a gradient reversal layer for
    ``scale < 0``, Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def cosine_curriculum(epoch: int, epochs: int, start: float, end: float) -> float:
    """``start + (end - start) * (1 - cos(pi * min(epoch, epochs) / epochs)) / 2``: ``start`` at epoch 0,
    ``end`` from ``epochs`` on."""
    progress = min(max(epoch, 0), epochs) / epochs
    return start + (end - start) * (1.0 - math.cos(math.pi * progress)) / 2.0


class CTKD(DistillationTerm):
    r"""Curriculum Temperature KD, global temperature (Li et al., "Curriculum Temperature for Knowledge
    Distillation", AAAI 2023).

    KD at a learnable temperature :math:`\tau = \tau_{start} + \tau_{range}\,\mathrm{sigmoid}(\theta)`
    (one parameter :math:`\theta`, initialised to ``init``, trained with the student and saved in its
    checkpoint):

    .. math::
        L_{ctkd} = \tau^2 \cdot \frac{1}{B}\sum_b \mathrm{KL}\big(\sigma(z_t^b / \tau)\,\|\,\sigma(z_s^b / \tau)\big)

    The student minimises it; :math:`\theta` receives the gradient through a gradient reversal layer scaled
    by :math:`-\lambda`, so it ascends the distillation loss (makes the task harder). The curriculum raises
    :math:`\lambda` over the first ``curriculum_epochs`` epochs, cosine-shaped, from ``lambda_start`` to
    ``lambda_end``: :math:`\lambda_e = \lambda_{start} + (\lambda_{end} - \lambda_{start})
    (1 - \cos(\pi \min(e, E) / E)) / 2` with :math:`e` the 1-based epoch, as in the authors' loop (epoch 1
    already has :math:`\lambda_1 > 0`). The methods call :meth:`start_epoch`; :attr:`reversal` is
    :math:`\lambda` now and :meth:`current_temperature` the temperature.

    Published (the authors' CIFAR-100 script): ``t_start=1, t_end=20`` (the authors' names: :math:`\tau` in
    (1, 21)), :math:`\theta` initialised to 1 (:math:`\tau_0 \approx 15.6`), :math:`\lambda` from 0 to 1 over
    10 epochs, CE weight 0.1 and KD weight 0.9 (``loss.alpha=0.9``); :math:`\theta` is in the student's SGD
    optimizer (with its learning rate and weight decay), as here. Only the global temperature is
    implemented, not the instance-wise variant. ``loss.temperature`` does not apply to this term.

    Checked against github.com/zhengli97/CTKD at commit 7d5252241259ae70d38a832371fed9697d15fc14:
    ``models/temp_global.py`` (``Global_T``, ``GradientReversalFunction``), ``distiller_zoo/KD.py``
    (``DistillKL``), ``helper/loops.py`` (``temp = t_start + t_end * sigmoid(mlp_net(...))``) and
    ``helper/util.py`` (``CosineDecay(max_value=0, min_value=-1, num_loops=10)``, whose value is our
    :math:`-\lambda`); ``tests/test_ctkd.py`` compares values and gradients (student and :math:`\theta`) with a
    transcription of that code.
    """

    def __init__(
        self,
        t_start: float = 1.0,
        t_end: float = 20.0,
        init: float = 1.0,
        lambda_start: float = 0.0,
        lambda_end: float = 1.0,
        curriculum_epochs: int = 10,
        student: ReadSpec = None,
        teacher: ReadSpec = None,
    ) -> None:
        super().__init__(student, teacher)
        for key, value in (("t_start", t_start), ("t_end", t_end), ("init", init)):
            check_type(value, (int, float), f"loss.terms.ctkd.{key}")
        check_type(curriculum_epochs, int, "loss.terms.ctkd.curriculum_epochs")
        if not (t_start > 0 and t_end >= 0):
            raise ConfigError(
                f"loss.terms.ctkd.t_start={t_start} must be > 0 and t_end={t_end} >= 0 (published: 1 and 20; "
                "the temperature lies in (t_start, t_start + t_end))"
            )
        if curriculum_epochs < 1:
            raise ConfigError(f"loss.terms.ctkd.curriculum_epochs={curriculum_epochs} must be >= 1 (published: 10)")
        self.t_start, self.t_end = float(t_start), float(t_end)
        self.lambda_start, self.lambda_end = float(lambda_start), float(lambda_end)
        self.curriculum_epochs = curriculum_epochs
        #: The learnable temperature logit theta (the authors' ``global_T``).
        self.raw_temperature = nn.Parameter(torch.full((), float(init)))
        #: lambda: the gradient reaching theta is -lambda times the loss's; set per epoch by start_epoch.
        self.reversal = cosine_curriculum(1, curriculum_epochs, self.lambda_start, self.lambda_end)

    def start_epoch(self, epoch: int) -> None:
        """Set lambda for the 0-based training epoch ``epoch`` (the authors' 1-based epoch ``epoch + 1``)."""
        self.reversal = cosine_curriculum(epoch + 1, self.curriculum_epochs, self.lambda_start, self.lambda_end)

    def temperature_tensor(self) -> Tensor:
        theta = _ScaleGradient.apply(self.raw_temperature, -self.reversal)
        return self.t_start + self.t_end * torch.sigmoid(theta)

    def current_temperature(self) -> float:
        """The temperature the next step uses (no graph)."""
        return float(self.t_start + self.t_end * torch.sigmoid(self.raw_temperature.detach()))

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> Tensor:
        temperature = self.temperature_tensor()
        return soft_kl(at_least_fp32(student), at_least_fp32(teacher), temperature) * temperature**2
