r"""The token-level LM distillation objective, computed chunk by chunk from final hidden states.

Valid tokens, hidden states, heads and the top-k teacher rows are defined in :mod:`kd_lightning.llm.tokens`.

Memory: logits are never materialised for the whole batch. Valid positions are selected first, then
for each chunk of ``chunk_size`` tokens the student's (and the teacher's) logits ``[chunk, V]`` are
computed from hidden states and the ``lm_head`` weight, reduced to three sums, and dropped; with
gradients enabled each chunk is recomputed in backward instead of kept (:mod:`kd_lightning.llm.chunking`).
Peak extra memory is a few ``[chunk, V]`` float32 tensors instead of several ``[B * T, V]`` ones (measured in
``docs/results/llm_loss_memory.md``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.engine.errors import ConfigError, check_fraction
from kd_lightning.llm.chunking import chunked_sums
from kd_lightning.llm.divergences import ForwardKL, TokenDivergence
from kd_lightning.llm.protocol import ANY_SOURCE, SUPERVISED_SOURCES, TokenSource
from kd_lightning.llm.tokens import (
    SparseTeacher,
    TokenLossOutput,
    bucket_log_probs,
    head_logits,
    linear_head,
    next_token_targets,
    sequence_inputs,
)
from kd_lightning.losses.precision import at_least_fp32


class PackedTokens(NamedTuple):
    """A batch's valid tokens as rows (see :meth:`TokenDistillationLoss.packed_tokens`)."""

    hidden: Tensor
    targets: Tensor
    positions: Tensor
    count: Tensor
    teacher_hidden: Tensor | None
    teacher_logits: Tensor | None


def teacher_head_weights(
    teacher_hidden: Tensor | None, teacher_head: nn.Module | None, teacher_logits: Tensor | None
) -> tuple[Tensor | None, Tensor | None, int | None]:
    """A live teacher's head weight and bias and its vocabulary (hidden states + head), or only the vocabulary of
    full ``teacher_logits``, or nothing."""
    if teacher_hidden is not None:
        if teacher_head is None:
            raise ValueError("teacher_hidden needs teacher_head")
        weight, bias = linear_head(teacher_head, "llm.teacher.model")
        return weight, bias, weight.shape[0]
    return None, None, teacher_logits.shape[-1] if teacher_logits is not None else None


