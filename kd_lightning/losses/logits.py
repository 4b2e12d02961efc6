"""Logit-based distillation terms."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kd_lightning.losses.base import DistillationTerm
from kd_lightning.losses.precision import at_least_fp32


def soft_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``KL(softmax(teacher/T) || softmax(student/T))``, averaged over samples, computed in >= fp32."""
    log_p_student = F.log_softmax(at_least_fp32(student_logits) / temperature, dim=-1)
    log_p_teacher = F.log_softmax(at_least_fp32(teacher_logits) / temperature, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


class KLDivergence(DistillationTerm):
    r"""Soft-target distillation of Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
    Network" (NeurIPS workshop 2015).

    .. math::
        L_{kd} = T^2 \cdot \frac{1}{B}\sum_b \mathrm{KL}\big(\sigma(z_t^b / T)\,\|\,\sigma(z_s^b / T)\big)

    The :math:`T^2` factor keeps gradient magnitudes comparable across temperatures. The paper's
    usual setting is T = 4 with a 0.9 / 0.1 distillation / cross-entropy split (``alpha = 0.9``).
    Softmaxes are computed in float32 so the term stays finite under mixed precision.
    """

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> Tensor:
        return soft_kl(student, teacher, self.temperature) * self.temperature**2
