"""DeiT's distillation through a second head (Touvron et al. 2021)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kd_lightning.engine.errors import ConfigError
from kd_lightning.losses.precision import at_least_fp32
from kd_lightning.losses.reads import LOGITS, ReadSpec
from kd_lightning.losses.terms import LayerTerm

MODES = ("hard", "soft")


class DeiTDistillation(LayerTerm):
    r"""The distillation term of DeiT (Touvron et al., "Training data-efficient image transformers &
    distillation through attention", ICML 2021), on the student's **distillation head** ``a`` (the output of
    the distillation token's classifier, ``student_layer``) and the teacher's logits ``b``:

    - ``mode: hard`` (the paper's best results): :math:`\mathrm{CE}(a, \arg\max_c b_c)`; with
      ``loss.alpha = 0.5`` and the class head's CE as the task term this is the paper's
      :math:`L_{hardDistill} = \tfrac12 \mathrm{CE}(\psi(Z_s), y) + \tfrac12 \mathrm{CE}(\psi(Z_{dist}), y_t)`.
    - ``mode: soft``: :math:`\tau^2 \sum_{i,c} \mathrm{KL}(\sigma(b_i/\tau) \| \sigma(a_i/\tau)) / (B\,C)` with
      ``loss.alpha`` the paper's :math:`\lambda` (0.5) and :math:`\tau = 3`. The authors' code
      (facebookresearch/deit, ``losses.py``, ``DistillationLoss``) sums the KL and divides by the number of
      logits ``B * C`` (not the batch size ``B``): this term does the same, so published settings carry over.

    The task term must read the student's **class head** and evaluation must average the two heads: method
    ``deit`` (:class:`~kd_lightning.methods.deit.DeiTDistillationModule`) does both.
    ``temperature``: null follows ``loss.temperature``. ``beta`` multiplies the term (1 in the paper).
    """

    def __init__(
        self,
        mode: str = "hard",
        temperature: float | None = None,
        student_layer: str = "model.distillation_classifier",
        teacher_layer: str = LOGITS,
        beta: float = 1.0,
        student: ReadSpec = None,
        teacher: ReadSpec = None,
    ) -> None:
        super().__init__(student_layer, teacher_layer, beta, student, teacher)
        if mode not in MODES:
            raise ConfigError(
                f"method.distillation.terms.deit.mode={mode!r} must be one of {list(MODES)} (hard: DeiT's best results)"
            )
        self.mode = mode
        if temperature is not None and not float(temperature) > 0:
            raise ConfigError(
                f"method.distillation.terms.deit.temperature={temperature} must be > 0 (DeiT: 3), or null"
            )
        self.follows_loss_temperature = temperature is None
        self.temperature = 3.0 if temperature is None else float(temperature)

    def setup_shapes(self, student: Tensor, teacher: Tensor, key: str) -> None:
        if student.dim() != 2 or student.shape != teacher.shape:
            raise ConfigError(
                f"{key}.student_layer must be the student's distillation head (logits of shape {tuple(teacher.shape)}, "
                f"like the teacher's), got {tuple(student.shape)}; e.g. model.distillation_classifier (Hugging Face "
                "DeiTForImageClassificationWithTeacher) or head_dist (timm's distilled ViTs)"
            )

    def forward(self, a: Tensor, b: Tensor, targets: Tensor | None = None) -> Tensor:
        a, b = at_least_fp32(a), at_least_fp32(b.detach())
        if self.mode == "hard":
            return self.beta * F.cross_entropy(a, b.argmax(dim=1))
        t = self.temperature
        kl = F.kl_div(F.log_softmax(a / t, dim=1), F.log_softmax(b / t, dim=1), reduction="sum", log_target=True)
        return self.beta * kl * (t * t) / a.numel()
