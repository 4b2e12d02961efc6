r"""Token-level divergences between the student's and the teacher's next-token distributions.

Every divergence maps student and teacher logits ``[N, V]`` to one value per token ``[N]``::

    divergence(student_logits, teacher_logits) -> Tensor  # [N], float32 (float64 stays float64)

Both sides are softened by the same temperature ``T`` (:math:`p = \mathrm{softmax}(z / T)`) and the
result is multiplied by :math:`T^2` (Hinton et al. 2015), so gradient scale stays comparable across
``T``; the LM default ``T = 1`` leaves both untouched. Teacher *log-probabilities* may be passed
instead of teacher logits (``log_softmax`` is shift-invariant). :meth:`TokenDivergence.per_token`
takes normalised log-distributions over any support (the full vocabulary, or the ``k + 1`` buckets of
a top-k teacher) and holds the formula. Notation: :math:`p_t` teacher, :math:`p_s` student.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.engine.errors import ConfigError, check_positive
from kd_lightning.losses.precision import at_least_fp32


def _weighted_log_ratio(p: Tensor, log_a: Tensor, log_b: Tensor) -> Tensor:
    r""":math:`\sum_v p_v (\log a_v - \log b_v)` over the last dim, with :math:`0 \log 0 = 0` (also in the gradient)."""
    diff = torch.where(p > 0, log_a - log_b, 0.0)
    return (p * diff).sum(dim=-1)


def _log_mixture(log_p: Tensor, log_q: Tensor, weight: float) -> Tensor:
    r""":math:`\log(w\,p + (1 - w)\,q)` from log-probabilities, computed with ``logaddexp``."""
    if weight <= 0.0:
        return log_q
    if weight >= 1.0:
        return log_p
    return torch.logaddexp(log_p + math.log(weight), log_q + math.log1p(-weight))


def _check_unit(value: float, name: str, key: str, closed_right: bool = True) -> float:
    ok = 0.0 <= value <= 1.0 if closed_right else 0.0 <= value < 1.0
    if not (isinstance(value, (int, float)) and ok):
        interval = "[0, 1]" if closed_right else "[0, 1)"
        raise ConfigError(f"{key}.{name}={value} must be in {interval}")
    return float(value)


class TokenDivergence(nn.Module):
    """Base class: softens both sides by ``temperature``, computes :meth:`per_token` in >= float32, times ``T^2``."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = check_positive(temperature, "llm.loss.divergence.temperature", " (1 is the LM default)")

    def log_probs(self, logits: Tensor) -> Tensor:
        """``log_softmax(logits / T)`` in at least float32."""
        logits = at_least_fp32(logits)
        return F.log_softmax(logits if self.temperature == 1.0 else logits / self.temperature, dim=-1)

    def per_token(self, log_p_student: Tensor, log_p_teacher: Tensor) -> Tensor:
        """The divergence of two normalised log-distributions ``[N, K]`` -> ``[N]`` (no temperature)."""
        raise NotImplementedError

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return self.per_token(self.log_probs(student_logits), self.log_probs(teacher_logits)) * self.temperature**2


class ForwardKL(TokenDivergence):
    r"""Forward KL, the word-level KD objective of Kim & Rush, "Sequence-Level Knowledge Distillation" (2016)
    and the usual LM distillation default; mass-covering.

    .. math:: \mathrm{KL}(p_t \,\|\, p_s) = \sum_v p_t(v)\,\big(\log p_t(v) - \log p_s(v)\big)
    """

    def per_token(self, log_p_student: Tensor, log_p_teacher: Tensor) -> Tensor:
        return _weighted_log_ratio(log_p_teacher.exp(), log_p_teacher, log_p_student)


class ReverseKL(TokenDivergence):
    r"""Reverse KL, as in MiniLLM (Gu et al., "MiniLLM: Knowledge Distillation of Large Language Models",
    ICLR 2024) at the token level; mode-seeking.

    .. math:: \mathrm{KL}(p_s \,\|\, p_t) = \sum_v p_s(v)\,\big(\log p_s(v) - \log p_t(v)\big)
    """

    def per_token(self, log_p_student: Tensor, log_p_teacher: Tensor) -> Tensor:
        return _weighted_log_ratio(log_p_student.exp(), log_p_student, log_p_teacher)


