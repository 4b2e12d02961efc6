r"""CrossTokenizerLoss: token-level distillation between a teacher and a student with different tokenizers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.engine.errors import ConfigError, check_fraction, check_positive
from kd_lightning.llm.aligned import row_spans
from kd_lightning.llm.cross_tokenizer import gold_loss, uld_loss
from kd_lightning.llm.protocol import ANY_SOURCE, SUPERVISED_SOURCES, TokenSource
from kd_lightning.llm.tokens import (
    IGNORE_INDEX,
    TokenLossOutput,
    head_logits,
    linear_head,
    next_token_targets,
    sequence_inputs,
)
from kd_lightning.llm.vocab_mapping import VocabMapping

Alignment = Literal["position", "spans"]

#: Batch keys of the teacher's own tokenisation and of the span alignment (kd_lightning.llm.aligned).
ALIGNMENT_KEYS = ("teacher_labels", "student_spans", "teacher_spans")
#: Both sides' per-example positions in packed batches (kd_lightning.llm.packing).
PACKING_KEYS = ("position_ids", "teacher_position_ids")


def position_pairs(
    student_labels: Tensor,
    teacher_labels: Tensor,
    student_positions: Tensor | None = None,
    teacher_positions: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Flat row indices ``[N]`` into ``[B * L_s]`` and ``[B * L_t]`` that pair, in each sequence, the
    student's ``i``-th completion position with the teacher's ``i``-th, for ``i`` below the shorter
    completion (ULD's position alignment): the rows that predict each side's ``i``-th completion token.
    Packed rows (both sides' ``position_ids``, :mod:`~kd_lightning.llm.packing`): per example of a row."""
    student_valid = F.pad(student_labels[:, 1:], (0, 1), value=IGNORE_INDEX) != IGNORE_INDEX
    teacher_valid = F.pad(teacher_labels[:, 1:], (0, 1), value=IGNORE_INDEX) != IGNORE_INDEX
    if student_positions is None or teacher_positions is None:
        shorter = torch.minimum(student_valid.sum(1), teacher_valid.sum(1))[:, None]
        student_keep = student_valid & (student_valid.cumsum(1) <= shorter)
        teacher_keep = teacher_valid & (teacher_valid.cumsum(1) <= shorter)
        return student_keep.reshape(-1).nonzero().squeeze(1), teacher_keep.reshape(-1).nonzero().squeeze(1)
    examples = max(student_labels.shape[1], teacher_labels.shape[1]) + 1
    sides = ((student_valid, student_positions), (teacher_valid, teacher_positions))
    segments = [(positions == 0).long().cumsum(1) - 1 for _, positions in sides]
    counts = [
        valid.new_zeros((valid.shape[0], examples), dtype=torch.long).scatter_add_(1, segment, valid.long())
        for (valid, _), segment in zip(sides, segments, strict=True)
    ]
    shorter = torch.minimum(*counts)
    keep = []
    for (valid, _), segment, count in zip(sides, segments, counts, strict=True):
        rank = valid.long().cumsum(1) - (count.cumsum(1) - count).gather(1, segment)
        keep.append((valid & (rank <= shorter.gather(1, segment))).reshape(-1).nonzero().squeeze(1))
    return keep[0], keep[1]


