"""Several LM teachers for one student (``llm/method=multi_teacher``): per-row routing or per-token mixtures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn
from torchmetrics import MeanMetric

from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.protocol import TokenLoss
from kd_lightning.llm.teacher_combinations import TeacherCombination, select_rows
from kd_lightning.llm.tokens import TokenLossOutput, final_hidden_states, sequence_inputs
from kd_lightning.methods.lm.base import Batch
from kd_lightning.methods.lm.on_policy import OnPolicy


class MultiTeacher(OnPolicy):
    r"""Distils several frozen teachers (``llm.teacher.teachers``) combined by ``llm.teacher.combine``.

    - :class:`~kd_lightning.llm.teacher_combinations.RowRouting` (TRL's multi-teacher distillation): each row is
      distilled from the teacher it names, each teacher with its own loss (teachers may differ in size and,
      with a cross-tokenizer loss, in tokenizer).
    - :class:`~kd_lightning.llm.teacher_combinations.TokenMixture` (ensemble distillation, Fukuda et al. 2017):
      the student fits :math:`p_{mix} = \sum_k w_k\, p_k` token by token (one shared tokenizer).

    ``lmbda > 0`` samples that fraction of batches from the student, as :class:`OnPolicy` (rows keep
    their teachers). Logged besides the base metrics: ``train/loss_distill/<teacher>``,
    ``val/kl_to_teacher/<teacher>``.

    Args:
        teachers: the frozen teachers by name; combination: how they combine; losses: one token loss per
            teacher (default: ``loss`` for all); lmbda, generation: as :class:`OnPolicy` (``lmbda`` in [0, 1]).
    """

    scheme = "multi_teacher"

    teacher_range = (1, None)
    takes_served_teacher = False
    takes_hidden = False
    lmbda_range = (0.0, 1.0, True)

    def __init__(
        self,
        *args: Any,
        teachers: Mapping[str, nn.Module] | None = None,
        combination: TeacherCombination | None = None,
        losses: Mapping[str, TokenLoss] | None = None,
        lmbda: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if not teachers or combination is None:
            raise ConfigError(
                "llm/method=multi_teacher needs several teachers and how to combine them: llm.teacher.teachers "
                "and llm.teacher.combine (e.g. llm/teacher=routed_tiny)"
            )
        super().__init__(*args, teachers=teachers, lmbda=lmbda, **kwargs)
        self.combination = combination
        combination.bind(list(self.teachers))
        self.losses = nn.ModuleDict(dict(losses) if losses else dict.fromkeys(self.teachers, self.loss))
        self.val_teacher_kl = nn.ModuleDict({name: MeanMetric() for name in self.teachers})

    @classmethod
    def check_config(cls, loss: TokenLoss | None, teachers: Sequence[str], cached: bool, remote: bool) -> None:
        if remote:
            raise ConfigError(f"llm.teacher.teachers: {list(teachers)} must be in-process models, not remote")
        super().check_config(loss, teachers, cached, remote)

    @classmethod
    def metric_names(cls, loss: nn.Module | None, teachers: Sequence[str]) -> set[str]:
        own = {f"val/kl_to_teacher/{name}" for name in teachers} | {f"train/loss_distill/{n}" for n in teachers}
        return super().metric_names(loss, teachers) | own

    def loss_on(self, batch: Batch, monitor_kl: bool = False) -> TokenLossOutput:
        hidden = final_hidden_states(self.student, *sequence_inputs(batch))
        head = self.student.get_output_embeddings()
        return self.combination.loss(hidden, head, batch, self.teachers, self.losses, monitor_kl)

    def head_models(self, batch: Batch) -> dict[str, tuple[nn.Module, Batch, Any]]:
        models: dict[str, tuple[nn.Module, Batch, Any]] = {"llm.student.model": (self.student, batch, None)}
        for index, (name, teacher) in enumerate(self.teachers.items()):
            rows = batch
            if "teacher_index" in batch:
                routed = (batch["teacher_index"] == index).nonzero().squeeze(1)
                if routed.numel() == 0:
                    continue  # no row for this teacher yet
                rows = select_rows(batch, routed)
            models[f"llm.teacher.teachers.{name}.model"] = (teacher, rows, self.losses[name])
        return models