class GeneralizedJSD(TokenDivergence):
    r"""Generalized Jensen-Shannon divergence of GKD (Agarwal et al., "On-Policy Distillation of Language
    Models: Learning from Self-Generated Mistakes", ICLR 2024, Eq. 1), with TRL's end points.

    For :math:`0 < \beta < 1`, with the mixture :math:`m = \beta\,p_t + (1 - \beta)\,p_s`:

    .. math:: \mathrm{JSD}_\beta = \beta\,\mathrm{KL}(p_t \,\|\, m) + (1 - \beta)\,\mathrm{KL}(p_s \,\|\, m)

    and, as in TRL's ``generalized_jsd_loss``, :math:`\beta = 0` is *exactly* forward KL
    :math:`\mathrm{KL}(p_t \| p_s)` and :math:`\beta = 1` exactly reverse KL :math:`\mathrm{KL}(p_s \| p_t)`.
    The mixture formula itself tends to 0 at both ends (it behaves like :math:`\beta\,\mathrm{KL}(p_t\|p_s)`
    near 0), so the value jumps there: compare losses across ``beta`` with that in mind.
    """

    def __init__(self, beta: float = 0.5, temperature: float = 1.0) -> None:
        super().__init__(temperature)
        self.beta = _check_unit(beta, "beta", "llm.loss.divergence")

    def per_token(self, log_p_student: Tensor, log_p_teacher: Tensor) -> Tensor:
        if self.beta == 0.0:
            return _weighted_log_ratio(log_p_teacher.exp(), log_p_teacher, log_p_student)
        if self.beta == 1.0:
            return _weighted_log_ratio(log_p_student.exp(), log_p_student, log_p_teacher)
        log_m = _log_mixture(log_p_teacher, log_p_student, self.beta)
        to_teacher = _weighted_log_ratio(log_p_teacher.exp(), log_p_teacher, log_m)
        to_student = _weighted_log_ratio(log_p_student.exp(), log_p_student, log_m)
        return self.beta * to_teacher + (1.0 - self.beta) * to_student


class SkewKL(TokenDivergence):
    r"""Skew KL of DistiLLM (Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language
    Models", ICML 2024): forward KL against a student skewed towards the teacher, which bounds the
    ratio :math:`p_t / m` by :math:`1/\alpha` and stabilises gradients.

    .. math:: \mathrm{SKL}_\alpha = \mathrm{KL}\big(p_t \,\|\, \alpha\,p_t + (1 - \alpha)\,p_s\big)

    :math:`\alpha = 0` is forward KL; the paper uses :math:`\alpha = 0.1`.
    """

    def __init__(self, alpha: float = 0.1, temperature: float = 1.0) -> None:
        super().__init__(temperature)
        self.alpha = _check_unit(alpha, "alpha", "llm.loss.divergence", closed_right=False)

    def per_token(self, log_p_student: Tensor, log_p_teacher: Tensor) -> Tensor:
        log_m = _log_mixture(log_p_teacher, log_p_student, self.alpha)
        return _weighted_log_ratio(log_p_teacher.exp(), log_p_teacher, log_m)


class SkewReverseKL(TokenDivergence):
    r"""Skew reverse KL of DistiLLM (Ko et al., ICML 2024): reverse KL against a teacher skewed towards
    the student.

    .. math:: \mathrm{SRKL}_\alpha = \mathrm{KL}\big(p_s \,\|\, \alpha\,p_s + (1 - \alpha)\,p_t\big)

    :math:`\alpha = 0` is reverse KL; the paper uses :math:`\alpha = 0.1`.
    """

    def __init__(self, alpha: float = 0.1, temperature: float = 1.0) -> None:
        super().__init__(temperature)
        self.alpha = _check_unit(alpha, "alpha", "llm.loss.divergence", closed_right=False)

    def per_token(self, log_p_student: Tensor, log_p_teacher: Tensor) -> Tensor:
        log_m = _log_mixture(log_p_student, log_p_teacher, self.alpha)
        return _weighted_log_ratio(log_p_student.exp(), log_p_student, log_m)


class TotalVariation(TokenDivergence):
    r"""Total variation distance, one of the f-divergences compared for LM distillation by Wen et al.,
    "f-Divergence Minimization for Sequence-Level Knowledge Distillation" (ACL 2023).

    .. math:: \mathrm{TV}(p_t, p_s) = \tfrac12 \sum_v \big|p_t(v) - p_s(v)\big|
    """

    def per_token(self, log_p_student: Tensor, log_p_teacher: Tensor) -> Tensor:
        return 0.5 * (log_p_teacher.exp() - log_p_student.exp()).abs().sum(dim=-1)


#: Every divergence by the name used in ``conf/llm/loss/<name>.yaml``.
DIVERGENCES: dict[str, type[TokenDivergence]] = {
    "forward_kl": ForwardKL,
    "reverse_kl": ReverseKL,
    "jsd": GeneralizedJSD,
    "skl": SkewKL,
    "srkl": SkewReverseKL,
    "tvd": TotalVariation,
}
