"""DistiLLM-2 (``llm/method=distillm2``): contrastive distillation on teacher and student responses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from torch import nn

from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.distillm2_loss import SAMPLED, DistiLLM2Loss, student_responses
from kd_lightning.llm.generation import checked_settings
from kd_lightning.llm.protocol import SOURCE_KEY, TokenLoss, TokenSource
from kd_lightning.llm.teacher_combinations import add_parts
from kd_lightning.llm.tokens import TokenLossOutput
from kd_lightning.methods.lm.base import Batch, LMMethod


class DistiLLM2(LMMethod):
    r"""DistiLLM-2 (Ko et al., ICML 2025, arXiv:2503.07067).

    .. math::
        L = \frac{1}{N}\Big[\sum_{i \in y_t} \mathrm{SKL}_\beta(p_t^i \| p_s^i)
            + w \sum_{i \in y_s} \mathrm{SRKL}_\beta(p_t^i \| p_s^i)\Big]

    on the teacher's responses :math:`y_t` (the dataset's completions, ``kd-llm-generate`` output) and the
    student's own responses :math:`y_s` to the same prompts, generated once by the student before training
    (``generation``) and cached, as the paper does per round. The objective is
    :class:`~kd_lightning.llm.distillm2_loss.DistiLLM2Loss` (``llm.method.loss``: ``skew`` = the paper's
    beta, ``student_weight`` = w, ``alpha`` < 1 adds cross-entropy on the teacher's responses only).
    One live teacher of the student's tokenizer.
    """

    scheme = "distillm2"

    takes_logit_cache = False
    takes_served_teacher = False
    takes_hidden = False

    def __init__(self, *args: Any, generation: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        defaults = {"max_new_tokens": 64, "do_sample": True}
        self.generation = checked_settings({**defaults, **(generation or {})}, "llm.method.generation")

    @classmethod
    def check_config(cls, loss: TokenLoss | None, teachers: Sequence[str], cached: bool, remote: bool) -> None:
        if loss is not None and not isinstance(loss, DistiLLM2Loss):
            raise ConfigError(
                f"llm/method=distillm2 runs its own objective (llm.method.loss: DistiLLM2Loss), not "
                f"{type(loss).__name__}; leave llm.method.loss as shipped"
            )
        super().check_config(loss, teachers, cached, remote)

    def before_fit(self, datamodule: L.LightningDataModule, tokenizer: Any, cache_dir: Any) -> None:
        """The student's own response to every training prompt, generated once and batched beside the
        teacher's (``sampled_*`` keys)."""
        datamodule.setup()
        responses = student_responses(
            self.student, tokenizer, datamodule.prompts["train"], self.generation, Path(cache_dir) / "distillm2"
        )
        datamodule.add_student_responses(responses, prefix=SAMPLED)

    def loss_on(self, batch: Batch, monitor_kl: bool = False) -> TokenLossOutput:
        """Each side on its own sequences (validation batches hold the teacher's responses only)."""
        outputs = [self.one_loss(self.loss, batch, monitor_kl)]
        if f"{SAMPLED}input_ids" in batch:
            view = {key[len(SAMPLED) :]: value for key, value in batch.items() if key.startswith(SAMPLED)}
            outputs.append(self.one_loss(self.loss, {**view, SOURCE_KEY: TokenSource.STUDENT.value}, False))
        elif self.training:
            raise ConfigError("llm/method=distillm2 needs sampled_* keys in training batches (the student's responses)")
        parts: dict[str, Any] = {}
        for out in outputs:
            add_parts(parts, out.parts)
        return TokenLossOutput(
            total=sum(out.total for out in outputs), count=sum(out.count for out in outputs), parts=parts
        )

    @classmethod
    def metric_names(cls, loss: nn.Module | None, teachers: Sequence[str]) -> set[str]:
        sides = {"train/loss_distill/teacher_responses", "train/loss_distill/student_responses"}
        return super().metric_names(loss, teachers) | sides
