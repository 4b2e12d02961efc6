r"""DistiLLM-2's contrastive objective (Ko et al., "DistiLLM-2: A Contrastive Approach Boosts the
Distillation of LLMs", ICML 2025, arXiv:2503.07067).

.. math::
    L = \frac{1}{N}\Big[\sum_{i \in y_t} \mathrm{SKL}_\beta\big(p_t^i \,\|\, p_s^i\big)
        + w \sum_{i \in y_s} \mathrm{SRKL}_\beta\big(p_t^i \,\|\, p_s^i\big)\Big]

skew KL (:class:`~kd_lightning.llm.divergences.SkewKL`) on the teacher's responses :math:`y_t` (the
dataset's completions: ``kd-llm-generate`` output) pulls the student up where the teacher puts mass;
skew reverse KL (:class:`~kd_lightning.llm.divergences.SkewReverseKL`) on the student's own responses
:math:`y_s` pushes it down where the teacher does not, :math:`N` counting the tokens of both. The
student's responses are generated once, by the student before training, and cached
(:func:`student_responses`), as the paper does per round. Optional cross-entropy on the teacher's
responses: ``alpha < 1``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from kd_lightning.engine.caching.store import weights_digest
from kd_lightning.engine.errors import ConfigError, check_type
from kd_lightning.engine.weights import in_mode
from kd_lightning.llm.divergences import SkewKL, SkewReverseKL
from kd_lightning.llm.generation import GenerationSettings, generate_file
from kd_lightning.llm.prompts import Prompt, prompt_id
from kd_lightning.llm.protocol import SUPERVISED_SOURCES, TokenSource
from kd_lightning.llm.records import read_records
from kd_lightning.llm.token_loss import TokenDistillationLoss
from kd_lightning.llm.tokens import TokenLossOutput

#: Batch-key prefix of the student's own responses.
SAMPLED = "sampled_"


class DistiLLM2Loss(nn.Module):
    """The two-sided objective of the module docstring as one :class:`~kd_lightning.llm.protocol.TokenLoss`:
    a batch of the teacher's responses (ground truth or teacher-written tokens) is scored by the skew KL
    side, a batch of the student's own responses (``source=STUDENT``) by the skew reverse KL side, times
    ``student_weight``. :class:`~kd_lightning.methods.lm.DistiLLM2` feeds it both batches of each step.

    Args:
        skew: :math:`\\beta` of both skew divergences (the paper: 0.1).
        student_weight: :math:`w`, the weight of the student-response side.
        alpha: weight of the divergence against cross-entropy on the teacher's responses (1: none; the
            cross-entropy never reads the student's responses).
        temperature, chunk_size, vocab_size: as :class:`~kd_lightning.llm.token_loss.TokenDistillationLoss`.
    """

    cross_tokenizer = False
    reads_top_k = False  # its skewed mixtures need the teacher's full distribution
    needs_teacher = True
    reads: ClassVar[Mapping[str, frozenset[TokenSource]]] = {
        "ce": SUPERVISED_SOURCES,
        "teacher_responses": SUPERVISED_SOURCES,
        "student_responses": frozenset({TokenSource.STUDENT}),
    }

    def __init__(
        self,
        skew: float = 0.1,
        student_weight: float = 1.0,
        alpha: float = 1.0,
        temperature: float = 1.0,
        chunk_size: int | None = 512,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        check_type(student_weight, (int, float), "llm.method.loss.student_weight")
        if not student_weight >= 0:
            raise ConfigError(f"llm.method.loss.student_weight={student_weight} must be >= 0")
        self.teacher_side = TokenDistillationLoss(SkewKL(skew, temperature), alpha, chunk_size, vocab_size)
        self.student_side = TokenDistillationLoss(SkewReverseKL(skew, temperature), 1.0, chunk_size, vocab_size)
        self.student_weight = float(student_weight)

    @property
    def temperature(self) -> float:
        return self.teacher_side.temperature

    @property
    def vocab_size(self) -> int | None:
        return self.teacher_side.vocab_size

    @vocab_size.setter
    def vocab_size(self, value: int | None) -> None:
        self.teacher_side.vocab_size = self.student_side.vocab_size = value

    def shared_vocab(self, student_vocab: int, teacher_vocab: int | None) -> int:
        return self.teacher_side.shared_vocab(student_vocab, teacher_vocab)

    def teacher_tokens(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, ...]:
        return self.teacher_side.teacher_tokens(batch)

    def alignment(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {}

    def forward(
        self,
        student_hidden: Tensor,
        student_head: nn.Module,
        labels: Tensor,
        source: TokenSource = TokenSource.GROUND_TRUTH,
        monitor_kl: bool = False,
        **teacher: Any,
    ) -> TokenLossOutput:
        """The side that reads ``source``: sums as :class:`~kd_lightning.llm.token_loss.TokenLossOutput`, with
        ``parts["distill/<side>"]`` naming it."""
        side = next(name for name in ("teacher_responses", "student_responses") if source in self.reads[name])
        loss, weight = (
            (self.teacher_side, 1.0) if side == "teacher_responses" else (self.student_side, self.student_weight)
        )
        out = loss(student_hidden, student_head, labels, monitor_kl=monitor_kl, source=source, **teacher)
        parts = {**out.parts, f"distill/{side}": out.parts["distill"]}
        return TokenLossOutput(total=weight * out.total, count=out.count, parts=parts)


def student_responses(
    student: nn.Module, tokenizer: Any, prompts: Sequence[str], settings: GenerationSettings, cache_dir: Path
) -> dict[str, str]:
    """``{prompt: the student's response}``, generated once per student (weights digest), prompts and
    settings into a resumable JSONL under ``cache_dir``, then read back."""
    unique = list(dict.fromkeys(prompts))
    key = json.dumps([weights_digest(student), unique, settings.__dict__], sort_keys=True, default=str)
    path = Path(cache_dir) / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.jsonl"
    with in_mode(student):  # generate_file switches to eval mode; training resumes as it was
        prompts = [Prompt(prompt_id(text), text, "prompt") for text in unique]
        generate_file(student, tokenizer, prompts, path, settings, progress=False)
    return {record["prompt"]: record["completion"] for record in read_records(path)}
