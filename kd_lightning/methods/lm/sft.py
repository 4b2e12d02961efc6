"""Supervised fine-tuning of the student alone (``llm/method=sft``): black-box sequence-level KD."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.divergences import ForwardKL
from kd_lightning.llm.protocol import TokenLoss
from kd_lightning.llm.token_loss import TokenDistillationLoss
from kd_lightning.methods.base import OptimizerFactory, SchedulerFactory
from kd_lightning.methods.lm.base import LMMethod


class SFT(LMMethod):
    r"""The student trained alone on the data's completions, the LM twin of ``method=supervised``:

    .. math:: L = \frac{1}{N} \sum_{i \in \mathrm{valid}} \mathrm{CE}(z_s^i, y_i)

    On teacher-written text (``llm/data=teacher_text``, ``kd-llm-generate`` output, optionally verified)
    this is black-box sequence-level KD (Kim & Rush 2016) and rejection-sampling distillation of
    reasoning traces (DeepSeek-AI 2025, the R1 distilled models); on reference text, the no-teacher
    baseline. The teacher never runs in training; when it shares the student's tokenizer it is kept to
    report ``val/kl_to_teacher``. ``llm.loss`` is not read.

    Args:
        chunk_size: tokens per chunk of logits (memory); vocab_size: the tokenizer's size (heads padded
            beyond it are sliced; set by ``kd-llm-distill``).
    """

    scheme = "sft"

    teacher_range = (0, 1)
    takes_logit_cache = False
    uses_loss = False
    takes_hidden = False

    def __init__(
        self,
        student: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        teacher: nn.Module | None = None,
        lora: Mapping[str, Any] | None = None,
        save_teacher: bool = False,
        nonfinite: str = "error",
        nonfinite_check_every: int | str = "auto",
        chunk_size: int | None = 512,
        vocab_size: int | None = None,
    ) -> None:
        objective = TokenDistillationLoss(ForwardKL(), alpha=0.0, chunk_size=chunk_size, vocab_size=vocab_size)
        super().__init__(
            student,
            objective,
            optimizer,
            scheduler,
            teacher=teacher,
            lora=lora,
            save_teacher=save_teacher,
            nonfinite=nonfinite,
            nonfinite_check_every=nonfinite_check_every,
        )

    @classmethod
    def check_config(cls, loss: TokenLoss | None, teachers: Sequence[str], cached: bool, remote: bool) -> None:
        if cached:
            raise ConfigError("llm/method=sft never runs the teacher: set llm/teacher_cache=none")
        super().check_config(None, teachers, cached, remote)
