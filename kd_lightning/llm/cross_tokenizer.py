r"""Cross-tokenizer LM distillation: a teacher and a student whose tokenizers and vocabularies differ.

Three pieces, pure functions over one sequence (the LM method batches and chunks around them):

- :func:`uld_loss`, the Universal Logit Distillation loss of Boizard et al., "Towards Cross-Tokenizer
  Distillation: the Universal Logit Distillation Loss for LLMs" (2024, arXiv:2402.12030): compares
  *sorted* probability vectors, so it needs no correspondence between the two vocabularies.
- :func:`~kd_lightning.llm.span_alignment.align_spans`: which groups of student tokens and of teacher tokens
  spell the same piece of text, from each tokenizer's character offsets of that text.
- :class:`~kd_lightning.llm.vocab_mapping.VocabMapping` and :func:`gold_loss`: GOLD-style span merging and the
  hybrid loss of TRL's ``GOLDTrainer`` (Patiño et al., "Unlocking On-Policy Distillation for Any Model Family",
  Hugging Face 2025): per aligned span, a divergence over the tokens both vocabularies share and ULD over the rest.

Shift convention (as in :mod:`kd_lightning.llm.tokens`): logits ``[T, V]`` are aligned with the
token ids ``[T]`` of the same sequence; row ``j`` is the model's output at token ``j`` and predicts
token ``j + 1``, so :math:`p(x_j \mid x_{<j}) = \mathrm{softmax}(z_{j-1})[x_j]` and token 0 is predicted
by no row. Teachers are never differentiated: their logits are detached.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.engine.errors import check_positive
from kd_lightning.llm.span_alignment import AlignedSpan
from kd_lightning.llm.vocab_mapping import VocabMapping
from kd_lightning.losses.precision import at_least_fp32


def _tempered(logits: Tensor, temperature: float) -> Tensor:
    """``logits / T`` in at least float32."""
    logits = at_least_fp32(logits)
    return logits if temperature == 1.0 else logits / temperature


def _sorted_l1(student: Tensor, teacher: Tensor) -> Tensor:
    r""":math:`\sum_i |\mathrm{sort}_\downarrow(s)_i - \mathrm{sort}_\downarrow(t)_i|` per row ``[N]`` of
    ``student`` ``[N, V_s]`` and ``teacher`` ``[N, V_t]``, the shorter padded with zeros to the longer."""
    size = max(student.shape[-1], teacher.shape[-1])
    student = F.pad(student.sort(dim=-1, descending=True).values, (0, size - student.shape[-1]))
    teacher = F.pad(teacher.sort(dim=-1, descending=True).values, (0, size - teacher.shape[-1]))
    return (student - teacher).abs().sum(dim=-1)


def uld_loss(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, temperature: float = 1.0
) -> Tensor:
    r"""Universal Logit Distillation (Boizard et al. 2024, arXiv:2402.12030), mean over valid positions.

    At each aligned position :math:`n`, with :math:`p_s = \mathrm{softmax}(z_s / T)` over the student's
    :math:`V_s` tokens and :math:`p_t = \mathrm{softmax}(z_t / T)` over the teacher's :math:`V_t`, let
    :math:`\tilde p` be a probability vector sorted in decreasing order and zero-padded to
    :math:`V = \max(V_s, V_t)` entries. Then

    .. math::
        \mathcal{L}_{\mathrm{ULD}} = \frac{1}{|\mathcal{N}|} \sum_{n \in \mathcal{N}}
            \sum_{i=1}^{V} \big| \tilde p_s^{(n)}(i) - \tilde p_t^{(n)}(i) \big|

    the closed form the paper derives for the Wasserstein-1 distance between the two distributions under
    a uniform transport cost, which makes it independent of which token is which (the loss is 0 whenever
    the student's distribution is a permutation of the teacher's). The per-position sum over the
    vocabulary and the mean over positions follow the authors' code; like the paper, no :math:`T^2` factor.

    Args:
        student_logits: ``[..., V_s]``, differentiated.
        teacher_logits: ``[..., V_t]`` with the same leading shape; detached. ``V_s != V_t`` is allowed.
        mask: bool ``[...]`` (the leading shape), True at positions to count; ``None`` counts all. No valid
            position gives a zero that is still part of the student's graph.
        temperature: :math:`T > 0`, applied to both sides.
    """
    temperature = check_positive(temperature, "temperature")
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "must have the same positions (all dimensions but the vocabulary)"
        )
    student = F.softmax(_tempered(student_logits, temperature), dim=-1).reshape(-1, student_logits.shape[-1])
    with torch.no_grad():
        teacher = F.softmax(_tempered(teacher_logits.detach(), temperature), dim=-1)
    per_position = _sorted_l1(student, teacher.reshape(-1, teacher_logits.shape[-1]))
    if mask is None:
        return per_position.mean() if per_position.numel() else per_position.sum()
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"mask {tuple(mask.shape)} must have the logits' leading shape {student_logits.shape[:-1]}")
    valid = mask.reshape(-1).to(torch.bool)
    return torch.where(valid, per_position, 0.0).sum() / valid.sum().clamp(min=1)


# ------------------------------------------------------------------------------------------------- GOLD
def span_log_probs(
    logits: Tensor, token_ids: Tensor | Sequence[int], spans: Sequence[range], temperature: float = 1.0
) -> Tensor:
    r"""Merged log-probabilities ``[K, V]`` of ``K`` token spans of one sequence (GOLD-style merging).

    For a span of tokens :math:`x_a \dots x_b` (``range(a, b + 1)``) and every vocabulary entry :math:`v`,

    .. math::
        \log q(v) = \sum_{j=a}^{b-1} \log p(x_j \mid x_{<j}) + \log p(v \mid x_{<b}),
        \qquad p = \mathrm{softmax}(z / T)

    the chain rule over the span's tokens with the last one left free: :math:`q(v)` is the model's
    probability of the span's text with its last token replaced by :math:`v`, given everything before
    the span, and :math:`q(x_b) = \prod_{j=a}^{b} p(x_j \mid x_{<j})` is the probability of the span's text.
    :math:`q` sums to the probability of the span's first :math:`b - a` tokens (1 for one-token spans).
    ``logits`` ``[T, V]`` and ``token_ids`` ``[T]`` follow the shift convention (row ``j`` predicts token
    ``j + 1``), so every span must start at token 1 or later. Computed in at least float32.
    """
    temperature = check_positive(temperature, "temperature")
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=logits.device)
    if logits.dim() != 2 or ids.shape != logits.shape[:1]:
        raise ValueError(f"logits {tuple(logits.shape)} must be [T, V] with one row per token id {tuple(ids.shape)}")
    for span in spans:
        if span.step != 1 or len(span) == 0 or span.start < 1 or span.stop > ids.numel():
            raise ValueError(
                f"span {span} must be a non-empty range of tokens 1..{ids.numel() - 1}: no logit row predicts "
                "token 0, so the aligned text must follow at least one token (a prompt or BOS)"
            )
    z = _tempered(logits, temperature)
    last_rows = torch.tensor([span.stop - 2 for span in spans], dtype=torch.long, device=z.device)
    merged = F.log_softmax(z.index_select(0, last_rows), dim=-1)
    inner = [(k, j) for k, span in enumerate(spans) for j in span[:-1]]
    if inner:
        owner, tokens = torch.tensor(inner, dtype=torch.long, device=z.device).unbind(1)
        rows = z.index_select(0, tokens - 1)
        token_log_probs = rows.gather(1, ids[tokens, None]).squeeze(1) - torch.logsumexp(rows, dim=-1)
        prefix = merged.new_zeros(len(spans)).index_add(0, owner, token_log_probs)
        merged = merged + prefix[:, None]
    return merged


def gold_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_ids: Tensor | Sequence[int],
    teacher_ids: Tensor | Sequence[int],
    spans: Sequence[AlignedSpan],
    mapping: VocabMapping,
    temperature: float = 1.0,
    matched_weight: float = 1.0,
    unmatched_weight: float = 1.0,
) -> Tensor:
    r"""The cross-tokenizer GOLD loss of one sequence: a divergence on shared tokens, ULD on the rest.

    Inputs: the student's logits ``[T_s, V_s]`` and token ids ``[T_s]``, the teacher's ``[T_t, V_t]`` and
    ``[T_t]`` (shift convention: row ``j`` predicts token ``j + 1``), the aligned ``spans`` of
    :func:`align_spans` (every span starting at token 1 or later on both sides) and the
    :class:`VocabMapping` of the two vocabularies (widths ``V_s``, ``V_t``).

    What is computed, for each aligned span :math:`k`:

    1. Merged vectors :math:`q^s_k \in \mathbb{R}^{V_s}`, :math:`q^t_k \in \mathbb{R}^{V_t}` by
       :func:`span_log_probs` (at temperature :math:`T`): the distribution that predicts the span's last
       token, times the probability of the span's earlier tokens, so that both models' entries for a
       token :math:`v` are probabilities of the same string (the span's text up to its last token, then
       :math:`v`) after the same preceding text, whatever the tokenisation.
    2. On the :math:`M` shared pairs :math:`(i_m, j_m)`, the generalised KL divergence (I-divergence,
       a KL for vectors that need not sum to 1; it is the forward KL when both do)

       .. math:: D_k = T^2 \sum_m q^t_k(j_m) \log\frac{q^t_k(j_m)}{q^s_k(i_m)} - q^t_k(j_m) + q^s_k(i_m)

    3. On the unmatched ids :math:`U_s`, :math:`U_t`, ULD (see :func:`uld_loss`) of the merged masses:
       :math:`U_k = \sum_i |\mathrm{sort}_\downarrow(q^s_k[U_s])_i - \mathrm{sort}_\downarrow(q^t_k[U_t])_i|`,
       zero-padded to the longer.

    Returns :math:`\frac{1}{K} \sum_k w_m D_k + w_u U_k` (``matched_weight``, ``unmatched_weight``); no
    span gives a zero in the student's graph. With one tokenizer for both models (every span one token,
    every id shared) this is the mean forward KL :math:`T^2\,\mathrm{KL}(p_t \| p_s)` of the positions that
    predict the spans' tokens.

    Differences from TRL's ``ULDLoss`` (hybrid mode): TRL multiplies the distribution predicting a span's
    *first* token by the probabilities of its later tokens (an approximation for tokens other than the
    actual first one, as its docstring notes) and reads each token's probability from the row at the
    token's own position; here the free token is the last one, so every entry is an exact string
    probability, and rows follow the shift convention. TRL uses a generalised JSD on the shared part with
    adaptive weights (shared count / teacher vocabulary) by default and compares raw token strings; here
    the I-divergence (:math:`T^2`-scaled, like :mod:`kd_lightning.llm.divergences`), fixed weights and
    normalised strings (:func:`normalize_token`).
    """
    if student_logits.shape[-1] != mapping.student_size or teacher_logits.shape[-1] != mapping.teacher_size:
        raise ValueError(
            f"logit widths (student {student_logits.shape[-1]}, teacher {teacher_logits.shape[-1]}) differ from "
            f"the vocabulary mapping ({mapping.student_size}, {mapping.teacher_size}); build the VocabMapping "
            "with student_size / teacher_size set to the models' output sizes"
        )
    if not spans:
        return at_least_fp32(student_logits).sum() * 0.0
    student = span_log_probs(student_logits, student_ids, [s for s, _ in spans], temperature)
    with torch.no_grad():
        teacher = span_log_probs(teacher_logits.detach(), teacher_ids, [t for _, t in spans], temperature)
    device = student.device
    log_s = student.index_select(1, mapping.student_ids.to(device))
    log_t = teacher.index_select(1, mapping.teacher_ids.to(device))
    p_t = log_t.exp()
    log_ratio = torch.where(p_t > 0, log_t - log_s, 0.0)
    matched = (p_t * log_ratio - p_t + log_s.exp()).sum(dim=-1) * temperature**2
    unmatched = _sorted_l1(
        student.index_select(1, mapping.student_unmatched.to(device)).exp(),
        teacher.index_select(1, mapping.teacher_unmatched.to(device)).exp(),
    )
    return (matched_weight * matched + unmatched_weight * unmatched).mean()