class Side(NamedTuple):
    """One model's final hidden states ``[B, L, H]`` and output layer (``weight [V, H]``, ``bias``)."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None

    def flat(self) -> Tensor:
        return self.hidden.reshape(-1, self.hidden.shape[-1])

    def logits(self, hidden: Tensor) -> Tensor:
        """Full-width logits (>= float32) of some hidden states."""
        return head_logits(hidden, self.weight, self.bias, self.weight.shape[0])


class CrossTokenizerLoss(nn.Module):
    r"""Next-token cross-entropy plus a distillation term that needs no shared vocabulary.

    .. math:: L = \frac{1}{N_s} \Big[ (1 - \alpha) \sum_{i \in \mathrm{valid}} \mathrm{CE}(z_s^i, y_i)
        + \alpha \sum_{a \in \mathcal{A}} D_a \Big]

    over the :math:`N_s` labelled student tokens, where the aligned units :math:`\mathcal{A}` and
    :math:`D` depend on ``alignment``:

    - ``"position"``: Universal Logit Distillation (Boizard et al. 2024, arXiv:2402.12030): the
      :math:`i`-th completion position of the student against the :math:`i`-th of the teacher (up to the
      shorter completion), :math:`D` the sorted-probability L1 distance of
      :func:`~kd_lightning.llm.cross_tokenizer.uld_loss`;
    - ``"spans"``: GOLD (TRL's ``GOLDTrainer``, Patiño et al. 2025): the completions' token spans aligned
      on character offsets (:mod:`kd_lightning.llm.aligned`), merged per span, the generalised KL over
      the tokens both vocabularies share (weight ``matched_weight``) and ULD over the rest
      (``unmatched_weight``), :func:`~kd_lightning.llm.cross_tokenizer.gold_loss` per span.

    Both sides' logits are computed per sequence in full (no chunking: a row's ``[L, V]`` at a time).
    ``alpha = 0`` is plain fine-tuning (no teacher). The ``"spans"`` loss needs :meth:`bind` (the
    :class:`VocabMapping` of the two tokenizers) before its first step; ``kd-llm-distill`` binds it.
    """

    cross_tokenizer = True
    reads_top_k = False  # it maps the teacher's whole vocabulary onto the student's
    #: Which token sources each term may read (:mod:`kd_lightning.llm.protocol`).
    reads: ClassVar[Mapping[str, frozenset[TokenSource]]] = {"ce": SUPERVISED_SOURCES, "distill": ANY_SOURCE}

    def __init__(
        self,
        alpha: float = 0.5,
        alignment: Alignment = "spans",
        temperature: float = 1.0,
        matched_weight: float = 1.0,
        unmatched_weight: float = 1.0,
    ) -> None:
        super().__init__()
        check_fraction(alpha, "llm.loss.alpha", "; 1 is distillation only")
        if alignment not in ("position", "spans"):
            raise ConfigError(f"llm.loss.alignment={alignment!r} must be 'position' (ULD) or 'spans' (GOLD)")
        check_positive(temperature, "llm.loss.temperature")
        for key, weight in (("matched_weight", matched_weight), ("unmatched_weight", unmatched_weight)):
            if not (isinstance(weight, (int, float)) and weight >= 0):
                raise ConfigError(f"llm.loss.{key}={weight} must be >= 0")
        self.alpha = float(alpha)
        self.alignment_kind: Alignment = alignment
        self.temperature = float(temperature)
        self.matched_weight = float(matched_weight)
        self.unmatched_weight = float(unmatched_weight)
        self.mapping: VocabMapping | None = None

    @property
    def needs_teacher(self) -> bool:
        return self.alpha > 0.0

    def bind(self, mapping: VocabMapping) -> None:
        """Set the vocabulary mapping (widths: the two output layers) that ``"spans"`` compares."""
        self.mapping = mapping

    def teacher_tokens(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, ...]:
        """``(input_ids, attention_mask[, position_ids])`` of the teacher's own tokenisation (``teacher_*`` keys)."""
        if "teacher_input_ids" not in batch:
            raise ConfigError(
                "llm/loss=uld or gold needs batches encoded for both tokenizers (teacher_* keys); "
                "kd-llm-distill builds them when the student has its own tokenizer (llm.student.tokenizer)"
            )
        return sequence_inputs(batch, "teacher_")

    def alignment(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The teacher's labels and both sides' span ids (and position ids, packed), as :meth:`forward` arguments."""
        self.teacher_tokens(batch)
        keys = (*ALIGNMENT_KEYS, *(key for key in PACKING_KEYS if key in batch))
        return {key: batch[key] for key in keys}

    def forward(
        self,
        student_hidden: Tensor,
        student_head: nn.Module,
        labels: Tensor,
        teacher_hidden: Tensor | None = None,
        teacher_head: nn.Module | None = None,
        teacher_labels: Tensor | None = None,
        student_spans: Tensor | None = None,
        teacher_spans: Tensor | None = None,
        monitor_kl: bool = False,
        source: TokenSource = TokenSource.GROUND_TRUTH,
        position_ids: Tensor | None = None,
        teacher_position_ids: Tensor | None = None,
    ) -> TokenLossOutput:
        """Sums over the labelled student tokens (see :class:`~kd_lightning.llm.token_loss.TokenLossOutput`):
        ``parts`` are ``ce``, ``distill`` and ``aligned`` (the number of aligned units). ``monitor_kl`` is
        accepted for the common call shape; a KL between different vocabularies is not defined, none is added.
        The cross-entropy reads ``source`` only if :attr:`reads` lets it (never the student's own samples)."""
        weight, bias = linear_head(student_head, "llm.student.model")
        batch, length = labels.shape
        targets, positions = next_token_targets(labels)
        targets = targets.reshape(-1).index_select(0, positions)
        student = Side(student_hidden, weight, bias)
        logits = student.logits(student_hidden.reshape(batch * length, -1).index_select(0, positions))
        ce = F.cross_entropy(logits, targets, reduction="sum") if targets.numel() else logits.sum() * 0.0
        distill = aligned = ce.new_zeros(())
        if self.needs_teacher:
            if teacher_hidden is None or teacher_head is None or teacher_labels is None:
                raise ValueError("alpha > 0 needs teacher_hidden, teacher_head and teacher_labels")
            teacher = Side(teacher_hidden, *linear_head(teacher_head, "llm.teacher.model"))
            if self.alignment_kind == "position":
                packed = (position_ids, teacher_position_ids)
                distill, aligned = self._uld(student, teacher, labels, teacher_labels, *packed)
            else:
                if student_spans is None or teacher_spans is None:
                    raise ValueError("alignment='spans' needs student_spans and teacher_spans")
                distill, aligned = self._gold(student, teacher, labels, teacher_labels, student_spans, teacher_spans)
        if source not in self.reads["ce"]:
            ce = ce * 0.0
        total = (1.0 - self.alpha) * ce + self.alpha * distill
        parts = {"ce": ce.detach(), "distill": distill.detach(), "aligned": aligned.detach()}
        return TokenLossOutput(total=total, count=positions.new_tensor(positions.numel()), parts=parts)

    def _uld(
        self, student: Side, teacher: Side, labels: Tensor, teacher_labels: Tensor, *positions: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """ULD summed over the position-aligned completion tokens (per example of packed rows), and their number."""
        student_rows, teacher_rows = position_pairs(labels, teacher_labels, *positions)
        student_logits = student.logits(student.flat().index_select(0, student_rows))
        with torch.no_grad():
            teacher_logits = teacher.logits(teacher.flat().index_select(0, teacher_rows))
        count = student_rows.numel()
        uld = uld_loss(student_logits, teacher_logits, temperature=self.temperature)
        return uld * count, uld.new_tensor(float(count))

    def _gold(
        self,
        student: Side,
        teacher: Side,
        labels: Tensor,
        teacher_labels: Tensor,
        student_spans: Tensor,
        teacher_spans: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """GOLD summed over the aligned spans of every sequence, and their number."""
        if self.mapping is None:
            raise ConfigError("llm/loss=gold needs the tokenizers' vocabulary mapping: call loss.bind(mapping)")
        total, count = student.hidden.new_zeros((), dtype=torch.float32), 0
        for row in range(labels.shape[0]):
            spans = row_spans(student_spans[row], teacher_spans[row])
            if not spans:
                continue
            student_logits = student.logits(student.hidden[row])
            with torch.no_grad():
                teacher_logits = teacher.logits(teacher.hidden[row])
            # Span tokens are labelled completion tokens (labels = input ids there); gold_loss shifts itself.
            row_loss = gold_loss(
                student_logits,
                teacher_logits,
                labels[row].clamp(min=0),
                teacher_labels[row].clamp(min=0),
                spans,
                self.mapping,
                self.temperature,
                self.matched_weight,
                self.unmatched_weight,
            )
            total = total + row_loss * len(spans)
            count += len(spans)
        return total, total.new_tensor(float(count))
