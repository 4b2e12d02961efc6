r"""Sampled-token on-policy KD: reverse KL from the teacher's log-probabilities of the student's own samples.

The objective used by on-policy distillation as policy gradient (Thinking Machines' "On-Policy
Distillation", Lu et al. 2025; GKD's on-policy setting, Agarwal et al. 2024; MiniLLM, Gu et al. 2024): the
student samples a completion, the teacher scores each sampled token, and the per-token reverse KL
:math:`\mathrm{KL}(p_s \| p_t)` is minimised with the score-function (REINFORCE) estimator, which reads
the teacher's log-probability of the sampled token only, not its distribution.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.chunking import chunked_sums
from kd_lightning.llm.divergences import ReverseKL
from kd_lightning.llm.protocol import TokenSource
from kd_lightning.llm.token_loss import TokenDistillationLoss, teacher_head_weights
from kd_lightning.llm.tokens import SparseTeacher, TokenLossOutput, head_logits, linear_head
from kd_lightning.losses.precision import at_least_fp32

#: The estimators of reverse KL the reported value may use (Schulman, "Approximating KL Divergence", 2020).
ESTIMATORS = ("k1", "k3")


def kl_estimate(log_p_student: Tensor, log_p_teacher: Tensor, estimator: str) -> Tensor:
    r"""Per sampled token :math:`x \sim p_s`, an unbiased estimate of :math:`\mathrm{KL}(p_s \| p_t)`:
    ``k1`` :math:`= \log p_s(x) - \log p_t(x)`; ``k3`` :math:`= (r - 1) - \log r` with :math:`r = p_t(x) / p_s(x)`
    (non-negative, lower variance when the distributions are close)."""
    log_ratio = log_p_teacher - log_p_student  # log r
    if estimator == "k1":
        return -log_ratio
    return torch.expm1(log_ratio) - log_ratio


class SampledReverseKL(TokenDistillationLoss):
    r"""Reverse KL on the student's own samples from the teacher's log-probability of each sampled token
    (``llm/loss=reverse_kl_sampled``, with ``llm/method=on_policy``).

    Per sampled token :math:`x_t \sim p_s(\cdot \mid x_{<t})` the advantage
    :math:`A_t = \log p_t(x_t) - \log p_s(x_t)` (detached) weighs the student's log-probability:

    .. math::
        L = -\frac{1}{N} \sum_t \alpha\, T^2 A_t \log p_s(x_t), \qquad
        \mathbb{E}_{x_t \sim p_s}\big[\nabla L\big] = \alpha\, T^2\, \nabla\, \mathrm{KL}(p_s \,\|\, p_t)

    per position (the score-function estimator: :math:`\mathbb{E}_{p_s}[\nabla \log p_s] = 0` removes the
    term of :math:`\log p_s` inside the KL). Each token's advantage is its own (discount 0, as Thinking
    Machines' on-policy distillation): the estimated gradient is that of the per-token reverse KL at the
    sampled prefixes, what ``llm/loss=reverse_kl`` computes exactly over the full vocabulary on the same
    batch. The *value* of ``total`` (``train/loss``) is the ``estimator``'s estimate of that reverse KL,
    ``k1`` :math:`= -A_t` or ``k3`` :math:`= (e^{A_t} - 1) - A_t` (Schulman 2020), with the gradient above
    (the surrogate minus its detached value, plus the detached estimate).

    Only the teacher's log-probability of each sampled token is read (``teacher_token_log_probs``
    ``[N]``, in :func:`~kd_lightning.llm.token_loss.next_token_targets` order); a live teacher's hidden states
    or logits are reduced to it. So a served teacher that scores given tokens can teach it.

    Token sources: the estimator is unbiased only for tokens sampled from the student, so the term reads
    :attr:`TokenSource.STUDENT` only, and there is no cross-entropy (``alpha`` scales the term, as on
    student samples in every token loss). ``kd-llm-distill`` refuses it with a scheme that trains on
    dataset text (``llm/method=token_kd``, ``on_policy`` with ``lmbda < 1``); a training step on other
    tokens raises. Validation (no gradient) on the dataset's completions reports the exact per-token reverse
    KL of a full teacher as ``val/loss``, and the student's cross-entropy for ``val/ppl``.

    Temperature: :math:`p = \mathrm{softmax}(z / T)` on both sides and :math:`T^2` as every token loss
    (``temperature = 1``: the raw distributions). The samples must come from :math:`p_s` at the same
    :math:`T`, unclipped: ``llm/method=on_policy`` refuses ``llm.method.generation`` with another
    ``temperature``, or ``top_k`` / ``top_p`` that truncate it (``exact_samples``). A served teacher
    reports log-probabilities at :math:`T = 1`.

    Args:
        estimator: ``k1`` or ``k3``, the reported estimate of the reverse KL (the gradient is the same).
        temperature: :math:`T` of both distributions (and of the student's sampling).
        alpha: weight of the term, in (0, 1].
        chunk_size, vocab_size: as :class:`~kd_lightning.llm.token_loss.TokenDistillationLoss`.
    """

    #: The term reads the student's own samples only; ``ce`` reads nothing (never the student's tokens).
    reads: ClassVar[Mapping[str, frozenset[TokenSource]]] = {
        "ce": frozenset(),
        "distill": frozenset({TokenSource.STUDENT}),
    }
    #: Unbiased only for samples drawn from the student's own (untruncated) distribution at ``temperature``.
    exact_samples = True
    #: It needs the teacher's log-probability of each sampled token, which top-k rows may lack.
    reads_top_k = False

    def __init__(
        self,
        estimator: str = "k3",
        temperature: float = 1.0,
        alpha: float = 1.0,
        chunk_size: int | None = 512,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__(ReverseKL(temperature), alpha=alpha, chunk_size=chunk_size, vocab_size=vocab_size)
        if estimator not in ESTIMATORS:
            raise ConfigError(f"llm.loss.estimator={estimator!r} must be one of {list(ESTIMATORS)}")
        self.estimator = estimator

    def forward(
        self,
        student_hidden: Tensor,
        student_head: nn.Module,
        labels: Tensor,
        teacher_hidden: Tensor | None = None,
        teacher_head: nn.Module | None = None,
        teacher_logits: Tensor | None = None,
        teacher_topk: SparseTeacher | None = None,
        teacher_token_log_probs: Tensor | None = None,
        monitor_kl: bool = False,
        source: TokenSource = TokenSource.GROUND_TRUTH,
    ) -> TokenLossOutput:
        """Sums over the valid tokens of ``labels`` (see the class docstring); the teacher as hidden states +
        head, full logits ``[B, T, V]``, or the log-probabilities of the labelled tokens ``[N]``."""
        source = TokenSource(source)
        sampled = source in self.reads["distill"]
        if not sampled and torch.is_grad_enabled():
            raise ConfigError(
                f"llm/loss=reverse_kl_sampled trains on the student's own samples only, but this batch holds "
                f"{source.value} tokens: use llm/method=on_policy with llm.method.lmbda=1"
            )
        if teacher_topk is not None:
            raise ConfigError("llm/loss=reverse_kl_sampled reads the teacher live: set llm/teacher_cache=none")
        weight, bias = linear_head(student_head, "llm.student.model")
        teacher_weight, teacher_bias, teacher_vocab = teacher_head_weights(teacher_hidden, teacher_head, teacher_logits)
        full_teacher = teacher_vocab is not None
        if not full_teacher and teacher_token_log_probs is None:
            raise ValueError("this loss needs teacher outputs (hidden states, logits or token log-probabilities)")
        vocab = self.shared_vocab(weight.shape[0], teacher_vocab)
        tokens = self.packed_tokens(labels, vocab, student_hidden, teacher_hidden, teacher_logits)
        if teacher_token_log_probs is not None and teacher_token_log_probs.shape != tokens.targets.shape:
            raise ValueError(f"teacher_token_log_probs has shape {tuple(teacher_token_log_probs.shape)}, not [N]")

        def chunk_args(h: Tensor, y: Tensor, rows: Tensor, t_hidden: Tensor | None, t_token: Tensor | None) -> tuple:
            teacher = (t_hidden, teacher_weight, teacher_bias, tokens.teacher_logits)
            return (h, weight, bias, y, vocab, *teacher, rows, t_token, sampled, monitor_kl and full_teacher)

        columns = [tokens.hidden, tokens.targets, tokens.positions, tokens.teacher_hidden, teacher_token_log_probs]
        sums = chunked_sums(self._sampled_sums, columns, chunk_args, (student_hidden, weight), 4, self.chunk_size)
        surrogate, estimate, ce, kl = sums.unbind()
        total = self.alpha * (surrogate - surrogate.detach() + estimate.detach())
        parts = {"ce": ce.detach() if not sampled else ce.detach() * 0, "distill": estimate.detach()}
        if monitor_kl and full_teacher:
            parts["kl_to_teacher"] = kl.detach()
        return TokenLossOutput(total=total, count=tokens.count, parts=parts)

    def _sampled_sums(
        self,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        vocab: int,
        teacher_hidden: Tensor | None,
        teacher_weight: Tensor | None,
        teacher_bias: Tensor | None,
        teacher_logits: Tensor | None,
        rows: Tensor,
        teacher_token: Tensor | None,
        sampled: bool,
        monitor_kl: bool,
    ) -> Tensor:
        """``[surrogate_sum, estimate_sum, ce_sum, kl_sum]`` over one chunk of valid tokens. On student
        samples the surrogate is :math:`-T^2 \\sum A_t \\log p_s(x_t)` and the estimate the chosen ``k``; on
        other tokens (validation) both are the exact reverse KL of a full teacher (0 without one)."""
        logits = head_logits(hidden, weight, bias, vocab)
        log_p_at_1 = F.log_softmax(logits, dim=-1)
        ce = -log_p_at_1.gather(1, targets[:, None]).squeeze(1).sum()
        student = log_p_at_1 if self.temperature == 1.0 else self.divergence.log_probs(logits)
        del logits
        teacher = teacher_at_1 = None
        with torch.no_grad():
            if teacher_hidden is not None or teacher_logits is not None:
                if teacher_hidden is not None:
                    full = head_logits(teacher_hidden, teacher_weight, teacher_bias, vocab)
                else:
                    full = at_least_fp32(teacher_logits.index_select(0, rows)[:, :vocab])
                teacher = self.divergence.log_probs(full)
                teacher_at_1 = teacher if self.temperature == 1.0 else F.log_softmax(full, dim=-1)
                del full
            kl = self.monitor.per_token(log_p_at_1, teacher_at_1).sum() if monitor_kl else ce.new_zeros(())
        scale = self.temperature**2
        if not sampled:  # validation on dataset tokens: the exact per-token reverse KL (no estimator applies)
            exact = self.divergence.per_token(student, teacher).sum() * scale if teacher is not None else ce * 0
            return torch.stack([exact, exact.detach(), ce, kl])
        token_student = student.gather(1, targets[:, None]).squeeze(1)
        if teacher_token is not None:
            token_teacher = at_least_fp32(teacher_token)
        else:
            token_teacher = teacher.gather(1, targets[:, None]).squeeze(1)
        advantage = (token_teacher - token_student).detach()
        surrogate = -(advantage * token_student).sum() * scale
        estimate = kl_estimate(token_student.detach(), token_teacher, self.estimator).sum() * scale
        return torch.stack([surrogate, estimate, ce, kl])
