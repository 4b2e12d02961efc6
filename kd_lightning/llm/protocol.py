"""What an LM token loss declares to the method that runs it, and where a batch's tokens came from.

A batch carries ``token_source`` (a :class:`TokenSource`): its labelled tokens are the dataset's ground
truth, text a teacher wrote, or tokens the student sampled itself. Each term of a token loss declares in
:attr:`TokenLoss.reads` which sources it may read; the loss applies a term only to batches of those
sources. Cross-entropy on the student's own samples would train the student to imitate itself
(self-reinforcement, not distillation), so no shipped loss lets its ``ce`` term read
:attr:`TokenSource.STUDENT`: on-policy batches contribute the divergence only, whatever ``alpha``.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

#: Batch key of the batch's token source.
SOURCE_KEY = "token_source"


class TokenSource(str, Enum):
    """Where the labelled tokens of a batch came from."""

    GROUND_TRUTH = "ground_truth"  # reference completions of the dataset
    TEACHER = "teacher"  # completions a teacher wrote (kd-llm-generate, a served teacher)
    STUDENT = "student"  # completions the student sampled (on-policy, DistiLLM-2's student side)


#: The sources a supervised term (cross-entropy on the labels) may read.
SUPERVISED_SOURCES = frozenset({TokenSource.GROUND_TRUTH, TokenSource.TEACHER})
#: Every source: a divergence to the teacher is defined on any tokens the teacher scores.
ANY_SOURCE = frozenset(TokenSource)


def batch_source(batch: Mapping[str, Any]) -> TokenSource:
    """The batch's :class:`TokenSource`; a batch without one holds dataset text (ground truth)."""
    return TokenSource(batch.get(SOURCE_KEY, TokenSource.GROUND_TRUTH))


@runtime_checkable
class TokenLoss(Protocol):
    """The call shape and declarations of an LM token loss (:class:`~kd_lightning.llm.token_loss.TokenDistillationLoss`,
    :class:`~kd_lightning.llm.cross_token_loss.CrossTokenizerLoss`), so a method routes without probing.

    - ``needs_teacher``: training reads teacher outputs (False: the teacher never runs in training).
    - ``cross_tokenizer``: the teacher reads its own tokenisation of the batch (``teacher_*`` keys).
    - ``reads_top_k``: the teacher may come as top-k rows (a logit cache, a served teacher).
    - ``reads``: term name -> the token sources it may read (see the module docstring).
    - ``temperature``, ``vocab_size``: the distributions compared (``vocab_size`` null: the heads' width).
    - ``__call__(student_hidden, student_head, labels, *, source, monitor_kl, **teacher)``: sums over the
      valid tokens (:class:`~kd_lightning.llm.token_loss.TokenLossOutput`); terms whose ``reads`` exclude
      ``source`` contribute nothing.
    """

    needs_teacher: bool
    cross_tokenizer: bool
    reads_top_k: bool
    reads: Mapping[str, frozenset[TokenSource]]
    temperature: float

    def teacher_tokens(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, ...]: ...

    def alignment(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]: ...

    def __call__(self, student_hidden: Tensor, student_head: Any, labels: Tensor, **kwargs: Any) -> Any: ...