class TokenDistillationLoss(nn.Module):
    r"""Next-token cross-entropy plus a token-level divergence to the teacher, over valid tokens.

    .. math::
        L = \frac{1}{N} \sum_{i \,\in\, \mathrm{valid}} (1 - \alpha)\,\mathrm{CE}\big(z_s^i, y_i\big)
            + \alpha\, T^2 D\big(\mathrm{softmax}(z_s^i / T),\ \mathrm{softmax}(z_t^i / T)\big)

    the LM form of Hinton et al. (2015) used by word-level KD (Kim & Rush 2016), GKD (Agarwal et al.
    2024) and DistiLLM (Ko et al. 2024); :math:`D` is any divergence from
    :mod:`kd_lightning.llm.divergences`. ``alpha`` only weighs the two terms (``alpha = 1``: distillation
    only); fine-tuning without a teacher is a method of its own (``llm/method=sft``).
    :meth:`forward` returns *sums* and the token count :math:`N` (see :class:`TokenLossOutput`).

    Token sources (:mod:`kd_lightning.llm.protocol`): the cross-entropy reads ground-truth and
    teacher-written tokens only; on the student's own samples (``source=STUDENT``) the loss is
    :math:`\alpha\, T^2 D` alone, for every ``alpha``.

    The teacher is given as hidden states plus its ``lm_head`` (chunked like the student), as full
    logits ``[B, T, V]``, or as a :class:`SparseTeacher` (top-k + tail bucket: :math:`D` is computed over
    ``k + 1`` buckets, the student's tail being the log-sum-exp of its non-top-k log-probabilities).

    Vocabularies: with ``vocab_size`` null both heads must have the same size; a head padded beyond
    the tokenizer is handled by setting ``vocab_size`` to the shared (tokenizer) size, which slices
    both to it (cross-entropy and divergence alike).

    Args:
        divergence: the token divergence (owns the temperature).
        alpha: weight of the divergence against the cross-entropy, in [0, 1].
        chunk_size: tokens per chunk of logits; ``null`` computes all valid tokens at once (no recompute).
        vocab_size: number of leading vocabulary entries both models share, or null.
    """

    def __init__(
        self,
        divergence: TokenDivergence,
        alpha: float = 0.5,
        chunk_size: int | None = 512,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        self.divergence = divergence
        self.alpha = check_fraction(alpha, "llm.loss.alpha", "; 1 is distillation only")
        if chunk_size is not None and (type(chunk_size) is not int or chunk_size < 1):
            raise ConfigError(f"llm.loss.chunk_size={chunk_size} must be a positive number of tokens (or null)")
        self.chunk_size = chunk_size
        if vocab_size is not None and (type(vocab_size) is not int or vocab_size < 1):
            raise ConfigError(f"llm.loss.vocab_size={vocab_size} must be a positive integer (or null)")
        self.vocab_size = vocab_size
        self.monitor = ForwardKL()
        #: The label ids were checked against the vocabulary (on the first batch; kd-llm-distill's pre-flight
        #: checks every row's ids, and reading them on the host every step would stall an accelerator).
        self.labels_checked = False

    #: Teacher and student read the same token ids (see :class:`~kd_lightning.llm.cross_token_loss.CrossTokenizerLoss`).
    cross_tokenizer = False
    #: The teacher may be given as top-k rows (:class:`SparseTeacher`: a logit cache, a served teacher).
    reads_top_k = True
    #: Which token sources each term may read (:mod:`kd_lightning.llm.protocol`).
    reads: ClassVar[Mapping[str, frozenset[TokenSource]]] = {"ce": SUPERVISED_SOURCES, "distill": ANY_SOURCE}

    @property
    def temperature(self) -> float:
        return self.divergence.temperature

    def teacher_tokens(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, ...]:
        """``(input_ids, attention_mask[, position_ids])`` the teacher reads: the student's own."""
        return sequence_inputs(batch)

    def alignment(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Extra :meth:`forward` arguments from the batch: none (one tokenisation)."""
        return {}

    @property
    def needs_teacher(self) -> bool:
        """Whether training needs teacher outputs (False for ``alpha == 0``)."""
        return self.alpha > 0.0

    def shared_vocab(self, student_vocab: int, teacher_vocab: int | None) -> int:
        """The number of leading vocabulary entries compared; a :class:`ConfigError` if the heads cannot share one."""
        sizes = f"student head {student_vocab}" + (f", teacher head {teacher_vocab}" if teacher_vocab else "")
        if self.vocab_size is not None:
            if self.vocab_size > min(student_vocab, teacher_vocab or student_vocab):
                raise ConfigError(
                    f"llm.loss.vocab_size={self.vocab_size} exceeds a model's vocabulary ({sizes}); "
                    "set it to the tokenizer's size"
                )
            return self.vocab_size
        if teacher_vocab is None or teacher_vocab == student_vocab:
            return student_vocab
        raise ConfigError(
            f"the vocabularies differ ({sizes}); if one head is only padded, set llm.loss.vocab_size to the "
            "shared tokenizer size, otherwise the tokenizers differ and white-box KD does not apply "
            "(fine-tune on teacher-written data: llm/method=sft)"
        )

    def packed_tokens(
        self,
        labels: Tensor,
        vocab: int,
        student_hidden: Tensor,
        teacher_hidden: Tensor | None,
        teacher_logits: Tensor | None,
    ) -> PackedTokens:
        """The valid tokens of ``labels`` ``[B, T]`` packed into rows: their next-token targets (checked once
        against the shared ``vocab``), the student's (and a live teacher's) hidden states at those positions,
        a full teacher's logits flattened to ``[B * T, V]`` (looked up by ``positions``)."""
        batch, length = labels.shape
        targets, positions = next_token_targets(labels)
        targets = targets.reshape(-1).index_select(0, positions)
        count = torch.full((), positions.numel(), dtype=torch.long, device=positions.device)  # no host copy
        if not self.labels_checked and targets.numel():
            if int(targets.max()) >= vocab:
                raise ConfigError(
                    f"a label id ({int(targets.max())}) is outside the shared vocabulary ({vocab}); check that "
                    "llm.loss.vocab_size and the tokenizer match the models"
                )
            self.labels_checked = True
        hidden = student_hidden.reshape(batch * length, -1).index_select(0, positions)
        if teacher_hidden is not None:
            teacher_hidden = teacher_hidden.reshape(batch * length, -1).index_select(0, positions)
        if teacher_logits is not None:
            teacher_logits = teacher_logits.reshape(batch * length, -1)
        return PackedTokens(hidden, targets, positions, count, teacher_hidden, teacher_logits)

    def forward(
        self,
        student_hidden: Tensor,
        student_head: nn.Module,
        labels: Tensor,
        teacher_hidden: Tensor | None = None,
        teacher_head: nn.Module | None = None,
        teacher_logits: Tensor | None = None,
        teacher_topk: SparseTeacher | None = None,
        monitor_kl: bool = False,
        source: TokenSource = TokenSource.GROUND_TRUTH,
    ) -> TokenLossOutput:
        """Sums over the valid tokens of ``labels`` ``[B, T]``, which came from ``source``.

        ``student_hidden`` ``[B, T, H]`` are the final hidden states (logits = ``student_head(hidden)``);
        give the teacher as ``teacher_hidden`` + ``teacher_head``, ``teacher_logits`` ``[B, T, V_t]`` or
        ``teacher_topk`` (one row per valid token). ``monitor_kl`` adds ``parts["kl_to_teacher"]``, the
        forward KL at T = 1 without gradient (for a top-k teacher: over its buckets, at its temperature).
        """
        weight, bias = linear_head(student_head, "llm.student.model")
        teacher_weight, teacher_bias, teacher_vocab = teacher_head_weights(teacher_hidden, teacher_head, teacher_logits)
        has_teacher = teacher_vocab is not None or teacher_topk is not None
        if (self.needs_teacher or monitor_kl) and not has_teacher:
            raise ValueError("this loss needs teacher outputs: alpha > 0 or monitor_kl")
        vocab = self.shared_vocab(weight.shape[0], teacher_vocab)
        tokens = self.packed_tokens(labels, vocab, student_hidden, teacher_hidden, teacher_logits)
        if teacher_topk is not None and teacher_topk.ids.shape[0] != tokens.targets.numel():
            raise ValueError(
                f"teacher_topk has {teacher_topk.ids.shape[0]} rows for {tokens.targets.numel()} valid tokens"
            )

        def chunk_args(h: Tensor, y: Tensor, rows: Tensor, t_hidden: Tensor | None, *topk: Tensor | None) -> tuple:
            sparse = SparseTeacher(*topk) if teacher_topk is not None else None
            teacher = (t_hidden, teacher_weight, teacher_bias, tokens.teacher_logits)
            return (h, weight, bias, y, vocab, *teacher, rows, sparse, monitor_kl)

        columns = [tokens.hidden, tokens.targets, tokens.positions, tokens.teacher_hidden]
        columns += list(teacher_topk or (None, None, None))
        sums = chunked_sums(self._chunk_sums, columns, chunk_args, (student_hidden, weight), 3, self.chunk_size)
        ce_weight = (1.0 - self.alpha) if source in self.reads["ce"] else 0.0
        total = ce_weight * sums[0] + self.alpha * sums[1]
        read = source in self.reads["ce"]
        parts = {"ce": sums[0].detach() if read else sums[0].detach() * 0, "distill": sums[1].detach()}
        if monitor_kl:
            parts["kl_to_teacher"] = sums[2].detach()
        return TokenLossOutput(total=total, count=tokens.count, parts=parts)

    def _chunk_sums(
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
        teacher_topk: SparseTeacher | None,
        monitor_kl: bool,
    ) -> Tensor:
        """``[ce_sum, divergence_sum, kl_sum]`` over one chunk of valid tokens (>= float32). Full teacher
        logits are indexed by ``rows`` here, inside the checkpoint, so no chunk of them outlives its step."""
        # Few [chunk, V] tensors live at once: logits are dropped once softmaxed; at T = 1 the
        # cross-entropy and the divergence share one log-softmax.
        logits = head_logits(hidden, weight, bias, vocab)
        log_p = F.log_softmax(logits, dim=-1)
        ce = -log_p.gather(1, targets[:, None]).sum()
        zero = ce.new_zeros(())
        if not (self.needs_teacher or monitor_kl):
            return torch.stack([ce, zero, zero])
        student = log_p if self.temperature == 1.0 else self.divergence.log_probs(logits)
        del logits
        if teacher_topk is not None:
            student = bucket_log_probs(student, teacher_topk.ids)
        with torch.no_grad():
            if teacher_topk is not None:
                teacher = torch.cat([teacher_topk.log_probs, teacher_topk.tail[:, None]], dim=1).float()
                teacher = teacher_at_1 = F.log_softmax(teacher, dim=1)  # renormalise (float16 on disk)
                log_p = student  # the monitor compares buckets, at the cache's temperature
            else:
                if teacher_hidden is not None:
                    teacher_logits = head_logits(teacher_hidden, teacher_weight, teacher_bias, vocab)
                else:
                    teacher_logits = at_least_fp32(teacher_logits.index_select(0, rows)[:, :vocab])
                teacher = self.divergence.log_probs(teacher_logits)
                teacher_at_1 = teacher if self.temperature == 1.0 else F.log_softmax(teacher_logits, dim=-1)
                del teacher_logits
            kl = self.monitor.per_token(log_p, teacher_at_1).sum() if monitor_kl else zero
        distill = (
            self.divergence.per_token(student, teacher).sum() * self.temperature**2 if self.needs_teacher else zero
        )
        return torch.stack([ce, distill, kl])
